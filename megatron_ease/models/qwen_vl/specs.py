"""Layer specs of the Qwen-VL language model: megatron-core's GPT layer, local or TransformerEngine.

Local modules on CPU, TE modules when TransformerEngine imports: a spec choice, one code path.
Selected layers can get another self-attention (EASE captures the image-column softmax slice
there) without touching the others:

    specs = qwen_vl_layer_specs(config, attention_override=lambda s: dataclasses.replace(
        s, module=EaseSelfAttention), override_layers=[12, 18])

Qwen3-VL: q/k RMSNorm per head (``qk_layernorm``, read from the TransformerConfig) and, at the
first ``num_deepstack_levels`` layers, ``DeepstackTransformerLayer`` as the layer module (same
parameters; it adds the DeepStack visual features after the layer, see ``deepstack.py``).

Both specs use the same checkpoint keys (megatron-core maps the local layer's separate norms to
TE's fused ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``), so a checkpoint
written on CPU loads on GPU and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Optional

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ease.models.qwen_vl.deepstack import DeepstackTransformerLayer

AttentionOverride = Callable[[ModuleSpec], ModuleSpec]


def transformer_engine_available() -> bool:
    from megatron.core.models.gpt import gpt_layer_specs

    return gpt_layer_specs.HAVE_TE


def qwen_vl_layer_spec(use_te: Optional[bool] = None, qk_layernorm: bool = False) -> ModuleSpec:
    """One decoder layer: RMSNorm, GQA self-attention (qkv bias per the TransformerConfig; q/k
    RMSNorm with ``qk_layernorm``), RMSNorm, SwiGLU MLP.

    With TE the attention mask type is ``padding_causal`` and the model passes a ``[b, 1, 1, s]``
    key-padding mask (TE reads it as row lengths: right-padded rows only); the local spec keeps
    ``causal`` and receives the full ``[b, 1, s, s]`` mask, any padding layout (see
    ``attention_mask_for``).
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    use_te = transformer_engine_available() if use_te is None else use_te
    if not use_te:
        return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, params={**attention.params, "attn_mask_type": AttnMaskType.padding_causal})
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def qwen_vl_layer_specs(
    config: TransformerConfig,
    use_te: Optional[bool] = None,
    attention_override: Optional[AttentionOverride] = None,
    override_layers: Sequence[int] = (),
    num_deepstack_levels: int = 0,
) -> list[ModuleSpec]:
    """Specs of all ``config.num_layers`` layers (0-based global index order).

    ``attention_override`` maps the default self-attention spec to the one used at the 0-based
    layers ``override_layers``; every other layer keeps the default. Layers
    ``0 .. num_deepstack_levels - 1`` get ``DeepstackTransformerLayer`` as their module.
    """
    bad = [i for i in override_layers if not 0 <= i < config.num_layers]
    if bad:
        raise ValueError(f"override_layers {bad} out of range for {config.num_layers} layers")
    if override_layers and attention_override is None:
        raise ValueError("override_layers given without an attention_override")
    if not 0 <= num_deepstack_levels <= config.num_layers:
        raise ValueError(f"{num_deepstack_levels} DeepStack levels for {config.num_layers} layers")
    default = qwen_vl_layer_spec(use_te, qk_layernorm=config.qk_layernorm)
    specs = []
    for i in range(config.num_layers):
        spec = default
        if i in override_layers:
            sub = spec.submodules
            spec = dataclasses.replace(spec, submodules=dataclasses.replace(
                sub, self_attention=attention_override(sub.self_attention)))
        if i < num_deepstack_levels:
            spec = dataclasses.replace(spec, module=DeepstackTransformerLayer,
                                       params={**spec.params,
                                               "num_deepstack_levels": num_deepstack_levels})
        specs.append(spec)
    return specs


def qwen_vl_block_spec(
    config: TransformerConfig,
    layer_specs: Sequence[ModuleSpec],
    use_te: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage: its slice of ``layer_specs`` + the final norm."""
    from megatron.core.transformer.transformer_block import (
        get_num_layers_to_build,
        get_transformer_layer_offset,
    )

    if len(layer_specs) != config.num_layers:
        raise ValueError(f"{len(layer_specs)} layer specs for {config.num_layers} layers")
    use_te = transformer_engine_available() if use_te is None else use_te
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        from megatron.core.models.backends import LocalSpecProvider

        # The local layer spec's own choice (WrappedTorchNorm for RMSNorm). gpt_layer_specs'
        # LNImpl is apex's FusedLayerNorm wherever apex imports (NGC containers), which
        # refuses RMSNorm: the converter and every GPU run without TE failed to build.
        final_norm = LocalSpecProvider().layer_norm(
            rms_norm=config.normalization == "RMSNorm")
    return TransformerBlockSubmodules(layer_specs=list(layer_specs[offset:offset + count]),
                                      layer_norm=final_norm)


def spec_attention_mask_type(block_spec: TransformerBlockSubmodules) -> AttnMaskType:
    """The mask type the block's layers expect (one type for all layers of a block)."""
    types = {spec.submodules.self_attention.params.get("attn_mask_type", AttnMaskType.causal)
             for spec in block_spec.layer_specs}
    if len(types) > 1:
        raise ValueError(f"layers of one block disagree on attn_mask_type: {types}")
    return types.pop() if types else AttnMaskType.causal
