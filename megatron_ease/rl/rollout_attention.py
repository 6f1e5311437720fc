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
  offsets and return contract as megatron-core's, but the step's new queries and keys are rotated
  here and cached rotated, so the attention gets no rotary embedding to apply (with the
  step's cos / sin computed by the first layer and reused by the others, ``RotaryTables``,
  where megatron-core recomputes them for the queries and the keys of every layer). With SDPA the
  buffers are batch-first, ``[b, g, s, d]``, so the attention reads each row's keys as one
  contiguous block (megatron-core's ``[s, b, g, d]`` makes every decode step a strided gather,
  about half of the attention's time on CPU); otherwise they keep megatron-core's layout;
- ``SdpaCoreAttention`` as each self-attention's ``core_attention``: one
  ``scaled_dot_product_attention`` call with the explicit mask (True = masked) turned additive,
  on CPU and GPU alike, whatever the training spec's core attention is. GQA is native at
  prefill; a decode step folds the ``h / g`` query heads of each group into the query axis
  instead (one query per head, so the ``[b, 1, 1, k]`` mask still broadcasts), which reads each
  group's keys once instead of once per head.

Both are numerically the same attention (tests compare rollouts with and without them); training
never sees them (``remove`` restores the modules before the model is handed back).
"""

from __future__ import annotations

import functools
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
                             inference_params=None, batch_first: bool = False,
                             rotary: Optional["RotaryTables"] = None):
    """``Attention._adjust_key_value_for_inference`` for a static context, caching rotated keys.

    Queries and keys ``[s, b, g, d]`` of this step are rotated with rows ``[start, end)`` of the
    rotary table (rope ``[max_seq, 1, 1, d]``), or with the whole table when it holds just this
    step's ``end - start`` positions (mrope ``[end - start, b, 1, d]``, built from the step's own
    position ids: ``QwenVLRolloutAdapter.position_ids_for``); the returned
    ``rotary_pos_emb`` is None so ``Attention.forward`` does not rotate again. ``batch_first``:
    the buffers are ``[max_batch, g, max_seq, d]`` and the returned keys and values
    ``[end, b, g, d]`` views of them (for ``SdpaCoreAttention``, which permutes them back).
    ``rotary``: the cos / sin of the step, shared by the layers (``RotaryTables``).
    """
    context = inference_context
    start, end = context.sequence_len_offset, context.sequence_len_offset + key.size(0)
    first, last = context.batch_size_offset, context.batch_size_offset + key.size(1)
    if self.layer_number not in context.key_value_memory_dict:
        if batch_first:
            groups = self.num_query_groups_per_partition
            context.key_value_memory_dict[self.layer_number] = tuple(
                torch.empty(context.max_batch_size, groups, context.max_sequence_length, size,
                            dtype=t.dtype, device=t.device)
                for size, t in ((self.key_hidden_size, key), (self.val_hidden_size, value)))
        else:
            context.key_value_memory_dict[self.layer_number] = (
                self._allocate_memory(context.max_sequence_length, context.max_batch_size,
                                      self.key_hidden_size, key.dtype),
                self._allocate_memory(context.max_sequence_length, context.max_batch_size,
                                      self.val_hidden_size, value.dtype))
    key_memory, value_memory = context.key_value_memory_dict[self.layer_number]
    seq_dim, batch_dim = (2, 0) if batch_first else (0, 1)
    if end > key_memory.size(seq_dim) or last > key_memory.size(batch_dim):
        raise ValueError(f"KV cache of {key_memory.size(seq_dim)} positions x "
                         f"{key_memory.size(batch_dim)} rows cannot hold positions "
                         f"[{start}, {end}) of rows [{first}, {last})")
    if rotary_pos_emb is not None:
        query, key = _rotate_query_key(self, query, key, rotary_pos_emb, start, end, rotary,
                                       together=batch_first)
    # As megatron-core: past the prompt the layer's own mask type is off (the explicit mask holds).
    attn_mask_type = AttnMaskType.no_mask if start > 0 else self.attn_mask_type
    if batch_first:
        key_memory[first:last, :, start:end] = key.permute(1, 2, 0, 3)
        value_memory[first:last, :, start:end] = value.permute(1, 2, 0, 3)
        keys = key_memory[first:last, :, :end].permute(2, 0, 1, 3)  # [end, b, g, d]
        values = value_memory[first:last, :, :end].permute(2, 0, 1, 3)
        return query, keys, values, None, attn_mask_type, None
    key_memory[start:end, first:last] = key
    value_memory[start:end, first:last] = value
    return (query, key_memory[:end, first:last], value_memory[:end, first:last], None,
            attn_mask_type, None)


class RotaryTables:
    """The cos / sin a step's rotary embedding multiplies by, computed by the first layer that
    rotates with the step's table rows and reused by the others (megatron-core's
    ``apply_rotary_pos_emb`` takes them from the angles at every call: twice per layer per
    step). Keyed by the table object (held here, so its identity stays unique) and the rows."""

    def __init__(self):
        self._key: Optional[tuple] = None
        self._cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def cos_sin(self, freqs: torch.Tensor, start: int, end: int, mscale: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, signed sin)`` of rows ``[start, end)`` of ``freqs`` (all of it when it has
        just those rows), scaled by ``mscale``, in ``dtype``: megatron-core's ``cos_``, and its
        ``sin_`` with the first half negated (``_rotate``)."""
        key = (freqs, start, end, mscale, dtype)
        cached = self._key
        if cached is None or cached[0] is not freqs or cached[1:] != key[1:]:
            if freqs.size(0) != end - start:
                freqs = freqs[start:end]
            sin = (torch.sin(freqs) * mscale).to(dtype)
            first, second = torch.chunk(sin, 2, dim=-1)
            self._cos_sin = ((torch.cos(freqs) * mscale).to(dtype),
                             torch.cat((-first, second), dim=-1))
            self._key = key
        return self._cos_sin

    def clear(self) -> None:
        self._key = self._cos_sin = None


