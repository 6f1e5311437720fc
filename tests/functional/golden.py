"""Golden-value functional tests in Megatron-LM's manner: run a case, compare its metrics.

A case is a directory ``tests/functional/<case>/`` with

- ``case.yaml``: a base run config (``examples/*.yaml``), the dotted overrides that make the case
  (parallel layout, model family, a few short RL steps), the world size and the scope (``ci``:
  also part of the default test run; ``nightly``: the full set);
- ``golden_values.json``: the reference curves in Megatron-LM's layout,
  ``{metric: {"start_step": 1, "end_step": N, "step_interval": 1, "values": {"1": v1, ...}}}``
  (``"nan"`` for a step where the value is not finite);
- ``environment.json``: the platform and library versions the golden values were made on.

A case runs through the real trainer CLI under torchrun,

    python -m torch.distributed.run --nproc-per-node N -m megatron_ease.train \\
        --config <config> <overrides> <data, run_dir and checkpoint locations>

and its ``metrics.jsonl`` is compared with the golden values: exactly (rtol 1e-6) on the platform
and library versions they were made on, within ``APPROXIMATE`` elsewhere (see README.md).
``tools/regenerate_golden_values.py`` rewrites them on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

REPO = Path(__file__).resolve().parents[2]
CASES_DIR = Path(__file__).resolve().parent
GOLDEN_FILE = "golden_values.json"
ENVIRONMENT_FILE = "environment.json"

# Compared metrics: (metrics.jsonl split, metric name). The warm start's supervised loss is
# Megatron's "lm loss"; the RL step's policy loss, reward, EASE loss, attention-in-evidence and
# gradient norm follow. A case records whichever of these its run produces.
TRACKED = (
    ("warm_start", "sft_loss"),
    ("train", "dapo_loss"),
    ("train", "reward"),
    ("train", "ease_loss"),
    ("train", "attn_in_evidence"),
    ("train", "grad_norm"),
)

# What has to match for the exact comparison: CPU float results depend on the torch build and
# the kernels it dispatches to (the ISA level), and the initial weights on megatron-core's
# initialisation code.
EXACT_ENVIRONMENT_KEYS = ("torch", "megatron_core", "system", "machine", "cpu_capability")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    mode: str  # "exact" | "approximate"
    reason: str

    def describe(self) -> str:
        return f"{self.mode} comparison (rtol {self.rtol:g}, atol {self.atol:g}): {self.reason}"


EXACT = Tolerance(rtol=1e-6, atol=0.0, mode="exact", reason="")
# Another torch version or CPU changes float rounding; in a few RL steps that stays within a few
# per cent until a sampled token flips, which can move a step's reward by a whole rollout.
APPROXIMATE = Tolerance(rtol=5e-2, atol=1e-3, mode="approximate", reason="")


@dataclasses.dataclass(frozen=True)
class FunctionalCase:
    name: str
    directory: Path
    description: str
    config: str  # base YAML, relative to the repo root
    overrides: tuple[str, ...]
    nproc_per_node: int
    scope: tuple[str, ...]

    @classmethod
    def load(cls, directory: Path) -> "FunctionalCase":
        path = directory / "case.yaml"
        with open(path) as f:
            spec = yaml.safe_load(f) or {}
        known = {"description", "config", "overrides", "nproc_per_node", "scope"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; expected {sorted(known)}")
        scope = tuple(spec.get("scope", ["nightly"]))
        bad = sorted(set(scope) - {"ci", "nightly"})
        if bad:
            raise ValueError(f"{path}: scope {bad} is not ci or nightly")
        return cls(name=directory.name, directory=directory,
                   description=str(spec.get("description", "")).strip(),
                   config=spec["config"], overrides=tuple(spec.get("overrides", [])),
                   nproc_per_node=int(spec.get("nproc_per_node", 1)), scope=scope)

    @property
    def golden_path(self) -> Path:
        return self.directory / GOLDEN_FILE

    @property
    def environment_path(self) -> Path:
        return self.directory / ENVIRONMENT_FILE


NIGHTLY_COMMAND = "bash tools/run_tests.sh -m nightly tests/functional"


def nightly_selected(config) -> bool:
    """Whether pytest runs with ``-m nightly`` (the nightly set), from its ``config``."""
    expression = config.option.markexpr or ""
    return "nightly" in expression and "not nightly" not in expression


def discover_cases() -> list[FunctionalCase]:
    return [FunctionalCase.load(d) for d in sorted(CASES_DIR.iterdir())
            if (d / "case.yaml").is_file()]


def load_case(name: str) -> FunctionalCase:
    directory = CASES_DIR / name
    if not (directory / "case.yaml").is_file():
        known = ", ".join(c.name for c in discover_cases())
        raise ValueError(f"no functional case {name!r} (known: {known})")
    return FunctionalCase.load(directory)


# -- running a case --------------------------------------------------------------------------------


class CaseRunError(RuntimeError):
    """The trainer did not finish; the message carries the command and the end of its log."""


def launch_command(case: FunctionalCase, workdir: Path, port: int,
                   extra_overrides: Sequence[str] = ()) -> list[str]:
    """The torchrun command line of one run; data, run dir and checkpoints go under ``workdir``."""
    data = workdir / "data"
    locations = [f"data.train_shards={data}/train/*.tar", f"data.eval_shards={data}/eval/*.tar",
                 f"data.tokenizer={data}/tokenizer", f"logging.run_dir={workdir / 'run'}",
                 "checkpoint.dir=null"]
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nproc-per-node={case.nproc_per_node}", "--master-addr=127.0.0.1",
            f"--master-port={port}", "-m", "megatron_ease.train",
            "--config", str(REPO / case.config), *case.overrides, *locations, *extra_overrides]


def run_case(case: FunctionalCase, workdir: Path, extra_overrides: Sequence[str] = (),
             timeout_s: float = 600.0) -> Path:
    """Run the case in a fresh ``workdir``; returns the run's metrics.jsonl."""
    from megatron_ease.distributed import find_free_port

    workdir = Path(workdir)
    if (workdir / "run").exists():
        # The metrics file is appended to: a second run in one directory would mix curves.
        raise ValueError(f"{workdir / 'run'} exists; run each case in a fresh directory")
    workdir.mkdir(parents=True, exist_ok=True)
    # CPU cases (gloo): GPUs hidden, also on a machine that has some.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    for attempt in range(3):
        cmd = launch_command(case, workdir, find_free_port(), extra_overrides)
        output, status = _run(cmd, env, timeout_s)
        # find_free_port's port can be taken again before torchrun binds it: try another one.
        if status != 0 and "address already in use" in output.lower() and attempt < 2:
            continue
        break
    (workdir / "train.log").write_text(output)
    if status != 0:
        raise CaseRunError(f"case {case.name}: trainer exited with status {status} (log: "
                           f"{workdir / 'train.log'})\ncommand: {' '.join(cmd)}\n"
                           f"{_failure_excerpt(output)}")
    return workdir / "run" / "metrics.jsonl"


