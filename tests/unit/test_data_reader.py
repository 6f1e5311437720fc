"""Shard reader: corrupt samples, strict mode, DP/worker split, exact resume, batch layout."""

import contextlib
import io
import itertools
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_ease.data import reader
from megatron_ease.data.image import ImageProcessingConfig
from megatron_ease.data.processing import SampleProcessor
from megatron_ease.data.reader import EvidenceDataLoader, EvidenceShardDataset, build_shard_index
from megatron_ease.data.schema import SampleError, _mask_array, decode_sample
from megatron_ease.data.synthetic import SyntheticConfig, synthetic_corpus
from megatron_ease.data.tokenizer import build_tiny_qwen_tokenizer
from megatron_ease.data.writer import EvidenceShardWriter
from megatron_ease.ease.targets import evidence_token_targets

IMAGE_CONFIG = ImageProcessingConfig.for_family("qwen2_5_vl", min_pixels=56 * 56, max_pixels=28 * 28 * 16)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_qwen_tokenizer(synthetic_corpus(SyntheticConfig()), str(tmp_path_factory.mktemp("tok")))


def encode(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


PNG = encode(Image.new("RGB", (56, 56), (200, 30, 30)))
JPG = encode(Image.new("RGB", (84, 56), (30, 30, 200)), "JPEG")


def record(i=0, **overrides):
    base = {"question": f"Is there a red square {i}?", "answer": "yes", "answer_type": "yesno",
            "evidence": [{"image": 0, "box": [0, 0, 28, 28]}], "source": "test"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def members(rec, images=((".png", PNG),), masks=None):
    files = {"json": json.dumps(rec).encode()} if not isinstance(rec, bytes) else {"json": rec}
    files.update({ext.lstrip("."): data for ext, data in images})
    files.update(masks or {})
    return files


def deep_json():
    nested = b"[" * 100_000 + b"]" * 100_000
    return b'{"question": ' + nested + b', "answer": "yes", "answer_type": "yesno"}'


def json_with_huge_int():  # more digits than Python's int() accepts (4300 by default)
    return json.dumps(record(answer_type="number", answer="X")).replace('"X"', "1" * 5000).encode()


# [56, 56] 16-bit mask: full scale on the left half, 1000/65535 on the right
MASK_16BIT = np.where(np.arange(56)[None, :] < 28, 65535, 1000).repeat(56, 0).astype(np.uint16)


def mask_member(image, fmt="PNG", name="mask.png"):
    return {name: encode(image, fmt)}


def write_tar(path, samples):
    """Raw tar writer (no validation), so broken samples and duplicate members can be written."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            items = files if isinstance(files, list) else list(files.items())
            for ext, data in items:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


BAD = {  # key -> (members, expected skip reason)
    "bad-image": (members(record(), [("png", b"not a png")]), "undecodable_image"),
    "truncated-image": (members(record(), [("png", PNG[: len(PNG) // 2])]), "undecodable_image"),
    "bad-json": (members(b"{oops"), "bad_json"),
    "json-array": (members(b"[1, 2]"), "bad_json"),
    "no-json": ({"png": PNG}, "bad_json"),
    "no-question": (members(record(question=None)), "missing_field"),
    "no-answer": (members(record(answer=None)), "missing_field"),
    "unknown-type": (members(record(answer_type="essay")), "unknown_answer_type"),
    "nan-box": (members(record(evidence=[{"image": 0, "box": [float("nan"), 0, 5, 5]}])), "malformed_box"),
    "short-box": (members(record(evidence=[{"image": 0, "box": [1, 2, 3]}])), "malformed_box"),
    "string-box": (members(record(evidence=[{"image": 0, "box": ["a", 0, 5, 5]}])), "malformed_box"),
    "evidence-not-list": (members(record(evidence={"box": [0, 0, 1, 1]})), "malformed_evidence"),
    "evidence-missing-image": (members(record(evidence=[{"image": 1, "box": [0, 0, 5, 5]}])), "evidence_image_missing"),
    "mask-size": (members(record(), masks={"mask.png": encode(Image.new("L", (10, 10)))}), "mask_size_mismatch"),
    "mask-missing-image": (members(record(), masks={"3.mask.png": encode(Image.new("L", (56, 56)))}), "evidence_image_missing"),
    "no-image": (members(record(), []), "no_image"),
    "bad-choice": (members(record(answer_type="choice", choices=["red", "blue"], answer="E")), "bad_choices"),
    "image-gap": (members(record(), [("0.png", PNG), ("2.png", PNG)]), "bad_image_names"),
    "duplicate-member": ([("json", json.dumps(record()).encode()), ("png", PNG), ("png", PNG)], "duplicate_member"),
    "special-token": (members(record(question="What is <|image_pad|> here?")), "special_token_in_text"),
    # Corrupt values that used to escape validation as other exception types and crash the reader.
    "huge-int-box": (members(record(evidence=[{"image": 0, "box": [10**400, 0, 5, 5]}])),
                     "malformed_box"),
    "deep-json": (members(deep_json()), "bad_json"),
    "int-over-digit-limit": (members(json_with_huge_int()), "bad_json"),
    "lone-surrogate": (members(record(question="Is there a \ud800 square?")), "bad_json"),
    "unicode-digit-index": (members(record(), [("\u00b2.png", PNG)]), "no_image"),  # '²'.isdigit()
    "huge-image-index": (members(record(), [("0.png", PNG), ("9" * 5000 + ".png", PNG)]),
                         "bad_image_names"),
    "huge-mask-index": (members(record(), masks=mask_member(Image.new("L", (56, 56)),
                                                            name="9" * 5000 + ".mask.png")),
                        "evidence_image_missing"),
    "int32-mask": (members(record(), masks=mask_member(Image.new("I", (56, 56), 7), "TIFF")),
                   "undecodable_mask"),
    "lab-mask": (members(record(), masks=mask_member(Image.new("LAB", (56, 56)), "TIFF")),
                 "undecodable_mask"),
    # A mask in another format was neither an image nor a mask: its evidence vanished uncounted.
    "jpeg-mask": (members(record(), masks=mask_member(Image.new("L", (56, 56), 255), "JPEG",
                                                      name="mask.jpg")), "undecodable_mask"),
    "indexed-jpeg-mask": (members(record(), masks=mask_member(Image.new("L", (56, 56)), "JPEG",
                                                              name="0.mask.jpg")),
                          "undecodable_mask"),
}

VALID_WITHOUT_TARGET = {
    "inverted-box": members(record(evidence=[{"image": 0, "box": [40, 40, 10, 10]}])),
    "outside-box": members(record(evidence=[{"image": 0, "box": [100, 100, 200, 200]}])),
    "empty-evidence": members(record(evidence=[])),
}
VALID_WITH_TARGET = {
    "partly-outside": members(record(evidence=[{"image": 0, "box": [40, 40, 90, 90]}])),
    "two-images": members(
        record(evidence=[{"image": 1, "box": [0, 0, 40, 56]}]),
        [("0.png", PNG), ("1.jpg", JPG)],
        masks={"0.mask.png": encode(Image.new("L", (56, 56), 255))},
    ),
    "choice-lowercase": members(record(answer_type="choice", choices=["red", "blue"], answer="b")),
    "number-answer": members(record(answer_type="number", answer=3)),
    "mask-16bit": members(record(evidence=[]), masks=mask_member(Image.fromarray(MASK_16BIT))),
}


def good_samples(n, prefix="good"):
    return [(f"{prefix}-{i:03d}", members(record(i))) for i in range(n)]


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory):
    return write_corrupt_shards(tmp_path_factory.mktemp("corrupt"))


def write_corrupt_shards(d):
    """Two shards: good samples interleaved with every bad kind and the valid edge cases."""
    special = list(BAD.items()) + list(VALID_WITHOUT_TARGET.items()) + list(VALID_WITH_TARGET.items())
    samples, goods = [], good_samples(24)
    for i, (key, value) in enumerate(special):
        samples.append(goods[i] if i < len(goods) else None)
        samples.append((key, value[0] if key in BAD else value))
    samples = [s for s in samples if s is not None] + goods[len(special):]
    half = len(samples) // 2
    write_tar(d / "shard-000000.tar", samples[:half])
    write_tar(d / "shard-000001.tar", samples[half:])
    valid = {k for k, _ in goods} | set(VALID_WITHOUT_TARGET) | set(VALID_WITH_TARGET)
    return str(d / "shard-*.tar"), valid


def make_dataset(shards, tokenizer, batch_size=4, **kwargs):
    processor = SampleProcessor(tokenizer, IMAGE_CONFIG, append_answer=kwargs.pop("append_answer", False))
    return EvidenceShardDataset(shards, processor, batch_size, **kwargs)


def collect(loader, max_batches=None):
    """Keys and batches of the first max_batches batches (islice: no extra batch is pulled)."""
    keys, batches = [], []
    with contextlib.closing(iter(loader)) as stream:  # closing shuts the workers down now
        for batch in itertools.islice(stream, max_batches):
            keys += batch["keys"]
            batches.append(batch)
    return keys, batches


# ---------------------------------------------------------------- corrupt samples


def test_every_bad_kind_is_skipped_and_counted_without_losing_good_samples(corrupt_shards, tokenizer):
    shards, valid = corrupt_shards
    loader = EvidenceDataLoader(make_dataset(shards, tokenizer, shuffle=False, num_epochs=1, even_ranks=False))
    keys, batches = collect(loader)
    assert sorted(keys) == sorted(valid)
    assert loader.skipped == Counter(reason for _, reason in BAD.values())
    has_target = {k: bool(t) for b in batches for k, t in zip(b["keys"], b["has_target"])}
    assert not any(has_target[k] for k in VALID_WITHOUT_TARGET)
    assert all(has_target[k] for k in VALID_WITH_TARGET)
    answers = {k: a for b in batches for k, a in zip(b["keys"], b["answers"])}
    assert answers["choice-lowercase"] == "B" and answers["number-answer"] == "3"


def test_skipped_samples_are_logged_with_shard_and_key(corrupt_shards, tokenizer, caplog):
    shards, _ = corrupt_shards
    dataset = make_dataset(shards, tokenizer, shuffle=False, num_epochs=1, even_ranks=False)
    with caplog.at_level("WARNING", logger="megatron_ease.data.reader"):
        list(dataset.iter_samples())
    assert any("'nan-box'" in r.getMessage() and "shard-00000" in r.getMessage() and "malformed_box" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_strict_mode_raises_naming_shard_and_key(corrupt_shards, tokenizer, num_workers):
    shards, _ = corrupt_shards
    dataset = make_dataset(shards, tokenizer, shuffle=False, num_epochs=1, even_ranks=False, strict=True)
    with pytest.raises(SampleError, match=r"shard-000000\.tar: sample 'bad-image': undecodable_image") as info:
        collect(EvidenceDataLoader(dataset, num_workers=num_workers))
    assert info.value.key == "bad-image" and info.value.reason == "undecodable_image"


def test_truncated_shard_keeps_the_samples_before_the_damage(tmp_path, tokenizer):
    write_tar(tmp_path / "a.tar", good_samples(10))
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])
    index = build_shard_index([str(tmp_path / "a.tar")])
    assert len(index.errors) == 1 and "a.tar" in index.errors[0]
    assert 0 < len(index.entries) < 10
    keys, _ = collect(EvidenceDataLoader(make_dataset(str(tmp_path / "a.tar"), tokenizer, shuffle=False, num_epochs=1)))
    assert keys == [f"good-{i:03d}" for i in range(len(index.entries))]
    with pytest.raises(ValueError, match="unreadable shard"):
        make_dataset(str(tmp_path / "a.tar"), tokenizer, strict=True)


def test_shard_cut_inside_the_first_member_of_a_sample_keeps_every_sample_before_it(tmp_path):
    """The cut-off member opens sample 5: samples 0-4 are complete and all kept (the last
    complete one was dropped as if it had lost members)."""
    write_tar(tmp_path / "a.tar", good_samples(10))
    with tarfile.open(tmp_path / "a.tar") as tar:
        first = next(m for m in tar.getmembers() if m.name.startswith("good-005."))
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: first.offset_data + first.size // 2])
    index = build_shard_index([str(tmp_path / "a.tar")])
    assert [e.key for e in index.entries] == [f"good-{i:03d}" for i in range(5)]
    assert "after 5 samples" in index.errors[0]
    # Cut inside the second member of sample 5: sample 5 is incomplete and dropped.
    write_tar(tmp_path / "b.tar", good_samples(10))
    with tarfile.open(tmp_path / "b.tar") as tar:
        second = [m for m in tar.getmembers() if m.name.startswith("good-005.")][1]
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: second.offset_data + second.size // 2])
    index = build_shard_index([str(tmp_path / "b.tar")])
    assert [e.key for e in index.entries] == [f"good-{i:03d}" for i in range(5)]


def _zero_from_sample(path, key, length=4096):
    """Zero ``length`` bytes from the header of sample ``key``'s first member (crash damage, a
    sparse hole): tarfile takes the zeros for the end-of-archive marker."""
    with tarfile.open(path) as tar:
        first = next(m for m in tar.getmembers() if m.name.startswith(key + "."))
    with open(path, "r+b") as f:
        f.seek(first.offset)
        f.write(bytes(length))


def _damage(kind, path, tmp_path):
    """A shard of good-000..good-009 damaged so that tarfile stops early without an error."""
    if kind == "concatenated":  # cat a.tar b.tar: the second archive follows the first's end
        write_tar(tmp_path / "first.tar", good_samples(5))
        write_tar(tmp_path / "second.tar", good_samples(10)[5:])
        path.write_bytes((tmp_path / "first.tar").read_bytes() + (tmp_path / "second.tar").read_bytes())
        return
    write_tar(path, good_samples(10))
    _zero_from_sample(path, {"zeroed-block": "good-005", "zeroed-first-block": "good-000"}[kind])


@pytest.mark.parametrize("kind", ["zeroed-block", "concatenated", "zeroed-first-block"])
def test_data_after_the_end_of_archive_marker_makes_the_shard_unreadable(tmp_path, tokenizer, kind):
    """tarfile stops at the first zero block; the samples after it used to vanish without a
    count, a log line or an error under strict."""
    shard = tmp_path / "damaged.tar"
    _damage(kind, shard, tmp_path)
    write_tar(tmp_path / "clean.tar", good_samples(3, "clean"))
    index = build_shard_index([str(shard)])
    assert len(index.errors) == 1 and index.errors[0].startswith(f"{shard}: ")
    assert "after the end-of-archive marker" in index.errors[0]
    kept = [e.key for e in index.entries]  # a prefix; the last sample may have lost members
    assert kept == [f"good-{i:03d}" for i in range(len(kept))] and len(kept) <= 5
    spec = [str(shard), str(tmp_path / "clean.tar")]
    loader = EvidenceDataLoader(make_dataset(spec, tokenizer, shuffle=False, num_epochs=1, even_ranks=False))
    keys, _ = collect(loader)
    assert sorted(keys) == sorted(kept + [f"clean-{i:03d}" for i in range(3)])
    assert loader.skipped == Counter(unreadable_shard=1)
    with pytest.raises(ValueError, match=r"unreadable shard: .*damaged\.tar: .*end-of-archive marker"):
        make_dataset(spec, tokenizer, strict=True)


def test_zero_padding_after_the_end_of_archive_marker_is_not_damage(tmp_path):
    """Extra zeros at the end (a larger record size, a preallocated file) are padding."""
    shard = tmp_path / "a.tar"
    write_tar(shard, good_samples(3))
    with open(shard, "ab") as f:
        f.write(bytes(3 << 20))  # more than one read chunk
    index = build_shard_index([str(shard)])
    assert not index.errors and len(index.entries) == 3


def test_corrupt_tar_header_inside_a_shard_makes_it_unreadable(tmp_path):
    shard = tmp_path / "a.tar"
    write_tar(shard, good_samples(10))
    with tarfile.open(shard) as tar:
        first = next(m for m in tar.getmembers() if m.name.startswith("good-005."))
    with open(shard, "r+b") as f:
        f.seek(first.offset)
        f.write(b"garbage" * 10)
    index = build_shard_index([str(shard)])
    assert len(index.errors) == 1 and "invalid tar header" in index.errors[0]
    assert [e.key for e in index.entries] == [f"good-{i:03d}" for i in range(4)]


def test_an_uneven_finite_pass_may_leave_a_rank_without_samples(tmp_path, tokenizer):
    """1 sample, 2 ranks (evaluation: even_ranks=False): rank 1 reads nothing instead of
    raising while rank 0 goes on into the evaluation's all-reduce alone (a hang). A stream
    every rank must read from (even ranks, or an infinite one) still refuses, on every rank."""
    write_tar(tmp_path / "one.tar", good_samples(1))
    shard = str(tmp_path / "one.tar")
    keys = [collect(EvidenceDataLoader(make_dataset(shard, tokenizer, rank=r, world_size=2,
                                                    shuffle=False, num_epochs=1,
                                                    even_ranks=False)))[0] for r in range(2)]
    assert keys == [["good-000"], []]
    for rank in range(2):
        with pytest.raises(ValueError, match="too few for 2 ranks"):
            make_dataset(shard, tokenizer, rank=rank, world_size=2, num_epochs=1)
        with pytest.raises(ValueError, match="too few for 2 ranks"):
            make_dataset(shard, tokenizer, rank=rank, world_size=2, even_ranks=False)


def test_few_valid_samples_do_not_trip_the_no_valid_sample_guard(tmp_path, tokenizer):
    """1 valid sample of 3: seed 2 orders it first in one epoch and last in the next, 4
    consecutive errors; the guard raised at one epoch's length (3)."""
    write_tar(tmp_path / "s.tar", [("good", members(record())), *[
        (f"bad{i}", members(record(), [("png", b"x")])) for i in range(2)]])
    keys, _ = collect(EvidenceDataLoader(make_dataset(str(tmp_path / "s.tar"), tokenizer,
                                                      batch_size=1, seed=2)), max_batches=6)
    assert keys == ["good"] * 6


def test_unreadable_shard_is_counted_once_by_rank_0(tmp_path, tokenizer):
    write_tar(tmp_path / "a.tar", good_samples(6, "a"))
    write_tar(tmp_path / "b.tar", good_samples(10, "b"))
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])
    spec = str(tmp_path / "*.tar")
    kwargs = dict(world_size=2, shuffle=False, num_epochs=1, even_ranks=False)
    loaders = [EvidenceDataLoader(make_dataset(spec, tokenizer, rank=r, **kwargs))
               for r in range(2)]
    for loader in loaders:
        collect(loader)
        collect(loader)  # a second pass reads the same index: the shard is not counted again
    assert loaders[0].skipped == Counter(unreadable_shard=1)  # summed over ranks: once per shard
    assert loaders[1].skipped == Counter()
    resumed = EvidenceDataLoader(make_dataset(spec, tokenizer, rank=0, **kwargs))
    resumed.load_state_dict(json.loads(json.dumps(loaders[0].state_dict())))
    assert resumed.skipped == Counter(unreadable_shard=1)  # kept by the checkpoint, not doubled


