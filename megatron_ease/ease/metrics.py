"""Attention-localisation diagnostics on the image-column mass (for logging and eval)."""

import torch

__all__ = ["attention_in_evidence"]


def attention_in_evidence(
    mass: torch.Tensor, evidence_mask: torch.Tensor, image_mask: torch.Tensor
) -> torch.Tensor:
    """Fraction of the response→image attention that lands on evidence tokens (E > 0).

    Args:
        mass: ``[b, s]`` image-column attention mass M (``image_attention_mass``).
        evidence_mask: ``[b, s]`` bool, True at visual tokens with E > 0.
        image_mask: ``[b, s]`` bool, True at visual tokens.

    Returns:
        ``[b]`` in [0, 1]; 0 for samples without image mass. Detached: this is a metric.
    """
    mass = torch.where(image_mask, mass.detach().float(), 0.0)  # [b, s]
    on_evidence = torch.where(evidence_mask, mass, 0.0).sum(dim=1)  # [b]
    return on_evidence / mass.sum(dim=1).clamp(min=1e-20)
