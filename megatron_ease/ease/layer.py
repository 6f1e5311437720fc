"""EASE-capturing core attention: the layer that turns DESIGN §4 into a gradient inside the model.

Selected layers swap their ``core_attention`` for a subclass of the very same class (local
``DotProductAttention`` on CPU, ``TEDotProductAttention`` on GPU), built by
``ease_core_attention``. It runs the parent's attention unchanged and, when an ``EaseContext`` is
set on the model (``megatron_ease.ease.context.ease_context``), computes beside it, from the same
post-rotary query and key:

    M_local = image_attention_mass(q, k)                      # [b, s], this rank's heads, fp32
    M       = reduce_from_tensor_model_parallel_region(M_local)  # Σ over TP ranks, identity bwd
    term    = ease_alignment_loss(M, p*, image, w, normalizer=global Σw) / |layers|

and attaches ``gradient_scale · term`` to the attention output with ``EaseLossAutoScaler``
(forward identity, backward injects the term's gradient), on every pipeline stage alike. The loss
is computed identically on every TP rank and each rank back-propagates into its own heads only, so
the term counts once. The parent class (and therefore the state dict, checkpoint keys and the
attention output) is untouched: without a context the layer *is* the plain attention.

Activation recomputation. A recomputed region runs twice: first under ``no_grad`` (megatron's
``CheckpointFunction.forward``), then again with grad inside the backward pass. The first pass
skips EASE, the second computes it, so the term's gradient is injected once and the work is done
once. The backward pass of a micro-batch runs long after its forward, when the trainer's context
manager has moved on (with pipelining, other micro-batches' forwards have run in between), so the
recomputed layer cannot use "the current context": ``ease_context`` registers a gradient hook on
the model's outputs that, when that micro-batch's backward starts, binds its context to the layers
together with the id of the running autograd graph task. A recomputation finds the context bound
to its own graph task; with none (no context was set for that forward) it is plain attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from megatron_ease.ease.attention import image_attention_mass
from megatron_ease.ease.loss import EaseLossAutoScaler, ease_alignment_loss
from megatron_ease.ease.metrics import attention_in_evidence

if TYPE_CHECKING:
    from megatron_ease.ease.context import EaseContext

__all__ = [
    "EaseCoreAttentionMixin",
    "EaseDotProductAttention",
    "ease_core_attention",
]


def _current_graph_task_id() -> int:
    """Id of the autograd graph task running on this thread; -1 outside backward.

    Private but stable torch API (``torch.utils.checkpoint`` relies on it): the only way to tell a
    recomputation inside backward from a forward, whatever checkpoint implementation runs it.
    """
    return torch._C._current_graph_task_id()


def _in_first_pass_of_recomputed_region() -> bool:
    """megatron's checkpoint runs the region under no_grad first; EASE waits for the recompute."""
    from megatron.core.tensor_parallel.random import is_checkpointing

    return is_checkpointing() and not torch.is_grad_enabled()


