"""DAPO math against naive float64 references written with explicit loops (DESIGN §5)."""

import math

import pytest
import torch

from megatron_ease.rl.dapo import (
    dapo_policy_loss,
    dapo_policy_loss_and_metrics,
    group_advantages,
    mixed_groups,
    overlong_reward,
    reduce_policy_metrics,
)


def naive_group_advantages(rewards, group_size, eps=1e-6):
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        out.extend((r - mean) / (std + eps) for r in group)
    return out


def naive_token_loss(logp, old_logp, adv, clip_low, clip_high, clip_c):
    """One token, scalar tensors, straight from the formula in DESIGN §5."""
    ratio = torch.exp(logp - old_logp)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(l1, l2)
    if adv < 0:
        loss = torch.minimum(loss, -adv * clip_c)
    return loss


def naive_policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=10.0,
                      num_tokens=None):
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                total = total + naive_token_loss(
                    logp[i, t], old_logp[i, t], adv[i], clip_low, clip_high, clip_c
                )
                count += 1
    denominator = count if num_tokens is None else num_tokens
    return total / max(1, denominator)


def random_rollouts(n=6, T=7, seed=0, spread=0.5):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, T, generator=gen, dtype=torch.float64) * 3
    logp = old + spread * torch.randn(n, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (n,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return logp, old, adv, mask


def loss_and_grad(fn, logp, *args, **kwargs):
    logp = logp.clone().requires_grad_(True)
    loss = fn(logp, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


# --- advantages, filter, overlong -------------------------------------------------------------


def test_group_advantages_match_naive_unbiased_std():
    rewards = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.5, 1.0, -1.0, 1.0, 0.2], dtype=torch.float64)
    expected = torch.tensor(naive_group_advantages(rewards.tolist(), 3), dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards, 3), expected)


def test_group_advantages_of_uniform_group_are_zero_not_nan():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2)
    assert torch.equal(adv, torch.zeros(4))
    # Equal rewards that float32 cannot hold exactly: its mean was an ulp off, and the
    # advantages up to 0.03 from nothing.
    for value in (0.3, 0.1, -0.7, 1 / 3):
        assert torch.equal(group_advantages(torch.full((8,), value), 8), torch.zeros(8))


def test_group_advantages_keeps_float64_and_promotes_integers():
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64
    assert group_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32


