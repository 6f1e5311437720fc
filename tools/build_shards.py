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

Boxes are ``[x0, y0, x1, y1]`` in pixels of the image as stored (after its EXIF rotation) unless
``--box-format`` says otherwise: ``xywh`` (pixels, ``[x, y, width, height]``), ``xyxy-norm``
(fractions 0-1 of the width and height) or ``xyxy-1000`` (0-1000, Qwen-VL grounding); they are
converted to pixel ``[x0, y0, x1, y1]``. A single-image line with numeric ``width`` and ``height``
gives the frame its pixel boxes are in (an annotation of the original image): when the stored
image has another size with the same aspect ratio the boxes are scaled to it (and ``width``/
``height`` updated), with another aspect ratio the line is skipped (``box_frame_mismatch``).
The tool cannot tell the conventions apart in general, but refuses what cannot be pixel boxes of
the image: an empty or inverted box (``x1 <= x0``, e.g. xywh read as xyxy: ``empty_box``), a box
reaching past the image by more than 2% (e.g. 0-1000 boxes on a smaller image:
``box_outside_image``), and a sample whose boxes all lie within [0, 1] on an image of more than a
few pixels (normalised boxes read as pixels: ``box_looks_normalised``); each is skipped, counted
and logged (or raises under --strict).

Keys are sanitised to ``[A-Za-z0-9_-]`` (a dot or slash becomes ``_``; leading underscores of a
key starting with ``__``, which webdataset reserves, are dropped); without a key (or with
``null``/``""``) a line gets ``line<N>``. A line whose key sanitises to nothing (``bad_key``) or
to the key of a sample already written (``duplicate_key``, e.g. a manifest keyed by image id with
several questions per image, or ``x.1`` and ``x_1``) is skipped, counted and logged with its
line, as is a line that is not a usable object (``bad_manifest_line``: not UTF-8, not JSON,
or e.g. ``"image": null``).

Images in a format the reader does not take are re-encoded losslessly to PNG; modes PNG cannot
store (CMYK, LAB, F, 32-bit I, ...) are first converted to RGB as the processor does. Masks that
are not PNG are re-encoded to PNG keeping their precision: 8-bit as 8-bit, 16-bit as 16-bit,
float weights as round(clip(w, 0, 1) * 65535) in a 16-bit PNG.

Visual-CoT metadata lines (``--format visual_cot``): {"dataset", "split", "image", "question",
"answer", "bboxs": [[x1, y1, x2, y2], ...], "width", "height"}; images are looked up as
``ROOT/IMAGE`` then ``ROOT/DATASET/IMAGE`` (textcap images live under textvqa), answers are free
text (answer_type ``text``); the boxes are pixels of the ``width`` x ``height`` image, checked
and scaled as above (``--box-format`` applies to ``--format jsonl`` only). Every sample is validated with the reader's own code before it is
written; invalid ones are counted by reason and logged (or raise under --strict).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import os
import re
import sys
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from PIL import Image, ImageOps  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron_ease.data.image import to_rgb  # noqa: E402
from megatron_ease.data.schema import (  # noqa: E402
    _16BIT_GRAY_MODES,
    _EXIF_ORIENTATION,
    IMAGE_EXTENSIONS,
    check_box,
)
from megatron_ease.data.writer import EvidenceShardWriter, sample_members  # noqa: E402

logger = logging.getLogger("build_shards")

_MANIFEST_FIELDS = {"key", "image", "images", "boxes", "mask", "masks"}


