"""The README main job end to end at a reduced size: dataset, warm start, both arms, summary,
plots."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

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


def test_verdict_names_both_effects_within_noise_bands_and_a_collapsed_arm():
    from megatron_ease.demo import verdict

    def arm(accuracy, attention, **extra):
        return {"accuracy": accuracy, "evidence_attention_mass": attention, **extra}

    text = verdict({"ease": arm(0.53, 0.62), "dapo": arm(0.19, 0.07)}, 150, 500)
    assert text.startswith("EASE raised attention in evidence (+0.550) and raised held-out "
                           "accuracy (+0.340)")
    # 0.02 of accuracy on 500 samples is within two binomial standard errors (~0.05).
    text = verdict({"ease": arm(0.45, 0.075), "dapo": arm(0.43, 0.07)}, 40, 500)
    assert "did not change attention in evidence" in text
    assert "did not change held-out accuracy" in text
    text = verdict({"ease": arm(0.2, 0.5), "dapo": arm(0.4, 0.6, stopped_early_at_step=5)}, 9, 500)
    assert "lowered attention" in text and "lowered held-out accuracy" in text
    assert "the DAPO arm stopped at step 5" in text and "DAPO+EASE arm stopped" not in text


def test_an_arm_whose_dynamic_sampling_gives_up_is_evaluated_where_it_stopped(monkeypatch):
    from megatron_ease import demo
    from megatron_ease.rl.dynamic_sampling import DynamicSamplingError
    from megatron_ease.training import trainer as trainer_module

    logged = []

    class CollapsingTrainer:
        def __init__(self, cfg):
            self.cfg, self.step = cfg, 0
            self.metrics = SimpleNamespace(log=lambda step, m, prefix: logged.append((step, m)),
                                           close=lambda: None)

        def train(self):
            self.step = 5
            raise DynamicSamplingError("dynamic sampling kept 3 of the 16 groups needed")

        def evaluate(self, max_samples):
            return {"accuracy": 0.1, "eval_samples": max_samples}

    monkeypatch.setattr(trainer_module, "Trainer", CollapsingTrainer)
    monkeypatch.setattr(demo, "attention_maps", lambda trainer, n: [])
    monkeypatch.setattr(demo, "_seed", lambda seed: None)
    args = SimpleNamespace(out="/tmp/unused", rl_steps=9, seed=1, warm_start_steps=0,
                           overrides=[], eval_samples=7, overlay_samples=0)
    result = demo.run_arm(args, "/tmp/data", "dapo", False, "/tmp/init")
    assert result["eval"] == {"accuracy": 0.1, "eval_samples": 7, "stopped_early_at_step": 5}
    assert logged == [(5, result["eval"])]