def _rotate_query_key(self: SelfAttention, query, key, rotary_pos_emb, start: int, end: int,
                      rotary: Optional[RotaryTables], together: bool = False):
    """Queries and keys of rows ``[start, end)`` rotated as megatron-core's unfused
    ``apply_rotary_pos_emb`` rotates them, bit for bit: ``t * cos + rotate_half(t) * sin``. With
    ``rotary`` the cos / sin are the step's shared ones and the rotation skips the copy that
    appends the (empty) unrotated part; ``together``: queries and keys are rotated as one tensor
    (the returned ones are views of it, for ``SdpaCoreAttention``, which takes any strides).
    The fused, interleaved, MLA and partial rotary variants go through megatron-core's
    function."""
    q_pos_emb, k_pos_emb = rotary_pos_emb
    config = self.config
    mscale = _yarn_get_concentration_factor_from_config(config)
    if (rotary is None or q_pos_emb is not k_pos_emb or query.dtype != key.dtype
            or config.apply_rope_fusion
            or config.rotary_interleaved or config.multi_latent_attention
            or q_pos_emb.size(-1) != query.size(-1) or k_pos_emb.size(-1) != key.size(-1)):
        if q_pos_emb.size(0) != end - start:
            q_pos_emb, k_pos_emb = q_pos_emb[start:end], k_pos_emb[start:end]
        query = apply_rotary_pos_emb(query, q_pos_emb, config=config, mscale=mscale,
                                     cp_group=self.pg_collection.cp)
        key = apply_rotary_pos_emb(key, k_pos_emb, config=config, mscale=mscale,
                                   cp_group=self.pg_collection.cp)
        return query, key
    cos, signed_sin = rotary.cos_sin(q_pos_emb, start, end, mscale, query.dtype)
    if together:
        heads = query.size(2)
        both = _rotate(torch.cat((query, key), dim=2), cos, signed_sin)
        return both[:, :, :heads], both[:, :, heads:]
    return _rotate(query, cos, signed_sin), _rotate(key, cos, signed_sin)


