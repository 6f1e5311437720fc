"""tools/build_shards.py and tools/inspect_shards.py."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from megatron_ease.data.image import ImageProcessingConfig, to_rgb
from megatron_ease.data.processing import SampleProcessor
from megatron_ease.data.prompt import PromptConfig
from megatron_ease.data.reader import EvidenceShardDataset, build_shard_index
from megatron_ease.data.schema import decode_sample
from megatron_ease.data.synthetic import SyntheticConfig, synthetic_corpus
from megatron_ease.data.tokenizer import build_tiny_qwen_tokenizer
from megatron_ease.data.writer import EvidenceShardWriter, sample_members
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


def test_inspect_shards_reports_shards_without_a_sample_instead_of_a_traceback(
        tmp_path, tiny_tokenizer_dir, capsys):
    """Every shard unreadable (here: compressed) or empty: the reader refuses to stream
    nothing, and the inspector raised that as a traceback instead of its report."""
    import gzip

    inspect_shards = load_tool("inspect_shards")
    with EvidenceShardWriter(str(tmp_path / "ok"), "ok", samples_per_shard=100, strict=True) as writer:
        for key, files in good_samples(2):
            writer.write(key, files)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "s-000000.tar").write_bytes(gzip.compress((tmp_path / "ok" / "ok-000000.tar").read_bytes()))
    args = ["--tokenizer", tiny_tokenizer_dir]
    code = inspect_shards.main([str(tmp_path / "gz" / "*.tar"), "--strict", *args])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and out[-1] == "valid=0 skipped=1" and "skipped[unreadable_shard]=1" in out
    assert any(line.startswith("unreadable: ") and "gzip-compressed" in line for line in out)
    assert inspect_shards.main([str(tmp_path / "gz" / "*.tar"), *args]) == 0
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert inspect_shards.main([str(tmp_path / "empty.tar"), "--strict", *args]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "valid=0 skipped=0"


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

    # A second build into the same --out: one shard now; the old second shard stayed behind and
    # a glob over the directory read its sample twice. Refused, or replaced with --overwrite.
    args = ["--manifest", str(manifest), "--image-root", str(root), "--out", str(tmp_path / "out"),
            "--samples-per-shard", "10"]
    assert build.main(args) == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["shard-000000.tar", "shard-000001.tar"]
    assert build.main(args + ["--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["shard-000000.tar"]
    assert build.build_shards(str(manifest), str(root), str(tmp_path / "out"),
                              prefix="other")["written"] == 2  # another prefix is no conflict


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


def _read_built(shards):
    """{key: EvidenceSample} of built shards, through the reader's index and decode_sample."""
    index = build_shard_index(shards)
    assert not index.errors
    samples = {}
    for entry in index.entries:
        with open(index.shards[entry.shard], "rb") as f:
            files = {}
            for ext, offset, size in entry.members:
                f.seek(offset)
                files[ext] = f.read(size)
        samples[entry.key] = decode_sample(files, entry.key, index.shards[entry.shard])
    return samples


def _mask_weights(mask):
    return mask.astype(np.float64) / 255 if mask.dtype == np.uint8 else mask.astype(np.float64)