def test_image_placeholder_in_appended_answer_is_skipped_and_counted(tmp_path, tokenizer):
    samples = good_samples(3)
    pad_answer = members(record(answer="a <|image_pad|> b", answer_type="text"))
    samples.insert(1, ("pad-answer", pad_answer))
    write_tar(tmp_path / "a.tar", samples)
    shards = str(tmp_path / "a.tar")
    kwargs = dict(batch_size=4, shuffle=False, num_epochs=1, append_answer=True)
    loader = EvidenceDataLoader(make_dataset(shards, tokenizer, **kwargs))
    keys, batches = collect(loader)
    assert keys == [k for k, _ in good_samples(3)]
    assert loader.skipped == Counter(special_token_in_text=1)
    assert batches[0]["image_mask"].sum(1).tolist() == batches[0]["num_image_tokens"].tolist()
    error = r"a\.tar: sample 'pad-answer': special_token_in_text: answer"
    with pytest.raises(SampleError, match=error):
        collect(EvidenceDataLoader(make_dataset(shards, tokenizer, strict=True, **kwargs)))
    # Without an appended answer the text is never tokenised into the sequence: a valid sample.
    kwargs["append_answer"] = False
    keys, _ = collect(EvidenceDataLoader(make_dataset(shards, tokenizer, **kwargs)))
    assert "pad-answer" in keys


