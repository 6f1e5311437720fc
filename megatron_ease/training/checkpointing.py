"""Atomic, resumable megatron-core distributed checkpoints.

Layout of ``checkpoint.dir``::

    latest                     "iter_0000040": written last, by atomic replace
    iter_0000040/              megatron-core dist_checkpointing (torch_dist): model tensors under
                               "model." (as tools/convert_hf_checkpoint.py writes them), optimizer
      trainer_state.json       step, LR scheduler, anything JSON the trainer adds (rank 0)
      rank_state/rank_00003.json  per-rank state: RNG streams, data reader position
    .tmp_iter_0000050/         a save in progress (or one killed mid-write): never read
    .deleting_iter_0000030.1f2e3d4c/  an old checkpoint being deleted: never read

Every rank writes into ``.tmp_iter_N``; after a barrier rank 0 renames it to ``iter_N`` (atomic on
one filesystem) and only then points ``latest`` at it, so a checkpoint interrupted mid-write is
never picked up. Each of these steps ends in a barrier that also agrees on failures: a rank
that fails one (a full disk, a refused rename) raises, and so does every other rank, instead of
waiting for the collective timeout. Old checkpoints beyond ``keep_last`` are removed once the save is complete on
every rank: renamed out of the ``iter_*`` namespace (one metadata operation each, so a kill
mid-delete never leaves a half-deleted ``iter_*``) and deleted by a background thread on rank 0.
Deleting ~100 GB can take longer than the collective timeout on a slow filesystem; no rank waits
for it, and what a killed run left half-deleted is finished by the next run's first save. Nothing
is pickled by us: trainer and rank state are JSON (RNG states base64-encoded).

So ``model.init_from`` and ``convert_hf_checkpoint.py megatron-to-hf`` read a trainer checkpoint
directory as they read a converted one (``megatron_ease.models.qwen_vl.checkpoint``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_ease.training.preemption import protect_checkpoint_writer

logger = logging.getLogger(__name__)

LATEST = "latest"
MODEL_PREFIX = "model."
_STEP_DIR = re.compile(r"^iter_(\d{7,})$")
_DISCARDED = ".deleting_"  # prefix of a folder that is being deleted in the background


def step_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


@contextlib.contextmanager
def _all_ranks_agree(what: str):
    """A barrier after the block that also agrees on whether it worked: when the block raises
    on some ranks, every rank raises (the failing ones their own error, the others one naming
    the lowest failing rank). A rank raising alone between a save's barriers (a full disk, a
    rename refused) left the others waiting for the collective timeout, 10+ minutes of a job
    that had already failed."""
    error = None
    try:
        yield
    except Exception as e:  # re-raised by _agree, once the others know
        error = e
    _agree(error, what)


def _agree(error: Optional[BaseException], what: str) -> None:
    """Collective over the default group (a barrier): raise ``error`` on its rank, and on the
    others an error naming the lowest rank that failed ``what``."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from megatron_ease.distributed import all_reduce_

        world = torch.distributed.get_world_size()
        failed = all_reduce_(torch.tensor([float(world if error is None else _rank())],
                                          dtype=torch.float64),
                             op=torch.distributed.ReduceOp.MIN)
        if error is None and failed.item() < world:
            raise RuntimeError(f"rank {int(failed.item())} failed while {what} (its error is in "
                               f"its log); this rank stops too")
    if error is not None:
        raise error