class ManifestError(ValueError):
    """A manifest line that cannot become a sample (missing file, unparsable line)."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(detail)


class ManifestFileError(ValueError):
    """A manifest that cannot be read at all (a JSON array file that does not parse)."""


def _not_utf8(text: str) -> Optional[str]:
    """Where ``text`` (decoded with errors="surrogateescape") held a byte that is not UTF-8."""
    bad = re.search("[\udc80-\udcff]", text)
    if bad is None:
        return None
    return f"byte 0x{ord(bad.group()) - 0xDC00:02x} at character {bad.start() + 1} is not UTF-8"


def read_manifest(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or the error) for a JSONL file or a JSON array file.

    A JSONL line that is not UTF-8 or not JSON (also one nested too deeply, or with an integer
    of more digits than Python converts) yields its error, for the caller to count as a bad
    line; a JSON array file that does not parse raises ManifestFileError naming the file.
    """
    # utf-8-sig: a byte-order mark (Windows editors, PowerShell) is not part of the first line
    # (which would otherwise fail to parse) nor hides a JSON array's opening bracket.
    # surrogateescape: a byte that is not UTF-8 spoils its line only (checked per line), not
    # the whole read; lines split as in text mode (\n, \r\n or \r), so line numbers are an
    # editor's.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            text = f.read()
            try:
                problem = _not_utf8(text)
                if problem:
                    raise ValueError(problem)
                items = json.loads(text)
            except (ValueError, RecursionError) as e:
                raise ManifestFileError(f"{path}: not a readable JSON array manifest: {type(e).__name__}: {e}") from None
            for i, item in enumerate(items):
                yield i + 1, item
            return
        for i, line in enumerate(f):
            if line.strip():
                try:
                    problem = _not_utf8(line)
                    if problem:
                        raise ValueError(problem)
                    item = json.loads(line)
                except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
                    item = e
                yield i + 1, item


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
        image = Image.open(io.BytesIO(data))
        image.load()
        # The PNG keeps no EXIF: apply the orientation here, as the reader does for its formats.
        image = ImageOps.exif_transpose(image)
        if image.mode not in _PNG_IMAGE_MODES:
            # CMYK, LAB, F, 32-bit I, ...: PNG cannot store them. The processor converts every
            # image with to_rgb, so doing it here leaves the pixels the model sees unchanged.
            image = to_rgb(image)
        image.save(buffer, format="PNG")
    except Exception as e:  # PIL raises many types; the sample is reported, not the run aborted
        raise ManifestError("undecodable_image", f"{path}: {type(e).__name__}: {e}") from None
    return "png", buffer.getvalue()


# Image modes PIL writes to PNG as they are (8-bit gray/palette/colour, with alpha, 16-bit gray).
_PNG_IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B")


def _mask_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise ManifestError("missing_file", f"mask not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if path.lower().endswith(".png"):
        return data
    try:
        mask = _mask_png_image(Image.open(io.BytesIO(data)), path)
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
    except ManifestError:
        raise
    except Exception as e:  # as above
        raise ManifestError("undecodable_mask", f"{path}: {type(e).__name__}: {e}") from None
    return buffer.getvalue()


def _mask_png_image(mask: Image.Image, path: str) -> Image.Image:
    """A non-PNG mask as an image PNG stores without losing what the reader reads from it
    (schema._mask_array): 16-bit gray stays 16-bit (weight value/65535); float weights (mode F,
    e.g. a float TIFF) become round(clip(w, 0, 1) * 65535) in 16 bits (the targets clip weights
    to [0, 1]; converting to 8 bits made every weight below 1 a 0); every other mode is 8-bit
    gray (weight value/255), converted as the reader converts it."""
    mask.load()
    mask = ImageOps.exif_transpose(mask)  # as for images: the PNG keeps no EXIF orientation
    if mask.mode in _16BIT_GRAY_MODES:
        return Image.fromarray(np.asarray(mask).astype(np.uint16))
    if mask.mode == "F":
        weights = np.asarray(mask, dtype=np.float64)
        if not np.isfinite(weights).all():
            raise ManifestError("undecodable_mask", f"{path}: float mask with NaN or infinite values")
        return Image.fromarray(np.round(np.clip(weights, 0.0, 1.0) * 65535).astype(np.uint16))
    if mask.mode == "I":  # the reader's rule: a 32-bit integer mask has no defined full scale
        raise ManifestError("undecodable_mask", f"{path}: 32-bit integer mask (mode I) has no defined "
                            "full scale; store masks as 8-bit (value/255) or 16-bit (value/65535) grayscale")
    return mask if mask.mode == "L" else mask.convert("L")


BOX_FORMATS = ("xyxy", "xywh", "xyxy-norm", "xyxy-1000")
# How far (fraction of the side, at least one pixel) a box may reach past the image: annotation
# tools round, and some use inclusive pixel ends.
_BOX_SLACK = 0.02
_BOX_FORMAT_HINT = "(see --box-format: xyxy pixels, xywh, xyxy-norm 0-1, xyxy-1000)"


def _upright_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) of an encoded image as the reader sees it (EXIF rotation applied), from
    its header; None when it does not open (decode_sample then reports it)."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            width, height = height, width
        return width, height
    except Exception:  # PIL raises many types
        return None


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and np.isfinite(value) and value > 0


