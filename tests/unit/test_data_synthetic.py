"""Synthetic evidence dataset: valid shards, exact evidence, language prior, offline tokenizer."""

import json
import os
from collections import Counter

import numpy as np
import pytest
from transformers import AutoTokenizer

from megatron_ease.data.image import ImageProcessingConfig
from megatron_ease.data.processing import SampleProcessor
from megatron_ease.data.reader import EvidenceShardDataset
from megatron_ease.data.synthetic import (
    COLOURS,
    PRIOR_COLOUR,
    SyntheticConfig,
    make_synthetic_sample,
    write_synthetic_dataset,
)

NUM_TRAIN, NUM_EVAL = 240, 60


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    write_synthetic_dataset(out, NUM_TRAIN, NUM_EVAL, seed=0, samples_per_shard=100)
    return out


def read_all(dataset_dir, split):
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(dataset_dir, "tokenizer"))
    processor = SampleProcessor(tokenizer, ImageProcessingConfig.for_family("qwen2_5_vl"), keep_source=True)
    dataset = EvidenceShardDataset(os.path.join(dataset_dir, split, "*.tar"), processor, 1, shuffle=False, num_epochs=1)
    return tokenizer, list(dataset.iter_samples())


def test_writes_valid_train_and_eval_shards(dataset_dir):
    manifest = json.load(open(os.path.join(dataset_dir, "manifest.json")))
    assert manifest["train"]["samples"] == NUM_TRAIN and manifest["eval"]["samples"] == NUM_EVAL
    assert manifest["train"]["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for split, n in (("train", NUM_TRAIN), ("eval", NUM_EVAL)):
        _, samples = read_all(dataset_dir, split)
        assert len(samples) == n and all(error is None for _, _, error in samples)
    _, train = read_all(dataset_dir, "train")
    _, held_out = read_all(dataset_dir, "eval")
    scenes = lambda samples: [json.dumps(s.record["objects"]) for _, s, _ in samples]  # noqa: E731
    assert not set(scenes(held_out)) & set(scenes(train))  # held out: its own random stream


def test_sizes_give_a_handful_of_visual_tokens(dataset_dir):
    _, samples = read_all(dataset_dir, "eval")
    sample = samples[0][1]
    assert sample.image_sizes == [(112, 112)] and sample.image_token_counts == [16]  # 4x4 at f = 28


def test_evidence_boxes_are_exactly_the_objects_the_answer_needs(dataset_dir):
    _, samples = read_all(dataset_dir, "train")
    for _, s, _ in samples:
        r = s.record
        boxes = [e["box"] for e in r["evidence"]]
        same_shape = [o for o in r["objects"] if o["shape"] == r["shape"]]
        assert r["shape"] in r["question"]
        assert boxes == [o["box"] for o in same_shape]
        if r["task"] == "colour":
            assert len(same_shape) == 1 and r["choices"][ord(r["answer"]) - ord("A")] == same_shape[0]["colour"]
        elif r["task"] == "count":
            assert int(r["answer"]) == len(same_shape)
        else:
            present = any(o["colour"] == r["colour"] for o in same_shape)
            assert r["answer"] == ("yes" if present else "no")
        assert (s.evidence_target is not None) == bool(boxes)
        # Each evidence object is drawn inside its box, in its colour.
        pixels = np.asarray(s.source.images[0])
        for obj in same_shape:
            x0, y0, x1, y1 = obj["box"]
            inside = (pixels[y0:y1, x0:x1] == COLOURS[obj["colour"]]).all(-1)
            assert inside.mean() > 0.4  # triangles fill about half their box


def test_language_prior_follows_prior_bias():
    rng = np.random.default_rng(0)
    records = [make_synthetic_sample(rng, SyntheticConfig(prior_bias=0.7))[1] for _ in range(600)]
    rate = np.mean([r["answer_is_prior"] for r in records])
    assert abs(rate - 0.7) < 0.06
    for r in records:
        if r["task"] == "colour" and r["answer_is_prior"]:
            assert r["choices"][ord(r["answer"]) - ord("A")] == PRIOR_COLOUR[r["shape"]]
    always = [make_synthetic_sample(rng, SyntheticConfig(prior_bias=1.0))[1] for _ in range(100)]
    assert all(r["answer_is_prior"] for r in always)
    assert Counter(r["task"] for r in records).keys() == {"colour", "count", "exists"}


def test_object_colour_task_one_object_its_box_and_a_letter_that_names_its_colour():
    rng = np.random.default_rng(3)
    config = SyntheticConfig(task_weights=(0, 0, 0, 1), prior_bias=0.2)
    samples = [make_synthetic_sample(rng, config) for _ in range(500)]
    for image, r in samples:
        assert r["task"] == "object_colour" and r["question"] == "What color is the object?"
        assert len(r["objects"]) == 1 and r["choices"] == list(COLOURS)
        (obj,) = r["objects"]
        assert r["choices"][ord(r["answer"]) - ord("A")] == obj["colour"]
        assert r["prior_answer"] == "A" and r["answer_is_prior"] == (obj["colour"] == "red")
        assert [e["box"] for e in r["evidence"]] == [obj["box"]]
        x0, y0, x1, y1 = obj["box"]
        assert (np.asarray(image)[y0:y1, x0:x1] == COLOURS[obj["colour"]]).all(-1).mean() > 0.4
    # prior_bias 0.2 over five colours: uniform.
    counts = Counter(r["answer"] for _, r in samples)
    assert set(counts) == set("ABCDE") and all(abs(n / 500 - 0.2) < 0.06 for n in counts.values())


@pytest.mark.parametrize("weights", [(1, 1, 1), (0, 0, 0, 0), (1, -1, 1, 1)])
def test_task_weights_are_checked(weights):
    with pytest.raises(ValueError, match="task_weights must be 4 non-negative weights"):
        SyntheticConfig(task_weights=weights)


def test_tokenizer_loads_offline_with_qwen_special_tokens(dataset_dir):
    tokenizer, samples = read_all(dataset_dir, "eval")
    ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    assert ids == [248, 249, 250, 251] and tokenizer.eos_token_id == 248 and len(tokenizer) <= 256
    for _, s, _ in samples[:20]:
        text = tokenizer.decode(s.input_ids)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == s.input_ids.tolist()
        assert s.record["question"] in text
        assert len(tokenizer(s.answer, add_special_tokens=False)["input_ids"]) == 1  # one-token answers


def test_write_is_idempotent_and_refuses_other_parameters(dataset_dir, tmp_path):
    shard = os.path.join(dataset_dir, "train", "train-000000.tar")
    before = os.stat(shard).st_mtime_ns
    write_synthetic_dataset(dataset_dir, NUM_TRAIN, NUM_EVAL, seed=0, samples_per_shard=100)
    assert os.stat(shard).st_mtime_ns == before
    with pytest.raises(ValueError, match="other parameters"):
        write_synthetic_dataset(dataset_dir, NUM_TRAIN + 1, NUM_EVAL, seed=0, samples_per_shard=100)
    # Same parameters elsewhere give the same bytes; a partial directory (no manifest) is rebuilt.
    other = str(tmp_path / "again")
    write_synthetic_dataset(other, NUM_TRAIN, NUM_EVAL, seed=0, samples_per_shard=100)
    os.remove(os.path.join(other, "manifest.json"))
    os.remove(os.path.join(other, "eval", "eval-000000.tar"))
    write_synthetic_dataset(other, NUM_TRAIN, NUM_EVAL, seed=0, samples_per_shard=100)
    for split, name in (("train", "train-000001.tar"), ("eval", "eval-000000.tar")):
        with open(os.path.join(dataset_dir, split, name), "rb") as a, open(os.path.join(other, split, name), "rb") as b:
            assert a.read() == b.read()


def test_datasets_written_before_the_object_colour_task_are_still_recognised(dataset_dir, tmp_path):
    """Their manifests list three task weights; the data is what weight 0 for it gives now."""
    import shutil

    old = str(tmp_path / "old")
    shutil.copytree(dataset_dir, old)
    path = os.path.join(old, "manifest.json")
    manifest = json.load(open(path))
    assert manifest["params"]["config"]["task_weights"] == [0.4, 0.3, 0.3, 0.0]
    manifest["params"]["config"]["task_weights"] = [0.4, 0.3, 0.3]
    json.dump(manifest, open(path, "w"))
    shard = os.path.join(old, "train", "train-000000.tar")
    before = os.stat(shard).st_mtime_ns
    write_synthetic_dataset(old, NUM_TRAIN, NUM_EVAL, seed=0, samples_per_shard=100)
    assert os.stat(shard).st_mtime_ns == before
    with pytest.raises(ValueError, match="other parameters"):
        write_synthetic_dataset(old, NUM_TRAIN, NUM_EVAL, seed=0, samples_per_shard=100,
                                config=SyntheticConfig(task_weights=(0, 0, 0, 1)))


def test_data_tokenizer_takes_a_directory_or_a_cached_hub_id(dataset_dir, tmp_path):
    """``data.tokenizer: Qwen/Qwen3-VL-8B-Instruct`` (the recipes) loads from the HF cache as
    ``from_pretrained`` does (here offline, from a cache laid out as huggingface_hub writes it);
    an id that is not there, or a path that does not exist, is a clear error naming the field."""
    import shutil
    import subprocess
    import sys

    from tests.qwen_fixtures import tiny_hf_config

    snapshot = tmp_path / "hub" / "models--org--tiny-vl" / "snapshots" / "0123abc"
    shutil.copytree(os.path.join(dataset_dir, "tokenizer"), snapshot)
    tiny_hf_config().to_json_file(snapshot / "config.json")  # a model repo has its config
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    script = ("import sys\nfrom megatron_ease.training.builders import load_tokenizer\n"
              "try:\n    print(load_tokenizer(sys.argv[1]).eos_token_id)\n"
              "except (FileNotFoundError, ValueError) as e:\n    print('error:', e)\n")

    def load(name):
        return subprocess.run([sys.executable, "-c", script, name], env=env, text=True,
                              capture_output=True, timeout=120).stdout.strip()

    assert load(os.path.join(dataset_dir, "tokenizer")) == "248"
    assert load("org/tiny-vl") == "248"
    missing = load("org/not-downloaded")
    assert missing.startswith("error: data.tokenizer: 'org/not-downloaded' is not a directory")
    assert "hf download org/not-downloaded" in missing
    assert load("no/such/dir") == "error: data.tokenizer: no tokenizer directory at 'no/such/dir'"
