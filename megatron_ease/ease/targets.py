"""Evidence -> visual-token target distribution (DESIGN §3).

Pure functions: boxes and masks in original-image pixels go in, a probability vector over the
visual tokens of a sample comes out. The reader calls them once per sample on CPU workers, so
they are written to be cheap at real image sizes: without a mask, a union of boxes is never
rasterised at full resolution (coverage counts are computed on a compressed grid whose lines
are the box edges and the token-cell edges); with a mask, everything is one W'×H' array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from PIL import Image

# (image_size, resized_size, cell, boxes, mask): one image of a sample, in token order.
ImageEvidence = tuple[
    tuple[int, int], tuple[int, int], int, Optional[Sequence[Sequence[float]]], Optional[np.ndarray]
]


def evidence_token_target(
    image_size: tuple[int, int],
    resized_size: tuple[int, int],
    cell: int,
    boxes: Optional[Sequence[Sequence[float]]] = None,
    mask: Optional[np.ndarray] = None,
    sigma: float = 1.0,
    alpha: float = 0.05,
) -> Optional[torch.Tensor]:
    """Target distribution over the h·w visual tokens of one image (DESIGN §3).

    image_size, resized_size: (W, H) and (W', H') in pixels; W', H' multiples of ``cell``.
    cell: patch_size · merge_size (28 for Qwen2.5-VL, 32 for Qwen3-VL).
    boxes: [x0, y0, x1, y1] in original pixels. mask: [H, W] or [H', W']; integer dtype means
    value/255, float dtype (or bool) is a weight in [0, 1]. Masks of more than 8 bits must come
    as float weights (the shard reader turns 16-bit masks into value/65535): integer values
    above 255 are clipped to weight 1 like any weight above 1.
    Returns float32 [h·w] (row-major) summing to 1, or None when the evidence covers nothing.
    """
    return evidence_token_targets([(image_size, resized_size, cell, boxes, mask)], sigma, alpha)


def evidence_token_targets(
    images: Sequence[ImageEvidence], sigma: float = 1.0, alpha: float = 0.05
) -> Optional[torch.Tensor]:
    """Joint target over the visual tokens of all images of one sample, in token order.

    Each image contributes its smoothed coverage S (steps 1-4 of §3); the concatenation is
    normalised once (step 5), so an image without evidence still receives the α/N floor.
    Returns float32 [N], N = Σ h·w, or None when ΣS = 0.
    """
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if len(images) == 0:
        return None
    smoothed = [smoothed_evidence_coverage(*image, sigma=sigma) for image in images]
    s = np.concatenate([x.reshape(-1) for x in smoothed])  # [N]
    total = s.sum()
    if not total > 0:
        return None
    p_star = (1.0 - alpha) * (s / total) + alpha / s.size
    return torch.from_numpy(p_star.astype(np.float32))


def smoothed_evidence_coverage(
    image_size: tuple[int, int],
    resized_size: tuple[int, int],
    cell: int,
    boxes: Optional[Sequence[Sequence[float]]] = None,
    mask: Optional[np.ndarray] = None,
    sigma: float = 1.0,
) -> np.ndarray:
    """S = E ⊛ G_σ for one image: float64 [h, w], unnormalised (steps 1-4 of §3)."""
    width, height = _check_size(image_size, "image_size")
    r_width, r_height = _check_size(resized_size, "resized_size")
    if cell <= 0 or r_width % cell or r_height % cell:
        raise ValueError(f"resized_size {resized_size} must be positive multiples of cell={cell}")
    scaled = _scaled_boxes(boxes, (r_width / width, r_height / height))  # [nb, 4]
    if mask is None:
        covered = _box_union_cell_counts(scaled, r_width, r_height, cell)  # [h, w]
        coverage = covered / float(cell * cell)
    else:
        weights = np.maximum(_mask_weights(mask, r_width, r_height), _box_union_raster(scaled, r_width, r_height))
        h, w = r_height // cell, r_width // cell
        coverage = weights.reshape(h, cell, w, cell).mean(axis=(1, 3))
    return _gaussian_smooth(coverage, sigma)


def _check_size(size: Sequence[int], name: str) -> tuple[int, int]:
    # A NaN or inf fails ``isfinite`` before ``int`` (which would raise its own message).
    if len(size) != 2 or any(not math.isfinite(v) or int(v) != v or v <= 0 for v in size):
        raise ValueError(f"{name} must be (W, H) positive integers, got {size}")
    return int(size[0]), int(size[1])


def _scaled_boxes(boxes: Optional[Sequence[Sequence[float]]], scale: tuple[float, float]) -> np.ndarray:
    """Validate, scale to resized pixels and clip (§3 step 1). Returns float64 [nb, 4]."""
    if boxes is None or len(boxes) == 0:
        return np.zeros((0, 4))
    rows = []
    for box in boxes:
        if isinstance(box, (str, bytes)) or not isinstance(box, (Sequence, np.ndarray)) or len(box) != 4:
            raise ValueError(f"box {box!r} is not four numbers [x0, y0, x1, y1]")
        try:
            values = [float(v) for v in box]
        except OverflowError:  # an int beyond float range: not finite, same rule as inf
            raise ValueError("box with an integer beyond float range is not four finite numbers "
                             "[x0, y0, x1, y1]") from None
        except (TypeError, ValueError):
            raise ValueError(f"box {box!r} is not four numbers [x0, y0, x1, y1]") from None
        if any(isinstance(v, (bool, np.bool_)) for v in box) or not all(math.isfinite(v) for v in values):
            raise ValueError(f"box {box!r} is not four finite numbers [x0, y0, x1, y1]")
        rows.append(values)
    out = np.asarray(rows, dtype=np.float64)
    out[:, [0, 2]] *= scale[0]
    out[:, [1, 3]] *= scale[1]
    return out


def _covered_pixel_range(lo: np.ndarray, hi: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels k with centre k + 0.5 in [lo, hi), as half-open integer ranges [start, stop).

    searchsorted over the exact centres keeps the rule bit-identical to a per-pixel test;
    clipping to the image falls out because there are no centres outside it.
    """
    centres = np.arange(size, dtype=np.float64) + 0.5
    start = np.searchsorted(centres, lo, side="left")
    stop = np.maximum(np.searchsorted(centres, hi, side="left"), start)
    return start, stop


