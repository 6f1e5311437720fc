"""Per-micro-batch EASE context: what the EASE layers need to compute their term, and what they
record for logging (DESIGN §4).

The trainer builds one ``EaseContext`` per micro-batch and runs that micro-batch's forward inside
``ease_context(model, context)``:

    normalizer = global_gated_count([mb.ease_weight for mb in micro_batches])   # Σw, all DP ranks
    scale = ease_gradient_scale(cfg.ease.loss_coeff, data_parallel_size=dp)     # see below
    contexts = []

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        context = EaseContext(mb.image_mask, mb.response_mask, mb.ease_target, mb.ease_weight,
                              normalizer=normalizer, num_layers=len(cfg.ease.layers),
                              gradient_scale=scale, key_valid_mask=mb.attention_mask,
                              evidence_mask=mb.evidence_mask, divergence=cfg.ease.divergence,
                              chunk_size=cfg.ease.chunk_size, slice_impl=cfg.ease.slice_impl)
        contexts.append(context)
        with ease_context(model, context):
            output = model(...)
        return output, loss_func

    forward_backward_func(forward_step_func=forward_step, ...)
    metrics = reduce_ease_metrics(contexts, cfg.ease.layers)      # {"ease/loss": ..., ...}

With ``ease.layers`` empty the model has no EASE layers (no spec override) and the context is
None; with ``ease.enabled = false`` or ``ease.loss_coeff = 0`` the layers still record their
metrics (the DAPO baseline's attention in evidence) while the gradients stay bit-identical to the
plain model's.

Scaling invariant. Each layer's term uses the *global* gated count, so summing the terms of all
micro-batches and DP ranks gives exactly ``L_EASE``; megatron must not rescale their gradients.
It does not divide them by the micro-batch count (the schedule divides only the loss returned by
``loss_func``; the auto-scaler's gradient bypasses it), but it does rescale every gradient after
backward: DDP averages over DP (or, with ``calculate_per_token_loss``, ``finalize_model_grads``
divides by the global token count), and the optimizer divides by its fp16 loss scale (which the
schedule multiplies into the main loss only). ``ease_gradient_scale`` returns ``λ`` times exactly
what cancels those, so that the step applies
``∇(L_DAPO + λ·L_EASE)`` whatever the micro-batch count, DP, TP or PP size.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional, Sequence, Union

import torch

from megatron_ease.distributed import all_reduce_
from megatron_ease.ease.attention import response_row_index
from megatron_ease.ease.layer import EaseCoreAttentionMixin
from megatron_ease.ease.loss import DIVERGENCES

__all__ = [
    "EaseContext",
    "EaseLayerRecord",
    "ease_attention_modules",
    "ease_context",
    "ease_gradient_scale",
    "global_gated_count",
    "reduce_ease_metrics",
]


@dataclasses.dataclass
class EaseLayerRecord:
    """What one EASE layer recorded for one micro-batch (detached)."""

    loss: torch.Tensor  # this micro-batch's share of L_ℓ: Σ_b w·L_ℓ[b] / max(1, global Σw)
    # Σ over samples with evidence and image mass of attention_in_evidence, and their count
    # (None without an evidence_mask).
    evidence_attention_sum: Optional[torch.Tensor]
    evidence_samples: Optional[torch.Tensor]
    mass: Optional[torch.Tensor]  # [b, s] TP-reduced M, when the context has keep_mass
    # The same over the gated samples only (w > 0: the rows the loss supervises).
    gated_evidence_attention_sum: Optional[torch.Tensor] = None
    gated_evidence_samples: Optional[torch.Tensor] = None


@dataclasses.dataclass(eq=False)
class EaseContext:
    """Inputs of the EASE term for one micro-batch, and the layers' records.

    Args:
        image_mask: ``[b, s]`` bool, True at visual tokens.
        response_mask: ``[b, s]`` bool, the label-shifted response mask (the same one that
            selects the DAPO log-probs: the last prompt position is a response row).
        target: ``[b, s]`` p* at image positions (0 elsewhere).
        weight: ``[b]`` gate w: 1 for verifier-correct rollouts with a target, else 0.
        normalizer: global Σw over the optimizer step's mini-batch (all micro-batches, all DP
            ranks); ``global_gated_count``.
        num_layers: number of EASE layers in the whole model (the term is their average).
        gradient_scale: backward multiplier of the term, ``ease_gradient_scale``; 0 records
            metrics only and leaves gradients bit-identical to the plain model.
        key_valid_mask: ``[b, s]`` bool, False at padding keys (None: all valid).
        evidence_mask: ``[b, s]`` bool, True at visual tokens with E > 0; enables the
            attention-in-evidence metric (and is required by divergence ``"mass"``).
        divergence, chunk_size, slice_impl: ``ease.divergence``, ``ease.chunk_size`` and
            ``ease.slice_impl`` (``image_attention_mass``'s ``impl``).
        keep_mass: also keep each layer's TP-reduced mass ``[b, s]`` in the records (eval
            diagnostics and tests).
    """

    image_mask: torch.Tensor
    response_mask: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    normalizer: Union[float, torch.Tensor]
    num_layers: int
    gradient_scale: float = 1.0
    key_valid_mask: Optional[torch.Tensor] = None
    evidence_mask: Optional[torch.Tensor] = None
    divergence: str = "kl"
    chunk_size: Optional[int] = None
    slice_impl: str = "torch"
    keep_mass: bool = False
    records: dict[int, EaseLayerRecord] = dataclasses.field(default_factory=dict, init=False)
    _response_rows: Optional[tuple] = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        b, s = self.image_mask.shape
        for name in ("image_mask", "response_mask", "key_valid_mask", "evidence_mask"):
            mask = getattr(self, name)
            if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, s)):
                raise ValueError(f"EaseContext.{name} must be a bool tensor of shape {(b, s)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
        if tuple(self.target.shape) != (b, s):
            raise ValueError(f"EaseContext.target must have shape {(b, s)}, "
                             f"got {tuple(self.target.shape)}")
        if tuple(self.weight.shape) != (b,):
            raise ValueError(f"EaseContext.weight must have shape {(b,)}, "
                             f"got {tuple(self.weight.shape)}")
        if self.num_layers < 1:
            raise ValueError(f"EaseContext.num_layers must be >= 1 (len(ease.layers)), "
                             f"got {self.num_layers}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"EaseContext.divergence must be one of {DIVERGENCES}, "
                             f"got {self.divergence!r}")
        if self.divergence == "mass" and self.evidence_mask is None:
            raise ValueError('EaseContext: divergence "mass" needs evidence_mask')
        self.gradient_scale = float(self.gradient_scale)

    @property
    def response_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``response_row_index(response_mask)``, built once and shared by the layers."""
        if self._response_rows is None:
            self._response_rows = response_row_index(self.response_mask)
        return self._response_rows

    def record(self, layer_index: int, loss, evidence_attention_sum, evidence_samples, mass,
               gated_evidence_attention_sum=None, gated_evidence_samples=None):
        """Called by the layer; a recomputation overwrites its own (identical) record."""
        self.records[layer_index] = EaseLayerRecord(
            loss, evidence_attention_sum, evidence_samples, mass,
            gated_evidence_attention_sum, gated_evidence_samples)


