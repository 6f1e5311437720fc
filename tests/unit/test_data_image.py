"""Image preprocessing equals HF's Qwen2VLImageProcessorPil bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from megatron_ease.data.image import (
    ImageProcessingConfig,
    normalise_patches,
    patchify_image,
    preprocess_image,
    to_rgb,
)

# The published preprocessor_config.json of each family (Qwen/Qwen2.5-VL-7B-Instruct,
# Qwen/Qwen3-VL-8B-Instruct): the reference processor is built from these, not from the config
# under test, so wrong family defaults cannot reach both sides of the comparison.
PUBLISHED = {
    "qwen2_5_vl": dict(patch_size=14, merge_size=2, temporal_patch_size=2,
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711],
                       min_pixels=3136, max_pixels=12845056),
    "qwen3_vl": dict(patch_size=16, merge_size=2, temporal_patch_size=2,
                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                     min_pixels=65536, max_pixels=16777216),
}


def hf_processor(family: str, **overrides) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(**{**PUBLISHED[family], **overrides})


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_family_defaults_are_the_published_preprocessor_configs(family):
    cfg = ImageProcessingConfig.for_family(family)
    published = PUBLISHED[family]
    assert {k: getattr(cfg, k) for k in published} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in published.items()}
    # HF's own class defaults are Qwen2-VL's, the same normalisation as Qwen2.5-VL's
    defaults = Qwen2VLImageProcessorPil()
    assert list(PUBLISHED["qwen2_5_vl"]["image_mean"]) == list(defaults.image_mean)
    assert list(PUBLISHED["qwen2_5_vl"]["image_std"]) == list(defaults.image_std)


def _noise(mode, size, seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    if mode == "P-transparent":
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 3
        return image
    raise ValueError(mode)


CASES = [
    ("qwen2_5_vl", "RGB", (448, 336), {}),  # typical, needs resizing (336 -> 336, 448 -> 448)
    ("qwen2_5_vl", "RGB", (517, 301), dict(max_pixels=200_000)),  # downscale under max_pixels
    ("qwen2_5_vl", "RGBA", (90, 61), {}),  # upscale to min_pixels; alpha composited on white
    ("qwen2_5_vl", "L", (224, 112), {}),  # already multiples of 28: resize is the identity
    ("qwen2_5_vl", "P-transparent", (150, 120), {}),
    ("qwen3_vl", "RGB", (640, 480), dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 256)),
    ("qwen3_vl", "RGB", (37, 300), dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 256)),
]


@pytest.mark.parametrize("family,mode,size,overrides", CASES)
def test_preprocess_image_equals_hf_pil_processor(family, mode, size, overrides):
    cfg = ImageProcessingConfig.for_family(family, **overrides)
    image = _noise(mode, size)
    want = hf_processor(family, **overrides)(images=[image], return_tensors="np")
    pixel_values, grid = preprocess_image(image, cfg)
    assert pixel_values.dtype.is_floating_point and pixel_values.numpy().dtype == want["pixel_values"].dtype
    assert list(grid) == want["image_grid_thw"][0].tolist()
    np.testing.assert_array_equal(pixel_values.numpy(), want["pixel_values"])
    # The loader's workers ship the uint8 patches; normalised they are the same pixel_values.
    raw, raw_grid = patchify_image(image, cfg)
    assert raw.dtype == torch.uint8 and raw_grid == grid
    assert raw.shape == (pixel_values.shape[0], 3 * cfg.patch_size ** 2)
    np.testing.assert_array_equal(normalise_patches(raw, cfg).numpy(), want["pixel_values"])


def test_grid_and_token_count_follow_smart_resize():
    cfg = ImageProcessingConfig.for_family("qwen2_5_vl")
    assert cfg.cell == 28 and cfg.patch_dim == 3 * 2 * 14 * 14
    assert cfg.resized_size(448, 336) == (448, 336)
    assert cfg.num_image_tokens(448, 336) == 16 * 12
    _, grid = preprocess_image(_noise("RGB", (448, 336)), cfg)
    assert grid == (1, 24, 32)  # patch units: (t, H'/14, W'/14)
    assert ImageProcessingConfig.for_family("qwen3_vl").cell == 32


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown model family"):
        ImageProcessingConfig.for_family("llava")


def test_normalise_patches_refuses_what_is_not_raw_patches():
    cfg = ImageProcessingConfig.for_family("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"raw patches must be uint8 \[N, 588\], got torch.float32"):
        normalise_patches(torch.zeros(4, 588), cfg)
    with pytest.raises(ValueError, match=r"got torch.uint8 \(4, 1176\)"):
        normalise_patches(torch.zeros(4, 1176, dtype=torch.uint8), cfg)


def _png_bytes(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_16bit_grayscale_image_is_scaled_to_8_bits_not_clipped_to_white():
    """A 16-bit grayscale PNG (opened as I;16) is read like PIL reads a 16-bit colour PNG: the
    high byte of each value. PIL's convert("RGB") clipped every value above 255, so a
    full-range 16-bit photo reached the model almost entirely white."""
    from megatron_ease.data.schema import decode_sample

    cfg = ImageProcessingConfig.for_family("qwen2_5_vl", max_pixels=28 * 28 * 16)
    values = np.linspace(0, 65535, 60 * 80).reshape(60, 80).astype(np.uint16)
    record = b'{"question": "q?", "answer": "a", "answer_type": "text"}'
    image = decode_sample({"json": record, "png": _png_bytes(Image.fromarray(values))}, "k", "s").images[0]
    assert image.mode.startswith("I")
    want = Image.fromarray((values >> 8).astype(np.uint8), mode="L")
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(want.convert("RGB")))
    pixel_values, grid = preprocess_image(image, cfg)
    want_values, want_grid = preprocess_image(want, cfg)
    assert grid == want_grid
    np.testing.assert_array_equal(pixel_values.numpy(), want_values.numpy())
    # mode I with 16-bit values (how older Pillow versions open a 16-bit PNG) reads the same
    as_i = Image.fromarray(values.astype(np.int32), mode="I")
    as_i.format = "PNG"
    np.testing.assert_array_equal(np.asarray(to_rgb(as_i)), np.asarray(want.convert("RGB")))
