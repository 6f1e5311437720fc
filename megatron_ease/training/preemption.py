"""Preemption: SIGTERM / SIGUSR1 -> finish the step, save, exit with status 75.

Slurm sends USR1 ahead of the time limit (``--signal=USR1@300``) and TERM on preemption; the
signal reaches the ranks at different moments, so the decision to stop is all-reduced (MAX) at a
step boundary: every rank stops after the same step, saves the same checkpoint, and exits 75 —
the status slurm/common.sh turns into ``scontrol requeue``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch

logger = logging.getLogger(__name__)

EXIT_REQUEUE = 75
# Preempted with nowhere to save (no checkpoint.dir): what a shell reports for a SIGTERM'd
# process, so that slurm/common.sh (which requeues 75 only) does not restart the run from zero.
EXIT_STOPPED_UNSAVED = 143


def ignore_preemption_signals(*_) -> None:
    """In a helper process (loader worker, checkpoint writer): ignore SIGTERM and SIGUSR1.

    Slurm signals every process of a task (``--signal=USR1@900``, SIGTERM on preemption); the
    trainer reacts by saving, and needs its helpers alive for that. Takes and ignores any
    arguments, so it serves as a DataLoader ``worker_init_fn`` or a process initializer."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_writer_manager = None  # our signal-proof stand-in for megatron-core's results-queue Manager


def _serve_checkpoint_writer(trainer_pid: int) -> None:
    """Initializer of the checkpoint writer's Manager process: ignore the preemption signals,
    and die with the trainer.

    Ignoring TERM (and, as every Manager does, INT) leaves only SIGKILL to end it: a trainer
    killed without running its exit handlers (SIGKILL, OOM killer, a crashed node's peers torn
    down by torchrun) left it running, orphaned, holding the job's stdout and stderr open: a
    ``| tee``, a test harness or anything else waiting for their end hung. Linux delivers
    PR_SET_PDEATHSIG when the thread that started it exits: the trainer's main thread, which
    saves."""
    ignore_preemption_signals()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != trainer_pid:  # the trainer died before the request took effect
        os._exit(0)


def protect_checkpoint_writer() -> None:
    """Make megatron-core's checkpoint writer survive the preemption signals.

    Its ``torch_dist`` writer (``dist_checkpointing.strategies.filesystem_async``) collects write
    results through a ``multiprocessing.Manager().Queue()``: a server process it spawns at the
    first save and keeps for the life of the process. A spawned process has default signal
    handling, so the USR1 Slurm sends ahead of the time limit killed it, and the save that
    signal asked for then failed on the broken pipe (every rank exited 1, no requeue). Here
    that Manager is started by us, ignoring the signals, before megatron-core makes its own.
    Idempotent; a no-op on megatron-core versions without that module-level queue."""
    global _writer_manager
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if not hasattr(filesystem_async, "_results_queue"):
        return
    if _writer_manager is not None and _writer_manager["queue"] is filesystem_async._results_queue:
        return
    import multiprocessing
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    try:
        manager.start(initializer=_serve_checkpoint_writer, initargs=(os.getpid(),))
    except (EOFError, RuntimeError) as e:
        # The usual cause: the spawned process re-imports the main module, and a script without
        # a main guard runs its training again in there, up to this save (which cannot spawn
        # while bootstrapping); all the parent saw was an EOFError from the broken pipe.
        raise RuntimeError(
            "checkpoint save: the checkpoint writer's helper process did not start "
            f"({type(e).__name__}: {e}). multiprocessing 'spawn' re-imports the main module, so "
            "a script that saves checkpoints (Trainer.train, CheckpointManager.save) must run "
            "them under `if __name__ == \"__main__\":`") from e
    _writer_manager = {"manager": manager, "queue": manager.Queue()}
    filesystem_async._results_queue = _writer_manager["queue"]


class PreemptionHandler:
    """Keeps SIGTERM / SIGUSR1 for the next step boundary (``should_stop``) until ``restore``.

    Python runs signal handlers in the main thread only, and only the main thread may install
    them: built in another thread (a trainer run from a worker thread) the handler installs
    nothing (that raised ValueError before) and ``should_stop`` still agrees with the ranks that
    were signalled; the process keeps its own signal handling."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            logger.warning("preemption handler created outside the main thread: SIGTERM/SIGUSR1 "
                           "are not caught here (a signal to another rank still stops this one)")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.received is None:
            logger.warning("received %s: will save and exit after this step",
                           signal.Signals(signum).name)
        self.received = signum

    def should_stop(self) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        """Put back the handlers this one replaced (once; a second call does nothing)."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