class EaseCoreAttentionMixin:
    """Adds the EASE term to a megatron-core core attention class; see the module docstring.

    Built by megatron as ``submodules.core_attention(config=..., layer_number=..., ...)``, with
    ``layer_number`` 1-based and global across pipeline stages. Query and key arrive post-rotary
    as ``[s, b, heads, d]`` (local heads under TP; GQA groups as many as this rank holds).
    """

    def __init__(self, *, config, layer_number: int, softmax_scale: Optional[float] = None,
                 pg_collection=None, **kwargs):
        _check_supported(config, layer_number)
        super().__init__(config=config, layer_number=layer_number, softmax_scale=softmax_scale,
                         pg_collection=pg_collection, **kwargs)
        # 0-based global index, as in the config's ``ease.layers`` and the metric names.
        self.ease_layer_index = layer_number - 1
        # The scale of the logits megatron uses (apply_query_key_layer_scaling divides and
        # multiplies back by the same coefficient); None = 1/sqrt(head dim).
        self.ease_softmax_scale = softmax_scale
        self.ease_tp_group = pg_collection.tp if pg_collection is not None else None
        self.ease_context: Optional["EaseContext"] = None  # set by ``ease_context`` for a forward
        self._ease_backward_binding: Optional[tuple[int, "EaseContext"]] = None

    def bind_ease_context_for_backward(self, context: "EaseContext") -> None:
        """Called when a micro-batch's backward starts (see ``ease_context``)."""
        self._ease_backward_binding = (_current_graph_task_id(), context)

    def _context_for_this_pass(self) -> Optional["EaseContext"]:
        task = _current_graph_task_id()
        if task != -1:  # recomputed inside backward
            binding = self._ease_backward_binding
            return binding[1] if binding is not None and binding[0] == task else None
        if self.ease_context is not None and _in_first_pass_of_recomputed_region():
            return None
        return self.ease_context

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        output = super().forward(query, key, value, attention_mask, *args, **kwargs)
        context = self._context_for_this_pass()
        if context is None:
            return output
        if kwargs.get("packed_seq_params") is not None:
            raise NotImplementedError(
                f"EASE layer {self.ease_layer_index}: packed sequences (THD) are not supported; "
                f"train EASE layers on padded [s, b] batches")
        term = self._ease_term(query, key, context)
        if term is None:
            return output
        return EaseLossAutoScaler.apply(output, term)

    def _ease_term(self, query, key, context: "EaseContext") -> Optional[torch.Tensor]:
        """Record the layer's EASE loss and metrics; return the scaled term to attach, if any."""
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        seq, batch = query.shape[0], query.shape[1]
        if tuple(context.image_mask.shape) != (batch, seq):
            raise ValueError(
                f"EASE layer {self.ease_layer_index}: the context's masks are "
                f"{tuple(context.image_mask.shape)} but this micro-batch is [b, s] = "
                f"{(batch, seq)}; set a context built for the micro-batch being run")
        # λ = 0 (or a forward without grad) records metrics only and leaves the graph untouched,
        # so gradients stay bit-identical to the plain model.
        attach = torch.is_grad_enabled() and context.gradient_scale != 0
        with torch.set_grad_enabled(attach):
            mass = image_attention_mass(
                query.permute(1, 2, 0, 3),  # [s, b, np, d] -> [b, np, s, d]
                key.permute(1, 2, 0, 3),  # [s, b, ng, d] -> [b, ng, s, d]
                context.image_mask,
                context.response_mask,
                softmax_scale=self.ease_softmax_scale,
                key_valid_mask=context.key_valid_mask,
                chunk_size=context.chunk_size,
                response_rows=context.response_rows,
                impl=context.slice_impl,
            )  # [b, s] fp32, this rank's heads
            mass = reduce_from_tensor_model_parallel_region(mass, group=self.ease_tp_group)
            loss = ease_alignment_loss(
                mass, context.target, context.image_mask, context.weight,
                normalizer=context.normalizer, divergence=context.divergence,
                evidence_mask=context.evidence_mask,
            )  # scalar: this micro-batch's share of L_ℓ (global normaliser)
        self._record(context, loss, mass)
        if not attach:
            return None
        if EaseLossAutoScaler.main_loss_backward_scale is not None:
            raise RuntimeError(
                "EaseLossAutoScaler.set_loss_scale was called, but the EASE layers carry their "
                "scale in EaseContext.gradient_scale (ease_gradient_scale); leave the class-level "
                "scale unset so that it is not applied twice")
        return loss * (context.gradient_scale / context.num_layers)

    def _record(self, context: "EaseContext", loss: torch.Tensor, mass: torch.Tensor) -> None:
        mass = mass.detach()
        sums = [None] * 4  # evidence share: sum, count; the same over gated samples
        if context.evidence_mask is not None:
            evidence = context.evidence_mask & context.image_mask  # [b, s]
            has = evidence.any(dim=1) & (torch.where(context.image_mask, mass, 0.0).sum(1) > 0)
            share = attention_in_evidence(mass, context.evidence_mask, context.image_mask)  # [b]
            gated = has & (context.weight.to(has.device) > 0)
            sums = [torch.where(has, share, 0.0).sum(), has.sum(),
                    torch.where(gated, share, 0.0).sum(), gated.sum()]
        context.record(self.ease_layer_index, loss.detach(), sums[0], sums[1],
                       mass if context.keep_mass else None, sums[2], sums[3])


def _check_supported(config, layer_number: int) -> None:
    where = f"EASE layer {layer_number - 1} (ease.layers)"
    if config.context_parallel_size > 1:
        raise ValueError(
            f"{where}: context parallelism (context_parallel_size="
            f"{config.context_parallel_size}) is not supported with EASE: the softmax row "
            f"normaliser would have to span CP ranks. Set parallel.context_parallel_size=1, or "
            f"ease.layers=[] (no EASE layers)")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        raise ValueError(
            f"{where}: softmax_type={config.softmax_type!r} adds a sink to the softmax that the "
            f"image-column slice does not model; EASE needs softmax_type='vanilla'")
    if getattr(config, "window_size", None) is not None:
        raise ValueError(
            f"{where}: sliding-window attention (window_size={config.window_size}) is not "
            f"supported by the image-column slice, which assumes full causal attention")


_EASE_CLASSES: dict[type, type] = {}


def ease_core_attention(base: type) -> type:
    """The EASE-capturing subclass of a core attention class (cached, one per base).

    ``ease_core_attention(DotProductAttention)`` is ``EaseDotProductAttention``; with
    TransformerEngine, ``ease_core_attention(TEDotProductAttention)``. Subclassing (instead of
    wrapping) keeps the module tree and therefore checkpoint keys identical to the plain layer.
    """
    if issubclass(base, EaseCoreAttentionMixin):
        return base
    cls = _EASE_CLASSES.get(base)
    if cls is None:
        name = f"Ease{base.__name__}"
        cls = type(name, (EaseCoreAttentionMixin, base), {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{base.__name__} that also computes the EASE term (DESIGN §4).",
        })
        _EASE_CLASSES[base] = cls
    return cls


def _local_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return ease_core_attention(DotProductAttention)


EaseDotProductAttention = _local_core_attention()
