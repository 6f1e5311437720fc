"""EASE alignment loss, gating, normaliser semantics and the pipeline auto-scaler (DESIGN §4)."""

import math

import pytest
import torch

from megatron_ease.ease.loss import (
    EaseLossAutoScaler,
    ease_alignment_loss,
    ease_alignment_per_sample,
)
from megatron_ease.ease.metrics import attention_in_evidence


def naive_kl_loss(mass, target, image_mask, weight, normalizer=None):
    """DESIGN §4 written out sample by sample, with Python-level skipping of excluded rows."""
    total = mass.new_zeros(())
    for b in range(mass.shape[0]):
        m, p = mass[b][image_mask[b]], target[b][image_mask[b]]
        if weight[b] == 0 or m.sum() <= 0:
            continue
        attention = m / m.sum()
        keep = p > 0  # 0 · log 0 = 0
        kl = (p[keep] * (p[keep].log() - (attention[keep] + 1e-12).log())).sum()
        total = total + weight[b] * kl
    denominator = weight.sum() if normalizer is None else torch.as_tensor(normalizer)
    return total / max(1.0, float(denominator))


def make_batch(b=4, s=16, seed=0, dtype=torch.float64):
    """Image at positions 2..9 of every sample; p* = (1 − α)·p + α/N with a sparse p."""
    gen = torch.Generator().manual_seed(seed)
    image_mask = torch.zeros(b, s, dtype=torch.bool)
    image_mask[:, 2:10] = True
    num_image = int(image_mask[0].sum())
    mass = torch.rand(b, s, generator=gen, dtype=dtype) * image_mask
    evidence = torch.zeros(b, s, dtype=torch.bool)
    evidence[:, 3:6] = True
    p = torch.rand(b, s, generator=gen, dtype=dtype) * evidence
    p = p / p.sum(dim=1, keepdim=True)
    target = (0.95 * p + 0.05 / num_image) * image_mask
    return mass, target, image_mask, evidence


def test_kl_matches_naive_reference_values_and_gradients():
    mass, target, image_mask, _ = make_batch()
    weight = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    m_ours, m_ref = mass.clone().requires_grad_(), mass.clone().requires_grad_()
    loss = ease_alignment_loss(m_ours, target, image_mask, weight)
    ref = naive_kl_loss(m_ref, target, image_mask, weight)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(m_ours.grad, m_ref.grad, rtol=1e-10, atol=1e-14)


def test_kl_with_exact_zeros_in_the_target_uses_xlogy():
    mass, target, image_mask, evidence = make_batch()
    target = torch.where(evidence, target, 0.0)  # α = 0: p* is exactly 0 off the evidence
    target = target / target.sum(dim=1, keepdim=True)
    weight = torch.ones(4, dtype=torch.float64)
    loss = ease_alignment_loss(mass, target, image_mask, weight)
    torch.testing.assert_close(loss, naive_kl_loss(mass, target, image_mask, weight))
    assert torch.isfinite(loss)


def test_kl_is_zero_when_attention_matches_the_target():
    _, target, image_mask, _ = make_batch()
    per_sample = ease_alignment_per_sample(3.0 * target, target, image_mask)
    torch.testing.assert_close(per_sample, torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)


