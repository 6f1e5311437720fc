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
)


def hf_processor(cfg: ImageProcessingConfig) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size,
        merge_size=cfg.merge_size,
        temporal_patch_size=cfg.temporal_patch_size,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
    )


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
    want = hf_processor(cfg)(images=[image], return_tensors="np")
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
