"""The README main job end to end at a reduced size: dataset, warm start, both arms, summary,
plots."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_runs_end_to_end_at_reduced_size(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "megatron_ease.demo", "--out", str(out), "--train-samples", "128",
           "--eval-samples", "32", "--warm-start-steps", "5", "--rl-steps", "2",
           "--overlay-samples", "2", "train.prompts_per_step=4", "dapo.max_gen_batches=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for arm in ("ease", "dapo"):
        assert summary[arm]["eval_samples"] == 32
        for key in ("accuracy", "anti_prior_accuracy", "evidence_attention_mass"):
            assert 0.0 <= summary[arm][key] <= 1.0, (arm, key, summary[arm])
    assert "attention in evidence" in summary["verdict"]
    plots = sorted(os.listdir(out / "plots"))
    assert plots == ["attention_0.png", "attention_1.png", "curves.png"]
    assert "DAPO+EASE" in result.stdout and "evidence_attention_mass" in result.stdout
    for arm in ("dapo_ease", "dapo"):
        lines = (out / "runs" / arm / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line) for line in lines if json.loads(line)["split"] == "train"]
        assert [s["step"] for s in steps] == [1, 2]
    # Idempotent: a second run in the same directory reuses the data, warm start and arms.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
