"""Atomic dist checkpoints: save/resume of model, optimizer, scheduler, RNG and rank state."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading

import pytest
import torch

from megatron_ease.models.qwen_vl.checkpoint import resolve_checkpoint_dir
from megatron_ease.training import metrics
from megatron_ease.training.checkpointing import CheckpointManager, latest_checkpoint
from megatron_ease.training.metrics import MetricsLogger
from megatron_ease.training.preemption import PreemptionHandler
from tests.harness import run_distributed
from tests.unit.test_megatron_parallel import BATCH, SEQ, _batch, _causal_mask, _tiny_gpt


def _train_objects(distributed_optimizer: bool = True):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model = _tiny_gpt()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, min_lr=1e-3, clip_grad=1.0,
        use_distributed_optimizer=distributed_optimizer), [ddp])
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1e-2, min_lr=1e-3,
                                    lr_warmup_steps=2, lr_decay_steps=10,
                                    lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=10, wd_incr_style="constant")
    return ddp, opt, sched


def _step(ddp, opt, sched):
    tokens, labels = _batch()
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    noise = torch.rand(())  # consumes the RNG stream, so a resumed stream shows in the loss
    loss = ddp(tokens, pos, _causal_mask(BATCH, SEQ), labels=labels).mean() * (1 + 0.1 * noise)
    loss.backward()
    ddp.finish_grad_sync()
    opt.step()
    sched.step(1)
    return loss.item()


def _run_with_checkpoints(directory: str, total: int, save_at: int, resume: bool,
                          distributed_optimizer: bool = True):
    """Train ``total`` steps; save at ``save_at``; with ``resume``, start from ``latest``."""
    ddp, opt, sched = _train_objects(distributed_optimizer)
    manager = CheckpointManager(directory, keep_last=2)
    start, losses = 0, {}
    if resume:
        start, meta, rank_state = manager.load(manager.latest(), [ddp], opt, sched)
        assert rank_state["data_position"] == start * 10 + torch.distributed.get_rank()
        assert meta["note"] == "hello"
    for step in range(start + 1, total + 1):
        losses[step] = _step(ddp, opt, sched)
        if step == save_at and not resume:
            manager.save(step, [ddp], opt, sched, trainer_state={"note": "hello"},
                         rank_state={"data_position": step * 10 + torch.distributed.get_rank()})
    return losses


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    full = run_distributed(_run_with_checkpoints, str(tmp_path / "a"), 5, 2, False)
    run_distributed(_run_with_checkpoints, str(tmp_path / "b"), 2, 2, False)
    resumed = run_distributed(_run_with_checkpoints, str(tmp_path / "b"), 5, 2, True)
    assert latest_checkpoint(str(tmp_path / "b")).endswith("iter_0000002")
    for rank in range(2):
        assert sorted(resumed[rank]) == [3, 4, 5]
        for step in (3, 4, 5):
            assert resumed[rank][step] == full[rank][step], (rank, step)


def _save_then_crash(directory: str):
    ddp, opt, sched = _train_objects()
    manager = CheckpointManager(directory, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, [ddp], opt, sched)
    import megatron.core.dist_checkpointing as dc

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    original, dc.save = dc.save, killed
    try:
        manager.save(4, [ddp], opt, sched)
    except KeyboardInterrupt:
        pass
    finally:
        dc.save = original
    manager.wait_for_deletions()
    return sorted(os.listdir(directory))


def test_interrupted_save_is_never_latest_and_old_ones_are_pruned(tmp_path):
    directory = str(tmp_path / "ckpt")
    listing = run_distributed(_save_then_crash, directory)[0]
    assert listing == [".tmp_iter_0000004", "iter_0000002", "iter_0000003", "latest"]
    assert latest_checkpoint(directory).endswith("iter_0000003")
    # The model exporter / init_from find the same checkpoint through the pointer.
    assert resolve_checkpoint_dir(directory).endswith("iter_0000003")


def _save_steps(directory: str, steps, keep_last: int):
    ddp, opt, sched = _train_objects()
    manager = CheckpointManager(directory, keep_last=keep_last)
    for step in steps:
        manager.save(step, [ddp], opt, sched)
    manager.wait_for_deletions()
    return sorted(os.listdir(directory)), manager.latest()


def test_save_below_older_runs_checkpoints_keeps_the_new_one(tmp_path):
    """A run that starts afresh (``checkpoint.resume=false``) in a directory holding a previous
    run's later steps: pruning by name order used to delete the checkpoint just saved, leaving
    ``latest`` naming nothing. The new one stays; the later ones are not this run's to delete."""
    directory = str(tmp_path / "ckpt")
    run_distributed(_save_steps, directory, (40, 50), 2)
    (listing, latest), warnings = run_distributed(_save_steps_counting_warnings, directory,
                                                  (10, 20, 30), 2)[0]
    assert latest.endswith("iter_0000030")
    assert listing == ["iter_0000020", "iter_0000030", "iter_0000040", "iter_0000050", "latest"]
    assert len(warnings) == 1 and "iter_0000040, iter_0000050" in warnings[0]  # not every save