def _write_manifest(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


QA = {"question": "Is it red?", "answer": "yes", "answer_type": "yesno"}


def test_build_shards_keeps_non_png_mask_precision(tmp_path):
    """A float TIFF mask holds weights (converting to 8 bits made 0.3 and 0.9 both 0); a 16-bit
    TIFF's full scale is 65535 (8 bits saturated 1000 to 255 = weight 1)."""
    build = load_tool("build_shards")
    root = tmp_path / "img"
    _save(str(root / "a.png"), Image.new("RGB", (56, 56), (200, 30, 30)))
    left = np.arange(56)[None, :].repeat(56, 0) < 28
    Image.fromarray(np.where(left, 0.3, 0.9).astype(np.float32), "F").save(root / "float.tif")
    Image.fromarray(np.where(left, 1000, 65535).astype(np.uint16)).save(root / "m16.tif")
    Image.fromarray(np.where(left, 0, 200).astype(np.uint8)).save(root / "m8.tif")
    Image.fromarray(np.where(left, -0.5, 7.0).astype(np.float32), "F").save(root / "float_out.tif")
    manifest = _write_manifest(tmp_path / "m.jsonl", [
        dict(QA, key="float", image="a.png", mask="float.tif"),
        dict(QA, key="m16", image="a.png", mask="m16.tif"),
        dict(QA, key="m8", image="a.png", mask="m8.tif"),
        dict(QA, key="clipped", image="a.png", masks=["float_out.tif"]),
    ])
    summary = build.build_shards(manifest, str(root), str(tmp_path / "out"))
    assert summary["written"] == 4 and summary["skipped"] == {}
    samples = _read_built(summary["shards"])
    expected = {"float": (0.3, 0.9), "m16": (1000 / 65535, 1.0), "m8": (0.0, 200 / 255), "clipped": (0.0, 1.0)}
    for key, (weight_left, weight_right) in expected.items():
        weights = _mask_weights(samples[key].masks[0])
        np.testing.assert_allclose(weights[:, :28], weight_left, atol=1 / 65535, err_msg=key)
        np.testing.assert_allclose(weights[:, 28:], weight_right, atol=1 / 65535, err_msg=key)
    assert samples["m8"].masks[0].dtype == np.uint8  # 8-bit masks stay 8-bit


def test_build_shards_skips_bad_lines_and_keys(tmp_path, caplog):
    """Duplicate keys (also after sanitising), "image": null or a list, and keys the reader would
    drop ('' and '__x') no longer abort the build or vanish from the shards."""
    build = load_tool("build_shards")
    root = tmp_path / "img"
    _save(str(root / "a.png"), Image.new("RGB", (56, 56), (200, 30, 30)))
    lines = [
        dict(QA, key="img1", image="a.png"),  # line 1
        dict(QA, key="img1", image="a.png", question="Is it blue?"),  # 2: duplicate
        dict(QA, key="x.1", image="a.png"),  # 3 -> x_1
        dict(QA, key="x_1", image="a.png"),  # 4: duplicate after sanitising
        dict(QA, image=None),  # 5
        dict(QA, image=["a.png"]),  # 6
        dict(QA, key="", image="a.png"),  # 7 -> line000000007
        dict(QA, key="__abc", image="a.png"),  # 8 -> abc
        dict(QA, key="___", image="a.png"),  # 9: nothing left
        dict(QA, key="img2", images=[None]),  # 10
        dict(QA, key="img3", images="a.png", masks=None),  # 11: fine
    ]
    manifest = _write_manifest(tmp_path / "m.jsonl", lines)
    with caplog.at_level("WARNING", logger="build_shards"):
        summary = build.build_shards(manifest, str(root), str(tmp_path / "out"), samples_per_shard=3)
    assert summary["skipped"] == {"duplicate_key": 2, "bad_manifest_line": 3, "bad_key": 1}
    samples = _read_built(summary["shards"])  # what the reader indexes = what was written
    assert sorted(samples) == sorted(["img1", "x_1", "line000000007", "abc", "img3"]) and summary["written"] == 5
    assert samples["img1"].question == "Is it red?"  # the first line wins
    assert "m.jsonl:2: duplicate_key" in caplog.text and "line 1" in caplog.text
    assert "m.jsonl:4: duplicate_key" in caplog.text and "m.jsonl:5: bad_manifest_line" in caplog.text
    with pytest.raises(ValueError, match="m.jsonl:2: duplicate_key"):
        build.build_shards(manifest, str(root), str(tmp_path / "strict"), strict=True)

    # A Visual-CoT line without dataset and split got the key '__000000001', which the reader ignores.
    cot = _write_manifest(tmp_path / "cot.jsonl", [{"image": "a.png", "question": "What?", "answer": "red"},
                                                   {"image": "a.png", "question": "What?", "answer": "red", "dataset": "gqa"}])
    summary = build.build_shards(cot, str(root), str(tmp_path / "cot"), fmt="visual_cot")
    assert summary["written"] == 2 and sorted(_read_built(summary["shards"])) == ["000000001", "gqa_000000002"]


def test_build_shards_converts_modes_png_cannot_store(tmp_path):
    """CMYK/LAB/F TIFFs failed the PNG re-encode (undecodable_image); they are converted to RGB
    first, which is what the processor does to every image, so the model's pixels are the same."""
    build = load_tool("build_shards")
    root = tmp_path / "img"
    os.makedirs(root)
    originals = {
        "cmyk": Image.new("CMYK", (56, 42), (0, 255, 255, 0)),
        "lab": Image.merge("LAB", [Image.new("L", (56, 42), v) for v in (150, 100, 200)]),
        "float": Image.fromarray(np.linspace(0, 300, 56 * 42, dtype=np.float32).reshape(42, 56), "F"),
    }
    for name, image in originals.items():
        image.save(root / f"{name}.tif")
    manifest = _write_manifest(tmp_path / "m.jsonl", [dict(QA, key=name, image=f"{name}.tif") for name in originals])
    summary = build.build_shards(manifest, str(root), str(tmp_path / "out"))
    assert summary["written"] == 3 and summary["skipped"] == {}
    samples = _read_built(summary["shards"])
    for name in originals:
        stored = samples[name].images[0]
        assert stored.size == (56, 42)
        reopened = Image.open(root / f"{name}.tif")
        assert np.array_equal(np.asarray(to_rgb(stored)), np.asarray(to_rgb(reopened))), name


def test_read_manifest_ignores_utf8_bom(tmp_path):
    build = load_tool("build_shards")
    root = tmp_path / "img"
    _save(str(root / "a.png"), Image.new("RGB", (56, 56), (200, 30, 30)))
    lines = [dict(QA, key=f"k{i}", image="a.png") for i in range(3)]
    (tmp_path / "bom.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8-sig")
    (tmp_path / "bom.json").write_text(json.dumps(lines, indent=1), encoding="utf-8-sig")
    for name in ("bom.jsonl", "bom.json"):
        assert [item for _, item in build.read_manifest(str(tmp_path / name))] == lines
        summary = build.build_shards(str(tmp_path / name), str(root), str(tmp_path / f"out_{name}"))
        assert summary["written"] == 3 and summary["skipped"] == {}, name


def test_build_shards_counts_unparsable_manifest_lines_and_builds_the_rest(tmp_path, caplog):
    """A byte that is not UTF-8 (UnicodeDecodeError at read), a line nested past the recursion
    limit (RecursionError) or an int over 4300 digits (ValueError) aborted the whole build
    without naming the manifest line; each is now one counted bad line."""
    build = load_tool("build_shards")
    root = tmp_path / "img"
    _save(str(root / "a.png"), Image.new("RGB", (56, 56), (200, 30, 30)))
    good = [json.dumps(dict(QA, key=f"good{i}", image="a.png")).encode() for i in range(3)]
    lines = [
        good[0],  # 1
        json.dumps(dict(QA, key="latin1", image="a.png", question="Ist es rot?")).encode()
        .replace(b"Ist", b"\xcdst"),  # 2: Latin-1, not UTF-8
        b'{"key": "deep", "image": "a.png", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # 3
        good[1],  # 4
        b'{"key": "bigint", "image": "a.png", "n": ' + b"1" * 5000 + b"}",  # 5
        good[2],  # 6
    ]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    manifest = str(tmp_path / "m.jsonl")
    assert [n for n, item in build.read_manifest(manifest) if isinstance(item, Exception)] == [2, 3, 5]
    with caplog.at_level("WARNING", logger="build_shards"):
        summary = build.build_shards(manifest, str(root), str(tmp_path / "out"))
    assert summary["written"] == 3 and summary["skipped"] == {"bad_manifest_line": 3}
    assert sorted(_read_built(summary["shards"])) == ["good0", "good1", "good2"]
    for line, what in ((2, "not UTF-8"), (3, "RecursionError"), (5, "ValueError")):
        assert f"m.jsonl:{line}: bad_manifest_line" in caplog.text and what in caplog.text
    with pytest.raises(ValueError, match="m.jsonl:2: bad_manifest_line.*byte 0xcd"):
        build.build_shards(manifest, str(root), str(tmp_path / "strict"), strict=True)


@pytest.mark.parametrize("content", [b'[{"key": "a"}, {oops}]', b'[{"key": "\xff"}]',
                                     b"[" * 100_000 + b"]" * 100_000])
def test_unreadable_json_array_manifest_is_an_error_naming_the_file(tmp_path, capsys, content):
    build = load_tool("build_shards")
    (tmp_path / "m.json").write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"m\.json: not a readable JSON array manifest"):
        build.build_shards(str(tmp_path / "m.json"), str(tmp_path), str(out))
    # Refused before --overwrite clears the shards of the last build.
    os.makedirs(out, exist_ok=True)
    (out / "shard-000000.tar").write_bytes(b"old")
    args = ["--manifest", str(tmp_path / "m.json"), "--out", str(out), "--overwrite"]
    assert build.main(args) == 2
    assert "m.json: not a readable JSON array manifest" in capsys.readouterr().err
    assert (out / "shard-000000.tar").read_bytes() == b"old"


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    build_tiny_qwen_tokenizer(synthetic_corpus(SyntheticConfig()), d)
    return d