def _failure_excerpt(output: str, max_lines: int = 60) -> str:
    """The first worker's traceback (torchrun's own summary after it says little), else the
    log's last lines."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    if not starts:
        return "--- last lines of its log ---\n" + "\n".join(lines[-max_lines:])
    end = starts[1] if len(starts) > 1 else len(lines)
    return "--- first traceback in its log ---\n" + \
        "\n".join(lines[starts[0]:min(end, starts[0] + max_lines)])


def _run(cmd: list[str], env: dict, timeout_s: float) -> tuple[str, int]:
    # Its own session, so a timeout takes torchrun's workers down with it.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return output + f"\n[timed out after {timeout_s:.0f} s]", 124
    return output, proc.returncode


# -- metrics and golden values ---------------------------------------------------------------------


def read_run_metrics(metrics_jsonl: Path) -> dict[str, dict]:
    """A run's tracked metrics in the golden-values layout (last record of a step wins)."""
    series: dict[str, dict[int, float]] = {}
    with open(metrics_jsonl) as f:
        for line in f:
            record = json.loads(line)
            for split, name in TRACKED:
                if record.get("split") == split and name in record:
                    series.setdefault(name, {})[int(record["step"])] = float(record[name])
    return {name: golden_metric(values) for name, values in series.items()}


def golden_metric(values: dict[int, float]) -> dict:
    """One metric's ``{step: value}`` in Megatron-LM's layout."""
    steps = sorted(values)
    interval = steps[1] - steps[0] if len(steps) > 1 else 1
    return {"start_step": steps[0], "end_step": steps[-1], "step_interval": interval,
            "values": {str(s): values[s] if math.isfinite(values[s]) else "nan" for s in steps}}


def read_golden_values(case: FunctionalCase) -> dict[str, dict]:
    if not case.golden_path.is_file():
        raise FileNotFoundError(
            f"case {case.name}: no {case.golden_path.relative_to(REPO)}; create it with "
            f"`.venv/bin/python tools/regenerate_golden_values.py --case {case.name}`")
    with open(case.golden_path) as f:
        return json.load(f)


