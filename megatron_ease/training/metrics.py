"""Metrics sinks for rank 0: Megatron-style console lines, a JSONL file, wandb, tensorboard.

wandb runs offline unless the user chose otherwise (``logging.wandb_mode`` or ``WANDB_MODE``);
the API key is never printed or written by us. Metrics arrive already reduced over DP/PP.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Optional

logger = logging.getLogger(__name__)

# Console order and short names, Megatron style: "step 3/10 | reward 0.41 | ..."
CONSOLE_FIELDS = (
    ("sft_loss", "sft"), ("reward", "reward"), ("accuracy", "acc"),
    ("generated_accuracy", "gen_acc"), ("kept_groups", "kept"),
    ("gen_batches", "gen"),
    ("dapo_loss", "dapo"), ("ease_loss", "ease"), ("attn_in_evidence", "attn_ev"),
    ("entropy", "ent"), ("clip_frac", "clip"), ("grad_norm", "gnorm"), ("lr", "lr"),
    ("tokens_per_s", "tok/s"), ("step_time", "time"), ("max_rss_gb", "mem_gb"),
)


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


class MetricsLogger:
    def __init__(self, run_dir: str, config: Optional[dict] = None, use_wandb: bool = False,
                 wandb_project: str = "megatron_ease", wandb_mode: Optional[str] = None,
                 tensorboard: bool = False, enabled: bool = True, stream=None,
                 resumed_at: Optional[int] = None, console_interval: int = 1):
        """``console_interval`` (``logging.log_interval``): the console line of a training or
        warm-start step every this many steps, and of the last one; validation lines always.
        The JSONL log, wandb and TensorBoard get every record."""
        self.enabled = enabled
        self.console_interval = max(1, console_interval)
        self.stream = stream or sys.stdout
        self._wandb = None
        self._wandb_prefixes: set[str] = set()
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        fresh = resumed_at is None
        if fresh:
            _set_aside_earlier_log(self.jsonl_path)
        else:
            _drop_records_after(self.jsonl_path, resumed_at)
        self._jsonl = open(self.jsonl_path, "a")
        if use_wandb:
            self._wandb = _start_wandb(run_dir, config, wandb_project, wandb_mode, fresh)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb_dir = os.path.join(run_dir, "tensorboard")
                if fresh:  # as metrics.jsonl: an earlier start's curves are set aside
                    _set_aside_earlier_tensorboard(tb_dir)
                # Resumed: events of steps after the checkpoint (logged again now) are purged.
                self._tb = SummaryWriter(tb_dir, purge_step=None if fresh else resumed_at + 1)
            except ImportError:
                logger.warning("logging.tensorboard is on but tensorboard is not installed")

    def has_record(self, step: int, prefix: str) -> bool:
        """Whether the JSONL log holds a ``prefix`` record of ``step`` (False where disabled)."""
        if not self.enabled:
            return False
        return any(record is not None and record.get("step") == step
                   and record.get("split") == prefix for _, record in _records(self.jsonl_path))

    def log(self, step: int, metrics: dict, total_steps: Optional[int] = None,
            prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (bool, int)) else v)
                 for k, v in metrics.items()}
        record = {"step": step, "split": prefix, "time": time.time(), **clean}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb_call(self._wandb_log, prefix, step, clean)
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if prefix != "eval" and step % self.console_interval and step != total_steps:
            return
        head = f"[{prefix}] step {step}" + (f"/{total_steps}" if total_steps else "")
        parts = [f"{short} {_fmt(clean[key])}" for key, short in CONSOLE_FIELDS if key in clean]
        print(" | ".join([head] + parts), file=self.stream, flush=True)

    def _wandb_call(self, fn, *args) -> None:
        """wandb is a side channel and never stops a run: Slurm signals every process of a task
        on preemption, and wandb's service process dies of the SIGTERM, after which every wandb
        call raises. Rank 0 must still reach the stop decision and the save (the other ranks wait
        for it in a collective), so the first failure turns wandb off; metrics.jsonl has it all."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 -- whatever wandb raises, the run goes on
            logger.warning("wandb failed (%s: %s); logging to wandb is off for the rest of this "
                           "run, metrics.jsonl keeps every record", type(e).__name__, e)
            self._wandb = None
            try:  # release wandb's connection now, or its exit hook prints the failure again
                import wandb

                wandb.teardown()
            except Exception:  # noqa: BLE001
                pass

    def _wandb_log(self, prefix: str, step: int, values: dict) -> None:
        """Each prefix on its own x-axis (``<prefix>/step``): the warm start's steps 1..W and
        the RL steps 1..N overlap, and wandb drops any ``log(step=s)`` with s below its current
        step, so a shared step would lose the first W RL steps."""
        if prefix not in self._wandb_prefixes:
            self._wandb.define_metric(f"{prefix}/step")
            self._wandb.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self._wandb_prefixes.add(prefix)
        self._wandb.log({f"{prefix}/step": step, **{
            f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}})

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb_call(self._wandb.finish)
        if self._tb is not None:
            self._tb.close()


