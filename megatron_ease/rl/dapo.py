"""DAPO math (DESIGN §5): group advantages, mixed-group filter, overlong shaping, policy loss.

Pure functions on tensors. Rollouts of one prompt are consecutive (`group_size` of them), which
is how the rollout engine emits them and how dynamic sampling keeps them.
"""

from typing import Optional, Union

import torch

# exp(±20) is far outside any clip range, so clamping the log-ratio there only changes the loss
# where it is already clipped (constant) or where ρ < 2e-9 (gradient ~1e-9 · A); it keeps a
# diverged token from producing inf · 0 = NaN in the backward of the unselected max/min branch.
_LOG_RATIO_LIMIT = 20.0


def _grouped(values: torch.Tensor, group_size: int, name: str) -> torch.Tensor:
    """[n] -> [n / group_size, group_size], with the errors a caller can act on."""
    if values.dim() != 1:
        raise ValueError(f"{name} must be 1-D [n], got shape {tuple(values.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (rollouts per prompt), got {group_size}")
    if values.numel() % group_size != 0:
        raise ValueError(
            f"{name} has {values.numel()} rollouts, not a multiple of group_size={group_size}; "
            "rollouts of one prompt must stay together"
        )
    return values.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i − mean_g R) / (std_g R + eps), std unbiased; returns [n] like `rewards`."""
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    # In float64: a float32 group of equal rewards (0.3 each) has a float32 mean off by an ulp,
    # and so advantages of up to 0.03 from nothing; float64 holds the sum of float32s exactly.
    grouped = _grouped(rewards, group_size, "rewards").to(torch.float64)  # [g, G]
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1).to(dtype)


def mixed_groups(accuracy: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool [n / group_size]: groups whose accuracies are not all equal (they carry signal)."""
    grouped = _grouped(accuracy, group_size, "accuracy")  # [g, G]
    return grouped.amax(dim=1) != grouped.amin(dim=1)


def overlong_reward(
    lengths: torch.Tensor,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """Soft overlong punishment, [n] lengths (response tokens incl. EOS) -> [n] float32 shaping.

    0 up to L_max − L_buf, then linear down to −factor at L_max. ``buffer_length = 0`` turns
    shaping off (all zeros): the expected length is then L_max itself, which no rollout exceeds.
    """
    if not 0 <= buffer_length <= max_response_length:
        raise ValueError(
            f"overlong buffer_length must be in [0, max_response_length={max_response_length}], "
            f"got {buffer_length}"
        )
    if penalty_factor < 0:  # clamp(min=-f, max=0) with -f > 0 is 0 everywhere: shaping off
        raise ValueError(f"overlong penalty_factor must be >= 0, got {penalty_factor}")
    if buffer_length == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    expected = max_response_length - buffer_length
    exceed = lengths.to(torch.float32) - expected
    penalty = -exceed / buffer_length * penalty_factor
    return penalty.clamp(min=-penalty_factor, max=0.0)


def _token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    clip_c: float,
):
    """Per-token clipped loss [n, T] (0 off the mask) plus the pieces the metrics need."""
    if logprobs.shape != old_logprobs.shape or logprobs.shape != response_mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must all be [n, T]"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be [n]={tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}"
        )
    if clip_c <= 1.0:
        raise ValueError(f"dual-clip constant clip_c must be > 1, got {clip_c}")

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    mask = response_mask.bool()
    # torch.where, not a multiply: garbage (inf/NaN) log-probs off the mask must not reach the
    # loss or its gradient, and 0 · NaN is NaN.
    log_ratio = torch.where(mask, logprobs.to(dtype) - old_logprobs.to(dtype), 0.0)
    log_ratio = log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)  # [n, T]

    adv = advantages.to(dtype).unsqueeze(1)  # [n, 1]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    # Dual clip: with A < 0 the clipped objective is unbounded in ρ; cap it at −A·c.
    dual_cap = -adv * clip_c
    negative = adv < 0  # [n, 1]
    loss = torch.where(negative, torch.minimum(loss, dual_cap), loss)
    loss = torch.where(mask, loss, 0.0)
    return loss, mask, ratio, log_ratio, adv, dual_cap


def _token_mean(
    loss: torch.Tensor, mask: torch.Tensor, num_tokens: Optional[Union[int, torch.Tensor]]
) -> torch.Tensor:
    # A global count makes sum-over-micro-batches equal the full-batch token mean (§4 invariant).
    denominator = mask.sum() if num_tokens is None else num_tokens
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(loss.dtype).clamp(min=1.0)
    else:
        denominator = max(1.0, float(denominator))
    return loss.sum() / denominator


def dapo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 10.0,
    num_tokens: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """DAPO token-level loss with clip-higher and dual clip (DESIGN §5), a scalar.

    logprobs, old_logprobs, response_mask: [n, T]; advantages: [n]. Normalised by the local
    response-token count, or by `num_tokens` (the mini-batch's global count) when given.
    """
    loss, mask, *_ = _token_losses(
        logprobs, old_logprobs, advantages, response_mask, clip_low, clip_high, clip_c
    )
    return _token_mean(loss, mask, num_tokens)


def dapo_policy_loss_and_metrics(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 10.0,
    num_tokens: Optional[Union[int, torch.Tensor]] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`dapo_policy_loss` plus detached metric sums over response tokens.

    Metrics are sums (float64 scalars) with `tokens` as their count, so they can be summed over
    micro-batches and DP ranks before dividing (see `reduce_policy_metrics`):
      clip_low   A < 0 and ρ < 1 − ε_low (lower clip active)
      clip_high  A > 0 and ρ > 1 + ε_high (clip-higher active)
      clip_dual  A < 0 and the −A·c cap active
      approx_kl  k3 estimator (ρ − 1) − log ρ of KL(π_old ‖ π_θ), non-negative
      ratio      ρ
    """
    loss, mask, ratio, log_ratio, adv, dual_cap = _token_losses(
        logprobs, old_logprobs, advantages, response_mask, clip_low, clip_high, clip_c
    )
    with torch.no_grad():
        ratio, log_ratio, adv = ratio.detach(), log_ratio.detach(), adv.detach()
        positive, negative = adv > 0, adv < 0  # [n, 1]
        clip_high_hit = positive & (ratio > 1.0 + clip_high)
        clip_low_hit = negative & (ratio < 1.0 - clip_low)
        clip_dual_hit = negative & (-adv * ratio > dual_cap.detach())

        def masked_sum(values: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, values.to(torch.float64), 0.0).sum()

        metrics = {
            "clip_low": masked_sum(clip_low_hit),
            "clip_high": masked_sum(clip_high_hit),
            "clip_dual": masked_sum(clip_dual_hit),
            "approx_kl": masked_sum(ratio - 1.0 - log_ratio),
            "ratio": masked_sum(ratio),
            "tokens": mask.sum().to(torch.float64),
        }
    return _token_mean(loss, mask, num_tokens), metrics


def reduce_policy_metrics(
    metric_sums: dict[str, torch.Tensor],
    group: Optional[torch.distributed.ProcessGroup] = None,
) -> dict[str, float]:
    """Means over all tokens of all ranks in `group` from (summed) metric dicts.

    One all-reduce of the stacked sums; `group=None` means single process (no collective).
    """
    names = sorted(metric_sums)
    stacked = torch.stack([metric_sums[name].to(torch.float64) for name in names])
    if group is not None:
        from megatron_ease.distributed import all_reduce_

        all_reduce_(stacked, group=group)
    totals = dict(zip(names, stacked.tolist()))
    tokens = max(1.0, totals.pop("tokens"))
    return {name: value / tokens for name, value in totals.items()}
