"""evidence_token_target(s) against a naive per-pixel reference of DESIGN §3."""

import math

import numpy as np
import pytest
import torch

from megatron_ease.ease.targets import evidence_token_target, evidence_token_targets

# ---------------------------------------------------------------- naive reference (float64)


def naive_resize(mask, out_w, out_h):
    """Separable triangle-filter resample (bilinear, antialiased when shrinking), explicit loops."""

    def weights(n_in, n_out):
        scale = n_in / n_out
        support = max(scale, 1.0)
        mat = np.zeros((n_out, n_in))
        for o in range(n_out):
            centre = (o + 0.5) * scale
            for k in range(n_in):
                d = abs(k + 0.5 - centre) / support
                mat[o, k] = max(0.0, 1.0 - d)
            mat[o] /= mat[o].sum()
        return mat

    h_in, w_in = mask.shape
    return weights(h_in, out_h) @ mask @ weights(w_in, out_w).T


def naive_smoothed(image_size, resized_size, cell, boxes, mask, sigma):
    (W, H), (Wr, Hr) = image_size, resized_size
    cover = np.zeros((Hr, Wr))
    for x0, y0, x1, y1 in boxes or []:
        x0, x1 = x0 * Wr / W, x1 * Wr / W
        y0, y1 = y0 * Hr / H, y1 * Hr / H
        x0, x1 = min(max(x0, 0), Wr), min(max(x1, 0), Wr)
        y0, y1 = min(max(y0, 0), Hr), min(max(y1, 0), Hr)
        for y in range(Hr):
            for x in range(Wr):
                if x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1:
                    cover[y, x] = 1.0
    if mask is not None:
        m = mask.astype(np.float64) / 255.0 if np.issubdtype(mask.dtype, np.integer) else mask.astype(np.float64)
        if m.shape != (Hr, Wr):
            m = naive_resize(m, Wr, Hr)
        cover = np.maximum(cover, np.clip(m, 0, 1))
    h, w = Hr // cell, Wr // cell
    E = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            E[i, j] = cover[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].sum() / cell**2
    if sigma == 0:
        return E
    r = math.ceil(3 * sigma)
    g = np.array([math.exp(-(d * d) / (2 * sigma * sigma)) for d in range(-r, r + 1)])
    g /= g.sum()
    S = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    ii, jj = i + di, j + dj
                    if 0 <= ii < h and 0 <= jj < w:
                        S[i, j] += g[di + r] * g[dj + r] * E[ii, jj]
    return S


def naive_targets(images, sigma=1.0, alpha=0.05):
    S = np.concatenate([naive_smoothed(*img, sigma).reshape(-1) for img in images])
    if S.sum() == 0:
        return None
    return torch.from_numpy((1 - alpha) * S / S.sum() + alpha / S.size)


def check(image_size, resized_size, cell, boxes=None, mask=None, sigma=1.0, alpha=0.05, atol=1e-6):
    got = evidence_token_target(image_size, resized_size, cell, boxes, mask, sigma, alpha)
    want = naive_targets([(image_size, resized_size, cell, boxes, mask)], sigma, alpha)
    assert got is not None and want is not None
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
    assert abs(got.sum().item() - 1.0) < 1e-5
    return got


# ---------------------------------------------------------------- boxes


def test_single_box_matches_reference_with_fractional_scale():
    check((150, 100), (168, 112), 28, [[13.3, 20.7, 97.1, 61.9]])


def test_target_is_row_major_over_h_by_w():
    # Box in the top-right cell only; σ = 0, α = 0: all mass on token (0, w - 1).
    t = evidence_token_target((112, 56), (112, 56), 28, [[84, 0, 112, 28]], sigma=0.0, alpha=0.0)
    assert t.shape == (2 * 4,)
    assert t[3].item() == 1.0 and t.sum().item() == 1.0


def test_union_of_overlapping_boxes_counts_pixels_once():
    boxes = [[10, 10, 60, 50], [30, 20, 90, 80], [0, 70, 20, 112], [35, 25, 55, 45]]
    check((112, 112), (112, 112), 28, boxes, sigma=0.0)
    check((300, 200), (140, 84), 28, [[b[0] * 2.5, b[1] * 1.8, b[2] * 2.5, b[3] * 1.8] for b in boxes])


def test_random_box_unions_match_reference():
    rng = np.random.default_rng(0)
    for _ in range(25):
        cell = int(rng.choice([28, 32]))
        Wr, Hr = cell * int(rng.integers(1, 5)), cell * int(rng.integers(1, 5))
        W, H = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        boxes = []
        for _ in range(int(rng.integers(1, 5))):
            x = np.sort(rng.uniform(-0.2 * W, 1.2 * W, 2))
            y = np.sort(rng.uniform(-0.2 * H, 1.2 * H, 2))
            boxes.append([x[0], y[0], x[1], y[1]])
        sigma = float(rng.choice([0.0, 0.5, 1.0, 1.7]))
        got = evidence_token_target((W, H), (Wr, Hr), cell, boxes, sigma=sigma)
        want = naive_targets([((W, H), (Wr, Hr), cell, boxes, None)], sigma)
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_box_partly_outside_is_clipped():
    inside = evidence_token_target((100, 100), (112, 112), 28, [[50, 50, 100, 100]])
    outside = check((100, 100), (112, 112), 28, [[50, 50, 180, 400]])
    torch.testing.assert_close(inside, outside)


