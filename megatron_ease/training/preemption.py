"""Preemption: SIGTERM / SIGUSR1 -> finish the step, save, exit with status 75.

Slurm sends USR1 ahead of the time limit (``--signal=USR1@300``) and TERM on preemption; the
signal reaches the ranks at different moments, so the decision to stop is all-reduced (MAX) at a
step boundary: every rank stops after the same step, saves the same checkpoint, and exits 75 —
the status slurm/common.sh turns into ``scontrol requeue``.
"""

from __future__ import annotations

import logging
import signal

import torch

logger = logging.getLogger(__name__)

EXIT_REQUEUE = 75
# Preempted with nowhere to save (no checkpoint.dir): what a shell reports for a SIGTERM'd
# process, so that slurm/common.sh (which requeues 75 only) does not restart the run from zero.
EXIT_STOPPED_UNSAVED = 143


class PreemptionHandler:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self._previous = {}
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
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
