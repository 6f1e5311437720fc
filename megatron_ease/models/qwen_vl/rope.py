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
    # Dense tensor ops, no per-token Python: every stage derives the positions at every forward,
    # on the GPU. One host synchronisation checks the image layout; the message of a bad layout
    # is worked out only then (_layout_error).
    is_image = (input_ids == image_token_id) & valid
    advance = valid.long()  # how far each token moves the next position on: 1 for text
    offset = torch.zeros(3, b, s, dtype=torch.long, device=device)  # (t, h, w) in its image
    num_images = 0 if image_grid_thw is None else int(image_grid_thw.shape[0])
    if num_images == 0:
        if bool(is_image.any()):
            raise _layout_error(is_image, torch.zeros(0, 3, dtype=torch.long),
                                torch.zeros(0, dtype=torch.long), None)
    else:
        grids = image_grid_thw.to(device=device, dtype=torch.long).reshape(-1, 3)
        t, gh, gw = grids[:, 0], grids[:, 1] // spatial_merge_size, grids[:, 2] // spatial_merge_size
        counts = t * gh * gw
        starts = counts.cumsum(0) - counts
        # Image tokens in batch order (sample 0's first): token k belongs to the image whose
        # [start, start + count) holds k, at offset k - start in it (row-major t, h, w).
        ordinal = is_image.reshape(-1).cumsum(0).reshape(b, s) - 1
        image = (torch.searchsorted(starts + counts, ordinal.clamp(min=0), right=True)
                 .clamp(max=num_images - 1))
        within = ordinal - starts[image]
        # An image's tokens lie in one run of one sample: (sample, valid index - offset) is the
        # same at all of them, that of the image's first token.
        run_key = (torch.arange(b, device=device)[:, None] * (s + 1)
                   + valid.long().cumsum(1) - 1 - within)
        slot = torch.where(is_image, ordinal, b * s)  # b * s: a scratch slot for other tokens
        key_of = torch.full((b * s + 1,), -1, dtype=torch.long, device=device).scatter_(
            0, slot.reshape(-1), run_key.reshape(-1))
        first_key = key_of[starts[image].clamp(max=b * s)]
        ok = (is_image.sum() == counts.sum()) & ((run_key == first_key) | ~is_image).all()
        if not bool(ok):
            raise _layout_error(is_image, grids, counts, run_key[is_image])
        hw = (gh * gw).clamp(min=1)[image]
        offset = torch.stack([within // hw, within % hw // gw.clamp(min=1)[image],
                              within % gw.clamp(min=1)[image]]) * is_image
        # An image moves the next position on by max(h, w), counted at its last token.
        last = within == counts[image] - 1
        advance = torch.where(is_image, torch.where(last, torch.maximum(gh, gw)[image], 0),
                              advance)
    start = advance.cumsum(1) - advance  # where each token's (t, h, w) = (0, 0, 0) sits
    position_ids = (start + offset) * valid
    top = position_ids.amax(0).masked_fill(~valid, -1).amax(1)  # -1: no valid token
    deltas = top + 1 - valid.sum(1)
    return position_ids, deltas.unsqueeze(1)


def _layout_error(is_image: torch.Tensor, grids: torch.Tensor, counts: torch.Tensor,
                  run_key: Optional[torch.Tensor]) -> ValueError:
    """Why ``get_rope_index`` refuses an image layout, for the first image (in batch order)
    that does not fit. ``run_key``: ``get_rope_index``'s of the image tokens, in batch order.
    Host-side, on failures only."""
    width = is_image.shape[1] + 1  # run_key = sample * width + valid index of the image's start
    run_key = torch.zeros(0, dtype=torch.long) if run_key is None else run_key.cpu()
    num_tokens = run_key.numel()
    end = 0
    for i, count in enumerate(counts.tolist()):
        first, end = end, end + count
        if first >= num_tokens:
            return ValueError(f"image_grid_thw describes {len(counts)} images but the batch "
                              f"holds image tokens for {i}")
        in_run = int((run_key[first:end] == run_key[first]).sum())
        if in_run < count:
            sample, valid_index = divmod(int(run_key[first]), width)
            return ValueError(
                f"sample {sample}: image {i} with grid {tuple(grids[i].tolist())} needs {count} "
                f"image tokens, but only {in_run} follow at valid position {valid_index}")
    sample = int(is_image.cpu().reshape(-1).nonzero()[end]) // is_image.shape[1]
    return ValueError(f"sample {sample} has more image tokens than image_grid_thw describes "
                      f"({len(counts)} images)")