def _records(path: str):
    """(line, record) of each line of a metrics JSONL file; the record is None for a line cut
    by a crash. Nothing when there is no file."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                yield line, None


def _drop_records_after(path: str, step: int) -> None:
    """A run resumed at ``step``: the RL records (train, eval) of later steps came from work
    the checkpoint does not hold (a crash after it), and the resumed run logs those steps again.
    Dropped so that every step has one record; the warm start's records stay."""
    lines = list(_records(path))
    kept = [line if line.endswith("\n") else line + "\n" for line, record in lines
            if record is not None and (record.get("split") == "warm_start"
                                       or record.get("step", 0) <= step)]
    if len(kept) == len(lines) and (not lines or lines[-1][0].endswith("\n")):
        return  # (a last line that lost its newline would join the next record)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    logger.info("%s: dropped %d records of steps after %d (resumed there)", path,
                len(lines) - len(kept), step)


def _set_aside_earlier_log(path: str) -> Optional[str]:
    """A fresh start (no checkpoint to resume) logs from its first step on: a log already in the
    run directory (a run killed before its first checkpoint, or an earlier experiment there) is
    renamed to ``metrics.<n>.jsonl`` (the first free n), so that every step of metrics.jsonl is
    this run's, once. Returns the new name, None when there was nothing to move."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    aside = _set_aside(path)
    logger.warning("%s is from an earlier start without a checkpoint to resume; this run logs "
                   "from step 1, the earlier log is now %s", path, aside)
    return aside


def _set_aside_earlier_tensorboard(directory: str) -> Optional[str]:
    """A fresh start's TensorBoard folder: an earlier one in the run directory is renamed to
    ``tensorboard.<n>`` (the first free n), else both runs' curves would be drawn as one."""
    if not os.path.isdir(directory) or not os.listdir(directory):
        return None
    return _set_aside(directory)


def _set_aside(path: str) -> str:
    """Rename ``path`` (``a/metrics.jsonl``, ``a/tensorboard``) to the first free
    ``a/metrics.<n>.jsonl`` / ``a/tensorboard.<n>``; returns the new name."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{ext}"):
        n += 1
    os.replace(path, f"{stem}.{n}{ext}")
    return f"{stem}.{n}{ext}"


def _start_wandb(run_dir: str, config: Optional[dict], project: str, mode: Optional[str],
                 fresh: bool):
    try:
        import wandb
    except ImportError:
        logger.warning("logging.wandb is on but wandb is not installed; skipping it")
        return None
    # Offline unless the user asked otherwise: a cluster job must never block on a login.
    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    return wandb.init(project=project, dir=run_dir, config=config or {}, mode=mode,
                      resume="allow", id=_stable_run_id(run_dir, new=fresh))


def _stable_run_id(run_dir: str, new: bool = False) -> str:
    """Same id after a resume, so a requeued job continues its wandb run; ``new`` (a fresh
    start, which logs from step 1 again) starts another run."""
    path = os.path.join(run_dir, "wandb_run_id")
    if os.path.isfile(path) and not new:
        with open(path) as f:
            return f.read().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id