def _save_steps_counting_warnings(directory: str, steps, keep_last: int):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("megatron_ease.training.checkpointing")
    logger.addHandler(handler)
    try:
        return _save_steps(directory, steps, keep_last), [r for r in records if "later" in r]
    finally:
        logger.removeHandler(handler)


def test_saving_the_same_step_again_keeps_latest_valid(tmp_path):
    directory = str(tmp_path / "ckpt")
    listing, latest = run_distributed(_save_steps, directory, (1, 2, 2), 1)[0]
    assert listing == ["iter_0000002", "latest"] and latest.endswith("iter_0000002")


def _save_recording_syncs(directory: str):
    """One save, recording in order the renames and the directory fsyncs each rank makes."""
    from megatron_ease.training import checkpointing

    ddp, opt, sched = _train_objects()
    events = []
    real_sync, real_rename, real_replace = checkpointing.fsync_dir, os.rename, os.replace

    def rel(path):
        return os.path.relpath(path, directory)

    def sync(path):
        events.append(("fsync", rel(path)))
        real_sync(path)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", rel(dst)))
        real_rename(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        events.append(("rename", rel(dst)))
        real_replace(src, dst, *args, **kwargs)

    checkpointing.fsync_dir, os.rename, os.replace = sync, rename, replace
    logs = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: logs.append(record.getMessage())
    checkpointing.logger.addHandler(handler)
    checkpointing.logger.setLevel(logging.INFO)
    try:
        CheckpointManager(directory, keep_last=2).save(3, [ddp], opt, sched)
    finally:
        checkpointing.fsync_dir, os.rename, os.replace = real_sync, real_rename, real_replace
        checkpointing.logger.removeHandler(handler)
    events.extend(("log", message) for message in logs)
    return [e for e in events if "distcp" not in e[1]]  # megatron-core's own files


def test_a_save_syncs_every_new_name_before_latest_names_the_checkpoint(tmp_path):
    """Renames are atomic but only durable once their directory is synced: after a node crash
    ``latest`` must not name a folder, or a folder hold a rank file, that the disk lost."""
    directory = str(tmp_path / "ckpt")
    rank0, rank1 = run_distributed(_save_recording_syncs, directory)
    tmp, final = ".tmp_iter_0000003", "iter_0000003"
    for rank, events in enumerate((rank0, rank1)):
        mine = ("rename", f"{tmp}/rank_state/rank_{rank:05d}.json")
        assert mine in events, events
        assert events[events.index(mine) + 1] == ("fsync", f"{tmp}/rank_state"), events
    assert [e for e in rank1 if e[1] in (".", "latest", final, tmp)] == []
    # Its duration is logged: it sizes Slurm's --signal=USR1@<seconds> margin.
    saved = [e[1] for e in rank0 if e[0] == "log" and e[1].startswith("saved checkpoint")]
    assert len(saved) == 1 and re.fullmatch(rf"saved checkpoint .*{final} in \d+\.\d s",
                                            saved[0]), saved
    rank0 = [e for e in rank0 if e[0] != "log"]
    order = [e for e in rank0 if e[1] in (".", "latest", final, tmp)
             or e == ("rename", f"{tmp}/trainer_state.json")]
    assert order == [("rename", f"{tmp}/trainer_state.json"), ("fsync", tmp),
                     ("fsync", tmp), ("rename", final), ("fsync", "."), ("rename", "latest"),
                     ("fsync", ".")], order


def _save_recording_deletions(directory: str):
    """Save 1, then 2 with ``keep_last=1``, recording on each rank when (after how many of the
    save's barriers) and on which thread checkpoint folders are deleted."""
    from megatron_ease.training import checkpointing

    ddp, opt, sched = _train_objects()
    manager = CheckpointManager(directory, keep_last=1)
    manager.save(1, [ddp], opt, sched)
    barriers, deletions = [], []
    real_agree, real_rmtree = checkpointing._agree, shutil.rmtree

    def agree(error, what):  # the save's barriers
        real_agree(error, what)
        barriers.append(True)

    def rmtree(path, *args, **kwargs):
        if "iter_" in os.path.basename(path):
            deletions.append((os.path.basename(path), len(barriers),
                              threading.current_thread() is threading.main_thread()))
        real_rmtree(path, *args, **kwargs)

    checkpointing._agree, shutil.rmtree = agree, rmtree
    try:
        manager.save(2, [ddp], opt, sched)
        manager.wait_for_deletions()
    finally:
        checkpointing._agree, shutil.rmtree = real_agree, real_rmtree
    return len(barriers), deletions, sorted(os.listdir(directory))


def test_old_checkpoints_are_deleted_after_the_save_by_no_rank_in_a_collective(tmp_path):
    """Rank 0 deleted the checkpoints beyond ``keep_last`` before the save's last barrier: on a
    slow filesystem deleting ~100 GB outlasts the collective timeout while every other rank
    waits (and, deleted on the main thread after it, they would wait in the next step's first
    collective instead). Now the deletion starts once every rank is past the save, on a thread
    of its own."""
    results = run_distributed(_save_recording_deletions, str(tmp_path / "ckpt"))
    barriers, deletions, listing = results[0]
    assert len(deletions) == 1
    name, after_barriers, on_main_thread = deletions[0]
    assert name.startswith(".deleting_iter_0000001.")  # out of the iter_* namespace first
    assert after_barriers == barriers and not on_main_thread
    assert listing == ["iter_0000002", "latest"]
    assert results[1][1] == []


def _save_killed_while_deleting(directory: str):
    ddp, opt, sched = _train_objects()
    manager = CheckpointManager(directory, keep_last=1)
    manager.save(1, [ddp], opt, sched)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # the run dies with the deletion half done
        os.remove(os.path.join(path, "trainer_state.json"))

    shutil.rmtree = killed_midway
    try:
        manager.save(2, [ddp], opt, sched)
        manager.wait_for_deletions()
    finally:
        shutil.rmtree = real_rmtree
    after_kill = sorted(os.listdir(directory))
    complete = [os.path.isfile(os.path.join(directory, name, "trainer_state.json"))
                for name in after_kill if name.startswith("iter_")]
    resumed = latest_checkpoint(directory)
    next_run = CheckpointManager(directory, keep_last=2)
    next_run.save(3, [ddp], opt, sched)
    next_run.wait_for_deletions()
    return after_kill, complete, resumed, sorted(os.listdir(directory))


def test_a_run_killed_while_deleting_an_old_checkpoint_leaves_no_broken_iter_folder(tmp_path):
    """Deleted in place, a checkpoint half-deleted by a kill stayed an ``iter_*`` folder that
    ``model.init_from`` or the exporter would take for a checkpoint. Renamed out of the way
    first, it is only a leftover, which the next run's first save deletes."""
    directory = str(tmp_path / "ckpt")
    after_kill, complete, resumed, listing = run_distributed(
        _save_killed_while_deleting, directory, world_size=1)[0]
    assert [n for n in after_kill if not n.startswith(".deleting_iter_0000001.")] == [
        "iter_0000002", "latest"]
    assert all(complete) and resumed.endswith("iter_0000002")
    assert listing == ["iter_0000002", "iter_0000003", "latest"]


class _Killed(BaseException):
    pass


def _resave_killed_between_renames(directory: str):
    ddp, opt, sched = _train_objects()
    manager = CheckpointManager(directory)
    manager.save(1, [ddp], opt, sched)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src) == ".tmp_iter_0000001":  # the new one, after the old moved
            raise _Killed()
        real_rename(src, dst)

    os.rename = rename
    try:
        manager.save(1, [ddp], opt, sched)
    except _Killed:
        pass
    finally:
        os.rename = real_rename
    try:
        latest_checkpoint(directory)
    except RuntimeError as e:
        return str(e)


