"""Shard sample schema (DESIGN §6) and the one validation routine used by writer and reader.

A sample is the group of tar members sharing a key (webdataset convention: the key is the
member name up to the first dot of its basename, the rest is the extension):

    KEY.json                 {"question", "answer", "answer_type", "choices"?, "evidence"?, "source"?, ...}
    KEY.jpg | KEY.png | ...  a single image (index 0), or KEY.0.jpg, KEY.1.png, ... for several
    KEY.mask.png             optional grayscale evidence mask of image 0, or KEY.<i>.mask.png

Only JSON and image bytes are ever decoded; unknown members are ignored and nothing is
unpickled (webdataset's default decoders would unpickle ``.pyd``/``.pickle`` members).
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image, ImageOps

ANSWER_TYPES = ("choice", "number", "yesno", "text", "math")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MASK_EXTENSION = "mask.png"
# Qwen's smart_resize refuses more extreme images; checked here so the reason is a data one.
MAX_ASPECT_RATIO = 200

# Every reason a sample can be skipped for, as counted in reader and writer summaries.
SKIP_REASONS = (
    # no json member; not UTF-8 JSON (including JSON nested too deeply and integers over Python's
    # 4300-digit limit); not an object; question/answer/choices text with lone surrogates
    "bad_json",
    "missing_field",  # question or answer missing/empty/not a string or number
    "unknown_answer_type",
    "bad_choices",  # choice sample whose choices or answer letter do not fit together
    "no_image",
    "bad_image_names",  # duplicate or non-contiguous image indices (0.jpg, 2.jpg)
    "undecodable_image",
    "extreme_aspect_ratio",
    "malformed_evidence",  # evidence not a list of {"image": int, "box": [...]} objects
    "malformed_box",  # box not four finite numbers (NaN, inf, wrong length, strings)
    "evidence_image_missing",  # evidence or mask for an image index the sample lacks
    # also a mask that is not 8- or 16-bit (a 32-bit integer 'I' image), or not a PNG
    "undecodable_mask",
    "mask_size_mismatch",
    "prompt_too_long",  # reader only: over the configured token budget
    "special_token_in_text",  # reader only: question or appended answer holds an image placeholder
    "duplicate_member",  # reader only: the same extension twice under one key in a tar
    # reader only: a tar that cannot be indexed to its end; counted once per unreadable shard, by
    # the rank-0 loader (the samples lost after the damage cannot be known)
    "unreadable_shard",
)

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class SampleError(ValueError):
    """A sample failed to decode or validate. ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str, shard: str = "?", key: str = "?"):
        assert reason in SKIP_REASONS, reason
        self.reason, self.detail, self.shard, self.key = reason, detail, shard, key
        super().__init__(f"{shard}: sample {key!r}: {reason}: {detail}")


@dataclass
class EvidenceSample:
    """A decoded, validated sample. Boxes are as stored (original pixels, not clipped)."""

    key: str
    shard: str
    images: list[Image.Image]  # decoded (loaded) PIL images, original mode
    question: str
    answer: str
    answer_type: str
    choices: Optional[list[str]]
    boxes: list[list[list[float]]]  # per image: list of [x0, y0, x1, y1]
    # per image, [H, W] or None: uint8 (value/255) for 8-bit masks, float32 weights in [0, 1] for
    # 16-bit ones (value/65535); see _mask_array
    masks: list[Optional[np.ndarray]]
    record: dict[str, Any] = field(default_factory=dict)  # the full JSON object (source, extras)

    @property
    def has_evidence(self) -> bool:
        return any(self.boxes) or any(m is not None for m in self.masks)


def split_member_name(name: str) -> tuple[Optional[str], Optional[str]]:
    """'a/b/k001.0.jpg' -> ('a/b/k001', '0.jpg'); (None, None) when there is no extension.

    Extensions are lowercased, as webdataset does when grouping.
    """
    match = _KEY_RE.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def choice_letter(index: int) -> str:
    return chr(ord("A") + index)


