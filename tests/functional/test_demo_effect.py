"""Nightly: the README's main job, the CPU demo at its defaults, still shows the EASE effect.

The golden values pin what 4 RL steps compute; this pins what 150 steps are for. Measured on
2026-12-04 in 6 seeds (README, "The demo"): DAPO+EASE attention in evidence 0.65-0.69 and
held-out accuracy 0.79-1.00, DAPO alone 0.11-0.23 and 0.39-0.53. The thresholds below sit well
inside those ranges, so a change of platform or kernel that moves the trajectory does not fail
them; a change that breaks the attention supervision, its gating or the policy update does (an
EASE arm that never reads stays at 0.2, the blind policy's accuracy). About 6 minutes on one core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.functional import golden

pytestmark = pytest.mark.nightly

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_default_demo_shows_ease_finding_and_reading_the_evidence(tmp_path, request):
    if not golden.nightly_selected(request.config):
        pytest.skip(f"nightly; run with `{golden.NIGHTLY_COMMAND}`")
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "megatron_ease.demo", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    ease, dapo = summary["ease"], summary["dapo"]
    report = json.dumps({"ease": ease, "dapo": dapo, "verdict": summary["verdict"]}, indent=1)
    assert ease["eval_samples"] == dapo["eval_samples"] == 500, report
    # EASE finds the evidence; DAPO alone does not look (uniform would be 1/16).
    assert ease["evidence_attention_mass"] > 0.5, report
    assert dapo["evidence_attention_mass"] < 0.35, report
    # ... and reads it: well above chance (0.2) and above DAPO alone.
    assert ease["accuracy"] > 0.6, report
    assert ease["accuracy"] - dapo["accuracy"] > 0.15, report
    assert summary["verdict"].startswith("EASE raised attention in evidence"), report
    assert "raised held-out accuracy" in summary["verdict"], report
