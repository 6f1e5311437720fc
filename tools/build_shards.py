#!/usr/bin/env python
"""Build evidence shards (DESIGN §6) from a JSONL manifest or Visual-CoT metadata.

    python tools/build_shards.py --manifest train.jsonl --image-root /data/images --out /data/shards/train
    python tools/build_shards.py --format visual_cot --manifest viscot_dataset/gqa.jsonl \\
        --image-root playground/data/cot --out shards/viscot --samples-per-shard 2000

Manifest lines (``--format jsonl``), paths relative to --image-root:

    {"image": "a.jpg" | "images": ["a.jpg", "b.png"], "question": ..., "answer": ...,
     "answer_type": "choice|number|yesno|text|math", "choices": [...]?,
     "boxes": [[x0, y0, x1, y1], ...]? (image 0, original pixels) | "evidence": [{"image": i, "box": [...]}]?,
     "mask": "m.png"? | "masks": ["m0.png", null]?, "key": "unique_id"?, ...any other fields are kept}

Visual-CoT metadata lines (``--format visual_cot``): {"dataset", "split", "image", "question",
"answer", "bboxs": [[x1, y1, x2, y2], ...], "width", "height"}; images are looked up as
``ROOT/IMAGE`` then ``ROOT/DATASET/IMAGE`` (textcap images live under textvqa), answers are free
text (answer_type ``text``). Every sample is validated with the reader's own code before it is
written; invalid ones are counted by reason and logged (or raise under --strict).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
from collections import Counter
from typing import Any, Iterator, Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron_ease.data.schema import IMAGE_EXTENSIONS  # noqa: E402
from megatron_ease.data.writer import EvidenceShardWriter, sample_members  # noqa: E402

logger = logging.getLogger("build_shards")

_MANIFEST_FIELDS = {"key", "image", "images", "boxes", "mask", "masks"}


class ManifestError(ValueError):
    """A manifest line that cannot become a sample (missing file, unparsable line)."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(detail)


def read_manifest(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or the JSONDecodeError) for a JSONL file or a JSON array file."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            for i, item in enumerate(json.load(f)):
                yield i + 1, item
            return
        for i, line in enumerate(f):
            if line.strip():
                try:
                    yield i + 1, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i + 1, e


def _image_bytes(path: str) -> tuple[str, bytes]:
    """Original bytes when the format is one the reader takes, else a lossless PNG re-encode."""
    if not os.path.isfile(path):
        raise ManifestError("missing_file", f"image not found: {path}")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    with open(path, "rb") as f:
        data = f.read()
    if ext in IMAGE_EXTENSIONS:
        return ext, data
    buffer = io.BytesIO()
    try:
        Image.open(io.BytesIO(data)).save(buffer, format="PNG")
    except Exception as e:  # PIL raises many types; the sample is reported, not the run aborted
        raise ManifestError("undecodable_image", f"{path}: {type(e).__name__}: {e}") from None
    return "png", buffer.getvalue()


def _mask_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise ManifestError("missing_file", f"mask not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if path.lower().endswith(".png"):
        return data
    buffer = io.BytesIO()
    try:
        Image.open(io.BytesIO(data)).convert("L").save(buffer, format="PNG")
    except Exception as e:  # as above
        raise ManifestError("undecodable_mask", f"{path}: {type(e).__name__}: {e}") from None
    return buffer.getvalue()


def _sanitise_key(key: str) -> str:
    """Webdataset keys end at the first dot and must not look like paths."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", key)


def convert_jsonl(item: dict, line: int, image_root: str) -> tuple[str, dict[str, bytes]]:
    images = item.get("images", [item["image"]] if "image" in item else [])
    if isinstance(images, str):
        images = [images]
    record = {k: v for k, v in item.items() if k not in _MANIFEST_FIELDS}
    if "boxes" in item:
        boxes = item["boxes"] if isinstance(item["boxes"], list) else [item["boxes"]]
        record["evidence"] = list(record.get("evidence") or []) + [{"image": 0, "box": b} for b in boxes]
    masks = item.get("masks", [item["mask"]] if item.get("mask") else [])
    encoded = [_image_bytes(os.path.join(image_root, p)) for p in images]
    mask_bytes = {i: _mask_bytes(os.path.join(image_root, p)) for i, p in enumerate(masks) if p}
    key = _sanitise_key(str(item.get("key", f"line{line:09d}")))
    return key, sample_members(record, encoded, mask_bytes)


def convert_visual_cot(item: dict, line: int, image_root: str) -> tuple[str, dict[str, bytes]]:
    dataset = item.get("dataset", "")
    image = item.get("image", "")
    candidates = [os.path.join(image_root, image), os.path.join(image_root, "textvqa" if dataset == "textcap" else dataset, image)]
    path = next((c for c in candidates if os.path.isfile(c)), candidates[-1])
    record = {
        "question": item.get("question"),
        "answer": item.get("answer"),
        "answer_type": "text",
        "evidence": [{"image": 0, "box": b} for b in item.get("bboxs") or []],
        "source": f"visual_cot/{dataset}",
        "split": item.get("split"),
    }
    key = _sanitise_key(f"{dataset}_{item.get('split', '')}_{line:09d}")
    return key, sample_members(record, [_image_bytes(path)])


CONVERTERS = {"jsonl": convert_jsonl, "visual_cot": convert_visual_cot}


def build_shards(
    manifest: str,
    image_root: str,
    out_dir: str,
    fmt: str = "jsonl",
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    strict: bool = False,
    limit: Optional[int] = None,
) -> dict[str, Any]:
    """Convert, validate and write; returns {shards, written, skipped: {reason: n}}."""
    convert = CONVERTERS[fmt]
    manifest_problems: Counter = Counter()
    with EvidenceShardWriter(out_dir, prefix, samples_per_shard, strict=strict) as writer:
        for count, (line, item) in enumerate(tqdm(read_manifest(manifest), desc="samples", unit="", file=sys.stderr)):
            if limit is not None and count >= limit:
                break
            try:
                if isinstance(item, Exception) or not isinstance(item, dict):
                    raise ManifestError("bad_manifest_line", f"not a JSON object: {item}")
                key, files = convert(item, line, image_root)
            except (ManifestError, KeyError) as e:
                reason = e.reason if isinstance(e, ManifestError) else "bad_manifest_line"
                if strict:
                    raise ValueError(f"{manifest}:{line}: {reason}: {e}") from None
                manifest_problems[reason] += 1
                logger.warning("skipping %s:%d: %s: %s", manifest, line, reason, e)
                continue
            writer.write(key, files)
    summary = writer.close()
    summary["skipped"] = dict(Counter(summary["skipped"]) + manifest_problems)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="JSONL (or JSON array) file")
    parser.add_argument("--image-root", default=".", help="directory image and mask paths are relative to")
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--format", choices=sorted(CONVERTERS), default="jsonl")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix: PREFIX-000000.tar")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="convert at most this many manifest lines")
    parser.add_argument("--strict", action="store_true", help="stop at the first invalid sample")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    summary = build_shards(args.manifest, args.image_root, args.out, args.format, args.prefix, args.samples_per_shard, args.strict, args.limit)
    for reason, n in sorted(summary["skipped"].items()):
        print(f"skipped[{reason}]={n}")
    print(f"shards={len(summary['shards'])} dir={args.out}")
    print(f"written={summary['written']} skipped={sum(summary['skipped'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