def test_a_resave_killed_between_its_renames_names_the_previous_checkpoint(tmp_path):
    """Re-saving a step moves the previous version aside before renaming the new one in; a kill
    in between leaves ``latest`` naming nothing. The error says where the complete previous
    version is (before, it sat under a temporary name the next save deleted)."""
    directory = tmp_path / "ckpt"
    error = run_distributed(_resave_killed_between_renames, str(directory), world_size=1)[0]
    aside = [n for n in os.listdir(directory) if n.startswith(".deleting_iter_0000001.")]
    assert len(aside) == 1 and str(directory / aside[0]) in error and "rename that back" in error
    os.rename(directory / aside[0], directory / "iter_0000001")
    assert latest_checkpoint(str(directory)) == str(directory / "iter_0000001")


def _resume_error(path: str, distributed_optimizer: bool = True):
    ddp, opt, sched = _train_objects(distributed_optimizer)
    try:
        return CheckpointManager(os.path.dirname(path)).load(path, [ddp], opt, sched)[0]
    except RuntimeError as e:
        return str(e)


def test_optimizer_state_the_run_cannot_load_is_refused_with_a_clear_error(tmp_path):
    """The distributed optimizer's state (``dp_reshardable``) reshards over data-parallel sizes
    only, and has another structure than the plain optimizer's: resumed at TP=2, or with
    ``use_distributed_optimizer`` switched, megatron-core failed inside
    torch.distributed.checkpoint naming optimizer buckets, as a BaseException (no
    ``except Exception`` sees it). At another DP size it resumes; the plain optimizer's state
    (per parameter) at another TP too."""
    directory = str(tmp_path / "ckpt")
    run_distributed(_run_with_checkpoints, directory, 1, 1, False)  # DP=2, a stepped optimizer
    path = latest_checkpoint(directory)
    for error in run_distributed(_resume_error, path, tensor_model_parallel_size=2):
        assert isinstance(error, str) and path in error and "model.init_from" in error
        assert "parallel.tensor_model_parallel_size=1" in error
        # A new run from its weights goes to a new directory: in this one, its saves would
        # replace and prune the checkpoints it starts from.
        assert "checkpoint.dir=<a new directory>" in error and "resume=false" not in error
    for error in run_distributed(_resume_error, path, False):
        assert isinstance(error, str) and "parallel.use_distributed_optimizer=true" in error
    assert run_distributed(_resume_from, path, world_size=1) == [(1, [])]
    plain = str(tmp_path / "plain")
    run_distributed(_run_with_checkpoints, plain, 1, 1, False, False)
    assert run_distributed(_resume_error, latest_checkpoint(plain), False,
                           tensor_model_parallel_size=2) == [1, 1]


