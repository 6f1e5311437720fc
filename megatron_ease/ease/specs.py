"""EASE as a ModuleSpec choice: the selected layers' self-attention gets the EASE-capturing core
attention; every other layer keeps its spec object untouched.

Model code with a per-layer attention hook (``megatron_ease.models.qwen_vl``) plugs
``ease_attention_spec`` in directly:

    qwen_vl_layer_specs(config, attention_override=ease_attention_spec,
                        override_layers=cfg.ease.layers if cfg.ease.enabled else [])

A plain megatron-core GPT model takes the block spec of its pipeline stage:

    layer_specs = ease_layer_specs(get_gpt_layer_local_spec(), config.num_layers, cfg.ease.layers)
    GPTModel(config, ease_block_spec(config, layer_specs), ...)

Layer indices are 0-based and global across pipeline stages (``ease.layers``); megatron's
``layer_number`` is the same index plus one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_ease.ease.layer import ease_core_attention

__all__ = ["ease_attention_spec", "ease_block_spec", "ease_layer_specs"]


def ease_attention_spec(attention_spec: ModuleSpec) -> ModuleSpec:
    """A self-attention spec with its ``core_attention`` swapped for the EASE-capturing subclass.

    Works for any core attention given as a class or a ModuleSpec (local ``DotProductAttention``,
    ``TEDotProductAttention``); query/key projections, rotary and output projection are the
    attention's own, so checkpoints load unchanged.
    """
    submodules = attention_spec.submodules
    core = getattr(submodules, "core_attention", None)
    if core is None:
        raise ValueError(f"attention spec {attention_spec.module.__name__} has no core_attention "
                         f"submodule to capture EASE from")
    if isinstance(core, ModuleSpec):
        core = dataclasses.replace(core, module=ease_core_attention(core.module))
    else:
        core = ease_core_attention(core)
    return dataclasses.replace(
        attention_spec, submodules=dataclasses.replace(submodules, core_attention=core))


def ease_layer_specs(base_layer_spec: ModuleSpec, num_layers: int,
                     ease_layers: Sequence[int]) -> list[ModuleSpec]:
    """Specs of all ``num_layers`` layers, in global order; EASE attention at ``ease_layers``.

    ``ease_layers`` are 0-based global indices; an empty list gives the plain model.
    """
    bad = [i for i in ease_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"ease.layers {bad} out of range for a model of {num_layers} layers "
                         f"(0-based indices 0..{num_layers - 1})")
    selected = set(ease_layers)
    if not selected:
        return [base_layer_spec] * num_layers
    submodules = base_layer_spec.submodules
    ease_spec = dataclasses.replace(base_layer_spec, submodules=dataclasses.replace(
        submodules, self_attention=ease_attention_spec(submodules.self_attention)))
    return [ease_spec if i in selected else base_layer_spec for i in range(num_layers)]


def ease_block_spec(config, layer_specs: Sequence[ModuleSpec], layer_norm=None,
                    vp_stage: Optional[int] = None,
                    pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage (and virtual stage): its slice of ``layer_specs``.

    ``layer_norm`` is the final norm; None = megatron's own (TENorm with TE, else the local
    spec's norm), so the module tree (and checkpoint keys) match a model built the plain way.
    """
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.transformer_block import (
        get_num_layers_to_build,
        get_transformer_layer_offset,
    )

    if len(layer_specs) != config.num_layers:
        raise ValueError(f"{len(layer_specs)} layer specs for a model of {config.num_layers} "
                         f"layers; pass the specs of all layers (ease_layer_specs)")
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if layer_norm is None:
        # Without TE, the local spec's own choice, as qwen_vl_block_spec makes it: megatron's
        # block default is apex's FusedLayerNorm wherever apex imports, which refuses RMSNorm.
        layer_norm = transformer_block.LayerNormImpl if transformer_block.HAVE_TE else \
            LocalSpecProvider().layer_norm(rms_norm=config.normalization == "RMSNorm")
    return TransformerBlockSubmodules(layer_specs=list(layer_specs[offset:offset + count]),
                                      layer_norm=layer_norm)