def _box_union_cell_counts(boxes: np.ndarray, r_width: int, r_height: int, cell: int) -> np.ndarray:
    """Number of covered pixels per token cell for a union of boxes: float64 [h, w].

    Coordinate compression: the grid lines are the covered-range edges of every box plus the
    cell edges, so every compressed cell lies inside one token cell and is either fully inside
    or fully outside each box. The union is then a small boolean array (2-D difference array,
    cumulative sums) and the counts are interval lengths summed per token cell — exact.
    """
    h, w = r_height // cell, r_width // cell
    x0, x1 = _covered_pixel_range(boxes[:, 0], boxes[:, 2], r_width)
    y0, y1 = _covered_pixel_range(boxes[:, 1], boxes[:, 3], r_height)
    keep = (x1 > x0) & (y1 > y0)
    if not keep.any():
        return np.zeros((h, w))
    x0, x1, y0, y1 = x0[keep], x1[keep], y0[keep], y1[keep]
    xs = np.unique(np.concatenate([np.arange(0, r_width + 1, cell), x0, x1]))  # grid lines, sorted
    ys = np.unique(np.concatenate([np.arange(0, r_height + 1, cell), y0, y1]))
    diff = np.zeros((len(ys), len(xs)), dtype=np.int64)
    ix0, ix1 = np.searchsorted(xs, x0), np.searchsorted(xs, x1)
    iy0, iy1 = np.searchsorted(ys, y0), np.searchsorted(ys, y1)
    np.add.at(diff, (iy0, ix0), 1)
    np.add.at(diff, (iy0, ix1), -1)
    np.add.at(diff, (iy1, ix0), -1)
    np.add.at(diff, (iy1, ix1), 1)
    union = diff.cumsum(0).cumsum(1)[:-1, :-1] > 0  # [ny, nx] compressed cells
    col_to_cell = np.zeros((len(xs) - 1, w))  # [nx, w] interval length in its token column
    col_to_cell[np.arange(len(xs) - 1), xs[:-1] // cell] = np.diff(xs)
    row_to_cell = np.zeros((len(ys) - 1, h))  # [ny, h]
    row_to_cell[np.arange(len(ys) - 1), ys[:-1] // cell] = np.diff(ys)
    return row_to_cell.T @ union @ col_to_cell  # integer-valued, < 2^53: exact in float64


def _box_union_raster(boxes: np.ndarray, r_width: int, r_height: int) -> np.ndarray:
    """Union of boxes rasterised at W'×H' under the centre rule: float64 [H', W'] of {0, 1}."""
    raster = np.zeros((r_height, r_width))
    x0, x1 = _covered_pixel_range(boxes[:, 0], boxes[:, 2], r_width)
    y0, y1 = _covered_pixel_range(boxes[:, 1], boxes[:, 3], r_height)
    for a, b, c, d in zip(y0, y1, x0, x1):
        raster[a:b, c:d] = 1.0
    return raster


def _mask_weights(mask: np.ndarray, r_width: int, r_height: int) -> np.ndarray:
    """Mask as weights in [0, 1] at W'×H' (§3 step 2): float64 [H', W']."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a 2-D [H, W] array, got shape {mask.shape}")
    if np.issubdtype(mask.dtype, np.integer):
        weights = mask.astype(np.float64) / 255.0
    elif np.issubdtype(mask.dtype, np.floating) or mask.dtype == np.bool_:
        weights = mask.astype(np.float64)
    else:
        raise ValueError(f"mask dtype must be integer, float or bool, got {mask.dtype}")
    if not np.isfinite(weights).all():
        raise ValueError("mask contains non-finite values")
    if weights.shape != (r_height, r_width):
        # PIL's float ("F") resize: bilinear, antialiased when shrinking, so thin structures in a
        # large mask are averaged into the resized pixels instead of being aliased away.
        resized = Image.fromarray(weights.astype(np.float32), mode="F").resize(
            (r_width, r_height), Image.Resampling.BILINEAR
        )
        weights = np.asarray(resized, dtype=np.float64)
    return np.clip(weights, 0.0, 1.0)


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    """Normalised Gaussian taps at offsets -r..r, r = ⌈3σ⌉: float64 [2r + 1]."""
    radius = math.ceil(3.0 * sigma)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _gaussian_smooth(coverage: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian with zero padding (§3 step 4), as two banded matrix products.

    [h, w] -> [h, w]. The grids are at most a few hundred tokens per side, so the dense band
    matrices are cheaper than a Python-level convolution and exactly zero-padded.
    """
    if sigma == 0:
        return coverage
    taps = gaussian_kernel_1d(sigma)
    radius = len(taps) // 2

    def band(n: int) -> np.ndarray:  # [n, n], band[i, j] = taps[j - i + r] for |j - i| <= r
        offset = np.subtract.outer(np.arange(n), np.arange(n)) + radius
        inside = (offset >= 0) & (offset <= 2 * radius)
        return np.where(inside, taps[np.clip(offset, 0, 2 * radius)], 0.0)

    h, w = coverage.shape
    return band(h) @ coverage @ band(w).T