def test_a_corrupt_checkpoint_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "iter_0000004"
    os.makedirs(path / "rank_state")
    (path / "trainer_state.json").write_text('{"step": 4, "world_si')  # cut short: disk full
    for read in (lambda: CheckpointManager(str(tmp_path)).load(str(path), []),
                 lambda: CheckpointManager.saved_rank_states(str(path), "reader")):
        with pytest.raises(RuntimeError, match=re.escape(str(path / "trainer_state.json"))):
            read()
    (path / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 1}))
    (path / "rank_state" / "rank_00000.json").write_bytes(b"\xff\xfe")
    with pytest.raises(RuntimeError, match="rank_00000.json"):
        CheckpointManager.saved_rank_states(str(path), "reader")


def _resume_from(path: str):
    ddp, opt, sched = _train_objects()
    step, _, rank_state = CheckpointManager(os.path.dirname(path)).load(path, [ddp], opt, sched)
    return step, sorted(rank_state)


def test_resume_at_another_world_size_starts_rank_state_afresh_on_every_rank(tmp_path):
    """Per-rank state (RNG, data position) saved by another number of ranks is skipped by all
    ranks alike; before, ranks with a file restored theirs (and the reader refused its foreign
    layout) while the others went on, and the job hung in its next collective."""
    directory = str(tmp_path / "ckpt")
    run_distributed(_save_steps, directory, (3,), 1)
    path = latest_checkpoint(directory)
    assert [r[1] for r in run_distributed(_resume_from, path)] == [["rng"], ["rng"]]
    meta_path = os.path.join(path, "trainer_state.json")
    meta = json.loads(open(meta_path).read())
    meta["world_size"] = 4  # as if written by a 4-rank job of the same parallel layout
    open(meta_path, "w").write(json.dumps(meta))
    assert run_distributed(_resume_from, path) == [(3, []), (3, [])]
    # The same world size in another layout (TP = 2 instead of DP = 2): rank r's file belongs
    # to another (TP, PP, DP) rank; it was restored.
    assert meta["layout"] == {"tp": 1, "pp": 1, "cp": 1, "dp": 2}
    meta.update(world_size=2, layout={"tp": 2, "pp": 1, "cp": 1, "dp": 1})
    open(meta_path, "w").write(json.dumps(meta))
    assert run_distributed(_resume_from, path) == [(3, []), (3, [])]


