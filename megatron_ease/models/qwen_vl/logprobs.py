"""Per-token log-probabilities from vocab-parallel logits (the policy's ``log π(token)``)."""

from __future__ import annotations

import torch


def vocab_parallel_log_probs(logits: torch.Tensor, labels: torch.Tensor,
                             temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)[label]``, ``[b, s]`` float32, exact over the full vocab.

    Args:
        logits: ``[b, s, vocab / TP]``, this rank's vocab shard (the model's last-stage output).
        labels: ``[b, s]`` token ids in the full vocabulary (shift them so position ``t`` holds
            the token that position ``t`` predicts).
        temperature: the sampling temperature the rollout used.

    megatron-core's ``vocab_parallel_cross_entropy`` (which returns ``-log p`` and all-reduces the
    softmax normaliser over TP) works in place on its input, so it gets a fresh fp32 tensor here;
    the caller's logits are left untouched. Gradients flow to ``logits``.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float() / temperature  # always a new tensor
    return -vocab_parallel_cross_entropy(scaled, labels)