def decode_sample(files: Mapping[str, bytes], key: str, shard: str) -> EvidenceSample:
    """Decode and validate one sample's members ({extension: bytes}). Raises SampleError."""

    def fail(reason: str, detail: str) -> SampleError:
        return SampleError(reason, detail, shard=shard, key=key)

    record = _parse_json(files.get("json"), fail)
    question, answer, answer_type, choices = _parse_qa(record, fail)

    image_members = _indexed_members(files, IMAGE_EXTENSIONS, fail)
    if not image_members:
        raise fail("no_image", f"no member with extension {'|'.join(IMAGE_EXTENSIONS)}")
    images = []
    for i, name in enumerate(image_members):
        image = _open_image(files[name], fail, "undecodable_image", name)
        width, height = image.size
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise fail("extreme_aspect_ratio", f"image {i} is {width}x{height}")
        images.append(image)

    boxes: list[list[list[float]]] = [[] for _ in images]
    for entry_index, image_index, box in _parse_evidence(record.get("evidence"), fail):
        if not 0 <= image_index < len(images):
            raise fail("evidence_image_missing", f"evidence[{entry_index}] names image {image_index}, sample has {len(images)}")
        boxes[image_index].append(box)

    masks: list[Optional[np.ndarray]] = [None] * len(images)
    for ext in files:
        if ext != MASK_EXTENSION and not ext.endswith("." + MASK_EXTENSION):
            prefix, _, suffix = ext.rpartition(".")
            if prefix == "mask" or prefix.endswith(".mask"):  # mask.jpg: its evidence would be
                raise fail("undecodable_mask",  # silently lost (and JPEG artefacts are not)
                           f"mask member {_brief(ext)} is not a PNG: evidence masks are stored "
                           f"lossless as {MASK_EXTENSION} (tools/build_shards.py re-encodes them)")
            continue
        index = _member_index(ext[: -len(MASK_EXTENSION) - 1])
        if index is None:
            continue
        if index >= len(images):
            detail = f"for image {_brief(index)}, sample has {len(images)}"
            raise fail("evidence_image_missing", f"mask member {_brief(ext)} {detail}")
        if masks[index] is not None:  # "mask.png" and "0.mask.png" both name image 0
            raise fail("bad_image_names", f"image {index} has two masks (mask member {ext})")
        mask_image = _open_image(files[ext], fail, "undecodable_mask", ext)
        if mask_image.size != images[index].size:
            raise fail("mask_size_mismatch", f"{ext} is {mask_image.size}, image {index} is {images[index].size}")
        masks[index] = _mask_array(mask_image, fail, ext)

    return EvidenceSample(key, shard, images, question, answer, answer_type, choices, boxes, masks, record)


def _parse_json(raw: Optional[bytes], fail) -> dict:
    if raw is None:
        raise fail("bad_json", "no json member")
    try:
        record = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise fail("bad_json", "json member nests arrays/objects too deeply to parse") from None
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, ints over the 4300-digit limit
        raise fail("bad_json", f"json member: {e}") from None
    if not isinstance(record, dict):
        raise fail("bad_json", f"top level is {type(record).__name__}, expected an object")
    return record