def _rotate(t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """megatron-core's ``(t * cos_) + (_rotate_half(t) * sin_)`` (not interleaved), with
    ``signed_sin`` = ``sin_`` with its first half negated: ``rotate_half(t) * sin_`` is
    ``[-x2, x1] * [s1, s2]``, and ``x2 * -s1`` is ``-x2 * s1`` bit for bit (IEEE products are
    sign-symmetric), so the negation is done once per step instead of twice per layer."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return (t * cos) + (torch.cat((x2, x1), dim=-1) * signed_sin)


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
        k = key.permute(1, 2, 0, 3)  # [b, g, sk, d]
        v = value.permute(1, 2, 0, 3)
        g = k.shape[1]
        bias = attention_mask
        if bias is not None:
            bias = additive_mask(bias, query.dtype) if bias.dtype == torch.bool else bias.to(
                query.dtype)
        if sq == 1 and g != h:  # decode: the group's heads as its queries, [b, g, h/g, d]
            q = query.reshape(b, g, h // g, d)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                                   scale=self.scale)
            return out.reshape(1, b, h * d)  # [sq, b, h*d]
        q = query.permute(1, 2, 0, 3)  # [b, h, sq, d]
        if g != h and q.is_cuda:
            # On CUDA, SDPA with enable_gqa fell back to the math kernel, which builds
            # [b, h, sq, sk] scores (benchmarks/ease_overhead.py ran out of memory at 7B sizes on
            # an H100, torch 2.11); with the keys and values repeated the fused kernels take it.
            # Not yet measured for rollouts on a GPU.
            k, v = (t.repeat_interleave(h // g, dim=1) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=self.scale, enable_gqa=k.shape[1] != h)
        return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)  # [sq, b, h*d]


class RolloutAttention:
    """Installs / removes the rollout attention path on every self-attention of ``model``, and
    knows the KV cache layout it makes (``select_cache_rows``)."""

    def __init__(self, model: torch.nn.Module, cache_rotated_keys: bool, sdpa: bool):
        self.attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
        self.cache_rotated_keys = cache_rotated_keys
        self.sdpa = sdpa
        self.batch_first_cache = cache_rotated_keys and sdpa
        self.rotary = RotaryTables()
        self._replaced: list[tuple[SelfAttention, torch.nn.Module]] = []  # (module, its core)

    def install(self) -> None:
        for module in self.attentions:
            if self.cache_rotated_keys:
                module._adjust_key_value_for_inference = functools.partial(
                    rotated_key_cache_adjust, module, batch_first=self.batch_first_cache,
                    rotary=self.rotary)
            if self.sdpa:
                self._replaced.append((module, module.core_attention))
                module.core_attention = SdpaCoreAttention(module.config)

    def select_cache_rows(self, inference_context, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows`` (in that order, repeats allowed) of every layer: one prompt's
        row for each of its rollouts, or the rollouts still generating. Only the filled
        positions are copied; the context's batch size becomes ``len(rows)``."""
        batch_dim, seq_dim = (0, 2) if self.batch_first_cache else (1, 0)
        filled = inference_context.sequence_len_offset
        memory = inference_context.key_value_memory_dict
        for layer, buffers in memory.items():
            selected = []
            for t in buffers:
                shape = list(t.shape)
                shape[batch_dim] = len(rows)
                out = t.new_empty(shape)
                torch.index_select(t.narrow(seq_dim, 0, filled), batch_dim, rows,
                                   out=out.narrow(seq_dim, 0, filled))
                selected.append(out)
            memory[layer] = tuple(selected)
        inference_context.max_batch_size = len(rows)

    def remove(self) -> None:
        self.rotary.clear()
        for module in self.attentions:
            module.__dict__.pop("_adjust_key_value_for_inference", None)
        for module, core in self._replaced:
            module.core_attention = core
        self._replaced = []