def test_inspect_shards_counts_the_prompt_training_builds(tmp_path, tiny_tokenizer_dir, capsys):
    """--family qwen3_vl: training's prompt has no system turn (PromptConfig.for_family); the
    inspector built Qwen2.5's and reported prompt_too_long at exactly training's length."""
    from transformers import AutoTokenizer

    inspect_shards = load_tool("inspect_shards")
    with EvidenceShardWriter(str(tmp_path / "s"), "s", strict=True) as writer:
        for key, files in good_samples(1):
            writer.write(key, files)
    shards = str(tmp_path / "s" / "s-*.tar")
    processor = SampleProcessor(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), ImageProcessingConfig.for_family("qwen3_vl"),
                                prompt_config=PromptConfig.for_family("qwen3_vl"))
    dataset = EvidenceShardDataset(shards, processor, 1, shuffle=False, num_epochs=1, even_ranks=False)
    (_, sample, error), = list(dataset.iter_samples())
    assert error is None
    length = sample.prompt_length
    for limit, expected in ((length, "valid=1 skipped=0"), (length - 1, "valid=0 skipped=1")):
        code = inspect_shards.main([shards, "--family", "qwen3_vl", "--tokenizer", tiny_tokenizer_dir, "--max-prompt-tokens", str(limit)])
        assert code == 0 and capsys.readouterr().out.strip().splitlines()[-1] == expected, limit