def test_16bit_mask_is_scaled_by_its_full_scale_and_8bit_mask_is_unchanged(tokenizer):
    processor = SampleProcessor(tokenizer, IMAGE_CONFIG, sigma=0.0, alpha=0.0)
    png16 = encode(Image.fromarray(MASK_16BIT))
    sample = decode_sample(members(record(evidence=[]), masks={"mask.png": png16}), "m16", "s")
    target = processor(sample).evidence_target.view(2, 2)  # 56x56: 2x2 tokens
    left, right = target.sum(0).tolist()
    assert left == pytest.approx(1 / (1 + 1000 / 65535), rel=1e-6)  # ~0.985, was 0.5
    assert right == pytest.approx(1 - left, abs=1e-6)
    weights = sample.masks[0]
    assert weights.dtype == np.float32 and weights.shape == (56, 56)
    np.testing.assert_array_equal(weights, MASK_16BIT.astype(np.float32) / np.float32(65535))
    # Older Pillow opens 16-bit PNGs as mode I: the same scale.
    as_i = Image.fromarray(MASK_16BIT.astype(np.int32))
    as_i.format = "PNG"
    np.testing.assert_array_equal(_mask_array(as_i, None, "mask.png"), weights)

    raw8 = (MASK_16BIT // 257).astype(np.uint8)  # 255 left, 3 right
    files8 = members(record(evidence=[]), masks=mask_member(Image.fromarray(raw8)))
    sample8 = decode_sample(files8, "m8", "s")
    assert sample8.masks[0].dtype == np.uint8
    np.testing.assert_array_equal(sample8.masks[0], raw8)  # 8-bit: the stored values, value/255
    want = evidence_token_targets([((56, 56), (56, 56), 28, [], raw8)], sigma=0.0, alpha=0.0)
    assert torch.equal(processor(sample8).evidence_target, want)


def test_float_mask_holds_weights_not_8bit_values(tokenizer):
    """A float mask (mode F: a float TIFF under mask.png; PIL reads by content) is weights in
    [0, 1] (DESIGN §3); converting it to 8 bits made 0.75 a 0 and the left half's evidence
    vanished. NaN weights are an undecodable mask."""
    weights = np.zeros((56, 56), dtype=np.float32)
    weights[:, :28] = 0.75
    weights[:, 28:] = 0.25
    tiff = io.BytesIO()
    Image.fromarray(weights, mode="F").save(tiff, format="TIFF")
    sample = decode_sample(members(record(evidence=[]), masks={"mask.png": tiff.getvalue()}), "f", "s")
    assert sample.masks[0].dtype == np.float32
    np.testing.assert_array_equal(sample.masks[0], weights)
    target = SampleProcessor(tokenizer, IMAGE_CONFIG, sigma=0.0, alpha=0.0)(sample).evidence_target
    left, right = target.view(2, 2).sum(0).tolist()
    assert left == pytest.approx(0.75) and right == pytest.approx(0.25)
    weights[0, 0] = np.nan
    bad = io.BytesIO()
    Image.fromarray(weights, mode="F").save(bad, format="TIFF")
    with pytest.raises(SampleError, match="undecodable_mask.*NaN"):
        decode_sample(members(record(evidence=[]), masks={"mask.png": bad.getvalue()}), "nan", "s")


def test_writer_validates_with_the_reader_code(tmp_path):
    writer = EvidenceShardWriter(str(tmp_path), "w", samples_per_shard=3)
    for key, files in good_samples(4):
        assert writer.write(key, files)
    assert not writer.write("nan", BAD["nan-box"][0])
    assert not writer.write("noimg", BAD["no-image"][0])
    summary = writer.close()
    assert summary["written"] == 4 and summary["skipped"] == {"malformed_box": 1, "no_image": 1}
    assert [os.path.basename(s) for s in summary["shards"]] == ["w-000000.tar", "w-000001.tar"]
    assert sorted(os.listdir(tmp_path)) == ["w-000000.tar", "w-000001.tar"]  # no temporaries left
    strict = EvidenceShardWriter(str(tmp_path / "s"), strict=True)
    with pytest.raises(SampleError, match="'k': unknown_answer_type"):
        strict.write("k", BAD["unknown-type"][0])
    with pytest.raises(ValueError, match="contains a '.'"):
        strict.write("a.b", members(record()))
    for key in ("", "__abc", "dir/__x", "dir/"):  # names the reader takes for metadata
        with pytest.raises(ValueError, match="empty or starts with '__'"):
            strict.write(key, members(record()))


def test_transparent_mask_pixels_mark_nothing():
    """An RGBA/LA mask: gray x alpha. PIL's grayscale dropped alpha, so a transparent white
    background was full evidence and an opaque black region none was... still none."""
    rgba = Image.new("RGBA", (56, 56), (255, 255, 255, 0))  # transparent white background
    rgba.paste((255, 255, 255, 255), (0, 0, 28, 56))  # opaque white left half
    la = Image.new("LA", (56, 56), (255, 0))
    la.paste((255, 128), (0, 0, 28, 56))  # half-transparent white left half
    for mask, left in ((rgba, 255), (la, 128)):
        sample = decode_sample(members(record(evidence=[]), masks={"mask.png": encode(mask)}),
                               "alpha", "s")
        weights = sample.masks[0]
        assert weights.dtype == np.uint8
        assert (weights[:, :28] == left).all() and (weights[:, 28:] == 0).all()


def test_two_masks_for_one_image_are_refused_whatever_their_order():
    """'mask.png' and '0.mask.png' both name image 0: the last in tar order won silently."""
    full, empty = encode(Image.new("L", (56, 56), 255)), encode(Image.new("L", (56, 56), 0))
    for masks in ({"mask.png": full, "0.mask.png": empty}, {"0.mask.png": empty, "mask.png": full}):
        with pytest.raises(SampleError, match="bad_image_names.*two masks"):
            decode_sample(members(record(evidence=[]), masks=masks), "two", "s")


def test_exif_rotated_photo_is_read_upright():
    """A camera JPEG stored sideways (EXIF orientation 6) is upright for viewers, annotation tools
    and HF's load_image; its boxes are in upright coordinates."""
    stored = Image.new("RGB", (200, 100), (10, 200, 10))
    stored.paste((200, 10, 10), (0, 0, 20, 100))  # red band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    jpg = io.BytesIO()
    stored.save(jpg, "JPEG", exif=exif.tobytes(), quality=95)
    sample = decode_sample(members(record(), [("jpg", jpg.getvalue())]), "exif", "s")
    upright = np.asarray(sample.images[0])
    assert sample.images[0].size == (100, 200)
    assert upright[5, 50, 0] > 150 and upright[195, 50, 0] < 100  # the band is now on top


# ---------------------------------------------------------------- splitting and resuming


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    samples = good_samples(37)
    samples[5] = ("bad-5", BAD["nan-box"][0])
    samples[20] = ("bad-20", BAD["bad-image"][0])
    for s in range(3):
        write_tar(d / f"s-{s:06d}.tar", samples[s * 13:(s + 1) * 13])
    return str(d / "s-{000000..000002}.tar"), {k for k, _ in samples if k.startswith("good")}


def test_ranks_and_workers_cover_one_pass_disjointly(clean_shards, tokenizer):
    shards, valid = clean_shards
    per_rank = []
    for rank in range(2):
        dataset = make_dataset(shards, tokenizer, batch_size=3, rank=rank, world_size=2, seed=3, num_epochs=1, even_ranks=False)
        keys, _ = collect(EvidenceDataLoader(dataset, num_workers=2))
        assert len(keys) == len(set(keys))
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == valid


def test_max_samples_pass_is_the_first_samples_whatever_the_ranks_workers_and_batch(
        clean_shards, tokenizer):
    """Evaluation's pass over ``max_samples``: the first N samples in shard order (bad ones
    skipped), split over the ranks; the loader's workers and batch size only order them."""
    shards, _ = clean_shards
    first_17 = {f"good-{i:03d}" for i in range(17)} - {"good-005"}  # sample 5 is bad
    for world_size, num_workers, batch_size in ((1, 0, 4), (2, 0, 3), (2, 2, 3), (2, 3, 16)):
        keys = []
        for rank in range(world_size):
            dataset = make_dataset(shards, tokenizer, batch_size=batch_size, rank=rank,
                                   world_size=world_size, shuffle=False, num_epochs=1,
                                   even_ranks=False, max_samples=17)
            keys += collect(EvidenceDataLoader(dataset, num_workers=num_workers))[0]
        assert len(keys) == len(set(keys)) and set(keys) == first_17, (world_size, num_workers)


def test_even_ranks_get_equal_disjoint_epochs_reshuffled_each_epoch(clean_shards, tokenizer):
    shards, _ = clean_shards
    datasets = [make_dataset(shards, tokenizer, rank=r, world_size=2, seed=1) for r in range(2)]
    length = datasets[0].epoch_length
    assert length == 37 // 2 == datasets[1].epoch_length
    epoch0 = [[d.entry_index(k) for k in range(length)] for d in datasets]
    epoch1 = [[d.entry_index(k) for k in range(length, 2 * length)] for d in datasets]
    assert not set(epoch0[0]) & set(epoch0[1]) and len(set(epoch0[0]) | set(epoch0[1])) == 2 * length
    assert epoch0 != epoch1


def test_resume_continues_exactly_where_it_stopped(clean_shards, tokenizer):
    shards, _ = clean_shards
    kwargs = dict(batch_size=3, seed=7)
    reference, _ = collect(EvidenceDataLoader(make_dataset(shards, tokenizer, **kwargs), num_workers=2), max_batches=20)
    assert len(reference) == 60  # crosses the epoch boundary (35 valid samples per epoch)

    first = EvidenceDataLoader(make_dataset(shards, tokenizer, **kwargs), num_workers=2)
    head, _ = collect(first, max_batches=7)
    state = json.loads(json.dumps(first.state_dict()))  # checkpointable as plain JSON

    resumed = EvidenceDataLoader(make_dataset(shards, tokenizer, **kwargs), num_workers=2)
    resumed.load_state_dict(state)
    tail, _ = collect(resumed, max_batches=13)
    assert head + tail == reference
    assert sum(resumed.skipped.values()) >= sum(first.skipped.values())


def test_resume_with_other_worker_count_neither_repeats_nor_skips(clean_shards, tokenizer):
    shards, valid = clean_shards
    kwargs = dict(batch_size=2, seed=5, num_epochs=1, even_ranks=False)
    first = EvidenceDataLoader(make_dataset(shards, tokenizer, **kwargs), num_workers=2)
    head, _ = collect(first, max_batches=5)
    second = EvidenceDataLoader(make_dataset(shards, tokenizer, **kwargs), num_workers=0)
    second.load_state_dict(first.state_dict())
    tail, _ = collect(second)
    assert len(head) + len(tail) == len(valid) and set(head + tail) == valid


def test_resume_at_another_data_parallel_size_continues_the_stream(clean_shards, tokenizer):
    """DP = 1 -> DP = 2 (a job requeued on more nodes): the new ranks read on from where the old
    one stopped in the same epoch order, nothing it delivered again and little passed over;
    restarting from sample 0 fed the already-trained prompts again. A state of the same DP
    rank and size (TP/PP changed) loads exactly."""
    shards, _ = clean_shards
    kwargs = dict(seed=7, even_ranks=True)
    old = EvidenceDataLoader(make_dataset(shards, tokenizer, batch_size=4, **kwargs), num_workers=2)
    delivered, _ = collect(old, max_batches=3)
    state = json.loads(json.dumps(old.state_dict()))
    order = [old.dataset.index.entries[old.dataset.entry_index(k)].key for k in range(old.dataset.epoch_length)]
    new = [EvidenceDataLoader(make_dataset(shards, tokenizer, batch_size=2, rank=r, world_size=2, **kwargs))
           for r in range(2)]
    assert [loader.load_resharded_state_dict([state]) for loader in new] == [False, False]
    after = [collect(loader, max_batches=2)[0] for loader in new]
    assert not set(delivered) & set(after[0] + after[1])
    first_new = min(order.index(k) for k in after[0] + after[1])
    passed_over = {k for k in order[:first_new] if k.startswith("good")} - set(delivered)
    assert 0 < len(passed_over) <= 4  # the other worker's prefetched batch, at most
    # Same DP rank and size: the exact continuation.
    ranks = [EvidenceDataLoader(make_dataset(shards, tokenizer, batch_size=2, rank=r, world_size=2, **kwargs))
             for r in range(2)]
    heads = [collect(loader, max_batches=2)[0] for loader in ranks]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in ranks]
    again = EvidenceDataLoader(make_dataset(shards, tokenizer, batch_size=2, rank=1, world_size=2, **kwargs))
    assert again.load_resharded_state_dict(states) is True
    reference = EvidenceDataLoader(make_dataset(shards, tokenizer, batch_size=2, rank=1, world_size=2, **kwargs))
    assert collect(again, max_batches=2)[0] == collect(reference, max_batches=4)[0][len(heads[1]):]
    other_seed = EvidenceDataLoader(make_dataset(shards, tokenizer, batch_size=2, rank=0, world_size=2, seed=8))
    with pytest.raises(ValueError, match="seed=7"):
        other_seed.load_resharded_state_dict([state])
    # Continuing DP = 2 at DP = 1 from rank 1's state alone restarted past rank 1's samples
    # only: rank 0's delivered ones could come again. Every rank's state is required.
    one = EvidenceDataLoader(make_dataset(shards, tokenizer, batch_size=2, **kwargs))
    with pytest.raises(ValueError, match=r"reader states of ranks \[1\] .*every rank"):
        one.load_resharded_state_dict(states[1:])
    assert one.load_resharded_state_dict(states) is False