def test_ungated_and_massless_rows_give_zero_and_finite_gradients():
    mass, target, image_mask, _ = make_batch()
    mass = mass.clone()
    mass[1] = float("nan")  # garbage in an ungated row must not leak
    mass[2] = 0.0  # a gated row with no image mass is excluded, not a division by zero
    mass.requires_grad_()
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    loss = ease_alignment_loss(mass, target, image_mask, weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(mass.grad).all()
    assert (mass.grad[1] == 0).all() and (mass.grad[2] == 0).all()
    per_sample = ease_alignment_per_sample(mass.detach().nan_to_num(), target, image_mask)
    assert per_sample[2] == 0
    expected = naive_kl_loss(mass.detach()[[0, 3]], target[[0, 3]], image_mask[[0, 3]],
                             torch.ones(2, dtype=torch.float64), normalizer=3.0)
    torch.testing.assert_close(loss, expected)


def test_normalizer_is_the_global_gated_count_floored_at_one():
    mass, target, image_mask, _ = make_batch()
    weight = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    summed = ease_alignment_loss(mass, target, image_mask, weight, normalizer=1.0)
    torch.testing.assert_close(ease_alignment_loss(mass, target, image_mask, weight), summed / 2)
    torch.testing.assert_close(
        ease_alignment_loss(mass, target, image_mask, weight, normalizer=torch.tensor(8.0)),
        summed / 8,
    )
    torch.testing.assert_close(
        ease_alignment_loss(mass, target, image_mask, weight, normalizer=0.0), summed
    )
    zero = ease_alignment_loss(mass, target, image_mask, torch.zeros(4, dtype=torch.float64))
    assert zero == 0


def test_micro_batches_with_a_global_normalizer_sum_to_the_full_batch_loss():
    mass, target, image_mask, _ = make_batch(b=6, seed=3)
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    full = ease_alignment_loss(mass, target, image_mask, weight)
    parts = sum(
        ease_alignment_loss(mass[i : i + 2], target[i : i + 2], image_mask[i : i + 2],
                            weight[i : i + 2], normalizer=weight.sum())
        for i in (0, 2, 4)
    )
    torch.testing.assert_close(parts, full)


def test_other_divergences_match_their_formulas():
    mass, target, image_mask, evidence = make_batch()
    attention = mass / mass.sum(dim=1, keepdim=True)
    eps = 1e-12
    img = image_mask

    ce = ease_alignment_per_sample(mass, target, image_mask, "ce")
    torch.testing.assert_close(ce, -(target * (attention + eps).log() * img).sum(1))

    kl = ease_alignment_per_sample(mass, target, image_mask, "kl")
    entropy = -(torch.xlogy(target, target)).sum(1)
    torch.testing.assert_close(ce - entropy, kl)

    reverse = ease_alignment_per_sample(mass, target, image_mask, "reverse_kl")
    expected = (attention * ((attention + eps).log() - (target + eps).log()) * img).sum(1)
    torch.testing.assert_close(reverse, expected)

    on_evidence = ease_alignment_per_sample(mass, target, image_mask, "mass", evidence)
    torch.testing.assert_close(on_evidence, -((attention * evidence).sum(1) + eps).log())


@pytest.mark.parametrize("divergence", ["kl", "ce", "reverse_kl", "mass"])
def test_every_divergence_has_finite_gradients_at_zero_attention(divergence):
    mass, target, image_mask, evidence = make_batch()
    mass = mass.clone()
    mass[0, 2:5] = 0.0  # some image tokens get no attention at all
    mass[1] = 0.0
    mass.requires_grad_()
    weight = torch.ones(4, dtype=torch.float64)
    loss = ease_alignment_loss(mass, target, image_mask, weight, divergence=divergence,
                               evidence_mask=evidence)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(mass.grad).all()


def test_mass_divergence_requires_an_evidence_mask():
    mass, target, image_mask, _ = make_batch()
    with pytest.raises(ValueError, match="evidence_mask"):
        ease_alignment_per_sample(mass, target, image_mask, "mass")
    with pytest.raises(ValueError, match="divergence must be one of"):
        ease_alignment_per_sample(mass, target, image_mask, "js")


def test_float32_mass_is_computed_in_float32():
    mass, target, image_mask, _ = make_batch(dtype=torch.float32)
    loss = ease_alignment_loss(mass.bfloat16(), target, image_mask, torch.ones(4))
    assert loss.dtype == torch.float32


def test_auto_scaler_injects_the_scaled_aux_gradient():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    w_main = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    w_aux = torch.randn(3, generator=gen, dtype=torch.float64)
    scale = 0.3

    def grads(use_scaler):
        a, b = w_main.clone().requires_grad_(), w_aux.clone().requires_grad_()
        hidden = x @ a  # a stage's activations
        aux = (hidden @ b).square().mean()  # an aux loss computed on that stage
        if use_scaler:
            hidden = EaseLossAutoScaler.apply(hidden, aux)
            (hidden.tanh().sum()).backward()  # the "later stage" only sees activations
        else:
            (hidden.tanh().sum() + scale * aux).backward()
        return a.grad, b.grad

    previous = EaseLossAutoScaler.main_loss_backward_scale
    try:
        EaseLossAutoScaler.set_loss_scale(scale)
        for ours, ref in zip(grads(True), grads(False)):
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    finally:
        EaseLossAutoScaler.main_loss_backward_scale = previous


def test_auto_scaler_forward_is_identity():
    x = torch.randn(4, 2, requires_grad=True)
    out = EaseLossAutoScaler.apply(x, (x * 2).sum())
    assert torch.equal(out, x)


def test_attention_in_evidence_fraction():
    mass, _, image_mask, evidence = make_batch()
    mass = mass.clone()
    mass[1] = 0.0
    fraction = attention_in_evidence(mass, evidence, image_mask)
    expected = (mass * evidence).sum(1) / mass.sum(1)
    torch.testing.assert_close(fraction[[0, 2, 3]], expected[[0, 2, 3]].float())
    assert fraction[1] == 0
    assert math.isclose(float(attention_in_evidence(mass, image_mask, image_mask)[0]), 1.0,
                        rel_tol=1e-6)
