#!/usr/bin/env python
"""Rerun functional cases and rewrite their golden values (on purpose: review the diff).

    .venv/bin/python tools/regenerate_golden_values.py                 # every case
    .venv/bin/python tools/regenerate_golden_values.py --case qwen25vl_dapo_ease_tp2 [--case ...]
    .venv/bin/python tools/regenerate_golden_values.py --list

Each case (tests/functional/<case>/case.yaml) runs twice through the trainer CLI under torchrun;
the two runs must agree bit for bit, else nothing is written for that case (a nondeterministic
case cannot have golden values). Then ``golden_values.json`` (Megatron-LM's layout) and
``environment.json`` (torch, megatron-core, platform, CPU ISA level) are rewritten, and the
changes against the previous golden values are printed. Exit status 1 when a case failed to run
or was not deterministic.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from tests.functional import golden  # noqa: E402


def _changes(case: golden.FunctionalCase, new: dict) -> str:
    if not case.golden_path.is_file():
        return "new golden values"
    mismatches = golden.compare_golden_values(golden.read_golden_values(case), new,
                                              golden.EXACT)
    if not mismatches:
        return "unchanged"
    return f"{len(mismatches)} change(s):\n" + "\n".join(f"    {m.describe()}"
                                                        for m in mismatches)


def regenerate(case: golden.FunctionalCase, workdir: Path, runs: int) -> bool:
    results = []
    for i in range(runs):
        try:
            metrics, seconds = golden.timed_run(case, workdir / f"run{i}")
        except golden.CaseRunError as e:
            print(f"{case.name}: FAILED\n{e}", flush=True)
            return False
        print(f"{case.name}: run {i + 1}/{runs} took {seconds:.1f} s", flush=True)
        results.append(metrics)
    for other in results[1:]:
        diffs = golden.compare_golden_values(results[0], other,
                                             golden.Tolerance(0.0, 0.0, "bitwise", ""))
        if diffs:
            print(f"{case.name}: NOT DETERMINISTIC, golden values left as they are; "
                  f"two identical runs differ:\n" + "\n".join(f"    {d.describe()}" for d in diffs),
                  flush=True)
            return False
    change = _changes(case, results[0])
    golden.write_golden_values(case, results[0])
    print(f"{case.name}: wrote {case.golden_path.relative_to(golden.REPO)} ({change})", flush=True)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", default=[], metavar="NAME",
                        help="a case directory name under tests/functional (repeatable; "
                             "default: every case)")
    parser.add_argument("--runs", type=int, default=2,
                        help="runs per case that must agree bit for bit (default 2; 1 skips "
                             "the determinism check)")
    parser.add_argument("--workdir", help="where runs write data and logs (default: a temp dir)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for case in golden.discover_cases():
            print(f"{case.name:32s} [{', '.join(case.scope)}] {case.description}")
        return 0
    try:
        cases = [golden.load_case(n) for n in args.case] if args.case else golden.discover_cases()
    except ValueError as e:
        parser.error(str(e))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="golden_values_"))
    print(f"runs under {workdir}", flush=True)
    ok = [regenerate(case, workdir / case.name, max(1, args.runs)) for case in cases]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
