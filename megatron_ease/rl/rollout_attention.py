"""The attention path of rollouts: rotated-key KV cache and an SDPA core attention.

megatron-core 0.16's static inference path has two costs that its own fast path (flash decode:
flash-attn only, no mrope) avoids, and one gap:

- it caches keys *before* rotary and re-rotates the whole cache in every layer at every step;
- the local ``DotProductAttention`` expands the grouped K/V cache to all heads (a copy per layer
  per step) and runs strided batched matmuls over it;
- after prefill it switches the layers to ``attn_mask_type=no_mask``; the local attention still
  applies the explicit mask, TransformerEngine's does not, so left padding breaks under TE.

``RolloutAttention`` installs, for the duration of one generation and on this model only:

- ``rotated_key_cache_adjust`` as each self-attention's ``_adjust_key_value_for_inference``: same
  buffers, offsets and return contract as megatron-core's, but the step's new queries and keys are
  rotated here and cached rotated, so the attention gets no rotary embedding to apply;
- ``SdpaCoreAttention`` as each self-attention's ``core_attention``: one
  ``scaled_dot_product_attention`` call with native GQA and the explicit mask (True = masked)
  turned additive, on CPU and GPU alike, whatever the training spec's core attention is.

Both are numerically the same attention (tests compare rollouts with and without them); training
never sees them (``remove`` restores the modules before the model is handed back).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType


def rotated_key_cache_adjust(self: SelfAttention, inference_context, query, key, value,
                             rotary_pos_emb, rotary_pos_cos=None, rotary_pos_sin=None,
                             rotary_pos_cos_sin=None, sequence_len_offset=None, *,
                             inference_params=None):
    """``Attention._adjust_key_value_for_inference`` for a static context, caching rotated keys.

    Queries and keys ``[s, b, g, d]`` of this step are rotated with rows ``[start, end)`` of the
    rotary table (rope ``[max_seq, 1, 1, d]`` or mrope ``[end, b, 1, d]``); the returned
    ``rotary_pos_emb`` is None so ``Attention.forward`` does not rotate again.
    """
    context = inference_context
    start, end = context.sequence_len_offset, context.sequence_len_offset + key.size(0)
    first, last = context.batch_size_offset, context.batch_size_offset + key.size(1)
    if self.layer_number not in context.key_value_memory_dict:
        context.key_value_memory_dict[self.layer_number] = (
            self._allocate_memory(context.max_sequence_length, context.max_batch_size,
                                  self.key_hidden_size, key.dtype),
            self._allocate_memory(context.max_sequence_length, context.max_batch_size,
                                  self.val_hidden_size, value.dtype))
    key_memory, value_memory = context.key_value_memory_dict[self.layer_number]
    if end > key_memory.size(0) or last > key_memory.size(1):
        raise ValueError(f"KV cache of {tuple(key_memory.shape[:2])} (seq, batch) cannot hold "
                         f"positions [{start}, {end}) of rows [{first}, {last})")
    if rotary_pos_emb is not None:
        q_pos_emb, k_pos_emb = rotary_pos_emb
        mscale = _yarn_get_concentration_factor_from_config(self.config)
        query = apply_rotary_pos_emb(query, q_pos_emb[start:end], config=self.config,
                                     mscale=mscale, cp_group=self.pg_collection.cp)
        key = apply_rotary_pos_emb(key, k_pos_emb[start:end], config=self.config, mscale=mscale,
                                   cp_group=self.pg_collection.cp)
    key_memory[start:end, first:last] = key
    value_memory[start:end, first:last] = value
    # As megatron-core: past the prompt the layer's own mask type is off (the explicit mask holds).
    attn_mask_type = AttnMaskType.no_mask if start > 0 else self.attn_mask_type
    return (query, key_memory[:end, first:last], value_memory[:end, first:last], None,
            attn_mask_type, None)


def additive_mask(masked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = masked) -> 0 / most negative finite value, for ``SdpaCoreAttention``."""
    bias = torch.zeros(masked.shape, dtype=dtype, device=masked.device)
    return bias.masked_fill_(masked, torch.finfo(dtype).min)


class SdpaCoreAttention(torch.nn.Module):
    """A core attention for rollouts: ``softmax(q·kᵀ·scale + mask)·v`` by one SDPA call.

    Megatron's core-attention contract: ``query [sq, b, h, d]``, ``key``/``value``
    ``[sk, b, g, d]`` (this TP rank's heads and groups), ``attention_mask`` broadcastable to
    ``[b, 1, sq, sk]``, bool with True = masked or already additive (``additive_mask``: built
    once per step instead of once per layer); returns ``[sq, b, h·d]``. A fully masked row (a
    padding query) gets a finite uniform average instead of NaN, as the local attention's -10000
    fill does.
    """

    def __init__(self, config):
        super().__init__()
        unsupported = {"softmax_type": config.softmax_type != "vanilla",
                       "window_size": config.window_size is not None}
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise NotImplementedError(f"SdpaCoreAttention does not implement {bad}; generate with "
                                      f"attention_backend='model'")
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.scale = config.softmax_scale or 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor],
                attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SdpaCoreAttention takes no attention_bias or packed "
                                      "sequences")
        sq, b, h, d = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, h, sq, d]
        k = key.permute(1, 2, 0, 3)  # [b, g, sk, d]
        v = value.permute(1, 2, 0, 3)
        bias = attention_mask
        if bias is not None:
            bias = additive_mask(bias, q.dtype) if bias.dtype == torch.bool else bias.to(q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=self.scale, enable_gqa=k.shape[1] != h)
        return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)  # [sq, b, h*d]


class RolloutAttention:
    """Installs / removes the rollout attention path on every self-attention of ``model``."""

    def __init__(self, model: torch.nn.Module, cache_rotated_keys: bool, sdpa: bool):
        self.attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
        self.cache_rotated_keys = cache_rotated_keys
        self.sdpa = sdpa
        self._replaced: list[tuple[SelfAttention, torch.nn.Module]] = []  # (module, its core)

    def install(self) -> None:
        for module in self.attentions:
            if self.cache_rotated_keys:
                module._adjust_key_value_for_inference = rotated_key_cache_adjust.__get__(module)
            if self.sdpa:
                self._replaced.append((module, module.core_attention))
                module.core_attention = SdpaCoreAttention(module.config)

    def remove(self) -> None:
        for module in self.attentions:
            module.__dict__.pop("_adjust_key_value_for_inference", None)
        for module, core in self._replaced:
            module.core_attention = core
        self._replaced = []