def _save_failing_on(directory: str, failing_rank: int, where: str):
    """Save step 1, then step 2 with ``where`` failing on ``failing_rank`` only: each rank's
    error (or None), and what ``latest`` names afterwards."""
    import errno
    import unittest.mock

    ddp, opt, sched = _train_objects()
    manager = CheckpointManager(directory, keep_last=2)
    manager.save(1, [ddp], opt, sched)
    rank = torch.distributed.get_rank()
    real_rename, real_makedirs = os.rename, os.makedirs

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def failing_rename(src, dst):  # only the publishing rename of the new checkpoint
        if os.fspath(src).endswith(".tmp_iter_0000002"):
            disk_full()
        return real_rename(src, dst)

    def failing_makedirs(path, *args, **kwargs):
        if os.fspath(path).endswith(".tmp_iter_0000002"):
            disk_full()
        return real_makedirs(path, *args, **kwargs)

    if rank == failing_rank:
        if where == "publish":
            os.rename = failing_rename
        elif where == "prepare":
            os.makedirs = failing_makedirs
        elif where == "rank_state":
            patcher = unittest.mock.patch("megatron_ease.training.checkpointing.write_atomic",
                                          side_effect=disk_full)
            patcher.start()
    error = None
    try:
        _step(ddp, opt, sched)
        manager.save(2, [ddp], opt, sched)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        os.rename, os.makedirs = real_rename, real_makedirs
        if where == "rank_state" and rank == failing_rank:
            patcher.stop()
    return error, os.path.basename(latest_checkpoint(directory))


@pytest.mark.parametrize("failing_rank,where", [(0, "prepare"), (0, "publish"),
                                                (1, "rank_state"), (0, "rank_state")])
def test_a_save_failing_on_one_rank_fails_on_every_rank_at_once(tmp_path, failing_rank, where):
    """Rank 0 failing to create the folder or to publish it (a full disk, a rename refused), or
    any rank failing to write its state, raised on that rank alone while the others waited in
    the save's next barrier until the collective timeout (here the 120 s guard). Every rank
    now raises: the failing one its own error, the others one naming it; ``latest`` still names
    the previous checkpoint."""
    results = run_distributed(_save_failing_on, str(tmp_path / "ckpt"), failing_rank, where,
                              timeout_s=120)
    for rank, (error, latest) in enumerate(results):
        assert latest == "iter_0000001"
        assert error is not None, f"rank {rank} saved although rank {failing_rank} failed"
        if rank == failing_rank:
            assert "No space left on device" in error, error
        else:
            assert f"rank {failing_rank} failed while" in error, error


def test_latest_pointing_nowhere_is_a_clear_error(tmp_path):
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(RuntimeError, match="iter_0000009"):
        latest_checkpoint(str(tmp_path))
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    (tmp_path / "latest").write_bytes(b"iter_\xff\xfe\n")  # garbled: named, not a decode error
    with pytest.raises(RuntimeError, match=r"latest names 'iter_\ufffd\ufffd', which is not a "
                                           r"checkpoint"):
        latest_checkpoint(str(tmp_path))


def _save_signal_helpers_then_save_again(directory: str):
    import time

    import psutil

    ddp, opt, sched = _train_objects()
    manager = CheckpointManager(directory, keep_last=2)
    _step(ddp, opt, sched)
    manager.save(1, [ddp], opt, sched)  # megatron-core's writer starts its helper process here
    helpers = psutil.Process().children(recursive=True)
    for helper in helpers:  # Slurm's --signal=USR1@900 reaches every process of the task
        helper.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    alive = [h.is_running() and h.status() != psutil.STATUS_ZOMBIE for h in helpers]
    _step(ddp, opt, sched)
    manager.save(2, [ddp], opt, sched)  # the save that signal asks for
    return len(helpers), alive, os.path.basename(manager.latest())


def _start_checkpoint_writer(pids):
    import time

    import psutil

    from megatron_ease.training.preemption import protect_checkpoint_writer

    protect_checkpoint_writer()
    pids.put([p.pid for p in psutil.Process().children(recursive=True)])
    time.sleep(600)  # killed by the test


