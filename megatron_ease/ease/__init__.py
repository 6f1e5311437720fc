"""EASE: evidence-aligned attention supervision (DESIGN §3–4).

Pure math (``targets``, ``attention``, ``loss``, ``metrics``) takes tensors and returns tensors;
``layer``, ``specs`` and ``context`` put it inside a megatron-core model.

Exports resolve lazily, so that ``megatron_ease.ease.targets`` (used by data-loader workers) does
not pull in megatron-core.
"""

import importlib

_EXPORTS = {
    "image_attention_mass": "attention",
    "EaseContext": "context",
    "EaseLayerRecord": "context",
    "ease_attention_modules": "context",
    "ease_context": "context",
    "ease_gradient_scale": "context",
    "global_gated_count": "context",
    "reduce_ease_metrics": "context",
    "EaseCoreAttentionMixin": "layer",
    "EaseDotProductAttention": "layer",
    "ease_core_attention": "layer",
    "EaseLossAutoScaler": "loss",
    "ease_alignment_loss": "loss",
    "ease_alignment_per_sample": "loss",
    "attention_in_evidence": "metrics",
    "ease_attention_spec": "specs",
    "ease_block_spec": "specs",
    "ease_layer_specs": "specs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__():
    return __all__
