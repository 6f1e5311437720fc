"""``logging.profile_steps``: a torch.profiler trace of chosen RL steps, Megatron-LM's
``--profile --profile-step-start/--profile-step-end`` for this trainer.

The profiled ranks (``logging.profile_ranks``) write ``<run_dir>/profile/rank<r>-steps<a>-<b>``:
a Chrome trace (``.json``, open in Perfetto or chrome://tracing; CUDA kernels included on GPUs)
and the operator table (``.txt``, sorted by device time on GPUs, else CPU time). The trainer
labels its phases (``megatron_ease/rollouts``, ``megatron_ease/update``) so they stand out in the
trace. Off by default; with it on, only the profiled steps pay the profiler's overhead.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch


class StepProfiler:
    """Profiles RL steps ``start..end`` (1-based, inclusive) on the listed ``ranks``."""

    def __init__(self, steps: Sequence[int], ranks: Sequence[int], out_dir: str, rank: int):
        self.enabled = len(steps) == 2 and rank in ranks
        self.start, self.end = (int(steps[0]), int(steps[1])) if self.enabled else (0, 0)
        self.out_dir, self.rank = out_dir, rank
        self._profiler: Optional[torch.profiler.profile] = None
        self._first = 0

    def before_step(self, step: int) -> None:
        """``step``: the RL step about to run. A run resumed inside the window profiles the
        window's remaining steps."""
        if self.enabled and self._profiler is None and self.start <= step <= self.end:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, profile_memory=True)
            self._profiler.__enter__()
            self._first = step

    def after_step(self, step: int) -> None:
        if self._profiler is not None and step >= self.end:
            self.finish(step)

    def finish(self, last_step: int) -> Optional[str]:
        """Stop and write the trace (also when the run stops inside the window); the path
        written, without extension, or None when nothing was being profiled."""
        if self._profiler is None:
            return None
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        os.makedirs(self.out_dir, exist_ok=True)
        stem = os.path.join(self.out_dir, f"rank{self.rank}-steps{self._first}-{last_step}")
        profiler.export_chrome_trace(stem + ".json")
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        with open(stem + ".txt", "w") as f:
            f.write(profiler.key_averages().table(sort_by=sort_by, row_limit=60) + "\n")
        print(f"profile of steps {self._first}-{last_step} written to {stem}.json / .txt",
              flush=True)
        return stem