def test_state_from_other_data_is_refused(clean_shards, tokenizer):
    shards, _ = clean_shards
    loader = EvidenceDataLoader(make_dataset(shards, tokenizer, seed=1))
    state = loader.state_dict()
    other = EvidenceDataLoader(make_dataset(shards, tokenizer, seed=2))
    with pytest.raises(ValueError, match="seed=1"):
        other.load_state_dict(state)




@pytest.mark.parametrize("compression", ["gzip", "bz2", "xz"])
def test_compressed_shard_is_named_as_compressed_not_as_damaged(tmp_path, tokenizer, compression):
    """A .tar.gz (which webdataset streams) cannot be seeked into: the shard is unreadable, and
    the message says why; it said "truncated header", i.e. damage."""
    import bz2
    import gzip
    import lzma

    write_tar(tmp_path / "a.tar", good_samples(3))
    module = {"gzip": gzip, "bz2": bz2, "xz": lzma}[compression]
    (tmp_path / "a.tar.x").write_bytes(module.compress((tmp_path / "a.tar").read_bytes()))
    index = build_shard_index([str(tmp_path / "a.tar.x"), str(tmp_path / "a.tar")])
    assert len(index.entries) == 3 and len(index.errors) == 1
    name = {"bz2": "bzip2"}.get(compression, compression)
    assert f"a.tar.x: ReadError: the shard is {name}-compressed" in index.errors[0]
    with pytest.raises(ValueError, match=f"unreadable shard: .*a.tar.x: .*{name}-compressed"):
        make_dataset(str(tmp_path / "a.tar.x"), tokenizer, strict=True)
    # a sample key that starts like bzip2's magic is not compression
    write_tar(tmp_path / "b.tar", good_samples(2, prefix="BZh9"))
    assert not build_shard_index([str(tmp_path / "b.tar")]).errors


