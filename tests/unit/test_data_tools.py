"""tools/build_shards.py and tools/inspect_shards.py."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from megatron_ease.data.image import ImageProcessingConfig
from megatron_ease.data.processing import SampleProcessor
from megatron_ease.data.reader import EvidenceShardDataset
from megatron_ease.data.synthetic import SyntheticConfig, synthetic_corpus
from megatron_ease.data.tokenizer import build_tiny_qwen_tokenizer
from megatron_ease.data.writer import EvidenceShardWriter
from tests.unit.test_data_reader import BAD, VALID_WITH_TARGET, good_samples, write_corrupt_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    d = tmp_path_factory.mktemp("corrupt")
    shards, valid = write_corrupt_shards(d)
    build_tiny_qwen_tokenizer(synthetic_corpus(SyntheticConfig()), str(d / "tokenizer"))  # found beside the shards
    return shards, valid


def test_inspect_shards_cli_last_line_and_strict_exit(corrupt):
    shards, valid = corrupt
    result = subprocess.run([sys.executable, "tools/inspect_shards.py", shards, "--strict"], cwd=REPO, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1
    assert lines[-1] == f"valid={len(valid)} skipped={len(BAD)}"
    reasons = Counter(reason for _, reason in BAD.values())
    for reason, n in reasons.items():
        assert f"skipped[{reason}]={n}" in lines
    assert "'nan-box'" in result.stderr  # each skip is logged with its key on stderr


def test_inspect_shards_exit_zero_and_overlays(tmp_path, capsys):
    inspect_shards = load_tool("inspect_shards")
    with EvidenceShardWriter(str(tmp_path / "ok"), "ok", samples_per_shard=100, strict=True) as writer:
        for key, files in good_samples(3) + list(VALID_WITH_TARGET.items()):
            writer.write(key, files)
    code = inspect_shards.main([str(tmp_path / "ok" / "ok-*.tar"), "--strict", "--overlays", str(tmp_path / "ov"), "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[-1] == f"valid={3 + len(VALID_WITH_TARGET)} skipped=0"
    pngs = sorted(os.listdir(tmp_path / "ov"))
    assert len(pngs) == 2 and all(p.endswith(".png") for p in pngs)
    assert Image.open(tmp_path / "ov" / pngs[0]).size[0] > 100


def _save(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


def test_build_shards_from_jsonl_manifest(tmp_path):
    build = load_tool("build_shards")
    root = tmp_path / "images"
    _save(str(root / "a.jpg"), Image.new("RGB", (120, 90), (10, 200, 10)))
    _save(str(root / "b.png"), Image.new("RGB", (60, 60), (200, 10, 10)))
    _save(str(root / "c.bmp"), Image.new("RGB", (64, 48), (10, 10, 200)))
    _save(str(root / "b_mask.png"), Image.fromarray(np.pad(np.full((20, 20), 255, np.uint8), 20)))
    lines = [
        {"key": "s1", "image": "a.jpg", "question": "Where?", "answer": "B", "answer_type": "choice",
         "choices": ["left", "right"], "boxes": [[60, 0, 120, 90]], "source": "unit"},
        {"key": "s2", "images": ["b.png", "c.bmp"], "question": "Red?", "answer": "yes", "answer_type": "yesno",
         "masks": ["b_mask.png", None], "evidence": [{"image": 1, "box": [0, 0, 10, 10]}]},
        {"key": "missing", "image": "nope.jpg", "question": "?", "answer": "1", "answer_type": "number"},
        {"key": "nan", "image": "a.jpg", "question": "?", "answer": "1", "answer_type": "number", "boxes": [[float("nan"), 0, 1, 1]]},
        {"key": "bad.type", "image": "a.jpg", "question": "?", "answer": "1", "answer_type": "essay"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    summary = build.build_shards(str(manifest), str(root), str(tmp_path / "out"), samples_per_shard=1)
    assert summary["written"] == 2 and len(summary["shards"]) == 2
    assert summary["skipped"] == {"missing_file": 1, "malformed_box": 1, "unknown_answer_type": 1, "bad_manifest_line": 1}

    tokenizer = build_tiny_qwen_tokenizer(synthetic_corpus(SyntheticConfig()), str(tmp_path / "tok"))
    processor = SampleProcessor(tokenizer, ImageProcessingConfig.for_family("qwen2_5_vl"), keep_source=True)
    dataset = EvidenceShardDataset(str(tmp_path / "out" / "*.tar"), processor, 1, shuffle=False, num_epochs=1)
    samples = {s.key: s for _, s, e in dataset.iter_samples() if e is None}
    assert set(samples) == {"s1", "s2"}
    s1, s2 = samples["s1"], samples["s2"]
    assert s1.record["source"] == "unit" and s1.source.boxes == [[[60.0, 0.0, 120.0, 90.0]]]
    assert s2.image_sizes == [(60, 60), (64, 48)] and s2.source.masks[0] is not None and s2.source.masks[1] is None
    assert s2.evidence_target is not None and len(s2.evidence_target) == sum(s2.image_token_counts)

    with pytest.raises(ValueError, match="m.jsonl:3: missing_file"):
        build.build_shards(str(manifest), str(root), str(tmp_path / "strict"), strict=True)


def test_build_shards_visual_cot_adapter(tmp_path, capsys):
    build = load_tool("build_shards")
    root = tmp_path / "cot"
    _save(str(root / "gqa" / "1.jpg"), Image.new("RGB", (200, 100)))
    _save(str(root / "textvqa" / "2.jpg"), Image.new("RGB", (80, 80)))
    lines = [
        {"dataset": "gqa", "split": "train", "image": "1.jpg", "question": "What is left?", "answer": "a cat",
         "bboxs": [[10, 10, 50, 60], [60, 10, 90, 40]], "width": 200, "height": 100},
        {"dataset": "textcap", "split": "train", "image": "2.jpg", "question": "Text?", "answer": "stop",
         "bboxs": [[0, 0, 40, 40]], "width": 80, "height": 80},
    ]
    manifest = tmp_path / "viscot.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    code = build.main(["--format", "visual_cot", "--manifest", str(manifest), "--image-root", str(root), "--out", str(tmp_path / "out")])
    assert code == 0 and capsys.readouterr().out.strip().splitlines()[-1] == "written=2 skipped=0"
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
        record = json.loads(tar.extractfile("gqa_train_000000001.json").read())
    assert names == ["gqa_train_000000001.jpg", "gqa_train_000000001.json", "textcap_train_000000002.jpg", "textcap_train_000000002.json"]
    assert record["answer_type"] == "text" and record["answer"] == "a cat" and record["source"] == "visual_cot/gqa"
    assert record["evidence"] == [{"image": 0, "box": [10, 10, 50, 60]}, {"image": 0, "box": [60, 10, 90, 40]}]