def test_checkpoint_writer_helper_dies_with_a_killed_trainer():
    """The writer's helper ignores TERM and USR1 (and INT): a trainer killed with SIGKILL left
    it running forever, holding the job's stdout open (a ``| tee`` or a harness hung)."""
    import multiprocessing
    import time

    import psutil

    ctx = multiprocessing.get_context("spawn")
    pids = ctx.Queue()
    trainer = ctx.Process(target=_start_checkpoint_writer, args=(pids,))
    trainer.start()
    helpers = [psutil.Process(pid) for pid in pids.get(timeout=120)]
    assert helpers, "protect_checkpoint_writer started no helper: nothing to check"
    trainer.kill()
    trainer.join()
    deadline = time.monotonic() + 60  # a hang guard, not a timing check
    try:
        while any(h.is_running() and h.status() != psutil.STATUS_ZOMBIE for h in helpers):
            assert time.monotonic() < deadline, "the writer's helper outlived its trainer"
            time.sleep(0.2)
    finally:
        for helper in helpers:
            if helper.is_running():
                helper.kill()


@pytest.mark.parametrize("guarded", [True, False], ids=["main_guard", "no_main_guard"])
def test_a_script_without_a_main_guard_gets_a_clear_error_at_its_first_save(tmp_path, guarded):
    """The writer's helper is spawned, and spawn re-imports the script: one without a main guard
    ran its training again in the helper, and the save failed with a bare EOFError."""
    import subprocess
    import sys
    import textwrap

    body = "protect_checkpoint_writer()\nprint('helper started', flush=True)\n"
    script = tmp_path / "train_script.py"
    script.write_text("from megatron_ease.training.preemption import protect_checkpoint_writer\n"
                      + ("if __name__ == '__main__':\n" + textwrap.indent(body, "    ")
                         if guarded else body))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    if guarded:
        assert result.returncode == 0 and "helper started" in result.stdout, result.stderr[-2000:]
    else:
        assert result.returncode != 0
        assert "the checkpoint writer's helper process did not start" in result.stderr
        assert "if __name__ == \"__main__\":" in result.stderr


def test_checkpoint_writer_helpers_survive_the_preemption_signals(tmp_path):
    """megatron-core's torch_dist writer keeps a spawned Manager process for its results; USR1
    killed it and the preemption save then failed on a broken pipe (exit 1, no requeue)."""
    results = run_distributed(_save_signal_helpers_then_save_again, str(tmp_path / "ckpt"))
    for helpers, alive, latest in results:
        assert helpers >= 1 and all(alive) and latest == "iter_0000002"


def _resolve_in(directories):
    directory = directories[torch.distributed.get_rank()]
    try:
        return CheckpointManager(directory).resolve_latest()
    except (RuntimeError, ValueError) as e:
        return f"error: {e}"


def _checkpoint_dir(root, latest, steps):
    os.makedirs(root)
    for step in steps:
        os.makedirs(root / f"iter_{step:07d}")
        (root / f"iter_{step:07d}" / "trainer_state.json").write_text("{}")
    if latest is not None:
        (root / "latest").write_text(latest + "\n")
    return str(root)


def test_every_rank_resumes_the_checkpoint_rank_0_reads(tmp_path):
    """Each rank read ``latest`` itself: a node with a stale view of a shared filesystem resumed
    an older step (diverged replicas, then a hang). Here each rank gets its own directory, as
    if it saw the shared one differently."""
    new, stale = (_checkpoint_dir(tmp_path / "r0", "iter_0000003", (2, 3)),
                  _checkpoint_dir(tmp_path / "r1", "iter_0000002", (2, 3)))
    paths = run_distributed(_resolve_in, [new, stale])
    assert [os.path.basename(p) for p in paths] == ["iter_0000003", "iter_0000003"]
    # Rank 1 does not see the checkpoint rank 0 names: every rank raises, none waits alone.
    missing = _checkpoint_dir(tmp_path / "r1b", "iter_0000002", (2,))
    errors = run_distributed(_resolve_in, [new, missing])
    assert all(e.startswith("error: ") and "not visible on every rank" in e for e in errors)
    assert "rank 1 does not see it" in errors[1]
    # Rank 0's pointer names nothing: every rank raises; no checkpoint anywhere: None on all.
    broken = _checkpoint_dir(tmp_path / "r0b", "iter_0000009", ())
    errors = run_distributed(_resolve_in, [broken, stale])
    assert "iter_0000009" in errors[0] and "rank 0 could not read" in errors[1]
    garbled = tmp_path / "r0c"  # a pointer that is not UTF-8: named on rank 0, the others told
    os.makedirs(garbled)
    (garbled / "latest").write_bytes(b"iter_\xff\xfe\n")
    errors = run_distributed(_resolve_in, [str(garbled), stale], timeout_s=60)
    assert "latest names 'iter_\ufffd\ufffd'" in errors[0], errors
    assert "rank 0 could not read" in errors[1]
    empty = str(tmp_path / "none")
    assert run_distributed(_resolve_in, [empty, stale]) == [None, None]