def test_sigma_zero_is_plain_cell_coverage():
    got = check((56, 56), (56, 56), 28, [[0, 0, 14, 28]], sigma=0.0, alpha=0.0)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_coordinates_on_pixel_centres_follow_half_open_rule():
    # Centre 0.5 is in [0.5, 1.5) but centre 1.5 is not: exactly one column of pixels.
    check((56, 56), (56, 56), 28, [[0.5, 0, 1.5, 56]], sigma=0.0)
    check((56, 56), (56, 56), 28, [[0.5, 0.5, 0.5000001, 56]], sigma=0.0)


# ---------------------------------------------------------------- masks


def _blob(h, w, cx, cy, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-(((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) / (2 * r * r)))


def test_uint8_mask_at_resized_size_is_exact():
    mask = (_blob(84, 112, 70, 30, 12) * 255).astype(np.uint8)
    check((112, 84), (112, 84), 28, mask=mask)


def test_float_mask_at_resized_size_is_exact():
    mask = _blob(56, 84, 20, 40, 9)
    check((200, 130), (84, 56), 28, mask=mask)  # mask already W'×H': no resize


def test_int_mask_at_original_size_is_resized():
    mask = (_blob(150, 201, 140, 60, 25) * 255).astype(np.int32)
    check((201, 150), (196, 140), 28, mask=mask, atol=1e-6)


def test_float_mask_smaller_than_resized_is_upsampled():
    mask = _blob(30, 40, 30, 10, 6).astype(np.float32)
    check((40, 30), (112, 84), 28, mask=mask, atol=1e-6)


def test_mask_and_boxes_take_pixelwise_max():
    mask = (_blob(64, 64, 48, 48, 5) * 255).astype(np.uint8)
    check((64, 64), (64, 64), 32, boxes=[[0, 0, 20, 20]], mask=mask)


def test_mask_values_are_clipped_to_unit_interval():
    mask = np.full((56, 56), 3.0)
    mask[:28] = -1.0
    got = evidence_token_target((56, 56), (56, 56), 28, mask=mask, sigma=0.0, alpha=0.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.5, 0.5]))


def test_all_zero_mask_gives_no_target():
    assert evidence_token_target((56, 56), (56, 56), 28, mask=np.zeros((56, 56), np.uint8)) is None


# ---------------------------------------------------------------- several images


def test_several_images_are_normalised_jointly():
    images = [
        ((100, 80), (112, 84), 28, [[10, 10, 40, 40]], None),
        ((60, 60), (56, 56), 28, None, None),  # no evidence: only the α/N floor
        ((64, 64), (64, 64), 32, [[30, 0, 64, 64]], (_blob(64, 64, 10, 10, 5) * 255).astype(np.uint8)),
    ]
    got = evidence_token_targets(images, sigma=1.0, alpha=0.1)
    want = naive_targets(images, sigma=1.0, alpha=0.1)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    assert got.shape == (12 + 4 + 4,)
    n = got.numel()
    torch.testing.assert_close(got[12:16], torch.full((4,), 0.1 / n))


def test_no_evidence_on_any_image_gives_none():
    assert evidence_token_targets([((56, 56), (56, 56), 28, [], None)] * 2) is None
    assert evidence_token_targets([]) is None


# ---------------------------------------------------------------- malformed and empty boxes


@pytest.mark.parametrize(
    "box",
    [
        [float("nan"), 0, 10, 10],
        [0, 0, float("inf"), 10],
        [0, 0, 10],
        [0, 0, 10, 10, 5],
        ["a", 0, 10, 10],
        "0 0 10 10",
        None,
        [0, 0, None, 10],
        [10**400, 0, 10, 10],  # an int beyond float range (JSON allows it): not finite
    ],
)
def test_malformed_box_raises(box):
    with pytest.raises(ValueError, match="box"):
        evidence_token_target((56, 56), (56, 56), 28, [box])


@pytest.mark.parametrize(
    "box",
    [
        [40, 40, 10, 10],  # inverted
        [10, 10, 10, 50],  # zero width
        [100, 100, 200, 200],  # fully outside
        [-50, 0, -1, 56],  # fully outside on the other side
        [10.0, 10.0, 10.2, 10.2],  # covers no pixel centre
    ],
)
def test_empty_or_outside_box_gives_none(box):
    assert evidence_token_target((56, 56), (56, 56), 28, [box]) is None


def test_bad_sizes_and_parameters_raise():
    with pytest.raises(ValueError, match="multiples of cell"):
        evidence_token_target((56, 56), (60, 56), 28, [[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="sigma"):
        evidence_token_target((56, 56), (56, 56), 28, [[0, 0, 5, 5]], sigma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        evidence_token_target((56, 56), (56, 56), 28, [[0, 0, 5, 5]], alpha=1.5)
    with pytest.raises(ValueError, match="mask"):
        evidence_token_target((56, 56), (56, 56), 28, mask=np.zeros((2, 3, 4)))
    for size in ((float("nan"), 56), (56, float("inf")), (0, 56), (56.5, 56)):
        with pytest.raises(ValueError, match=r"image_size must be \(W, H\) positive integers"):
            evidence_token_target(size, (56, 56), 28, [[0, 0, 5, 5]])