def _pixel_evidence(record: dict, sizes: list[Optional[tuple[int, int]]], box_format: str) -> None:
    """Convert record["evidence"] boxes to pixel [x0, y0, x1, y1] of the stored images and refuse
    boxes that cannot be such (ManifestError). Entries the schema rejects anyway (not an object,
    a bad box, an image index the sample lacks) are left for decode_sample to report."""
    evidence = record.get("evidence")
    if not isinstance(evidence, list):
        return
    entries = []
    for entry in evidence:
        if not isinstance(entry, dict) or "box" not in entry or check_box(entry["box"]) is not None:
            continue
        index = entry.get("image", 0)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(sizes) or sizes[index] is None:
            continue
        entries.append((entry, index))
    if not entries:
        return
    frame = None
    if len(sizes) == 1 and _number(record.get("width")) and _number(record.get("height")):
        frame = (float(record["width"]), float(record["height"]))
        width, height = sizes[0]
        if frame != (width, height):
            if abs(frame[0] / frame[1] - width / height) > 0.01 * width / height:
                raise ManifestError("box_frame_mismatch", f"boxes are given for a {record['width']}x{record['height']} "
                                    f"image, the image is {width}x{height} (another aspect ratio)")
            record["width"], record["height"] = width, height
    converted = []
    for entry, index in entries:
        width, height = sizes[index]
        x0, y0, a, b = (float(v) for v in entry["box"])
        x1, y1 = (x0 + a, y0 + b) if box_format == "xywh" else (a, b)
        if box_format == "xyxy-norm":
            x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
        elif box_format == "xyxy-1000":
            x0, x1, y0, y1 = x0 * width / 1000, x1 * width / 1000, y0 * height / 1000, y1 * height / 1000
        elif frame is not None and frame != (width, height):
            sx, sy = width / frame[0], height / frame[1]
            x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        converted.append((entry, index, [x0, y0, x1, y1]))
    for entry, index, box in converted:
        width, height = sizes[index]
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise ManifestError("empty_box", f"box {entry['box']!r} (as {box_format}) is empty or inverted "
                                f"{_BOX_FORMAT_HINT}")
        slack_x, slack_y = max(1.0, _BOX_SLACK * width), max(1.0, _BOX_SLACK * height)
        if x0 < -slack_x or y0 < -slack_y or x1 > width + slack_x or y1 > height + slack_y:
            raise ManifestError("box_outside_image", f"box {entry['box']!r} (as {box_format}) reaches past image "
                                f"{index} ({width}x{height}) {_BOX_FORMAT_HINT}")
    if box_format in ("xyxy", "xywh") and all(
            max(sizes[index]) > 4 and all(0 <= float(v) <= 1 for v in entry["box"]) for entry, index, _ in converted):
        raise ManifestError("box_looks_normalised", f"every box lies within [0, 1] ({converted[0][0]['box']!r}) on "
                            f"images of more than a few pixels: normalised boxes? {_BOX_FORMAT_HINT}")
    for entry, _, box in converted:
        if box_format != "xyxy" or frame is not None and frame != sizes[0]:
            entry["box"] = box