def current_environment() -> dict:
    from importlib.metadata import version

    import torch

    return {"torch": torch.__version__, "megatron_core": version("megatron-core"),
            "numpy": version("numpy"), "pillow": version("pillow"),
            "python": platform.python_version(), "system": platform.system(),
            "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def read_environment(case: FunctionalCase) -> dict:
    if not case.environment_path.is_file():
        return {}
    with open(case.environment_path) as f:
        return json.load(f)


def tolerance_for(golden_env: dict, env: dict) -> Tolerance:
    """Exact where the golden values were made on this platform and torch/megatron-core build,
    approximate elsewhere (the reason names what differs)."""
    differs = [f"{k} {golden_env.get(k)} -> {env.get(k)}" for k in EXACT_ENVIRONMENT_KEYS
               if golden_env.get(k) != env.get(k)]
    if differs:
        return dataclasses.replace(APPROXIMATE,
                                   reason="golden values made elsewhere: " + ", ".join(differs))
    summary = ", ".join(f"{k} {env.get(k)}" for k in EXACT_ENVIRONMENT_KEYS)
    return dataclasses.replace(EXACT, reason=f"same platform as the golden values ({summary})")


@dataclasses.dataclass(frozen=True)
class Mismatch:
    metric: str
    step: Optional[int]
    expected: object
    got: object
    note: str = ""

    def describe(self) -> str:
        where = f"{self.metric} step {self.step}" if self.step is not None else self.metric
        line = f"{where}: expected {self.expected!r}, got {self.got!r}"
        if isinstance(self.expected, float) and isinstance(self.got, float) and self.expected:
            line += f" (rel diff {abs(self.got - self.expected) / abs(self.expected):.2e})"
        return line + (f" [{self.note}]" if self.note else "")


def _as_float(value) -> float:
    return float("nan") if value == "nan" else float(value)


def _close(expected: float, got: float, tol: Tolerance) -> bool:
    if math.isnan(expected) or math.isnan(got):
        return math.isnan(expected) and math.isnan(got)
    return abs(got - expected) <= tol.atol + tol.rtol * abs(expected)


def compare_golden_values(golden: dict[str, dict], actual: dict[str, dict],
                          tol: Tolerance) -> list[Mismatch]:
    """Every golden metric at every golden step, and nothing tracked that the golden file lacks."""
    mismatches = []
    for metric, spec in golden.items():
        if metric not in actual:
            mismatches.append(Mismatch(metric, None, "a recorded metric", "none",
                                       "the run did not record it"))
            continue
        got_values = actual[metric]["values"]
        for step, expected in spec["values"].items():
            if step not in got_values:
                mismatches.append(Mismatch(metric, int(step), expected, "no value",
                                           "the run did not reach or log this step"))
            elif not _close(_as_float(expected), _as_float(got_values[step]), tol):
                mismatches.append(Mismatch(metric, int(step), expected, got_values[step]))
        extra = sorted(set(got_values) - set(spec["values"]), key=int)
        if extra:
            expected_steps = f"steps {spec['start_step']}..{spec['end_step']}"
            mismatches.append(Mismatch(metric, None, expected_steps,
                                       f"also steps {', '.join(extra)}",
                                       "the case runs more steps than its golden values"))
    for metric in sorted(set(actual) - set(golden)):
        mismatches.append(Mismatch(metric, None, "not recorded", "recorded",
                                   "the run records a tracked metric the golden file lacks"))
    return mismatches


class GoldenValueMismatch(AssertionError):
    pass


def mismatch_report(case: FunctionalCase, mismatches: list[Mismatch], tol: Tolerance) -> str:
    lines = [f"case {case.name}: {len(mismatches)} value(s) differ from "
             f"{case.golden_path.relative_to(REPO)} ({tol.describe()})"]
    lines += [f"  {case.name} | {m.describe()}" for m in mismatches]
    lines.append("If the change is intended, regenerate: .venv/bin/python "
                 f"tools/regenerate_golden_values.py --case {case.name}")
    return "\n".join(lines)


def check_against_golden(case: FunctionalCase, actual: dict[str, dict],
                         env: Optional[dict] = None) -> Tolerance:
    """Raise ``GoldenValueMismatch`` naming case, metric, step, expected and got; returns the
    tolerance used."""
    tol = tolerance_for(read_environment(case), env or current_environment())
    mismatches = compare_golden_values(read_golden_values(case), actual, tol)
    if mismatches:
        raise GoldenValueMismatch(mismatch_report(case, mismatches, tol))
    return tol


def write_golden_values(case: FunctionalCase, actual: dict[str, dict],
                        env: Optional[dict] = None) -> None:
    with open(case.golden_path, "w") as f:
        json.dump(actual, f, indent=2)
        f.write("\n")
    with open(case.environment_path, "w") as f:
        json.dump(env or current_environment(), f, indent=2)
        f.write("\n")


def timed_run(case: FunctionalCase, workdir: Path, extra_overrides: Sequence[str] = (),
              timeout_s: float = 600.0) -> tuple[dict[str, dict], float]:
    """Run the case; its tracked metrics and the wall time in seconds."""
    start = time.monotonic()
    metrics = read_run_metrics(run_case(case, workdir, extra_overrides, timeout_s))
    return metrics, time.monotonic() - start