def test_one_shard_named_twice_is_read_once(tmp_path, tokenizer, monkeypatch):
    """The same file under two spellings (relative and absolute, ./, a symlink) is one shard:
    it was indexed twice and each of its samples read twice per epoch."""
    write_tar(tmp_path / "s-000000.tar", good_samples(4))
    write_tar(tmp_path / "s-000001.tar", good_samples(3, prefix="other"))
    os.symlink(tmp_path / "s-000000.tar", tmp_path / "s-link.tar")
    monkeypatch.chdir(tmp_path)
    spec = ["s-*.tar", str(tmp_path / "s-000000.tar"), "./s-000001.tar"]
    files = reader.expand_shards(spec)
    assert files == sorted(files) and len(files) == 2
    assert {os.path.realpath(f) for f in files} == {str((tmp_path / f"s-00000{i}.tar").resolve()) for i in (0, 1)}
    assert reader.expand_shards(list(reversed(spec))) == files  # the same whatever the spelling order
    dataset = make_dataset(spec, tokenizer, shuffle=False, num_epochs=1, even_ranks=False)
    keys, _ = collect(EvidenceDataLoader(dataset))
    assert sorted(keys) == sorted(k for k, _ in good_samples(4) + good_samples(3, prefix="other"))


def test_negative_shuffle_seed_is_an_error_naming_the_field_at_construction(clean_shards, tokenizer):
    """numpy refused it only when the first batch was drawn (inside a loader worker) with
    "expected non-negative integer", naming nothing."""
    shards, _ = clean_shards
    with pytest.raises(ValueError, match=r"seed \(data.shuffle_seed\) must be a non-negative integer, got -1"):
        make_dataset(shards, tokenizer, seed=-1)
    make_dataset(shards, tokenizer, seed=-1, shuffle=False)  # an in-order pass uses no seed


