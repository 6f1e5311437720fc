"""Multimodal rotary positions (mrope) of Qwen2.5-VL and Qwen3-VL, as pure functions of the
token ids.

Every pipeline stage derives the ``[3, b, s]`` position ids from ``input_ids`` and
``image_grid_thw`` itself (they are cheap and tiny), so nothing but hidden states crosses stages.

Semantics follow HF ``Qwen2_5_VLModel.get_rope_index`` and ``Qwen3VLModel.get_rope_index``
(transformers 5; the two agree for images, they differ only in how videos are timed), images
only:

- only valid tokens (``attention_mask`` True) are numbered; padding keeps position 0 in all three
  rows, so left and right padding give a sample the same positions it has unpadded;
- a text token takes the next position in all three rows (temporal, height, width);
- an image of ``t x h x w`` merged tokens (grid ``(t, H, W)`` patches, ``h = H/m``, ``w = W/m``)
  starting at position ``p`` gets rows ``(p + ti, p + hi, p + wi)`` in row-major token order, and
  the text after it continues at ``p + max(h, w)``;
- images are taken from ``image_grid_thw`` in batch order (all images of sample 0, then 1, ...).
  A run of adjacent image tokens may hold several images (HF would reject that); each image's
  tokens must lie wholly inside one run.
"""

from __future__ import annotations

from typing import Optional

import torch


def image_token_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``[b, s]`` bool, True at the positions whose embedding is replaced by an image feature."""
    return input_ids == image_token_id


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor] = None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL / Qwen3-VL mrope positions.

    Args:
        input_ids: ``[b, s]`` token ids.
        image_grid_thw: ``[num_images, 3]`` patch grids (t, H, W) of the images in batch order,
            or None for a text-only batch.
        attention_mask: ``[b, s]``, nonzero/True at real tokens; None = all real.
        spatial_merge_size: the vision tower's merge size ``m`` (2 for both families).
        image_token_id: the id of the image placeholder token.

    Returns:
        ``position_ids`` ``[3, b, s]`` int64 and ``rope_deltas`` ``[b, 1]``: the offset that
        continues a sample's positions during generation (next position = length + delta, HF's
        ``mrope_position_deltas``).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [b, s], got shape {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    device = input_ids.device
    valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
             else attention_mask.to(device=device).bool())
    grids = [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()]
    next_grid = 0
    position_ids = torch.zeros(3, b, s, dtype=torch.long, device=device)
    deltas = []
    for i in range(b):
        ids = input_ids[i][valid[i]]
        is_image = (ids == image_token_id).tolist()
        pieces, pos, j, n = [], 0, 0, len(is_image)
        while j < n:
            k = j
            while k < n and is_image[k] == is_image[j]:
                k += 1
            if not is_image[j]:
                pieces.append(torch.arange(pos, pos + k - j, device=device).expand(3, -1))
                pos += k - j
            else:
                while j < k:
                    if next_grid >= len(grids):
                        raise ValueError(
                            f"sample {i} has more image tokens than image_grid_thw describes "
                            f"({len(grids)} images)")
                    t, h, w = grids[next_grid]
                    next_grid += 1
                    gh, gw = h // spatial_merge_size, w // spatial_merge_size
                    count = t * gh * gw
                    if j + count > k:
                        raise ValueError(
                            f"sample {i}: image {next_grid - 1} with grid {(t, h, w)} needs "
                            f"{count} image tokens, but only {k - j} follow at valid position {j}")
                    tt, hh, ww = torch.meshgrid(torch.arange(t, device=device),
                                                torch.arange(gh, device=device),
                                                torch.arange(gw, device=device), indexing="ij")
                    pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
                    pos += max(gh, gw)
                    j += count
            j = k
        sample = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long,
                                                                     device=device)
        position_ids[:, i, valid[i]] = sample
        deltas.append((int(sample.max()) + 1 if n else 0) - n)
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw describes {len(grids)} images but the batch holds image "
                         f"tokens for {next_grid}")
    return position_ids, torch.tensor(deltas, dtype=torch.long, device=device).unsqueeze(1)