def _sanitise_key(key: str) -> str:
    """Webdataset keys end at the first dot and must not look like paths; names starting with
    ``__`` are webdataset's (``__key__``, ``__index__``) and the reader ignores them, so their
    leading underscores are dropped. May return "" (no usable key: the caller skips the line)."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", key)
    return key.lstrip("_") if key.startswith("__") else key


def _paths(item: dict, name: str, allow_none: bool = False) -> list:
    """item[name] as a list of path strings (a single string is a list of one)."""
    value = item[name]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p or (allow_none and p is None) for p in value):
        kind = "path strings" + (" or null" if allow_none else "")
        raise ManifestError("bad_manifest_line", f'"{name}" must be a path string or a list of {kind}, got {value!r}')
    return value


def _jsonl_key(item: dict, line: int) -> str:
    key = item.get("key")
    if key is None or key == "":
        return f"line{line:09d}"
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ManifestError("bad_key", f'"key" must be a string or an integer, got {key!r}')
    sanitised = _sanitise_key(str(key))
    if not sanitised:
        raise ManifestError("bad_key", f"key {key!r} has no character a sample key can keep")
    return sanitised


def convert_jsonl(item: dict, line: int, image_root: str, box_format: str = "xyxy") -> tuple[str, dict[str, bytes]]:
    key = _jsonl_key(item, line)
    if "images" in item:
        images = _paths(item, "images")
    elif "image" in item:
        if not isinstance(item["image"], str) or not item["image"]:
            raise ManifestError("bad_manifest_line", f'"image" must be a path string (a list goes in "images"), got {item["image"]!r}')
        images = [item["image"]]
    else:
        images = []
    mask_field = "masks" if "masks" in item else "mask"
    masks = _paths(item, mask_field, allow_none=True) if item.get(mask_field) not in (None, "") else []
    record = {k: v for k, v in item.items() if k not in _MANIFEST_FIELDS}
    if "boxes" in item:
        boxes = item["boxes"] if isinstance(item["boxes"], list) else [item["boxes"]]
        evidence = record.get("evidence") or []
        if not isinstance(evidence, list):
            raise ManifestError("bad_manifest_line", f'"evidence" must be a list when "boxes" is given too, got {evidence!r}')
        record["evidence"] = evidence + [{"image": 0, "box": b} for b in boxes]
    encoded = [_image_bytes(os.path.join(image_root, p)) for p in images]
    _pixel_evidence(record, [_upright_size(data) for _, data in encoded], box_format)
    mask_bytes = {i: _mask_bytes(os.path.join(image_root, p)) for i, p in enumerate(masks) if p}
    return key, sample_members(record, encoded, mask_bytes)


def convert_visual_cot(item: dict, line: int, image_root: str, box_format: str = "xyxy") -> tuple[str, dict[str, bytes]]:
    dataset = item.get("dataset") or ""
    image = item.get("image")
    if not isinstance(image, str) or not image or not isinstance(dataset, str):
        raise ManifestError("bad_manifest_line", f'"image" must be a path string and "dataset" a string, got {image!r}, {dataset!r}')
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
    for name in ("width", "height"):  # the frame of the boxes (checked and scaled below)
        if name in item:
            record[name] = item[name]
    # The line number keeps keys unique; a missing dataset or split leaves no empty part (a key
    # '__000000001' would be a webdataset name, which the reader ignores).
    key = _sanitise_key("_".join(str(part) for part in (dataset, item.get("split"), f"{line:09d}") if part))
    encoded = _image_bytes(path)
    _pixel_evidence(record, [_upright_size(encoded[1])], "xyxy")  # Visual-CoT boxes are xyxy pixels
    return key, sample_members(record, [encoded])


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
    overwrite: bool = False,
    box_format: str = "xyxy",
) -> dict[str, Any]:
    """Convert, validate and write; returns {shards, written, skipped: {reason: n}}. Shards
    already named ``PREFIX-*.tar`` in ``out_dir`` are an error, or replaced with ``overwrite``
    once the build completes (a failed or interrupted build leaves ``out_dir`` as it was)."""
    convert = CONVERTERS[fmt]
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    manifest_problems: Counter = Counter()
    key_lines: dict[str, int] = {}  # key of each written sample -> its manifest line
    # The manifest is opened (and a JSON array parsed) before the writer clears --out under
    # ``overwrite``: a manifest that cannot be read leaves the old shards in place.
    lines = read_manifest(manifest)
    first = next(lines, None)
    lines = itertools.chain([] if first is None else [first], lines)
    with EvidenceShardWriter(out_dir, prefix, samples_per_shard, strict=strict, overwrite=overwrite) as writer:
        for count, (line, item) in enumerate(tqdm(lines, desc="samples", unit="", file=sys.stderr)):
            if limit is not None and count >= limit:
                break
            try:
                if isinstance(item, Exception):
                    raise ManifestError("bad_manifest_line", f"not a JSON object: {type(item).__name__}: {item}")
                if not isinstance(item, dict):
                    raise ManifestError("bad_manifest_line", f"not a JSON object: {item}")
                try:
                    key, files = convert(item, line, image_root, box_format)
                except OSError as e:  # a path that exists but cannot be read (permissions, ...)
                    raise ManifestError("missing_file", f"{type(e).__name__}: {e}") from None
                except (KeyError, TypeError, ValueError) as e:
                    if isinstance(e, ManifestError):
                        raise
                    raise ManifestError("bad_manifest_line", f"{type(e).__name__}: {e}") from None
                if key in key_lines:
                    raise ManifestError("duplicate_key", f"sample key {key!r} was already written for line {key_lines[key]}")
            except ManifestError as e:
                if strict:
                    raise ValueError(f"{manifest}:{line}: {e.reason}: {e}") from None
                manifest_problems[e.reason] += 1
                logger.warning("skipping %s:%d: %s: %s", manifest, line, e.reason, e)
                continue
            if writer.write(key, files):
                key_lines[key] = line
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards PREFIX-*.tar already in --out (else they are an error), "
                             "when the build completes: one that fails leaves them")
    parser.add_argument("--box-format", choices=BOX_FORMATS, default="xyxy",
                        help="box convention of --format jsonl manifests: xyxy = [x0, y0, x1, y1] pixels (default), "
                             "xywh = [x, y, width, height] pixels, xyxy-norm = 0-1, xyxy-1000 = 0-1000 (Qwen-VL)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = build_shards(args.manifest, args.image_root, args.out, args.format, args.prefix,
                               args.samples_per_shard, args.strict, args.limit, args.overwrite, args.box_format)
    except (FileExistsError, ManifestFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for reason, n in sorted(summary["skipped"].items()):
        print(f"skipped[{reason}]={n}")
    print(f"shards={len(summary['shards'])} dir={args.out}")
    print(f"written={summary['written']} skipped={sum(summary['skipped'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
