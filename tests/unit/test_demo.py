"""The README main job: end to end at a reduced size (dataset, warm start, both arms, summary,
plots), and its pieces (rerun guard, verdict, overlays, argument handling, tools/run_demo.sh) with
the training stubbed out."""

import json
import os
import shutil
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest

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
    # The default data: one object per image, filling one 28 px slot (one visual token), whose
    # box is the evidence.
    import tarfile
    boxes = []
    for shard in sorted((out / "data" / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    record = json.load(tar.extractfile(member))
                    assert record["task"] == "object_colour" and len(record["evidence"]) == 1
                    boxes.append(record["evidence"][0]["box"])
    assert len(boxes) == 128
    for x0, y0, x1, y1 in boxes:
        assert x0 % 28 == 0 and y0 % 28 == 0 and (x1 - x0, y1 - y0) == (28, 28), (x0, y0, x1, y1)
    # Idempotent: a second run in the same directory reuses the data, warm start and arms.
    def snapshot():  # every file of the data, the warm start and the arms' checkpoints
        kept = [out / "data", out / "warm_start"] + [out / "runs" / arm / "checkpoints"
                                                     for arm in ("dapo_ease", "dapo")]
        files = {p: p.stat().st_mtime_ns for root in kept for p in root.rglob("*")
                 if p.is_file()}
        assert any("warm_start" in str(p) for p in files) and any(
            "checkpoints" in str(p) for p in files), sorted(map(str, files))[:20]
        return files

    before = snapshot()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert snapshot() == before, "the rerun rewrote data, the warm start or an arm's checkpoint"
    for arm in ("dapo_ease", "dapo"):
        assert not (out / "runs" / arm / "metrics.1.jsonl").exists(), f"{arm} started afresh"
        lines = (out / "runs" / arm / "metrics.jsonl").read_text().splitlines()
        assert [r["step"] for r in map(json.loads, lines) if r["split"] == "train"] == [1, 2]


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
    # It may have found some mixed groups, only too few within dapo.max_gen_batches: the
    # wording must not claim that it found none or that the policy collapsed.
    assert "found too few mixed groups within dapo.max_gen_batches" in text
    assert "no mixed groups" not in text and "collapsed" not in text


def test_an_arm_whose_dynamic_sampling_gives_up_is_evaluated_where_it_stopped(monkeypatch):
    from megatron_ease import demo
    from megatron_ease.rl.dynamic_sampling import DynamicSamplingError
    from megatron_ease.training import trainer as trainer_module

    logged = []

    class CollapsingTrainer:
        def __init__(self, cfg):
            self.cfg, self.step = cfg, 0
            self.metrics = SimpleNamespace(log=lambda step, m, prefix: logged.append((step, m)),
                                           close=lambda: None, has_record=lambda *a: False)

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


def _finished_trainer(metrics, tokenizer: bool = False):
    """A ``Trainer`` stand-in whose run is done at step 3 (``train`` returns 0); ``metrics(cfg)``
    makes its logger."""
    from megatron_ease.training import builders

    class FinishedTrainer:
        def __init__(self, cfg):
            self.cfg, self.step = cfg, 3
            self.metrics = metrics(cfg)
            if tokenizer:
                self.tokenizer = builders.load_tokenizer(cfg.data.tokenizer)

        def train(self):
            return 0

        def evaluate(self, max_samples):
            return {"accuracy": 0.1, "eval_samples": max_samples}

    return FinishedTrainer


def _run_finished_arm(monkeypatch, trainer_class, out: str, data_dir: str = "/tmp/data"):
    from megatron_ease import demo
    from megatron_ease.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "Trainer", trainer_class)
    monkeypatch.setattr(demo, "_seed", lambda seed: None)
    args = SimpleNamespace(out=out, rl_steps=3, seed=1, warm_start_steps=0,
                           overrides=[], eval_samples=7, overlay_samples=0)
    return demo.run_arm(args, data_dir, "dapo", False, "/tmp/init")


def test_a_rerun_of_a_finished_arm_logs_its_evaluation_once(monkeypatch, tmp_path):
    """Run again into the same --out, a finished arm resumes at its last step and trains
    nothing; its evaluation was logged a second time at that step."""
    from megatron_ease.training.metrics import MetricsLogger

    trainer_class = _finished_trainer(
        lambda cfg: MetricsLogger(cfg.logging.run_dir, use_wandb=False, resumed_at=3))
    for _ in range(2):
        _run_finished_arm(monkeypatch, trainer_class, str(tmp_path))
    with open(tmp_path / "runs" / "dapo" / "metrics.jsonl") as f:
        assert [(r["step"], r["split"]) for r in map(json.loads, f)] == [(3, "eval")]


@pytest.fixture
def stubbed_demo(monkeypatch):
    """``demo.main`` with the dataset, process group, warm start, arms and plots stubbed out:
    what it was asked to run is recorded in ``calls``."""
    from megatron_ease import demo, distributed
    from megatron_ease.data import synthetic

    calls = []

    def warm_start(args, data_dir):
        os.makedirs(os.path.join(args.out, "warm_start"), exist_ok=True)
        calls.append(("warm_start", args.seed))
        return os.path.join(args.out, "warm_start")

    def run_arm(args, data_dir, name, ease, init_from):
        calls.append((name, args.seed))
        run_dir = os.path.join(args.out, "runs", name)
        os.makedirs(run_dir, exist_ok=True)
        return {"eval": {"accuracy": 0.5, "anti_prior_accuracy": 0.5,
                         "evidence_attention_mass": 0.1, "eval_samples": args.eval_samples},
                "overlays": [], "run_dir": run_dir}

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", lambda *a, **k: {})
    monkeypatch.setattr(distributed, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "initialize_model_parallel", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "destroy_distributed", lambda *a, **k: None)
    monkeypatch.setattr(demo, "warm_start", warm_start)
    monkeypatch.setattr(demo, "run_arm", run_arm)
    monkeypatch.setattr(demo, "plot", lambda args, arms: [])
    return SimpleNamespace(main=demo.main, calls=calls)


def test_a_rerun_into_the_same_out_resumes_only_with_the_same_arguments(tmp_path, stubbed_demo):
    out = tmp_path / "demo"
    args = {"--out": str(out), "--rl-steps": "3", "--warm-start-steps": "2", "--seed": "1"}

    def main(overrides=(), **changed):
        argv = dict(args, **{f"--{k.replace('_', '-')}": v for k, v in changed.items()})
        return stubbed_demo.main([x for kv in argv.items() for x in kv] + list(overrides))

    assert main(["train.prompts_per_step=4"]) == 0
    # The same arguments: the warm start and arms run again (resuming what is there).
    assert main(["train.prompts_per_step=4"]) == 0
    assert [c for c in stubbed_demo.calls if c[0] == "warm_start"] == [("warm_start", 1)] * 2
    assert json.loads((out / "demo_args.json").read_text())["seed"] == 1
    summary = (out / "summary.json").read_text()
    del stubbed_demo.calls[:]
    # Other arguments would resume the old checkpoints and train nothing: refused, naming them.
    for changed, overrides, named in (
            ({"seed": "7"}, ["train.prompts_per_step=4"], "--seed (was 1, now 7)"),
            ({"warm_start_steps": "9"}, ["train.prompts_per_step=4"], "--warm-start-steps"),
            ({"data": "mixed"}, ["train.prompts_per_step=4"], "--data"),
            ({}, ["train.prompts_per_step=8"], "overrides")):
        with pytest.raises(SystemExit) as refused:
            main(overrides, **changed)
        message = str(refused.value.code)
        assert named in message and "another --out" in message and "delete" in message, message
    assert stubbed_demo.calls == []  # nothing ran ...
    assert (out / "summary.json").read_text() == summary  # ... nor was overwritten


def test_an_out_with_results_but_no_recorded_arguments_is_refused(tmp_path, stubbed_demo):
    out = tmp_path / "demo"
    (out / "warm_start").mkdir(parents=True)  # an earlier run's, its arguments unknown
    with pytest.raises(SystemExit) as refused:
        stubbed_demo.main(["--out", str(out), "--seed", "7"])
    assert "another --out" in str(refused.value.code)
    assert stubbed_demo.calls == []


def test_overlay_samples_zero_gives_an_arm_no_overlays(monkeypatch, tmp_path):
    from megatron_ease.data.synthetic import write_synthetic_dataset

    data_dir = str(tmp_path / "data")
    write_synthetic_dataset(data_dir, 8, 4)
    trainer_class = _finished_trainer(lambda cfg: SimpleNamespace(
        log=lambda *a, **k: None, close=lambda: None, has_record=lambda *a: False),
        tokenizer=True)
    # Used to fail after the arm trained: ValueError: batch_size must be positive.
    result = _run_finished_arm(monkeypatch, trainer_class, str(tmp_path), data_dir)
    assert result["overlays"] == [] and result["eval"]["accuracy"] == 0.1


def test_overlay_samples_zero_runs_and_negative_is_rejected(tmp_path, stubbed_demo, capsys):
    with pytest.raises(SystemExit) as rejected:
        stubbed_demo.main(["--out", str(tmp_path / "neg"), "--overlay-samples", "-1"])
    assert rejected.value.code == 2 and "--overlay-samples" in capsys.readouterr().err
    assert stubbed_demo.calls == []
    assert stubbed_demo.main(["--out", str(tmp_path / "zero"), "--overlay-samples", "0"]) == 0


def test_attention_overlays_share_one_colour_scale_from_zero(monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes
    import matplotlib.figure
    import numpy as np
    from PIL import Image

    from megatron_ease import demo
    from megatron_ease.eval import plots

    evidence = np.zeros((4, 4), dtype=bool)
    evidence[0, 3] = True
    # A real target: p* = (1 - alpha) q + alpha / N, positive on every token (the titles'
    # share in evidence counted every token as evidence: 1.000 for any attention).
    target = 0.95 * evidence + 0.05 / 16
    near_uniform = np.full((4, 4), 1 / 16)
    near_uniform[0, 3] += 0.003  # 0.065 in evidence against 0.0625 for uniform attention
    focused = np.full((4, 4), 0.3 / 15)
    focused[0, 3] = 0.7
    arms = {}
    for name, attention in (("dapo_ease", 3 * focused), ("dapo", near_uniform)):  # raw masses
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(json.dumps(
            {"split": "train", "step": 1, "generated_reward": 0.5}) + "\n")
        arms[name] = {"run_dir": str(run_dir), "overlays": [
            {"key": "k", "shard": "s", "question": "q", "answer": "a", "grid": [4, 4],
             "target": target.tolist(), "evidence": evidence.tolist(),
             "attention": attention.tolist()}]}
    monkeypatch.setattr(plots, "sample_images", lambda shard, key: [Image.new("RGB", (32, 32))])
    shown, colorbars = [], []
    imshow, colorbar = matplotlib.axes.Axes.imshow, matplotlib.figure.FigureBase.colorbar

    def spy_imshow(ax, data, *a, **k):
        image = imshow(ax, data, *a, **k)
        if np.ndim(data) == 2:
            shown.append((ax, image))
        return image

    def spy_colorbar(fig, mappable, *a, **k):
        colorbars.append(mappable)
        return colorbar(fig, mappable, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy_imshow)
    monkeypatch.setattr(matplotlib.figure.FigureBase, "colorbar", spy_colorbar)
    written = demo.plot(SimpleNamespace(out=str(tmp_path / "out")), arms)
    assert [os.path.basename(p) for p in written] == ["curves.png", "attention_0.png"]
    assert len(shown) == 3  # evidence target, then each arm's attention
    # One scale for the sample, from 0 to its largest share (the target's evidence token),
    # not each panel's own min/max (which made the near-uniform one look as sharp as the target).
    for _, image in shown:
        assert (image.norm.vmin, image.norm.vmax) == (0.0, target.max())
        assert np.isclose(np.asarray(image.get_array()).sum(), 1.0)
    assert len(colorbars) == 1 and colorbars[0] in [image for _, image in shown]
    titles = [ax.get_title() for ax, _ in shown]
    assert "in evidence: 0.700" in titles[1] and "dapo_ease" in titles[1]
    assert "in evidence: 0.065" in titles[2] and titles[2].startswith("dapo:")


def test_run_demo_sh_passes_extra_arguments_to_the_demo(tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    shutil.copy(os.path.join(REPO, "tools", "run_demo.sh"), tools / "run_demo.sh")
    (tools / "setup_env.sh").write_text("true\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)

    def run(*extra):
        result = subprocess.run(["bash", str(tools / "run_demo.sh"), *extra], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    head = ["-m", "megatron_ease.demo", "--out"]
    assert run() == head + ["demo_out"]
    assert run("out") == head + ["out"]
    assert run("out", "--seed", "7", "train.lr=3e-4") == head + ["out", "--seed", "7",
                                                                 "train.lr=3e-4"]


def test_invalid_overrides_are_refused_before_anything_runs(tmp_path, stubbed_demo):
    """The demo validates both arms' configs as the training CLI does (train.micro_batch_size=3
    ran; an out-of-range ease.layers failed deep inside a trainer)."""
    for override, named in (("train.micro_batch_size=3", "train.micro_batch_size (3)"),
                            ("ease.layers=[9]", "ease.layers [9] out of range")):
        out = tmp_path / override.split("=")[0]
        with pytest.raises(SystemExit) as refused:
            stubbed_demo.main(["--out", str(out), override])
        assert "config error" in str(refused.value.code) and named in str(refused.value.code)
        assert not out.exists()
    assert stubbed_demo.calls == []


def test_too_few_samples_are_refused_before_anything_runs(tmp_path, stubbed_demo, capsys):
    """--eval-samples 0 wrote no held-out shard: both arms trained (minutes) and the evaluation
    failed after them (and 0 meant the config's eval.samples to the evaluator)."""
    for flag in ("--eval-samples", "--train-samples"):
        with pytest.raises(SystemExit) as rejected:
            stubbed_demo.main(["--out", str(tmp_path / flag), flag, "0"])
        assert rejected.value.code == 2 and flag in capsys.readouterr().err
        assert not (tmp_path / flag).exists()
    with pytest.raises(SystemExit):
        stubbed_demo.main(["--out", str(tmp_path / "x"), "--eval-samples", "ten"])
    assert "--eval-samples: invalid int value: 'ten'" in capsys.readouterr().err  # not "parse"
    assert stubbed_demo.calls == []


def test_summary_is_standard_json_when_a_metric_has_no_samples(tmp_path, monkeypatch,
                                                               stubbed_demo):
    """An arm's metric without samples (NaN: no anti-prior sample among the held-out ones) was
    written to summary.json as NaN, which is not JSON."""
    from megatron_ease import demo

    def run_arm(args, data_dir, name, ease, init_from):
        run_dir = os.path.join(args.out, "runs", name)
        os.makedirs(run_dir, exist_ok=True)
        return {"eval": {"accuracy": 0.5, "anti_prior_accuracy": float("nan"),
                         "evidence_attention_mass": 0.1, "eval_samples": args.eval_samples},
                "overlays": [], "run_dir": run_dir}

    monkeypatch.setattr(demo, "run_arm", run_arm)
    assert stubbed_demo.main(["--out", str(tmp_path / "out")]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=refuse)
    assert summary["ease"]["anti_prior_accuracy"] is None and summary["ease"]["accuracy"] == 0.5
