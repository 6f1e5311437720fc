"""Per-token log-probabilities and entropies from vocab-parallel logits (the policy's
``log π(token)`` and ``H(π(· | prefix))``)."""

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


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                           chunk_rows: int = 1024) -> torch.Tensor:
    """``H(softmax(logits / temperature))`` at the ``mask`` positions: ``[mask.sum()]`` float32,
    exact over the full vocab, no gradient (a metric: the policy's entropy, whose collapse is
    DAPO's failure mode to watch).

    Args:
        logits: ``[b, s, vocab / TP]``, this rank's vocab shard.
        mask: ``[b, s]`` bool, the positions to measure (the response tokens).
        temperature: the sampling temperature the rollout used.
        chunk_rows: rows gathered and converted to fp32 at a time, so the extra memory is
            ``chunk_rows · vocab / TP`` floats, not a copy of the response rows' logits.

    ``H = log Z − Σ p z`` with ``Z = Σ exp(z − m)`` and the max ``m`` taken over all TP ranks:
    two all-reduces a chunk over the tensor-parallel group (the max, then the two sums stacked).
    """
    from megatron.core import parallel_state as ps

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Row indices, gathered a chunk at a time: the logits may be a transposed view, which a
    # reshape would copy whole.
    rows, cols = mask.nonzero(as_tuple=True)
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    out = []
    for start in range(0, rows.numel(), chunk_rows):
        chunk = slice(start, start + chunk_rows)
        z = logits[rows[chunk], cols[chunk]].float() / temperature
        m = z.max(dim=-1, keepdim=True).values
        if group is not None:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
        z = z - m
        e = z.exp()
        sums = torch.stack([e.sum(-1), (e * z).sum(-1)])
        if group is not None:
            torch.distributed.all_reduce(sums, group=group)
        out.append(sums[0].log() - sums[1] / sums[0])
    if not out:
        return logits.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)