# ---------------------------------------------------------------- batch layout


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_layout(corrupt_shards, tokenizer, padding_side):
    shards, _ = corrupt_shards
    dataset = make_dataset(shards, tokenizer, batch_size=8, shuffle=False, num_epochs=1, even_ranks=False,
                           padding_side=padding_side, append_answer=True)
    _, batches = collect(EvidenceDataLoader(dataset))
    special = dataset.processor.special
    for b in batches:
        B, S = b["input_ids"].shape
        assert b["attention_mask"].sum(1).tolist() == b["lengths"].tolist()
        assert (b["input_ids"][~b["attention_mask"]] == special.pad).all()
        assert b["image_mask"].sum(1).tolist() == b["num_image_tokens"].tolist()
        grid = b["image_grid_thw"]
        assert grid.shape == (int(b["num_images"].sum()), 3)
        assert b["pixel_values"].shape == (int(grid.prod(1).sum()), IMAGE_CONFIG.patch_dim)
        assert (grid.prod(1) // IMAGE_CONFIG.merge_size**2).sum() == b["num_image_tokens"].sum()
        target = b["evidence_target"]
        torch.testing.assert_close(target.sum(1)[b["has_target"]], torch.ones(int(b["has_target"].sum())))
        assert (target[~b["image_mask"]] == 0).all() and (target[~b["has_target"]] == 0).all()
        # Response mask: the answer tokens and <|im_end|>, right after the prompt.
        for row in range(B):
            ids = b["input_ids"][row][b["attention_mask"][row]]
            response = b["input_ids"][row][b["response_mask"][row]]
            assert b["response_mask"][row].sum() == b["lengths"][row] - b["prompt_lengths"][row]
            assert response[-1] == special.im_end
            assert tokenizer.decode(response[:-1]) == b["answers"][row]
            assert ids[len(ids) - len(response):].tolist() == response.tolist()
            if padding_side == "left":
                assert b["attention_mask"][row, -1]
            else:
                assert b["attention_mask"][row, 0]


def test_prompt_is_qwen_chat_format(clean_shards, tokenizer):
    shards, _ = clean_shards
    dataset = make_dataset(shards, tokenizer, batch_size=1, shuffle=False, num_epochs=1)
    _, sample, _ = next(dataset.iter_samples())
    text = tokenizer.decode(sample.input_ids)
    pads = "<|image_pad|>" * 4  # 56x56 image: 2x2 tokens at f = 28
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{pads}<|vision_end|>Is there a red square 0?\nAnswer with yes or no.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    np.testing.assert_allclose(sample.evidence_target.sum().item(), 1.0, rtol=1e-6)


def test_infinite_stream_over_only_bad_samples_raises_instead_of_spinning(tmp_path, tokenizer):
    write_tar(tmp_path / "bad.tar", [(f"b{i}", BAD["nan-box"][0]) for i in range(4)])
    with pytest.raises(ValueError, match="no valid sample in .* consecutive stream positions"):
        collect(EvidenceDataLoader(make_dataset(str(tmp_path / "bad.tar"), tokenizer)), max_batches=1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_finite_pass_with_drop_last_repeats_the_same_full_batches(clean_shards, tokenizer,
                                                                  num_workers):
    shards, valid = clean_shards
    dataset = make_dataset(shards, tokenizer, batch_size=4, shuffle=False, num_epochs=1,
                           even_ranks=False, drop_last=True)
    loader = EvidenceDataLoader(dataset, num_workers=num_workers)
    passes = [collect(loader) for _ in range(3)]
    keys = [k for k, _ in passes]
    assert keys[0] == keys[1] == keys[2] and set(keys[0]) <= valid
    assert all(len(b["keys"]) == 4 for _, batches in passes for b in batches)
    assert 0 <= len(valid) - len(keys[0]) < 4 * max(num_workers, 1)  # a partial batch per worker
    # both bad samples, counted in each of the three passes
    assert loader.skipped == Counter(malformed_box=3, undecodable_image=3)


def test_finite_pass_ending_in_skipped_samples_finishes_and_counts_them(tmp_path, tokenizer):
    bad_tail = [("bad-x", BAD["nan-box"][0]), ("bad-y", BAD["bad-image"][0])]
    write_tar(tmp_path / "a.tar", good_samples(4) + bad_tail)  # last full batch ends at good-003
    dataset = make_dataset(str(tmp_path / "a.tar"), tokenizer, batch_size=2, shuffle=False,
                           num_epochs=1)
    loader = EvidenceDataLoader(dataset)
    first, _ = collect(loader)
    second, _ = collect(loader)
    assert first == second == [k for k, _ in good_samples(4)]
    assert loader.skipped == Counter(malformed_box=2, undecodable_image=2)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_error_that_is_not_a_data_error_is_raised_naming_the_sample(
        clean_shards, tokenizer, monkeypatch, caplog, num_workers):
    shards, _ = clean_shards
    real = reader.decode_sample

    def buggy(files, key, shard):  # stands for a bug in our code, not in the data
        if key == "good-003":
            raise ZeroDivisionError("a bug")
        return real(files, key, shard)

    monkeypatch.setattr(reader, "decode_sample", buggy)
    dataset = make_dataset(shards, tokenizer, shuffle=False, num_epochs=1)
    loader = EvidenceDataLoader(dataset, num_workers=num_workers)
    with caplog.at_level("ERROR", logger="megatron_ease.data.reader"):
        with pytest.raises(ZeroDivisionError) as info:
            collect(loader)
    assert loader.skipped == Counter()  # never skipped as if it were bad data
    text = "".join(getattr(info.value, "__notes__", [])) + str(info.value)
    if num_workers == 0:
        messages = [r.getMessage() for r in caplog.records]
        assert any("'good-003'" in m and "s-000000.tar" in m for m in messages)
    if hasattr(info.value, "add_note"):  # Python >= 3.11 (a worker's copy carries the note too)
        assert "'good-003'" in text and "s-000000.tar" in text


def test_workers_ship_uint8_patches_and_the_loader_hands_out_the_same_pixel_values(tmp_path,
                                                                                   tokenizer):
    """With workers, samples cross to the main process as uint8 patches (an eighth of the
    float32 bytes that wait in shared memory) and are normalised there: the batches equal the
    in-process ones bit for bit (HF's pixel_values, tests/unit/test_data_image.py)."""
    from unittest import mock

    from megatron_ease.data import reader

    write_tar(tmp_path / "a.tar", good_samples(6))
    kwargs = dict(batch_size=2, shuffle=False, num_epochs=1, even_ranks=False)
    _, inline = collect(EvidenceDataLoader(make_dataset(str(tmp_path / "a.tar"), tokenizer, **kwargs)))
    shipped, original = [], reader.normalise_patches

    def normalise(raw, cfg):
        shipped.append((raw.dtype, raw.shape))
        return original(raw, cfg)

    with mock.patch.object(reader, "normalise_patches", normalise):
        _, workers = collect(EvidenceDataLoader(make_dataset(str(tmp_path / "a.tar"), tokenizer, **kwargs),
                                                num_workers=2))
    assert len(inline) == 3 and len(workers) == len(shipped) == 4  # 2 + 1 per worker

    def per_sample(batch):
        return zip(batch["keys"], batch["pixel_values"].split(batch["image_grid_thw"].prod(1).tolist()))

    for (dtype, shape), b in zip(shipped, workers):
        assert dtype == torch.uint8 and shape == (b["pixel_values"].shape[0], 3 * IMAGE_CONFIG.patch_size ** 2)
    worker_pixels = {k: p for b in workers for k, p in per_sample(b)}
    assert len(worker_pixels) == 6
    for a in inline:
        for key, pixels in per_sample(a):
            assert worker_pixels[key].dtype == torch.float32
            assert torch.equal(worker_pixels[key], pixels), key
