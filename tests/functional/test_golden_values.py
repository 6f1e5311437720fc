"""Functional cases against their golden values (tests/functional/<case>/, README.md there).

Every case is marked ``nightly``; the full set runs with

    bash tools/run_tests.sh -m nightly tests/functional

The default test run (no ``-m``) runs the cases whose ``case.yaml`` scope includes ``ci`` (the
fast TP1/PP1 DAPO + EASE case) and skips the others, saying how to run them. Each case runs once
per session (``case_runs`` caches the runs), so the perturbation test reuses the fast case's run.
"""

from __future__ import annotations

import math

import pytest

from megatron_ease.config import load_config
from tests.functional import golden

pytestmark = pytest.mark.nightly

FAST_CASE = "qwen25vl_dapo_ease_tp1_pp1"
CASES = golden.discover_cases()


@pytest.fixture(scope="module")
def case_runs(tmp_path_factory):
    """``run(case, *overrides)``: the case's tracked metrics, each (case, overrides) run once."""
    cache: dict[tuple, dict] = {}

    def run(case: golden.FunctionalCase, *overrides: str) -> dict:
        key = (case.name, overrides)
        if key not in cache:
            workdir = tmp_path_factory.mktemp(case.name)
            cache[key], _ = golden.timed_run(case, workdir, overrides)
        return cache[key]

    return run


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_matches_its_golden_values(case, case_runs, request):
    if "ci" not in case.scope and not golden.nightly_selected(request.config):
        pytest.skip(f"nightly case; run the full set with `{golden.NIGHTLY_COMMAND}`")
    golden.check_against_golden(case, case_runs(case))


def test_a_changed_ease_loss_coefficient_fails_the_golden_comparison(case_runs):
    case = golden.load_case(FAST_CASE)
    tol = golden.tolerance_for(golden.read_environment(case), golden.current_environment())
    if tol.mode != "exact":
        # Measured: λ 1.0 -> 1.5 moves the metrics by at most 8e-3 relative in 4 steps, as
        # much as other CPU kernels do (README.md): only the exact comparison can see it.
        pytest.skip(f"needs the exact comparison; here it is the {tol.describe()}")
    assert load_config(str(golden.REPO / case.config), list(case.overrides)).ease.loss_coeff \
        == 1.0, f"{case.name}: this test perturbs an EASE coefficient of 1.0"
    golden.check_against_golden(case, case_runs(case))  # unperturbed: passes

    perturbed = case_runs(case, "ease.loss_coeff=1.5")
    with pytest.raises(golden.GoldenValueMismatch) as failure:
        golden.check_against_golden(case, perturbed)
    mismatches = golden.compare_golden_values(golden.read_golden_values(case), perturbed, tol)
    where = {(m.metric, m.step) for m in mismatches}
    # λ scales the EASE gradient: the first update's gradient norm moves at once, and the
    # attention (EASE loss, attention in evidence) of every later step.
    assert ("grad_norm", 1) in where, mismatches
    assert {m.metric for m in mismatches} >= {"grad_norm", "ease_loss", "attn_in_evidence"}
    # What λ cannot have touched still matches: the warm start and step 1's forward pass.
    assert not {("ease_loss", 1), ("attn_in_evidence", 1)} & where, mismatches
    assert "sft_loss" not in {m.metric for m in mismatches}, mismatches
    message = str(failure.value)
    assert f"case {case.name}:" in message
    assert f"{case.name} | grad_norm step 1: expected " in message and ", got " in message


# -- the comparison itself, on made-up curves --------------------------------------------------


def _curve(*values) -> dict:
    return golden.golden_metric({i + 1: float(v) for i, v in enumerate(values)})