def ease_attention_modules(model: torch.nn.Module) -> list[EaseCoreAttentionMixin]:
    """The EASE-capturing core attentions inside ``model`` (any wrapper: DDP, Float16Module)."""
    return [m for m in model.modules() if isinstance(m, EaseCoreAttentionMixin)]


@contextlib.contextmanager
def ease_context(model: torch.nn.Module, context: Optional[EaseContext]) -> Iterator:
    """Run ``model``'s forward of one micro-batch with ``context`` set on its EASE layers.

    ``None`` runs the plain model (and is a no-op). Besides setting the context for the forward,
    it hooks the model's outputs so that the micro-batch's backward binds ``context`` to the
    layers before it reaches them: what recomputed layers (activation checkpointing) read, since
    their forward runs again inside backward, after this ``with`` block has exited.
    """
    if context is None:
        yield None
        return
    layers = ease_attention_modules(model)
    for layer in layers:
        if layer.ease_context is not None:
            raise RuntimeError("ease_context is already active on this model; contexts do not "
                               "nest (one micro-batch forward at a time)")

    def bind_outputs(module, args, output):
        def bind(grad):
            for layer in layers:
                layer.bind_ease_context_for_backward(context)

        for tensor in _tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(bind)

    handle = model.register_forward_hook(bind_outputs) if layers else None
    for layer in layers:
        layer.ease_context = context
    try:
        yield context
    finally:
        for layer in layers:
            layer.ease_context = None
        if handle is not None:
            handle.remove()


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []


def ease_gradient_scale(
    loss_coeff: float,
    *,
    data_parallel_size: int = 1,
    loss_scale: Union[float, torch.Tensor] = 1.0,
    global_num_tokens: Optional[Union[float, torch.Tensor]] = None,
) -> float:
    """Backward multiplier of the EASE term such that the step applies ``λ · ∇L_EASE``.

    Args:
        loss_coeff: λ (``ease.loss_coeff``).
        data_parallel_size: DP size over which DDP averages gradients (with the default
            ``calculate_per_token_loss=False``); 1 when nothing averages them.
        loss_scale: the fp16 loss scale the optimizer unscales by (``config.grad_scale_func``
            applied to 1); 1 for bf16 and fp32.
        global_num_tokens: with ``calculate_per_token_loss=True`` only: the token count, summed
            over micro-batches and DP ranks, that ``finalize_model_grads`` divides every gradient
            by (DDP then sums instead of averaging, so ``data_parallel_size`` is ignored).
    """
    undo = float(global_num_tokens) if global_num_tokens is not None else float(data_parallel_size)
    return float(loss_coeff) * undo * float(loss_scale)


def global_gated_count(weights: Sequence[torch.Tensor], group=None) -> float:
    """Σw over the micro-batches of this rank, summed over data-parallel ranks.

    Every rank of the DP group must call it (TP and PP peers hold the same weights and get the
    same value). ``group`` defaults to megatron's data-parallel group when it is initialised.
    """
    local = torch.stack([w.detach().double().sum() for w in weights]).sum() if weights \
        else torch.zeros((), dtype=torch.float64)
    group = _default_group(group, "data")
    if group is not None:
        all_reduce_(local, group=group)
    return float(local)


def reduce_ease_metrics(
    contexts: Sequence[EaseContext],
    ease_layers: Sequence[int],
    pipeline_group=None,
    data_parallel_group=None,
) -> dict[str, float]:
    """Step metrics from the records of this rank's micro-batch contexts, over PP and DP.

    Collective over the pipeline and data-parallel groups (defaults: megatron's, when
    initialised): every rank calls it, whether or not its stage holds EASE layers. Values are the
    same on every rank.

    Returns ``ease/loss`` (L_EASE, the average over layers of L_ℓ with the global normaliser),
    ``ease/loss/layer_{i}``, ``ease/gated_fraction`` (Σw over the rows the EASE term saw, the
    share of them it supervises) and, when contexts carry an ``evidence_mask``,
    ``ease/attention_in_evidence`` (mean over samples with evidence, averaged over layers) and
    ``ease/attention_in_evidence/layer_{i}``, and the same over the gated samples only,
    ``ease/attention_in_evidence_gated[/layer_{i}]``; ``i`` is the 0-based global layer index.
    """
    layers = list(ease_layers)
    if not layers:
        return {}
    position = {layer: n for n, layer in enumerate(layers)}
    # Per layer: loss, evidence sum, evidence count, gated evidence sum, gated evidence count.
    sums = torch.zeros(len(layers) + 1, 5, dtype=torch.float64)
    for context in contexts:
        # The last row counts the gate, once per micro-batch: Σw and rows. Every pipeline stage
        # holds the same contexts, so the PP sum scales both alike and leaves the fraction.
        sums[-1, 0] += float(context.weight.detach().double().sum())
        sums[-1, 1] += context.weight.numel()
        for layer, record in context.records.items():
            if layer not in position:
                raise ValueError(f"EASE layer {layer} recorded a loss but is not in ease_layers "
                                 f"{layers}; pass the model's EASE layers (ease.layers)")
            row = sums[position[layer]]
            row[0] += float(record.loss)
            if record.evidence_samples is not None:
                row[1] += float(record.evidence_attention_sum)
                row[2] += float(record.evidence_samples)
            if record.gated_evidence_samples is not None:
                row[3] += float(record.gated_evidence_attention_sum)
                row[4] += float(record.gated_evidence_samples)
    for group in (_default_group(pipeline_group, "pipeline"),
                  _default_group(data_parallel_group, "data")):
        if group is not None:
            all_reduce_(sums, group=group)
    gate, sums = sums[-1], sums[:-1]

    metrics = {"ease/loss": float(sums[:, 0].mean())}
    metrics.update({f"ease/loss/layer_{layer}": float(sums[n, 0]) for layer, n in position.items()})
    if gate[1] > 0:
        metrics["ease/gated_fraction"] = float(gate[0] / gate[1])
    for name, total, count in (("ease/attention_in_evidence", 1, 2),
                               ("ease/attention_in_evidence_gated", 3, 4)):
        if bool((sums[:, count] > 0).any()):
            share = sums[:, total] / sums[:, count].clamp(min=1)
            metrics[name] = float(share.mean())
            metrics.update({f"{name}/layer_{layer}": float(share[n])
                            for layer, n in position.items()})
    return metrics


def _default_group(group, kind: str):
    if group is not None:
        return group
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None
    if kind == "pipeline":
        return parallel_state.get_pipeline_model_parallel_group()
    return parallel_state.get_data_parallel_group()

