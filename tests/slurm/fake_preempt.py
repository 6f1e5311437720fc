"""A stand-in for the trainer's preemption contract, run by slurm/common.sh as ``ENTRY``.

First run of the job: each rank marks itself ready, waits for USR1 (what ``--signal=USR1@900``
delivers before the time limit) or SIGTERM, "saves a checkpoint" and exits 75 (EX_TEMPFAIL), as
the trainer does. A requeued run finds its checkpoint and exits 0. State lives in
``$FAKE_PREEMPT_DIR``; every run prints ``fake_preempt rank=<r> restart=<SLURM_RESTART_COUNT>``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

EX_TEMPFAIL = 75
WAIT_FOR_SIGNAL_S = 60


def main() -> int:
    state = Path(os.environ["FAKE_PREEMPT_DIR"])
    rank = int(os.environ["SLURM_PROCID"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    print(f"fake_preempt rank={rank} restart={restart} args={sys.argv[1:]}", flush=True)
    checkpoint = state / f"checkpoint.{rank}"
    if checkpoint.exists():
        print(f"rank={rank} resumed", flush=True)
        return 0
    # Block first, then say ready: a signal sent after "ready" waits for sigtimedwait.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    (state / f"ready.{rank}").write_text(os.environ["SLURM_JOB_ID"])
    received = signal.sigtimedwait({signal.SIGUSR1, signal.SIGTERM}, WAIT_FOR_SIGNAL_S)
    if received is None:
        print(f"rank={rank} no USR1/SIGTERM within {WAIT_FOR_SIGNAL_S} s", flush=True)
        return 1
    checkpoint.touch()
    print(f"rank={rank} got {signal.Signals(received.si_signo).name}: saved, exiting {EX_TEMPFAIL}",
          flush=True)
    return EX_TEMPFAIL


if __name__ == "__main__":
    raise SystemExit(main())