def _layout() -> Optional[dict]:
    """This process's parallel layout (sizes), as checkpoints record it; None without
    megatron-core's groups."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def write_atomic(path: str, text: str) -> None:
    """``text`` to ``path`` through a synced temporary file and a rename: a reader sees the old
    file or the whole new one, and after a node crash too (the directory holding the new name is
    synced before this returns)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def _read_json(path: str) -> dict:
    """A checkpoint's JSON file; a missing or unreadable one is an error naming it (json's own
    errors name neither the file nor the checkpoint)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise RuntimeError(f"{path}: cannot read this checkpoint file ({e}); the checkpoint "
                           f"is incomplete or corrupt: point checkpoint.dir's {LATEST} at an "
                           f"earlier iter_* folder, or start afresh") from e


def fsync_dir(path: str) -> None:
    """Persist a directory's entries (renames in it): a rename is atomic, but only durable
    once its directory is synced; a node crash could otherwise bring back the old name. (Given
    a file, its data.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def latest_checkpoint(directory: Optional[str]) -> Optional[str]:
    """The step dir ``latest`` names, or None when there is no complete checkpoint yet."""
    if not directory:
        return None
    pointer = os.path.join(directory, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, "rb") as f:
        # Bytes decoded leniently: a garbled pointer gets the error below, which names it.
        name = f.read().decode("utf-8", errors="replace").strip()
    path = os.path.join(directory, name)
    if not _STEP_DIR.match(name) or not os.path.isdir(path):
        # The one way our saves leave this: killed between moving a re-saved step's previous
        # version aside and renaming the new one in. That previous version is complete.
        # Only complete ones: an earlier kill may have left a half-deleted one beside it.
        aside = sorted(n for n in os.listdir(directory) if n.startswith(f"{_DISCARDED}{name}.")
                       and os.path.isfile(os.path.join(directory, n, "trainer_state.json")))
        hint = (f"; a save that replaced it was interrupted and its previous version is "
                f"{' or '.join(os.path.join(directory, n) for n in aside)}: rename that back to "
                f"{path} to resume from it" if aside and _STEP_DIR.match(name) else "")
        raise RuntimeError(f"{pointer} names {name!r}, which is not a checkpoint in {directory}"
                           f"{hint}; point it at an existing iter_* folder or remove it to start "
                           f"afresh")
    return path


def rng_state() -> dict:
    """This rank's RNG streams as JSON: torch CPU (+ CUDA), megatron's tracker, numpy, random."""
    from megatron.core import tensor_parallel

    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()

    tracker = tensor_parallel.get_cuda_rng_tracker()
    state = {
        "torch": b64(torch.get_rng_state()),
        "tracker": {k: b64(v) for k, v in tracker.get_states().items()
                    if isinstance(v, torch.Tensor)},
        "numpy": _jsonable(np.random.get_state()),
        "random": _jsonable(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = b64(torch.cuda.get_rng_state())
    return state


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(o) for o in obj]
    return obj


def _from_jsonable(obj):
    if isinstance(obj, dict) and "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if isinstance(obj, list):
        return tuple(_from_jsonable(o) for o in obj)
    return obj


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    def unb64(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(unb64(state["cuda"]))
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.set_states({k: unb64(v) for k, v in state["tracker"].items()})
    np.random.set_state(_from_jsonable(state["numpy"]))
    random.setstate(_from_jsonable(state["random"]))


# Megatron-LM's default: each DP rank writes its own optimizer shard, in parallel, with no
# gather; resuming at another DP size works, at another TP/PP it needs "fully_reshardable".
OPTIMIZER_SHARDING = "dp_reshardable"


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(opt, DistributedOptimizer)
               for opt in getattr(optimizer, "chained_optimizers", [optimizer]))


def _check_optimizer_layout(path: str, meta: dict, optimizer) -> None:
    """Refuse, on every rank alike, optimizer state this run cannot load, instead of failing deep
    inside torch.distributed.checkpoint's planning (a ``CheckpointException``: a BaseException,
    naming optimizer buckets, not the cause). Megatron-core's optimizer state saved with and
    without the distributed optimizer differ in structure; the distributed optimizer's
    (``OPTIMIZER_SHARDING``) reshards across data-parallel sizes only. The plain one's is per
    parameter and loads at any TP / PP."""
    distributed = _is_distributed_optimizer(optimizer)
    fresh = (f"or start a new run from its weights with a fresh optimizer: model.init_from={path} "
             f"checkpoint.dir=<a new directory> (not this one, whose checkpoints the new run's "
             f"saves would replace and prune)")
    saved_distributed = meta.get("distributed_optimizer")
    if saved_distributed is not None and saved_distributed != distributed:
        raise RuntimeError(
            f"{path} holds optimizer state saved with parallel.use_distributed_optimizer="
            f"{str(saved_distributed).lower()}; this run has {str(distributed).lower()}. Resume "
            f"with parallel.use_distributed_optimizer={str(saved_distributed).lower()}, {fresh}")
    saved, current = meta.get("layout"), _layout()
    if not distributed or not saved or not current:
        return
    tp, pp = saved.get("tp", current["tp"]), saved.get("pp", current["pp"])
    if (tp, pp) != (current["tp"], current["pp"]):
        raise RuntimeError(
            f"{path} holds distributed-optimizer state saved at tensor-parallel size {tp} and "
            f"pipeline-parallel size {pp}; this run has {current['tp']} and {current['pp']}, and "
            f"that state ({OPTIMIZER_SHARDING}) reshards across data-parallel sizes only. Resume "
            f"with parallel.tensor_model_parallel_size={tp} "
            f"parallel.pipeline_model_parallel_size={pp}, {fresh}")


def _sharded_state(model_chunks: Sequence[torch.nn.Module], optimizer, is_loading: bool) -> dict:
    from megatron.core.utils import unwrap_model

    metadata = {"distrib_optim_sharding_type": OPTIMIZER_SHARDING}
    state = {}
    # The bare modules' keys (no DDP "module." prefix): the checkpoint does not depend on how
    # the model was wrapped for training, and the HF exporter reads the same names.
    for i, chunk in enumerate(unwrap_model(list(model_chunks))):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        state[key] = chunk.sharded_state_dict(prefix=key + ".", metadata=metadata)
    if optimizer is not None:
        model_sd = state["model"] if len(model_chunks) == 1 else dict(state)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=metadata)
    return state


def _optimizer_has_state(optimizer) -> bool:
    return any(len(getattr(opt, "optimizer", None).state) > 0
               for opt in getattr(optimizer, "chained_optimizers", [optimizer])
               if getattr(opt, "optimizer", None) is not None)


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh DistributedOptimizer its Adam state before a load.

    Without apex/TE (CPU; torch's Adam) ``DistributedOptimizer.state_dict`` reads the ``step`` of
    existing Adam states and asserts there is one, which a never-stepped optimizer lacks. Loading
    overwrites every value, so megatron-core's own dummy initialisation (a zero-grad step) is
    enough.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Set every Adam state's ``step`` from the loaded param groups, one tensor per state.

    megatron-core 0.16.1's DistributedOptimizer on the torch-Adam path (no apex/TE) keeps the step
    in its param groups; load_state_dict copies it into the per-parameter states only when those
    are empty (ours were materialised) and then as one tensor shared by every parameter, which
    torch's Adam increments in place once per parameter.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in (inner.param_groups if inner is not None else ()):
            for param in group["params"]:
                state = inner.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor) and "step" in group:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32,
                                                 device=state["step"].device)