def test_preemption_signal_sets_the_stop_flag():
    handler = PreemptionHandler()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_stop()
    finally:
        handler.restore()


def test_metrics_logger_writes_jsonl_and_console(tmp_path, capsys):
    log = MetricsLogger(str(tmp_path), use_wandb=False)
    log.log(3, {"reward": 0.5, "ease_loss": torch.tensor(0.25), "kept_groups": 4}, total_steps=10)
    log.close()
    out = capsys.readouterr().out
    assert "[train] step 3/10 | reward 0.5000 | kept 4 | ease 0.2500" in out
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 3 and record["ease_loss"] == 0.25 and record["kept_groups"] == 4


def test_resumed_metrics_log_drops_records_of_steps_after_the_checkpoint(tmp_path):
    """Killed after logging steps 3-4 with the checkpoint at 2: the resumed run logs 3-4 again,
    so the old ones (and a line cut by the kill) go; the warm start's records stay."""
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "split": "warm_start"} for s in (1, 2, 3)]
    records += [{"step": s, "split": "train", "reward": s} for s in (1, 2, 3, 4)]
    records += [{"step": s, "split": "eval"} for s in (2, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "spl')
    MetricsLogger(str(tmp_path), resumed_at=2, use_wandb=False).close()
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in kept] == [
        ("warm_start", 1), ("warm_start", 2), ("warm_start", 3), ("train", 1), ("train", 2),
        ("eval", 2)]


def test_a_resumed_log_whose_last_record_lost_its_newline_keeps_records_apart(tmp_path):
    """Nothing to drop, but the kill cut the last line's newline: the next record was appended
    to that line, and neither parsed again."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(str(tmp_path), use_wandb=False)
    for step in (1, 2):
        log.log(step, {"reward": step})
    log.close()
    path.write_text(path.read_text().rstrip("\n"))
    log = MetricsLogger(str(tmp_path), resumed_at=2, use_wandb=False)
    log.log(3, {"reward": 3})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_tensorboard_purges_steps_after_a_resume_and_a_fresh_start_sets_its_events_aside(
        tmp_path, monkeypatch):
    """Resumed at step 2, TensorBoard kept the crashed run's points of steps 3.. beside the
    re-logged ones; a fresh start drew its curves on the earlier run's."""
    import sys
    import types

    writers = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            os.makedirs(log_dir, exist_ok=True)
            open(os.path.join(log_dir, f"events.{len(writers)}"), "w").close()
            writers.append((os.path.relpath(log_dir, tmp_path), purge_step))

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    MetricsLogger(str(tmp_path), use_wandb=False, tensorboard=True).close()
    MetricsLogger(str(tmp_path), use_wandb=False, tensorboard=True, resumed_at=2).close()
    assert writers == [("tensorboard", None), ("tensorboard", 3)]
    assert sorted(os.listdir(tmp_path / "tensorboard")) == ["events.0", "events.1"]
    MetricsLogger(str(tmp_path), use_wandb=False, tensorboard=True).close()  # a fresh start
    assert os.listdir(tmp_path / "tensorboard") == ["events.2"]
    assert sorted(os.listdir(tmp_path / "tensorboard.1")) == ["events.0", "events.1"]


def test_a_fresh_start_sets_an_earlier_log_aside_and_starts_another_wandb_run(tmp_path):
    """Killed before its first checkpoint, a requeued run starts again at step 1: without a
    checkpoint nothing says which records are this run's, so the earlier log moves to
    metrics.<n>.jsonl (nothing lost) and metrics.jsonl holds each step once. A resume keeps
    its log and its wandb run id; a fresh start gets another wandb run."""
    path = tmp_path / "metrics.jsonl"
    attempts = []
    for attempt in range(3):
        log = MetricsLogger(str(tmp_path), use_wandb=False)
        for step in (1, 2):
            log.log(step, {"reward": attempt})
        log.close()
        attempts.append(metrics._stable_run_id(str(tmp_path), new=True))
        assert metrics._stable_run_id(str(tmp_path)) == attempts[-1]  # as a resume reads it
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["reward"]) for r in records] == [(1, 2), (2, 2)]
    for n in (1, 2):
        earlier = [json.loads(line) for line in (tmp_path / f"metrics.{n}.jsonl").open()]
        assert [(r["step"], r["reward"]) for r in earlier] == [(1, n - 1), (2, n - 1)]
    assert len(set(attempts)) == 3
    MetricsLogger(str(tmp_path), resumed_at=2, use_wandb=False).close()
    assert len(path.read_text().splitlines()) == 2 and not (tmp_path / "metrics.3.jsonl").exists()