def _parse_qa(record: dict, fail) -> tuple[str, str, str, Optional[list[str]]]:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise fail("missing_field", "question missing or empty")
    _check_text(question, "question", fail)
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise fail("missing_field", f"answer missing or not a string/number: {answer!r}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise fail("missing_field", f"answer is {answer}")
    answer = str(answer).strip()
    if not answer:
        raise fail("missing_field", "answer is empty")
    _check_text(answer, "answer", fail)
    answer_type = record.get("answer_type")
    if answer_type not in ANSWER_TYPES:
        raise fail("unknown_answer_type", f"{answer_type!r} not in {ANSWER_TYPES}")
    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise fail("bad_choices", f"choices must be a list of non-empty strings, got {choices!r}")
        if len(choices) > 26:
            raise fail("bad_choices", f"{len(choices)} choices; at most 26 (letters A-Z)")
        for i, choice in enumerate(choices):
            _check_text(choice, f"choices[{i}]", fail)
    if answer_type == "choice":
        if not choices or len(choices) < 2:
            raise fail("bad_choices", "a choice sample needs at least two choices")
        letters = [choice_letter(i) for i in range(len(choices))]
        if answer.upper() not in letters:
            raise fail("bad_choices", f"answer {answer!r} is not one of the letters {letters}")
        answer = answer.upper()
    return question, answer, answer_type, choices


def _indexed_members(files: Mapping[str, bytes], extensions, fail) -> list[str]:
    """Image member extensions in index order: ['jpg'] or ['0.jpg', '1.png', ...]."""
    indexed: dict[int, str] = {}
    for ext in files:
        prefix, _, suffix = ext.rpartition(".")
        if suffix not in extensions or prefix == "mask" or prefix.endswith(".mask"):
            continue
        index = _member_index(prefix)
        if index is None:
            continue
        if index in indexed:
            names = f"{_brief(indexed[index])} and {_brief(ext)}"
            raise fail("bad_image_names", f"image {_brief(index)} given twice: {names}")
        indexed[index] = ext
    if sorted(indexed) != list(range(len(indexed))):
        indices = ", ".join(_brief(i) for i in sorted(indexed))
        raise fail("bad_image_names", f"image indices [{indices}] are not 0..{len(indexed) - 1}")
    return [indexed[i] for i in range(len(indexed))]


def _member_index(prefix: str) -> Optional[int]:
    """Image index of a member extension's prefix: '' -> 0, '12' -> 12; None when the prefix is
    not ASCII digits (not an indexed member: str.isdigit also accepts '²', which int() refuses).

    A digit string too long for int() (Python's 4300-digit limit) is an index past any image,
    which the callers reject like every other out-of-range index.
    """
    if prefix == "":
        return 0
    if not (prefix.isascii() and prefix.isdigit()):
        return None
    prefix = prefix.lstrip("0") or "0"
    return int(prefix) if len(prefix) <= 100 else 10**100


def _brief(value: Any) -> str:
    """repr cut to a readable length for error messages (indices, names from corrupt data)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} characters)"


def _check_text(text: str, name: str, fail) -> None:
    """Text that gets tokenised must be valid Unicode: JSON's \\ud800-style escapes can decode
    to lone surrogates, which the tokenizer cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        detail = f"{name} is not valid Unicode text: {e.reason} at character {e.start}"
        raise fail("bad_json", detail) from None


def _open_image(raw: bytes, fail, reason: str, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Decompression-bomb warnings become errors: a giant image is a bad sample here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            image.load()  # full decode now, so truncated files fail here and not in a worker later
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise fail(reason, f"{name}: {type(e).__name__}: {e}") from None
    if image.width <= 0 or image.height <= 0:
        raise fail(reason, f"{name}: empty image {image.size}")
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        # A camera JPEG stored sideways: shown upright by viewers, annotation tools and HF's
        # load_image, so its boxes and masks are in upright coordinates.
        image = ImageOps.exif_transpose(image)
    return image


_EXIF_ORIENTATION = 0x0112


_16BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def is_16bit_gray(image: Image.Image) -> bool:
    """16-bit grayscale: the I;16 modes, and mode I from a PNG (older Pillow versions open
    16-bit PNGs as I); full scale 65535. Images and masks alike."""
    return image.mode in _16BIT_GRAY_MODES or (image.mode == "I" and image.format == "PNG")


def _mask_array(mask: Image.Image, fail, name: str) -> np.ndarray:
    """A decoded mask as the [H, W] array the targets take (DESIGN §3), scaled by its bit depth.

    8-bit (mode L, and every mode PIL converts to L: 1, P, LA, RGB, ...): the uint8 values,
    weight = value/255 (the targets' integer rule), exactly as stored; with an alpha channel
    (LA, RGBA, PA, a transparency colour) the gray value times alpha/255. 16-bit grayscale
    (the I;16 modes, and mode I from a PNG: older Pillow versions open 16-bit PNGs as I):
    float32 weights value/65535, so full scale is weight 1 as in 8 bits. A 32-bit integer image
    (mode I from any other format) has no agreed full scale and is rejected (undecodable_mask),
    as is a mode PIL cannot convert to grayscale. A float image (mode F, e.g. a float TIFF)
    holds weights, kept as float32 (the targets clip them to [0, 1]); converting it to 8 bits
    made every weight below 1 a 0.
    """
    if mask.mode == "L":
        return np.asarray(mask).astype(np.uint8)
    if is_16bit_gray(mask):
        values = np.asarray(mask)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise fail("undecodable_mask", f"{name}: 16-bit mask with values outside [0, 65535]")
        return values.astype(np.float32) / np.float32(65535)
    if mask.mode == "F":  # 32-bit float (TIFF): weights as they are (DESIGN §3), not value/255
        values = np.asarray(mask, dtype=np.float32)
        if not np.isfinite(values).all():
            raise fail("undecodable_mask", f"{name}: float mask with NaN or infinite values")
        return values
    if mask.mode == "I":
        raise fail("undecodable_mask", f"{name}: 32-bit integer mask (mode I) has no defined full "
                   "scale; store masks as 8-bit (value/255) or 16-bit (value/65535) grayscale PNG")
    try:
        if mask.mode in ("LA", "La", "RGBA", "RGBa", "PA") or "transparency" in mask.info:
            # A transparent pixel marks nothing, whatever its colour (PIL's grayscale drops
            # alpha: a transparent white mask was full evidence): gray x alpha, in 8 bits.
            gray, alpha = (np.asarray(c, dtype=np.uint16) for c in mask.convert("LA").split())
            return ((gray * alpha + 127) // 255).astype(np.uint8)
        return np.asarray(mask.convert("L"))
    except (ValueError, OSError) as e:  # modes PIL cannot convert (e.g. LAB)
        detail = f"{name}: mode {mask.mode} cannot be read as grayscale: {e}"
        raise fail("undecodable_mask", detail) from None


def check_box(box: Any) -> Optional[str]:
    """Why ``box`` is not four finite numbers, or None when it is (same rule as the targets)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return f"box {_brief(box)} is not a list of four numbers"
    for v in box:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"box {_brief(box)} is not four finite numbers"
        try:
            finite = math.isfinite(v)
        except OverflowError:  # an int beyond float range (JSON allows any number of digits)
            finite = False
        if not finite:
            return f"box {_brief(box)} is not four finite numbers"
    return None


def _parse_evidence(evidence: Any, fail):
    """Yield (entry index, image index, box) for each evidence entry."""
    if evidence is None:
        return
    if not isinstance(evidence, list):
        raise fail("malformed_evidence", f"evidence must be a list, got {type(evidence).__name__}")
    for i, entry in enumerate(evidence):
        if not isinstance(entry, dict) or "box" not in entry:
            raise fail("malformed_evidence", f"evidence[{i}] = {entry!r} is not an object with a box")
        image_index = entry.get("image", 0)
        if isinstance(image_index, bool) or not isinstance(image_index, int):
            raise fail("malformed_evidence", f"evidence[{i}].image = {image_index!r} is not an integer")
        problem = check_box(entry["box"])
        if problem:
            raise fail("malformed_box", f"evidence[{i}]: {problem}")
        yield i, image_index, [float(v) for v in entry["box"]]
