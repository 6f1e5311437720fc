"""EASE alignment loss between the image-column attention mass and the evidence target (DESIGN §4).

Per layer and sample, over image positions:

    â[b, j] = M[b, j] / max(Σ_j' M[b, j'], 1e-20)
    L[b]    = Σ_j p*[b, j] · (log p*[b, j] − log(â[b, j] + 1e-12))        (divergence "kl")

and the batch term ``Σ_b w[b] · L[b] / max(1, normalizer)``, where the trainer passes the *global*
gated count (all micro-batches, all DP ranks) as ``normalizer`` so that the step's gradient does
not depend on how the mini-batch is split. ``EaseLossAutoScaler`` injects the term's gradient on a
pipeline stage that does not compute the final loss.
"""

from typing import Optional, Union

import torch

__all__ = [
    "DIVERGENCES",
    "EaseLossAutoScaler",
    "ease_alignment_loss",
    "ease_alignment_per_sample",
]

DIVERGENCES = ("kl", "ce", "reverse_kl", "mass")

_MASS_FLOOR = 1e-20  # the â normaliser's floor (DESIGN §4)
_LOG_EPS = 1e-12  # keeps log â finite where the model puts no mass


def ease_alignment_per_sample(
    mass: torch.Tensor,
    target: torch.Tensor,
    image_mask: torch.Tensor,
    divergence: str = "kl",
    evidence_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample divergence between the evidence target and the normalised image attention.

    Args:
        mass: ``[b, s]`` image-column attention mass M (``image_attention_mass``, TP-reduced).
        target: ``[b, s]`` p* at image positions (0 elsewhere), summing to 1 over a sample's
            image positions when the sample has a target.
        image_mask: ``[b, s]`` bool, True at visual tokens.
        divergence: ``"kl"`` (default): Σ p* (log p* − log(â + ε)), 0·log 0 = 0;
            ``"ce"``: −Σ p* log(â + ε), the KL without the constant target entropy;
            ``"reverse_kl"``: Σ â (log(â + ε) − log(p* + ε));
            ``"mass"``: −log(Σ_{j ∈ evidence} â + ε), the share of attention on evidence tokens;
            needs ``evidence_mask``.
        evidence_mask: ``[b, s]`` bool, True at evidence tokens (E > 0); only for ``"mass"``.

    Returns:
        ``[b]`` in at least float32. Samples without image mass (and, for ``"mass"``, without
        evidence tokens) give exactly 0 with a zero, finite gradient.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "mass" and evidence_mask is None:
        raise ValueError('divergence "mass" needs evidence_mask (True at tokens with E > 0)')
    dtype = torch.promote_types(mass.dtype, torch.float32)
    mass = torch.where(image_mask, mass.to(dtype), 0.0)  # [b, s]
    target = torch.where(image_mask, target.to(dtype), 0.0)  # [b, s]

    total = mass.sum(dim=1, keepdim=True)  # [b, 1]
    has_mass = total.squeeze(1) > 0  # [b]
    attention = mass / total.clamp(min=_MASS_FLOOR)  # â [b, s]; all zeros without mass, not NaN

    if divergence == "kl":
        per_token = torch.xlogy(target, target) - torch.xlogy(target, attention + _LOG_EPS)
    elif divergence == "ce":
        per_token = -torch.xlogy(target, attention + _LOG_EPS)
    elif divergence == "reverse_kl":
        per_token = attention * (
            torch.log(attention + _LOG_EPS) - torch.log(target + _LOG_EPS)
        )
    else:
        evidence = evidence_mask & image_mask  # [b, s]
        has_mass = has_mass & evidence.any(dim=1)
        on_evidence = torch.where(evidence, attention, 0.0).sum(dim=1)  # [b]
        return torch.where(has_mass, -torch.log(on_evidence + _LOG_EPS), 0.0)

    per_token = torch.where(image_mask, per_token, 0.0)
    return torch.where(has_mass, per_token.sum(dim=1), 0.0)


def ease_alignment_loss(
    mass: torch.Tensor,
    target: torch.Tensor,
    image_mask: torch.Tensor,
    weight: torch.Tensor,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    divergence: str = "kl",
    evidence_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gated EASE alignment loss of one layer: ``Σ_b w[b] · L[b] / max(1, normalizer)``.

    Args:
        mass, target, image_mask, divergence, evidence_mask: as in ``ease_alignment_per_sample``.
        weight: ``[b]`` gate w (1 for verifier-correct samples with a target, else 0; floats
            allowed).
        normalizer: the global gated count Σ w over the optimizer step's mini-batch (all
            micro-batches and DP ranks), float or tensor; None uses this batch's Σ w.

    Returns:
        Scalar loss. Rows with ``w = 0`` or without image mass contribute exactly 0 and get a
        zero gradient, even when their mass is NaN or inf.
    """
    dtype = torch.promote_types(mass.dtype, torch.float32)
    weight = weight.to(dtype)
    gated = weight != 0  # [b]
    # Clean the ungated rows *before* any arithmetic: masking a NaN after log/divide would still
    # send NaN gradients back through the masked branch.
    mass = torch.where(gated.unsqueeze(1), mass.to(dtype), 0.0)  # [b, s]
    per_sample = ease_alignment_per_sample(mass, target, image_mask, divergence, evidence_mask)
    if normalizer is None:
        normalizer = weight.sum()
    normalizer = torch.as_tensor(normalizer, dtype=dtype, device=mass.device).clamp(min=1.0)
    return torch.where(gated, weight * per_sample, 0.0).sum() / normalizer


class EaseLossAutoScaler(torch.autograd.Function):
    """Attach an auxiliary loss to activations so its gradient rides the pipeline backward.

    Forward returns ``activations`` unchanged; backward returns their gradient untouched and sends
    ``main_loss_backward_scale`` into ``aux_loss``, as if ``scale · aux_loss`` had been added to
    the final loss. Modelled on megatron-core's ``MoEAuxLossAutoScaler``, with its own scale so
    that EASE (λ and the trainer's micro-batch correction) and MoE balance losses stay
    independent. The trainer sets the scale through ``set_loss_scale``; unset means 1.

    The model's EASE layers (``megatron_ease.ease.layer``) do not use this class-level scale: each
    micro-batch's ``EaseContext.gradient_scale`` is multiplied into the term they attach, and they
    refuse to run while a class-level scale is set, so that the scale cannot be applied twice.
    """

    main_loss_backward_scale: Optional[Union[float, torch.Tensor]] = None

    @staticmethod
    def forward(ctx, activations: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        # Saving aux_loss keeps its graph alive until this node's backward runs.
        ctx.save_for_backward(aux_loss)
        return activations

    @staticmethod
    def backward(ctx, grad_activations: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scale = EaseLossAutoScaler.main_loss_backward_scale
        if scale is None:
            scale = 1.0
        # A Python float keeps full precision; a tensor is moved next to the loss.
        scale = torch.as_tensor(scale, dtype=aux_loss.dtype, device=aux_loss.device)
        return grad_activations, torch.ones_like(aux_loss) * scale

    @staticmethod
    def set_loss_scale(scale: Union[float, torch.Tensor]) -> None:
        """Set the factor applied to every attached aux-loss gradient (e.g. λ / micro-batches)."""
        EaseLossAutoScaler.main_loss_backward_scale = scale
