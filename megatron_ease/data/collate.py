"""Processed samples -> one padded batch dict."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import get_worker_info

from megatron_ease.data.processing import ProcessedSample


def _concat_for_transport(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat, straight into shared memory inside a DataLoader worker.

    A worker's tensors are copied into shared memory to reach the main process; pixel values
    are by far the largest (≈19 MB per 1024-px image), so concatenating into a shared buffer
    saves one full copy of them per batch.
    """
    if get_worker_info() is None:
        return torch.cat(tensors)
    rows = sum(t.shape[0] for t in tensors)
    out = torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype).share_memory_()
    return torch.cat(tensors, out=out)


def collate_evidence_batch(
    samples: Sequence[ProcessedSample], pad_token_id: int, image_token_id: int, padding_side: str = "right"
) -> dict[str, Any]:
    """Pad and concatenate. B = len(samples), S = longest sequence.

    input_ids         [B, S] int64, padded with pad_token_id
    attention_mask    [B, S] bool, True on real tokens
    response_mask     [B, S] bool, True on appended answer tokens (all False without them)
    image_mask        [B, S] bool, True on <|image_pad|> positions
    evidence_target   [B, S] float32, p* on image positions of rows with a target, else 0;
                      aligned with input_ids so padding side never matters to the loss
    evidence_mask     [B, S] bool, image positions with raw evidence coverage E > 0
    has_target        [B] bool
    pixel_values      [Σ t·h·w, C·tp·p·p] float32, images of all samples in order
    image_grid_thw    [n_img, 3] int64
    num_images        [B] int64 (rows of image_grid_thw per sample)
    num_image_tokens  [B] int64
    prompt_lengths    [B] int64 (tokens before any appended answer)
    lengths           [B] int64 (all real tokens)
    answers, answer_types, choices, keys, shards, records: lists of length B
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch_size = len(samples)
    seq_len = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((batch_size, seq_len), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.bool)
    response_mask = torch.zeros((batch_size, seq_len), dtype=torch.bool)
    evidence_target = torch.zeros((batch_size, seq_len), dtype=torch.float32)
    evidence_mask = torch.zeros((batch_size, seq_len), dtype=torch.bool)
    has_target = torch.zeros(batch_size, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        start = seq_len - n if padding_side == "left" else 0
        row = slice(start, start + n)
        input_ids[b, row] = s.input_ids
        attention_mask[b, row] = True
        response_mask[b, start + s.prompt_length : start + n] = True
        if s.evidence_target is not None:
            positions = torch.nonzero(s.input_ids == image_token_id).squeeze(1) + start  # [N]
            evidence_target[b, positions] = s.evidence_target
            evidence_mask[b, positions] = s.evidence_mask
            has_target[b] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "image_mask": input_ids.eq(image_token_id) & attention_mask,
        "evidence_target": evidence_target,
        "evidence_mask": evidence_mask,
        "has_target": has_target,
        "pixel_values": _concat_for_transport([s.pixel_values for s in samples]),
        "image_grid_thw": torch.cat([s.image_grid_thw for s in samples]),
        "num_images": torch.tensor([len(s.image_token_counts) for s in samples], dtype=torch.int64),
        "num_image_tokens": torch.tensor([sum(s.image_token_counts) for s in samples], dtype=torch.int64),
        "prompt_lengths": torch.tensor([s.prompt_length for s in samples], dtype=torch.int64),
        "lengths": torch.tensor([len(s.input_ids) for s in samples], dtype=torch.int64),
        "answers": [s.answer for s in samples],
        "answer_types": [s.answer_type for s in samples],
        "choices": [s.choices for s in samples],
        "keys": [s.key for s in samples],
        "shards": [s.shard for s in samples],
        "records": [s.record for s in samples],
    }