def test_inspect_shards_overlay_contours_16bit_masks(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    """16-bit masks arrive as float32 weights in [0, 1]: a contour at level 127 drew nothing."""
    import matplotlib.axes

    inspect_shards = load_tool("inspect_shards")
    square = np.zeros((56, 56), np.uint16)
    square[10:40, 10:40] = 65535
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    masks = {"m8": Image.fromarray((square // 257).astype(np.uint8)), "m16": Image.fromarray(square),
             "mf": Image.fromarray(square.astype(np.float32) / 65535 * 0.8, "F")}
    with EvidenceShardWriter(str(tmp_path / "s"), "s", strict=True) as writer:
        for key, mask in masks.items():
            writer.write(key, sample_members(dict(QA), [("png", _encode(image))], {0: _encode(mask, "TIFF" if mask.mode == "F" else "PNG")}))
    drawn = []
    original = matplotlib.axes.Axes.contour

    def contour(self, data, *args, **kwargs):
        result = original(self, data, *args, **kwargs)
        drawn.append(sum(len(segment) for level in result.allsegs for segment in level))
        return result

    monkeypatch.setattr(matplotlib.axes.Axes, "contour", contour)
    code = inspect_shards.main([str(tmp_path / "s" / "s-*.tar"), "--tokenizer", tiny_tokenizer_dir, "--overlays", str(tmp_path / "ov"), "3"])
    assert code == 0 and capsys.readouterr().out.strip().splitlines()[-1] == "valid=3 skipped=0"
    assert len(drawn) == 3 and all(n > 0 for n in drawn), drawn  # 8-bit, 16-bit and float masks


def _encode(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_build_shards_refuses_boxes_that_cannot_be_pixels_and_converts_box_formats(tmp_path, caplog):
    """Boxes were written as given, whatever their convention: normalised 0-1 boxes covered no
    pixel, 0-1000 (Qwen grounding) boxes were clipped to the image, xywh read as xyxy was empty,
    and boxes for a bigger original image (record width/height) landed in the wrong place: each
    silently lost or misplaced the evidence. They are refused with a reason, or converted to
    pixel xyxy under --box-format / the record's frame."""
    build = load_tool("build_shards")
    root = tmp_path / "img"
    _save(str(root / "a.jpg"), Image.new("RGB", (640, 480)))
    lines = [
        dict(QA, key="norm", image="a.jpg", boxes=[[0.1, 0.2, 0.5, 0.6]]),
        dict(QA, key="q1000", image="a.jpg", boxes=[[100, 200, 900, 950]]),
        dict(QA, key="xywh", image="a.jpg", evidence=[{"image": 0, "box": [300, 200, 100, 50]}]),
        dict(QA, key="aspect", image="a.jpg", width=1000, height=1000, boxes=[[0, 0, 10, 10]]),
        dict(QA, key="frame", image="a.jpg", width=1280, height=960, boxes=[[600, 400, 1200, 900]]),
        dict(QA, key="ok", image="a.jpg", boxes=[[10, 20, 640, 480]]),
        dict(QA, key="nobox", image="a.jpg"),
    ]
    manifest = _write_manifest(tmp_path / "m.jsonl", lines)
    with caplog.at_level("WARNING", logger="build_shards"):
        summary = build.build_shards(manifest, str(root), str(tmp_path / "out"))
    assert summary["skipped"] == {"box_looks_normalised": 1, "box_outside_image": 1, "empty_box": 1,
                                  "box_frame_mismatch": 1}
    assert "--box-format" in caplog.text
    samples = _read_built(summary["shards"])
    assert sorted(samples) == ["frame", "nobox", "ok"]
    assert samples["frame"].boxes == [[[300.0, 200.0, 600.0, 450.0]]]  # scaled to the stored image
    assert samples["frame"].record["width"] == 640 and samples["frame"].record["height"] == 480
    assert samples["ok"].boxes == [[[10.0, 20.0, 640.0, 480.0]]]
    with pytest.raises(ValueError, match="m.jsonl:1: box_looks_normalised"):
        build.build_shards(manifest, str(root), str(tmp_path / "strict"), strict=True)

    expected = [[64.0, 96.0, 320.0, 288.0]]
    for fmt, box in [("xyxy-norm", [0.1, 0.2, 0.5, 0.6]), ("xyxy-1000", [100, 200, 500, 600]),
                     ("xywh", [64, 96, 256, 192])]:
        manifest = _write_manifest(tmp_path / f"{fmt}.jsonl", [dict(QA, key="k", image="a.jpg", boxes=[box])])
        out = str(tmp_path / f"out_{fmt}")
        assert build.main(["--manifest", manifest, "--image-root", str(root), "--out", out, "--box-format", fmt]) == 0
        assert _read_built([os.path.join(out, "shard-000000.tar")])["k"].boxes == [expected], fmt

    # Visual-CoT boxes are pixels of its width x height: scaled when the stored image is resized.
    cot = _write_manifest(tmp_path / "cot.jsonl", [
        {"dataset": "gqa", "split": "train", "image": "a.jpg", "question": "What?", "answer": "red",
         "bboxs": [[128, 96, 256, 192]], "width": 1280, "height": 960}])
    summary = build.build_shards(cot, str(root), str(tmp_path / "cot"), fmt="visual_cot")
    assert _read_built(summary["shards"])["gqa_train_000000001"].boxes == [[[64.0, 48.0, 128.0, 96.0]]]


def test_overwrite_keeps_shards_of_a_longer_prefix(tmp_path):
    """--prefix train --overwrite deleted train-2024-000000.tar (the glob train-[0-9]*.tar
    matched it), and without --overwrite refused a directory holding no train shard."""
    (tmp_path / "train-2024-000000.tar").write_bytes(b"other build")
    with EvidenceShardWriter(str(tmp_path), "train") as writer:  # no conflict
        for key, files in good_samples(1):
            writer.write(key, files)
    with EvidenceShardWriter(str(tmp_path), "train", overwrite=True):
        pass
    assert sorted(os.listdir(tmp_path)) == ["train-2024-000000.tar"]


def test_a_failed_build_leaves_the_directory_as_it_was(tmp_path):
    """Shards were renamed to their final names as each one filled, and --overwrite removed the
    earlier build first: a build stopped part way (a strict error, Ctrl-C) left a partial dataset
    that looked complete, with the old one gone."""
    with EvidenceShardWriter(str(tmp_path), "train", samples_per_shard=1) as writer:
        for key, files in good_samples(3):
            writer.write(key, files)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert sorted(before) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    samples = list(good_samples(5))
    with pytest.raises(KeyboardInterrupt):
        with EvidenceShardWriter(str(tmp_path), "train", samples_per_shard=1, overwrite=True) as writer:
            for i, (key, files) in enumerate(samples):
                if i == 4:
                    raise KeyboardInterrupt
                writer.write("new_" + key, files)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    # Completed with fewer shards: the new ones replace the old, the old tail goes.
    with EvidenceShardWriter(str(tmp_path), "train", samples_per_shard=2, overwrite=True) as writer:
        for key, files in samples[:3]:
            writer.write("new_" + key, files)
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar", "train-000001.tar"]
    assert (tmp_path / "train-000000.tar").read_bytes() != before["train-000000.tar"]