def test_comparison_names_metric_step_expected_and_got():
    expected = {"grad_norm": _curve(1.0, 2.0, 3.0), "reward": _curve(0.5, 0.5, 0.5)}
    actual = {"grad_norm": _curve(1.0, 2.5, 3.0), "reward": _curve(0.5, 0.5, 0.5)}
    mismatches = golden.compare_golden_values(expected, actual, golden.EXACT)
    assert [(m.metric, m.step, m.expected, m.got) for m in mismatches] == \
        [("grad_norm", 2, 2.0, 2.5)]
    case = golden.load_case(FAST_CASE)
    report = golden.mismatch_report(case, mismatches, golden.EXACT)
    assert f"{case.name} | grad_norm step 2: expected 2.0, got 2.5 (rel diff 2.50e-01)" in report
    assert f"--case {case.name}" in report


def test_comparison_tolerances_and_nan():
    expected = {"loss": _curve(1.0, float("nan"))}
    assert expected["loss"]["values"] == {"1": 1.0, "2": "nan"}  # Megatron-LM writes "nan"
    assert golden.compare_golden_values(expected, {"loss": _curve(1.0 + 5e-7, float("nan"))},
                                        golden.EXACT) == []
    assert len(golden.compare_golden_values(expected, {"loss": _curve(1.0 + 2e-6, float("nan"))},
                                            golden.EXACT)) == 1
    assert len(golden.compare_golden_values(expected, {"loss": _curve(1.0, 1.0)},
                                            golden.EXACT)) == 1
    assert golden.compare_golden_values(expected, {"loss": _curve(1.04, float("nan"))},
                                        golden.APPROXIMATE) == []


def test_comparison_reports_missing_steps_and_metrics_on_either_side():
    expected = {"loss": _curve(1.0, 2.0), "grad_norm": _curve(3.0, 4.0)}
    actual = {"loss": _curve(1.0), "reward": _curve(0.5, 0.5)}
    notes = {(m.metric, m.step, m.note) for m in
             golden.compare_golden_values(expected, actual, golden.EXACT)}
    assert notes == {("loss", 2, "the run did not reach or log this step"),
                     ("grad_norm", None, "the run did not record it"),
                     ("reward", None, "the run records a tracked metric the golden file lacks")}
    longer = {"loss": _curve(1.0, 2.0, 3.0), "grad_norm": _curve(3.0, 4.0)}
    [extra] = golden.compare_golden_values(expected, longer, golden.EXACT)
    assert (extra.metric, extra.got) == ("loss", "also steps 3")


def test_tolerance_is_exact_only_on_the_golden_platform_and_build():
    env = golden.current_environment()
    assert golden.tolerance_for(dict(env), env).mode == "exact"
    assert golden.tolerance_for(dict(env, numpy="0.0"), env).mode == "exact"  # recorded only
    for key in golden.EXACT_ENVIRONMENT_KEYS:
        tol = golden.tolerance_for(dict(env, **{key: "other"}), env)
        assert (tol.rtol, tol.mode) == (golden.APPROXIMATE.rtol, "approximate")
        assert f"{key} other -> {env[key]}" in tol.reason
    assert golden.tolerance_for({}, env).mode == "approximate"  # no environment.json


def test_every_case_is_well_formed():
    assert FAST_CASE in {c.name for c in CASES}
    assert [c.name for c in CASES if "ci" in c.scope] == [FAST_CASE]
    for case in CASES:
        assert case.golden_path.is_file(), f"{case.name}: no golden values"
        values = golden.read_golden_values(case)
        assert {"dapo_loss", "reward", "grad_norm"} <= set(values), (case.name, sorted(values))
        for name, metric in values.items():
            steps = [int(s) for s in metric["values"]]
            assert steps == list(range(metric["start_step"], metric["end_step"] + 1,
                                       metric["step_interval"])), (case.name, name)
            assert all(v == "nan" or math.isfinite(v) for v in metric["values"].values())
        assert set(golden.read_environment(case)) >= set(golden.EXACT_ENVIRONMENT_KEYS)
        assert case.nproc_per_node == 2
