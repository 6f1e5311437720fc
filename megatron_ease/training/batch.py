"""Rollouts -> training sequences: prompt + response, label-shifted masks.

Row convention (DESIGN §4): position ``t`` predicts token ``t + 1``; the *response rows* are the
positions whose next token is a response token, so for a prompt of length ``P`` and a response of
length ``L`` they are ``P - 1 … P + L - 2`` (the last prompt position predicts the first answer
token). The same mask selects the DAPO log-probs and the rows the EASE slice sums over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class TrainSequences:
    input_ids: torch.Tensor  # [n, S] int64, right-padded
    attention_mask: torch.Tensor  # [n, S] bool, real tokens
    labels: torch.Tensor  # [n, S] int64, input_ids shifted left (pad at the end)
    response_mask: torch.Tensor  # [n, S] bool, label-shifted response rows
    image_mask: torch.Tensor  # [n, S] bool

    def cut(self, start: int, stop: int) -> tuple[slice, tuple[slice, slice]]:
        """Rows ``start:stop`` and the ``[rows, columns]`` index of those rows cut to their own
        longest sequence (the sequences are right-padded): one micro-batch's block."""
        rows = slice(start, stop)
        return rows, (rows, slice(0, int(self.attention_mask[rows].sum(dim=1).max())))


def assemble_sequences(prompt_ids: Sequence[torch.Tensor], responses: torch.Tensor,
                       response_lengths: torch.Tensor, pad_token_id: int,
                       image_token_id: int) -> TrainSequences:
    """Concatenate each prompt with its response (first ``length`` tokens) and right-pad."""
    n = len(prompt_ids)
    if responses.shape[0] != n or response_lengths.shape[0] != n:
        raise ValueError(f"{n} prompts but {responses.shape[0]} responses / "
                         f"{response_lengths.shape[0]} lengths")
    total = [p.numel() + int(length) for p, length in zip(prompt_ids, response_lengths)]
    seq_len = max(total)
    input_ids = torch.full((n, seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(n, seq_len, dtype=torch.bool)
    response_mask = torch.zeros(n, seq_len, dtype=torch.bool)
    prompt_part = torch.zeros(n, seq_len, dtype=torch.bool)
    for i, (prompt, length) in enumerate(zip(prompt_ids, response_lengths.tolist())):
        p = prompt.numel()
        input_ids[i, :p] = prompt
        input_ids[i, p:p + length] = responses[i, :length]
        attention_mask[i, :p + length] = True
        prompt_part[i, :p] = True
        response_mask[i, p - 1:p + length - 1] = True
    labels = torch.full_like(input_ids, pad_token_id)
    labels[:, :-1] = input_ids[:, 1:]
    # Visual tokens are the prompt's image pads only: a sampled response may emit that id too.
    return TrainSequences(input_ids, attention_mask, labels, response_mask,
                          input_ids.eq(image_token_id) & prompt_part)


def length_sorted_order(lengths: torch.Tensor, group_size: int) -> torch.Tensor:
    """A row order that keeps every group of ``group_size`` consecutive rollouts in place and
    sorts its rows by ``lengths``: ascending in groups 0, 2, 4, ..., descending in 1, 3, 5, ...

    Micro-batches are consecutive rows cut to their own longest sequence, so rollouts of similar
    length side by side waste fewer padded positions; a micro-batch that straddles two groups
    joins their long ends (or short ends) rather than a long one with a short one. Groups stay
    whole and contiguous: a micro-batch still holds few prompts, and their images are encoded
    once (``shared_images``). Deterministic (a stable sort, reversed in descending groups)."""
    if lengths.dim() != 1 or lengths.numel() % group_size:
        raise ValueError(f"lengths must be [n] with n a multiple of group_size {group_size}, got "
                         f"{tuple(lengths.shape)}")
    order = lengths.reshape(-1, group_size).argsort(dim=1, stable=True)
    order[1::2] = order[1::2].flip(1)
    starts = torch.arange(0, lengths.numel(), group_size, device=lengths.device)
    return (order + starts[:, None]).reshape(-1)


def place_at_image_tokens(image_mask: torch.Tensor, values: Sequence[Optional[torch.Tensor]],
                          dtype=torch.float32) -> torch.Tensor:
    """``values[i]`` (one entry per visual token of sample i, or None) -> ``[n, S]`` at its image
    positions; zeros elsewhere and for None."""
    out = torch.zeros(image_mask.shape, dtype=dtype)
    for i, v in enumerate(values):
        if v is None:
            continue
        positions = image_mask[i].nonzero().squeeze(1)
        if positions.numel() != v.numel():
            raise ValueError(f"sample {i}: {v.numel()} values for {positions.numel()} image tokens")
        out[i, positions] = v.to(dtype)
    return out


def shared_images(pixel_values: Sequence[torch.Tensor], image_grid_thw: Sequence[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-sequence images -> the images to encode once each, and ``image_ids``.

    ``pixel_values[i]`` ``[patches_i, D]`` and ``image_grid_thw[i]`` ``[images_i, 3]`` are sequence
    i's images. A sequence whose images equal the previous sequence's (the G rollouts of a prompt
    are consecutive) reuses them: ``image_ids`` ``[image slots]`` says which encoded image fills
    each slot, in batch order (``QwenVLModel.forward``); None when no sequence shares. Equal
    means equal values, so sharing is exact whatever the sequences' provenance.
    """
    encode_pixels, encode_grids, image_ids = [], [], []
    previous, count, shared = None, 0, False
    for pixels, grid in zip(pixel_values, image_grid_thw):
        if previous is not None and _same(previous[0], pixels) and _same(previous[1], grid):
            image_ids.extend(previous[2])
            shared = True
            continue
        ids = list(range(count, count + grid.shape[0]))
        count += grid.shape[0]
        encode_pixels.append(pixels)
        encode_grids.append(grid)
        image_ids.extend(ids)
        previous = (pixels, grid, ids)
    return (torch.cat(encode_pixels), torch.cat(encode_grids),
            torch.tensor(image_ids, dtype=torch.long) if shared else None)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a, b))