@pytest.mark.parametrize(
    "n, group_size, message",
    [(5, 2, "not a multiple of group_size=2"), (4, 1, "group_size must be >= 2")],
)
def test_grouping_errors_are_explicit(n, group_size, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(torch.zeros(n), group_size)
    with pytest.raises(ValueError, match=message):
        mixed_groups(torch.zeros(n), group_size)


def test_mixed_groups_keeps_only_groups_with_both_outcomes():
    accuracy = torch.tensor([1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1])
    assert mixed_groups(accuracy, 3).tolist() == [True, False, False, True]
    assert mixed_groups(accuracy.bool(), 3).tolist() == [True, False, False, True]


def naive_overlong(length, max_len, buffer, factor):
    expected = max_len - buffer
    exceed = length - expected
    if exceed <= 0:
        return 0.0
    return min(0.0, max(-factor, -exceed / buffer * factor))


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_overlong_reward_matches_formula(factor):
    lengths = torch.tensor([0, 1, 11, 12, 13, 14, 15, 16, 17, 30])
    expected = [naive_overlong(n, 16, 4, factor) for n in lengths.tolist()]
    got = overlong_reward(lengths, max_response_length=16, buffer_length=4, penalty_factor=factor)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    # The ends of the ramp, explicitly: no penalty at L_max - L_buf, full penalty at L_max.
    assert got[3].item() == 0.0 and got[7].item() == -factor


def test_overlong_reward_with_no_buffer_is_no_shaping():
    """``dapo.overlong_buffer_length=0`` (valid config) turns shaping off instead of crashing."""
    got = overlong_reward(torch.tensor([0, 5, 16]), max_response_length=16, buffer_length=0)
    assert got.dtype == torch.float32 and got.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("buffer", [-1, 17])
def test_overlong_reward_rejects_bad_buffer(buffer):
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_reward(torch.tensor([3]), max_response_length=16, buffer_length=buffer)


def test_overlong_reward_rejects_a_negative_factor():
    """clamp(min=-f, max=0) with f < 0 is 0 everywhere: a negative factor silently turned the
    shaping off."""
    with pytest.raises(ValueError, match="penalty_factor must be >= 0"):
        overlong_reward(torch.tensor([16]), max_response_length=16, buffer_length=4,
                        penalty_factor=-1.0)


# --- policy loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spread", [0.05, 0.5, 3.0])
def test_policy_loss_values_and_gradients_match_naive(seed, spread):
    logp, old, adv, mask = random_rollouts(seed=seed, spread=spread)
    loss, grad = loss_and_grad(dapo_policy_loss, logp, old, adv, mask)
    ref_loss, ref_grad = loss_and_grad(naive_policy_loss, logp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_policy_loss_with_custom_clip_values_matches_naive():
    logp, old, adv, mask = random_rollouts(seed=3, spread=1.5)
    kwargs = dict(clip_low=0.1, clip_high=0.5, clip_c=2.0)
    loss, grad = loss_and_grad(dapo_policy_loss, logp, old, adv, mask, **kwargs)
    ref_loss, ref_grad = loss_and_grad(naive_policy_loss, logp, old, adv, mask, **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def one_token(log_ratio, adv, **kwargs):
    logp = torch.tensor([[log_ratio]], dtype=torch.float64)
    old = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    return loss_and_grad(
        dapo_policy_loss, logp, old, torch.tensor([adv], dtype=torch.float64), mask, **kwargs
    )


def test_clip_higher_is_asymmetric():
    # ρ = 1.25 is inside (1 − 0.2, 1 + 0.28): a positive advantage still pushes it up ...
    loss, grad = one_token(math.log(1.25), 1.0)
    assert loss.item() == pytest.approx(-1.25) and grad.item() == pytest.approx(-1.25)
    # ... but ρ = 0.75 is below 1 − 0.2: a negative advantage no longer pushes it down.
    loss, grad = one_token(math.log(0.75), -1.0)
    assert loss.item() == pytest.approx(0.8) and grad.item() == 0.0
    # With symmetric clipping at 0.2 the same ρ = 1.25 would be clipped.
    loss, grad = one_token(math.log(1.25), 1.0, clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2) and grad.item() == 0.0


def test_dual_clip_caps_negative_advantage_loss():
    # A < 0, ρ = 20 > c = 10: the loss is capped at −A·c with zero gradient.
    loss, grad = one_token(math.log(20.0), -0.5)
    assert loss.item() == pytest.approx(5.0) and grad.item() == 0.0
    # Below the cap the unclipped term −A·ρ is used and its gradient flows.
    loss, grad = one_token(math.log(5.0), -0.5)
    assert loss.item() == pytest.approx(2.5) and grad.item() == pytest.approx(2.5)
    # Positive advantages are never dual-clipped (they are clipped at 1 + ε_high instead).
    loss, grad = one_token(math.log(20.0), 0.5)
    assert loss.item() == pytest.approx(-0.5 * 1.28) and grad.item() == 0.0


def test_extreme_ratio_on_a_response_token_gives_finite_gradient():
    for adv in (1.0, -1.0):
        loss, grad = one_token(200.0, adv)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_masked_garbage_logprobs_do_not_poison_loss_or_gradient():
    logp, old, adv, mask = random_rollouts(seed=4)
    garbage = logp.clone()
    garbage_old = old.clone()
    fill = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], dtype=torch.float64)
    off = ~mask
    garbage[off] = fill.repeat(off.sum().item() // 4 + 1)[: off.sum().item()]
    garbage_old[off] = -fill.repeat(off.sum().item() // 4 + 1)[: off.sum().item()]
    loss, grad = loss_and_grad(dapo_policy_loss, garbage, garbage_old, adv, mask)
    ref_loss, ref_grad = loss_and_grad(naive_policy_loss, logp, old, adv, mask)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[off] == 0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_empty_mask_gives_zero_loss():
    logp, old, adv, mask = random_rollouts()
    loss, grad = loss_and_grad(dapo_policy_loss, logp, old, adv, torch.zeros_like(mask))
    assert loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("split", [[6], [1, 5], [2, 2, 2], [3, 1, 1, 1], [1] * 6])
def test_global_token_count_makes_micro_batch_split_irrelevant(split):
    logp, old, adv, mask = random_rollouts(n=6, T=9, seed=5, spread=1.0)
    full_loss, full_grad = loss_and_grad(dapo_policy_loss, logp, old, adv, mask)
    num_tokens = mask.sum()  # the mini-batch's count, known before the micro-batches run

    leaf = logp.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for rows in torch.arange(6).split(split):
        total = total + dapo_policy_loss(
            leaf[rows], old[rows], adv[rows], mask[rows], num_tokens=num_tokens
        )
    (grad,) = torch.autograd.grad(total, leaf)
    torch.testing.assert_close(total.detach(), full_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-12)
    # Plain int counts are accepted too.
    assert dapo_policy_loss(logp, old, adv, mask, num_tokens=int(num_tokens)).item() == (
        pytest.approx(full_loss.item(), rel=1e-12)
    )


def test_num_tokens_zero_does_not_divide_by_zero():
    logp, old, adv, mask = random_rollouts()
    loss = dapo_policy_loss(logp, old, adv, torch.zeros_like(mask), num_tokens=0)
    assert loss.item() == 0.0


def test_policy_loss_rejects_mismatched_shapes_and_bad_dual_clip():
    logp, old, adv, mask = random_rollouts()
    with pytest.raises(ValueError, match="advantages must be"):
        dapo_policy_loss(logp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="must all be"):
        dapo_policy_loss(logp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="clip_c must be > 1"):
        dapo_policy_loss(logp, old, adv, mask, clip_c=1.0)


def test_bf16_inputs_compute_in_float32():
    logp, old, adv, mask = random_rollouts()
    loss = dapo_policy_loss(logp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    assert loss.dtype == torch.float32


# --- metrics ----------------------------------------------------------------------------------


def naive_metric_sums(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=10.0):
    sums = dict(clip_low=0.0, clip_high=0.0, clip_dual=0.0, approx_kl=0.0, ratio=0.0, tokens=0.0)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            a = adv[i].item()
            ratio = math.exp(logp[i, t].item() - old[i, t].item())
            sums["clip_high"] += a > 0 and ratio > 1 + clip_high
            sums["clip_low"] += a < 0 and ratio < 1 - clip_low
            sums["clip_dual"] += a < 0 and ratio > clip_c
            sums["approx_kl"] += ratio - 1 - math.log(ratio)
            sums["ratio"] += ratio
            sums["tokens"] += 1
    return sums


def test_metrics_match_naive_counts_and_loss_matches_plain_loss():
    logp, old, adv, mask = random_rollouts(n=8, T=12, seed=6, spread=2.0)
    loss, sums = dapo_policy_loss_and_metrics(logp, old, adv, mask)
    assert loss.item() == pytest.approx(dapo_policy_loss(logp, old, adv, mask).item(), rel=1e-12)
    expected = naive_metric_sums(logp, old, adv, mask)
    assert set(sums) == set(expected)
    for name, value in expected.items():
        assert sums[name].item() == pytest.approx(value, rel=1e-9), name
    # Every kind of clipping occurs in this draw, so the counts are actually exercised.
    assert min(expected["clip_low"], expected["clip_high"], expected["clip_dual"]) > 0


def test_reduce_policy_metrics_sums_micro_batches_before_dividing():
    logp, old, adv, mask = random_rollouts(n=8, T=12, seed=6, spread=2.0)
    _, full = dapo_policy_loss_and_metrics(logp, old, adv, mask)
    _, first = dapo_policy_loss_and_metrics(logp[:3], old[:3], adv[:3], mask[:3])
    _, second = dapo_policy_loss_and_metrics(logp[3:], old[3:], adv[3:], mask[3:])
    summed = {name: first[name] + second[name] for name in first}
    means = reduce_policy_metrics(summed)
    assert set(means) == {"clip_low", "clip_high", "clip_dual", "approx_kl", "ratio"}
    tokens = full["tokens"].item()
    for name, value in means.items():
        assert value == pytest.approx(full[name].item() / tokens, rel=1e-12)