class CheckpointManager:
    """Save/resume for the trainer; every method is collective over the default group."""

    def __init__(self, directory: str, keep_last: int = 2):
        if not directory:
            raise ValueError("checkpoint.dir is not set")
        self.directory = directory
        self.keep_last = keep_last
        self._reported_later: set[str] = set()  # another run's later checkpoints, warned once
        # Rank 0's background deletion: folders still to delete (the first one is being
        # deleted), and the thread doing it while there are any.
        self._lock = threading.Lock()
        self._to_delete: list[str] = []
        self._deleter: Optional[threading.Thread] = None

    def latest(self) -> Optional[str]:
        return latest_checkpoint(self.directory)

    def resolve_latest(self) -> Optional[str]:
        """Collective: the checkpoint ``latest`` names as rank 0 reads it, on every rank.

        Each rank reading the pointer itself could resume different steps (a shared filesystem
        may show a node a stale ``latest``: diverged replicas, then a hang), or one rank could
        find none and wait alone in a collective. Raises on every rank when rank 0 cannot read
        the pointer or some rank does not see the checkpoint it names."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return self.latest()
        from megatron_ease.distributed import all_reduce_

        error, step = None, -3.0  # rank 0's answer wins the MAX: -2 error, -1 none, else step
        if _rank() == 0:
            try:
                path = self.latest()
                step = -1.0 if path is None else float(_STEP_DIR.match(
                    os.path.basename(path)).group(1))
            except Exception as e:  # OSError (ESTALE, EIO) too: the others wait below
                error, step = e, -2.0
        agreed = all_reduce_(torch.tensor([step], dtype=torch.float64),
                             op=torch.distributed.ReduceOp.MAX)
        if agreed.item() == -2.0:
            raise error if error is not None else RuntimeError(
                f"rank 0 could not read {os.path.join(self.directory, LATEST)} (its error is "
                f"in rank 0's log)")
        if agreed.item() == -1.0:
            return None
        path = os.path.join(self.directory, step_dir_name(int(agreed.item())))
        seen = os.path.isfile(os.path.join(path, "trainer_state.json"))
        missing = all_reduce_(torch.tensor([0.0 if seen else 1.0], dtype=torch.float64),
                              op=torch.distributed.ReduceOp.MAX)
        if missing.item() > 0:
            raise RuntimeError(
                f"{path} (named by rank 0's {LATEST}) is not visible on every rank"
                f"{'' if seen else f' (rank {_rank()} does not see it)'}: checkpoint.dir must "
                f"be on a filesystem that all nodes share")
        return path

    def save(self, step: int, model_chunks: Sequence[torch.nn.Module], optimizer=None,
             scheduler=None, trainer_state: Optional[dict] = None,
             rank_state: Optional[dict] = None) -> str:
        from megatron.core import dist_checkpointing

        final = os.path.join(self.directory, step_dir_name(step))
        tmp = os.path.join(self.directory, ".tmp_" + step_dir_name(step))
        started = time.monotonic()
        with _all_ranks_agree(f"preparing checkpoint folder {tmp}"):
            if _rank() == 0:
                os.makedirs(self.directory, exist_ok=True)
                if self._to_delete:
                    logger.warning("%d old checkpoint folder(s) in %s are still being deleted: "
                                   "deleting is slower than the checkpoint interval, the "
                                   "filesystem may fill up", len(self._to_delete),
                                   self.directory)
                for stale in os.listdir(self.directory):
                    if stale.startswith(".tmp_iter_"):  # left by a save that was killed
                        self._discard(stale)
                self._delete_discarded()  # these, and what a killed run left half-deleted
                os.makedirs(tmp)
        protect_checkpoint_writer()  # megatron-core's writer must outlive Slurm's USR1 / TERM
        # A never-stepped optimizer has nothing to save (and megatron-core cannot describe it).
        if optimizer is not None and not _optimizer_has_state(optimizer):
            optimizer = None
        # Failures inside are megatron-core's: its writer gathers every rank's write result and
        # raises everywhere, but a rank failing before that gather (or rank 0 failing to write
        # the metadata) leaves the others in its collectives, as upstream. Each step of ours
        # is a block that every rank agrees on.
        dist_checkpointing.save(_sharded_state(model_chunks, optimizer, is_loading=False), tmp)
        with _all_ranks_agree(f"creating {os.path.join(tmp, 'rank_state')}"):
            if _rank() == 0:
                os.makedirs(os.path.join(tmp, "rank_state"))
        with _all_ranks_agree(f"writing the rank and trainer state of {tmp}"):
            state = {"rng": rng_state(), **(rank_state or {})}
            write_atomic(os.path.join(tmp, "rank_state", f"rank_{_rank():05d}.json"),
                         json.dumps(state))
            if _rank() == 0:
                meta = {"step": step, "world_size": torch.distributed.get_world_size()
                        if torch.distributed.is_initialized() else 1, "layout": _layout(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "has_optimizer": optimizer is not None,
                        "distributed_optimizer": optimizer is not None and
                        _is_distributed_optimizer(optimizer),
                        **(trainer_state or {})}
                write_atomic(os.path.join(tmp, "trainer_state.json"),
                             json.dumps(meta, indent=1))
        with _all_ranks_agree(f"publishing {final}"):
            if _rank() == 0:
                # megatron-core fsyncs its files, not the folder holding their names: the
                # folder's entries reach the disk before the rename publishes it.
                fsync_dir(tmp)
                if os.path.isdir(final):  # a re-save of the same step (e.g. after a resume)
                    # Moved aside, not deleted first: ``latest`` may name it, and the new one
                    # takes its place with the next rename (a crash in between leaves the old
                    # one under a name ``latest_checkpoint``'s error points to).
                    self._discard(step_dir_name(step))
                os.rename(tmp, final)
                fsync_dir(self.directory)  # iter_N is on disk before latest names it
                write_atomic(os.path.join(self.directory, LATEST), step_dir_name(step) + "\n")
                # The duration sizes Slurm's --signal=USR1@<seconds> margin (README).
                logger.info("saved checkpoint %s in %.1f s", final, time.monotonic() - started)
        # The checkpoint is complete and named by ``latest``: removing old ones is rank 0's
        # alone, and nobody waits for it (see the module doc).
        if _rank() == 0:
            self._prune(step)
            self._delete_discarded()
        return final

    @staticmethod
    def saved_rank_states(path: str, key: str) -> list:
        """``key`` of every rank's saved state in checkpoint ``path``, in rank order (ranks that
        saved none are left out): what a resume in another layout continues from."""
        directory = os.path.join(path, "rank_state")
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        saved_by = _read_json(os.path.join(path, "trainer_state.json")).get("world_size",
                                                                            len(names))
        if len(names) != saved_by:  # a partial view (stale metadata on a shared filesystem)
            raise RuntimeError(f"{directory}: {len(names)} rank files for the {saved_by} ranks "
                               f"that saved it; checkpoint.dir must be on a filesystem all "
                               f"nodes see completely")
        out = []
        for name in names:
            saved = _read_json(os.path.join(directory, name))
            if key in saved:
                out.append(saved[key])
        return out

    def _prune(self, saved_step: int) -> None:
        """Keep the ``keep_last`` newest checkpoints up to the one just saved (which ``latest``
        names). Checkpoints of later steps were left by another run in this directory (e.g. one
        with ``checkpoint.resume=false``): they are not this run's to delete, and deleting by
        name order would delete the new one instead."""
        steps = sorted((int(m.group(1)), name) for name in os.listdir(self.directory)
                       if (m := _STEP_DIR.match(name)))
        later = [name for step, name in steps if step > saved_step]
        if later and not set(later) <= self._reported_later:
            self._reported_later.update(later)
            logger.warning("%s holds checkpoints of later steps than this run's %d (%s): left "
                           "in place; 'latest' names this run's", self.directory, saved_step,
                           ", ".join(later))
        mine = [name for step, name in steps if step <= saved_step]
        for name in mine[:-self.keep_last]:
            self._discard(name)
        if mine[:-self.keep_last]:
            fsync_dir(self.directory)  # a node crash must not bring back a half-deleted iter_*

    def _discard(self, name: str) -> None:
        """Rank 0: take folder ``name`` out of use at once (one rename); ``_delete_discarded``
        deletes it later. A failure is a warning (rank 0 raising here, between the save's
        barriers, would leave the other ranks waiting for the collective timeout); the folder
        is tried again at the next save."""
        try:
            os.rename(os.path.join(self.directory, name),
                      os.path.join(self.directory, f"{_DISCARDED}{name}.{uuid.uuid4().hex[:8]}"))
        except OSError as e:
            logger.warning("could not set %s aside for deletion (%s); tried again at the next "
                           "save", os.path.join(self.directory, name), e)

    def _delete_discarded(self) -> None:
        """Rank 0: delete every discarded folder of the directory (this run's, and any a killed
        run left half-deleted) in a background thread."""
        with self._lock:
            for name in sorted(os.listdir(self.directory)):
                path = os.path.join(self.directory, name)
                if name.startswith(_DISCARDED) and path not in self._to_delete:
                    self._to_delete.append(path)
            if self._to_delete and self._deleter is None:
                # A daemon: a run that exits (preempted, with seconds to go) does not wait for
                # it; the next run's first save deletes what is left.
                self._deleter = threading.Thread(target=self._delete_in_background,
                                                 name="checkpoint-deleter", daemon=True)
                self._deleter.start()

    def _delete_in_background(self) -> None:
        while True:
            with self._lock:
                if not self._to_delete:
                    self._deleter = None
                    return
                path = self._to_delete[0]
            shutil.rmtree(path, ignore_errors=True)  # what fails is retried at the next save
            with self._lock:
                self._to_delete.remove(path)

    def wait_for_deletions(self) -> None:
        """Block until the old checkpoints this process discarded are deleted: for the end of
        a run that completed (not for a preempted one, whose grace time is for its save)."""
        deleter = self._deleter
        if deleter is not None:
            deleter.join()

    def load(self, path: str, model_chunks: Sequence[torch.nn.Module], optimizer=None,
             scheduler=None, restore_rng: bool = True) -> tuple[int, dict, dict]:
        """Load a step dir into model/optimizer/scheduler; return (step, trainer, rank state)."""
        from megatron.core import dist_checkpointing

        from megatron_ease.models.qwen_vl.checkpoint import drop_absent_extra_state

        meta = _read_json(os.path.join(path, "trainer_state.json"))
        if not meta.get("has_optimizer", True):
            optimizer = None
        if optimizer is not None:
            _check_optimizer_layout(path, meta, optimizer)
            _materialize_optimizer_state(optimizer)
        sharded = _sharded_state(model_chunks, optimizer, is_loading=True)
        # A run saved without TransformerEngine, resumed with it: no _extra_state to restore.
        loaded = dist_checkpointing.load(drop_absent_extra_state(sharded, path), path)
        from megatron.core.utils import unwrap_model

        for i, chunk in enumerate(unwrap_model(list(model_chunks))):
            key = "model" if len(model_chunks) == 1 else f"model{i}"
            missing, unexpected = chunk.load_state_dict(
                {k[len(key) + 1:]: v for k, v in loaded[key].items()}, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise RuntimeError(f"{path}: {key} state dict mismatch after load: missing "
                                   f"{missing[:5]}, unexpected {unexpected[:5]}")
        if optimizer is not None:
            # fp32 training: the optimizer's main params are views of the model's leaf params.
            with torch.no_grad():
                optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(optimizer)
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        rank_file = os.path.join(path, "rank_state", f"rank_{_rank():05d}.json")
        rank_state: dict[str, Any] = {}
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() \
            else 1
        layout = _layout()
        if meta.get("world_size", world_size) != world_size or \
                meta.get("layout", layout) != layout:
            # Per-rank state (RNG streams, data position) belongs to a layout that is gone: every
            # rank starts it afresh, the same way, instead of some ranks restoring theirs (at the
            # same world size rank r's file would be another (TP, PP, DP) rank's).
            if _rank() == 0:
                logger.warning("%s was saved by %s ranks in layout %s, resumed on %d in %s: RNG "
                               "streams start afresh", path, meta.get("world_size"),
                               meta.get("layout"), world_size, layout)
        elif os.path.isfile(rank_file):
            rank_state = _read_json(rank_file)
            if restore_rng:
                set_rng_state(rank_state["rng"])
        elif restore_rng:
            logger.warning("%s has no state for rank %d (saved with world size %s): RNG streams "
                           "and data position start afresh", path, _rank(), meta.get("world_size"))
        return int(meta["step"]), meta, rank_state