def test_wandb_gives_each_metric_prefix_its_own_step_axis(tmp_path, monkeypatch):
    """The warm start logs steps 1..W, then RL logs steps 1..N: with one shared wandb step, wandb
    drops every log below its current step (the first W RL steps). Each prefix gets its own
    x-axis instead (``define_metric``), on a real offline wandb run."""
    calls = []
    start = metrics._start_wandb

    def spied_start(*args, **kwargs):
        run = start(*args, **kwargs)
        for name in ("log", "define_metric"):
            real = getattr(run, name)
            monkeypatch.setattr(run, name, lambda *a, _n=name, _r=real, **k:
                                calls.append((_n, a, k)) or _r(*a, **k))
        return run

    monkeypatch.setattr(metrics, "_start_wandb", spied_start)
    log = MetricsLogger(str(tmp_path), use_wandb=True, wandb_mode="offline")
    for step in (1, 2, 3):
        log.log(step, {"sft_loss": 1.0 / step}, prefix="warm_start")
    for step in (1, 2):
        log.log(step, {"reward": 0.5 * step, "grad_norm": 1.0})
    log.close()
    defined = {(a[0], k.get("step_metric")) for n, a, k in calls if n == "define_metric"}
    assert defined == {("warm_start/step", None), ("warm_start/*", "warm_start/step"),
                       ("train/step", None), ("train/*", "train/step")}
    logged = [(a[0], k) for n, a, k in calls if n == "log"]
    assert all("step" not in k for _, k in logged)  # wandb's own step only ever increases
    assert [payload for payload, _ in logged][3:] == [
        {"train/step": 1, "train/reward": 0.5, "train/grad_norm": 1.0},
        {"train/step": 2, "train/reward": 1.0, "train/grad_norm": 1.0}]


def test_wandb_service_killed_by_sigterm_turns_wandb_off_and_logging_goes_on(tmp_path, caplog):
    """On preemption Slurm sends SIGTERM to every process of the task, wandb's service process
    included; every later wandb call raises. Rank 0 must still log, reach the stop decision and
    save (the other ranks wait for it in a collective): wandb turns off with one warning and
    metrics.jsonl keeps every record."""
    import psutil

    log = MetricsLogger(str(tmp_path), use_wandb=True, wandb_mode="offline")
    log.log(1, {"reward": 0.5})
    services = [p for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(
        p.cmdline()).lower()]
    assert services, "no wandb service process to signal: the test would prove nothing"
    for p in services:
        p.send_signal(signal.SIGTERM)
    psutil.wait_procs(services, timeout=30)
    with caplog.at_level("WARNING"):
        log.log(2, {"reward": 0.75})
        log.log(3, {"reward": 1.0})
        log.close()
    assert sum("wandb failed" in r.getMessage() for r in caplog.records) == 1
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == [1, 2, 3]


def test_saved_rank_states_are_read_in_rank_order_and_a_partial_view_is_refused(tmp_path):
    """A resume in another layout continues the data stream from every old rank's reader
    state; a view missing some rank files (stale shared-filesystem metadata) would compute
    another position on this node, so it is an error."""
    path = tmp_path / "iter_0000004"
    os.makedirs(path / "rank_state")
    (path / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 3}))
    for rank in range(3):
        state = {"rng": {}, **({"reader": {"base": 10 + rank}} if rank != 1 else {})}
        (path / "rank_state" / f"rank_{rank:05d}.json").write_text(json.dumps(state))
    readers = CheckpointManager.saved_rank_states(str(path), "reader")
    assert readers == [{"base": 10}, {"base": 12}]
    os.remove(path / "rank_state" / "rank_00002.json")
    with pytest.raises(RuntimeError, match="2 rank files for the 3 ranks"):
        CheckpointManager.saved_rank_states(str(path), "reader")


def test_a_folder_that_cannot_be_set_aside_is_a_warning_not_a_crash_of_rank_0(tmp_path, caplog):
    """Rank 0 raising between the save's barriers left the other ranks in the collective until
    its timeout; the folder is tried again at the next save."""
    manager = CheckpointManager(str(tmp_path), keep_last=1)
    with caplog.at_level(logging.WARNING, logger="megatron_ease.training.checkpointing"):
        manager._discard("iter_0000001")  # vanished (another process, a stale NFS view)
    assert "could not set" in caplog.text and "iter_0000001" in caplog.text
