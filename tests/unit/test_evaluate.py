"""``python -m megatron_ease.evaluate``: a trainer checkpoint evaluated without training gives the
metrics the trainer's own validation logged for it, in another parallel layout too; overlays;
one-line refusals of a bad checkpoint or path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_ease.distributed import find_free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "examples", "tiny_cpu_ease.yaml")
METRICS = ("accuracy", "anti_prior_accuracy", "evidence_attention_mass", "eval_samples")


def _env() -> dict:
    # GPUs hidden: the CPU venv's torch on a GPU machine would otherwise be refused.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")


def _data_overrides(data: str) -> list[str]:
    return [f"data.train_shards={data}/train/*.tar", f"data.eval_shards={data}/eval/*.tar",
            f"data.tokenizer={data}/tokenizer", "data.synthetic=false", "eval.batch_size=4",
            "dapo.max_response_length=6", "dapo.overlong_buffer_length=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One RL step (after a short warm start) saved at step 1 and validated on 8 samples."""
    from megatron_ease.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("evaluate")
    data = str(root / "data")
    write_synthetic_dataset(data, num_train=64, num_eval=16, seed=0, samples_per_shard=32)
    run_dir = str(root / "run")
    result = subprocess.run(
        [sys.executable, "-m", "megatron_ease.train", "--config", CONFIG,
         *_data_overrides(data), f"logging.run_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt",
         "train.steps=1", "train.warm_start_steps=8", "train.warm_start_lr=3e-3",
         "train.prompts_per_step=4", "dapo.group_size=4", "train.micro_batch_size=8",
         "dapo.max_gen_batches=16", "eval.interval=1", "eval.samples=8"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        [validation] = [r for r in map(json.loads, f) if r["split"] == "eval"]
    return {"root": root, "data": data, "ckpt": f"{run_dir}/ckpt", "validation": validation}


def _evaluate(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "megatron_ease.evaluate"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={find_free_port()}",
        "-m", "megatron_ease.evaluate"]
    return subprocess.run([*launcher, "--config", CONFIG, *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)


def test_a_checkpoint_evaluates_as_the_trainer_validated_it_with_overlays(trained):
    out = trained["root"] / "eval" / "results.json"
    result = _evaluate(["--checkpoint", trained["ckpt"], "--samples", "8", "--out", str(out),
                        "--overlays", "2", *_data_overrides(trained["data"])])
    assert result.returncode == 0, result.stdout + result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed
    validation = trained["validation"]
    assert validation["eval_samples"] == 8 and printed["skipped_samples"] == 0
    for name in METRICS:
        assert printed[name] == pytest.approx(validation[name], rel=1e-6), name
    assert printed["checkpoint"].endswith("iter_0000001")
    assert [os.path.basename(p) for p in printed["plots"]] == ["attention_0.png",
                                                                "attention_1.png"]
    assert all(os.path.getsize(p) > 0 and os.path.dirname(p) == str(out.parent / "plots")
               for p in printed["plots"])


def test_a_checkpoint_evaluates_the_same_at_pipeline_parallel_2(trained):
    """Saved by one process, loaded into two pipeline stages: the same answers and scores, and
    attention in evidence summed over both stages' EASE layers."""
    result = _evaluate(["--checkpoint", trained["ckpt"], "--samples", "8",
                        "parallel.pipeline_model_parallel_size=2",
                        *_data_overrides(trained["data"])], nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 only
    printed = json.loads(lines[0])
    for name in METRICS:
        assert printed[name] == pytest.approx(trained["validation"][name], rel=1e-5), name


def test_overlays_at_pipeline_parallel_2_average_every_stages_ease_layers(trained, tmp_path):
    """Overlays read the masses of the EASE layers on the logging rank's stage only, and raised
    on a stage without any: with ease.layers=[1, 3] at PP 2 each stage holds one, with [3] the
    first holds none. Either way the grids equal one process's."""
    maps = {}
    for layers in ("[1,3]", "[3]"):
        for pp in (1, 2):
            out = tmp_path / f"pp{pp}_{layers}" / "results.json"
            result = _evaluate(["--checkpoint", trained["ckpt"], "--samples", "4", "--out",
                                str(out), "--overlays", "2", f"ease.layers={layers}",
                                f"parallel.pipeline_model_parallel_size={pp}",
                                *_data_overrides(trained["data"])], nproc=pp)
            assert result.returncode == 0, result.stdout + result.stderr
            [grids] = json.loads(open(json.loads(out.read_text())["attention_maps"]).read(
                )).values()
            maps[pp, layers] = grids
        assert len(maps[1, layers]) == len(maps[2, layers]) == 2
        for one, two in zip(maps[1, layers], maps[2, layers], strict=True):
            assert one["grid"] == two["grid"] and one["key"] == two["key"]
            np.testing.assert_allclose(one["attention"], two["attention"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(maps[1, "[1,3]"][0]["attention"], maps[1, "[3]"][0]["attention"])


@pytest.mark.parametrize("case, message", [
    ("missing", "config error: --checkpoint: no checkpoint at"),
    ("not_a_checkpoint", "config error: --checkpoint: "),
    ("no_shards", "config error: data.eval_shards: no shard file matches"),
    # Refused before the evaluation (it failed after it, losing the results).
    ("overlays_without_layers", "config error: --overlays draws the attention of the EASE"),
])
def test_bad_checkpoint_or_shards_are_one_line_refusals(trained, tmp_path, case, message):
    checkpoint, overrides = trained["ckpt"], _data_overrides(trained["data"])
    if case == "missing":
        checkpoint = str(tmp_path / "nowhere")
    elif case == "not_a_checkpoint":
        checkpoint = trained["data"]  # a directory, of shards
    elif case == "overlays_without_layers":
        overrides += ["ease.layers=[]", "ease.enabled=false", "--overlays", "1"]
    else:
        overrides.append(f"data.eval_shards={tmp_path}/none-*.tar")
    result = _evaluate(["--checkpoint", checkpoint, *overrides])
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "config error" in line]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


# -- the Evaluator's bookkeeping and the overlays' image, in process (no model) ---------------------

def _fake_evaluator(monkeypatch, records: list[dict], batch_size: int = 3):
    """An ``Evaluator`` at DP 1 whose reader yields ``records`` and whose greedy answer is right
    exactly for the records with ``"answer": "yes"``."""
    from collections import Counter
    from types import SimpleNamespace

    import torch

    import megatron_ease.rl.rewards as rewards
    from megatron_ease.config import Config
    from megatron_ease.eval import evaluator
    from megatron_ease.training import builders

    class Reader:
        skipped = Counter()

        def __init__(self, max_samples):
            self.records = records[:max_samples]

        def __iter__(self):
            for start in range(0, len(self.records), batch_size):
                part = self.records[start:start + batch_size]
                yield {"records": part, "answers": [r["answer"] for r in part],
                       "answer_types": ["yesno"] * len(part), "choices": [None] * len(part)}

    monkeypatch.setattr(builders, "build_reader", lambda *a, max_samples=None, **k:
                        Reader(max_samples))
    monkeypatch.setattr(evaluator, "split_prompts", lambda batch: [None] * len(batch["records"]))
    monkeypatch.setattr(evaluator, "generate", lambda engine, prompts, params: SimpleNamespace(
        tokens=torch.zeros(len(prompts), 1, dtype=torch.long), lengths=torch.ones(len(prompts))))
    monkeypatch.setattr(rewards, "compute_rewards", lambda texts, answers, *a: SimpleNamespace(
        accuracy=torch.tensor([float(a == "yes") for a in answers])))
    cfg = Config()
    cfg.ease.layers, cfg.logging.progress = [], False
    e = evaluator.Evaluator.__new__(evaluator.Evaluator)
    e.cfg, e.engine, e.model_chunks = cfg, None, []
    e.tokenizer = SimpleNamespace(batch_decode=lambda rows, **k: [""] * len(rows))
    e.dp_rank, e.dp_size, e.dp_group, e.is_logging_rank = 0, 1, None, True
    return e


def test_anti_prior_accuracy_counts_only_samples_known_to_go_against_the_prior(monkeypatch):
    """A record that names no language prior (a real benchmark's) was counted as anti-prior:
    on such a set anti-prior accuracy was the accuracy itself. It is over the samples whose
    answer is known not to be the prior one (``answer_is_prior`` false, or a ``prior_answer``
    other than the answer), and without any such sample it has no value."""
    records = [{"answer": "yes", "answer_is_prior": True},
               {"answer": "no", "answer_is_prior": False},
               {"answer": "yes", "answer_is_prior": False},
               {"answer": "yes", "prior_answer": "no"},  # anti-prior, right
               {"answer": "no", "prior_answer": "no"},  # prior
               {"answer": "yes"}, {"answer": "no"}]  # no prior named: in neither subset
    metrics = _fake_evaluator(monkeypatch, records).evaluate(len(records))
    assert metrics["accuracy"] == pytest.approx(4 / 7) and metrics["eval_samples"] == 7
    assert metrics["anti_prior_accuracy"] == pytest.approx(2 / 3)  # was 3 / 6
    unlabelled = _fake_evaluator(monkeypatch, records[-2:]).evaluate(2)
    assert unlabelled["accuracy"] == 0.5 and np.isnan(unlabelled["anti_prior_accuracy"])
    assert (metrics["anti_prior_samples"], unlabelled["anti_prior_samples"]) == (3, 0)


def test_metrics_without_samples_are_json_null_not_nan(monkeypatch, tmp_path):
    """Every sample skipped (or none against the prior): the metric has no value. The CLI wrote
    it as ``NaN``, which is not JSON (jq, JavaScript and strict parsers refuse the file)."""
    from megatron_ease import evaluate

    metrics = _fake_evaluator(monkeypatch, []).evaluate(4)
    assert metrics["eval_samples"] == 0 and np.isnan(metrics["accuracy"])
    evaluate._write_json(str(tmp_path / "results.json"), {"checkpoint": "c", **metrics})
    text = (tmp_path / "results.json").read_text()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    parsed = json.loads(text, parse_constant=refuse)
    assert parsed["accuracy"] is None and parsed["anti_prior_accuracy"] is None
    assert parsed["eval_samples"] == 0


def test_overlays_draw_the_image_the_reader_decoded(tmp_path):
    """The overlay's image is read back from the shard as the reader decoded it: upright (a
    camera JPEG's EXIF orientation applied: its visual tokens, boxes and masks are in that
    frame; the overlay drew the grid over the sideways image), and found for a key that
    contains "mask" (every member was taken for a mask: IndexError)."""
    import io
    import tarfile

    from PIL import Image

    from megatron_ease.data.schema import decode_sample
    from megatron_ease.eval.plots import sample_images

    image = Image.new("RGB", (112, 56), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown (and read) rotated by 90 degrees
    raw = io.BytesIO()
    image.save(raw, "JPEG", exif=exif.tobytes())
    record = json.dumps({"question": "q?", "answer": "yes", "answer_type": "yesno"}).encode()
    shard = str(tmp_path / "s.tar")
    members = {}
    with tarfile.open(shard, "w") as tar:
        for key in ("k2", "dir/unmasked_1"):
            for ext, data in (("jpg", raw.getvalue()), ("json", record),
                              ("mask.png", _png(Image.new("L", (56, 112), 255)))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                members[key, ext] = data
    for key in ("k2", "dir/unmasked_1"):
        decoded = decode_sample({ext: members[key, ext] for ext in ("jpg", "json")}, key, shard)
        [shown] = sample_images(shard, key)
        assert shown.size == decoded.images[0].size == (56, 112), key
        assert shown.mode == "RGB"


def test_overlays_draw_every_image_of_a_multi_image_sample(tmp_path, monkeypatch):
    """A sample of two images was drawn from its first image alone (its grid, attention and an
    "in evidence" share of that image only): evidence on the second image never showed."""
    import io
    import tarfile

    import matplotlib
    import matplotlib.pyplot as plt
    from PIL import Image

    from megatron_ease.eval import plots

    shard = str(tmp_path / "s.tar")
    record = json.dumps({"question": "q?", "answer": "yes", "answer_type": "yesno"}).encode()
    with tarfile.open(shard, "w") as tar:
        for ext, data in (("0.png", _png(Image.new("RGB", (56, 56), (200, 0, 0)))),
                          ("1.png", _png(Image.new("RGB", (112, 56), (0, 0, 200)))),
                          ("json", record)):
            info = tarfile.TarInfo(f"m.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    first = {"grid": [2, 2], "target": [[0.4, 0.1], [0.1, 0.1]],
             "evidence": [[True, False], [False, False]], "attention": [[1.0, 0.0], [0.0, 0.0]]}
    second = {"grid": [2, 4], "target": [[0.0375] * 4] * 2, "evidence": [[False] * 4] * 2,
              "attention": [[1.0] * 4] * 2}
    sample = {"key": "m", "shard": shard, "question": "q?", "answer": "yes", **first,
              "images": [first, second]}
    layouts, titles, shown = [], [], []
    subplots, set_title = plt.subplots, matplotlib.axes.Axes.set_title
    imshow = matplotlib.axes.Axes.imshow

    def spy_imshow(ax, data, *a, **k):
        if np.ndim(data) == 2:
            shown.append(np.asarray(data))
        return imshow(ax, data, *a, **k)

    monkeypatch.setattr(plt, "subplots", lambda *a, **k: layouts.append(a) or subplots(*a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda ax, text, *a, **k: titles.append(text) or set_title(ax, text, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy_imshow)
    [path] = plots.plot_attention_overlays({"ease": [sample]}, str(tmp_path / "plots"))
    assert os.path.isfile(path) and layouts == [(2, 3)]  # a row per image
    assert "image 1" in titles
    assert any("in evidence: 0.111" in t for t in titles), titles  # 1 of 9 over both images
    # The attention grids are shares of the sample's whole attention (both images).
    assert [grid.shape for grid in shown] == [(2, 2), (2, 2), (2, 4), (2, 4)]
    np.testing.assert_allclose(shown[1].sum() + shown[3].sum(), 1.0)
    np.testing.assert_allclose(shown[3], np.full((2, 4), 1 / 9))


def _png(image) -> bytes:
    import io

    raw = io.BytesIO()
    image.save(raw, "PNG")
    return raw.getvalue()
