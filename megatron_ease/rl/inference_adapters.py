"""Model adapters of the rollout engine: prefill / decode over megatron-core's static KV cache.

An adapter is a megatron-core ``AbstractModelInferenceWrapper`` (the extension point megatron-core
provides for new models), so the pieces that carry 8B rollouts come from megatron-core itself:

- ``StaticInferenceContext``: per-layer KV buffers ``[max_seq, max_batch, groups/TP, d]`` that the
  attention layers fill (``Attention._adjust_key_value_for_inference``), sequence offset tracking;
- ``run_one_forward_step``: the forward of one step on this stage, with activations received from
  the previous pipeline stage and sent to the next (``inference.communication_utils``); logits
  come back on the last stage only, gathered over TP.

What the adapter does for RL rollouts instead of megatron-core's text-generation controller:

- **left padding** with an explicit mask: ``[b, 1, s, s]`` causal ∧ valid-key at prefill and
  ``[b, 1, 1, k]`` valid-key masks at every decode step, so every prompt's last token sits in the
  last column and generation starts for all rows at once (megatron-core's controller instead
  starts at the shortest prompt and teacher-forces the longer ones, which cannot work for image
  prompts whose image tokens need vision features);
- **prefill once per prompt, decode G samples**: the ``B`` unique prompts are prefilled (the vision
  tower runs once per image), then the KV cache rows are replicated ``G`` times
  (``select_rows`` with a repeat-interleaved index) and the ``B·G`` rollouts decode together;
- **finished rollouts leave the batch**: ``select_rows`` with the unfinished rows drops the others
  from the KV cache, positions and masks, so decode steps stop computing them;
- **positions per model**: ``position_ids_for`` of each adapter (GPT: ``[b, q]``; Qwen-VL mrope
  ``[3, b, prefix]``: generated tokens continue at the prompt's largest position + 1, HF's
  ``rope_deltas`` semantics).

What the adapter changes for the length of a generation (``rollout_attention.py``; each can be
turned off, the rollouts are the same up to float noise):

- ``cache_rotated_keys``: megatron-core's static path caches keys before rotary and re-rotates
  the whole cache in every layer at every step; the adapter caches rotated keys instead.
- ``attention_backend="sdpa"``: the core attention becomes one SDPA call with native GQA and the
  explicit mask. megatron-core switches the layers to ``attn_mask_type=no_mask`` after prefill;
  the local ``DotProductAttention`` still applies the explicit mask, TransformerEngine's does not,
  so with ``attention_backend="model"`` a padded batch needs the local attention, and
  TransformerEngine's is refused whatever the padding (its mask argument is a padding mask; an
  error says so; that backend is verified with the local spec only). SDPA also avoids the local attention's
  per-step copy of the grouped K/V cache to all heads (``benchmarks/README.md`` has numbers).
- ``direct_linears``: at TP = 1 the parallel linears of the model (megatron-core's
  ``ColumnParallelLinear`` / ``RowParallelLinear``, and the ``VocabParallelEmbedding``) run as
  the matmul and bias add (the lookup) their forward computes, without the autograd
  ``Function``, the TP-group lookups (a deprecation warning per row-parallel call) and the
  identity TP mappings around it (``_DirectLinears``): a quarter of a decode step of the tiny
  benchmark model, where a step is mostly Python. The same operations in the same order, so
  the rollouts are bit-identical (tests compare them).

Other limitations of megatron-core 0.16 this code lives with:

- With ``position_embedding_type="rope"`` a GPTModel ignores ``position_ids`` and rotates by the
  cache index, so a left-padded prompt is rotated with an offset equal to its padding. Rotary
  attention only depends on position differences, so this changes logits by float noise only,
  and a teacher-forced forward with the same layout gives the same numbers. mrope (Qwen-VL) takes
  per-sample positions and is exact.
- GPTModel gathers the logits over TP in inference (its own assertion), so every TP rank holds
  ``[b, vocab]`` per step.
"""

from __future__ import annotations

import abc
import types
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.abstract_model_inference_wrapper import (
    AbstractModelInferenceWrapper,
)
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
    InferenceWrapperConfig,
)
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.utils import get_attr_wrapped_model, get_model_config, unwrap_model

from megatron_ease.rl.rollout_attention import RolloutAttention, additive_mask

if TYPE_CHECKING:
    from megatron_ease.rl.rollout import PromptBatch


def _causal_valid_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """``[b, 1, s, s]`` True = masked: causal ∧ valid keys (the local attention's explicit mask)."""
    s = key_valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=key_valid.device).tril()
    return ~(causal[None, None] & key_valid[:, None, None, :])


def _matmul_bias(module, input_: torch.Tensor, weight: torch.Tensor):
    """A parallel linear's ``(output, output_bias)`` at TP = 1: ``matmul(input, weight.t())``,
    plus the bias unless the module returns it apart (``skip_bias_add``)."""
    output = torch.matmul(input_, weight.t())
    if module.skip_bias_add:
        return output, module.bias
    if module.bias is not None:
        output = output + module.bias
    return output, None


def _direct_column_forward(self: ColumnParallelLinear, input_: torch.Tensor,
                           weight: Optional[torch.Tensor] = None, runtime_gather_output=None):
    """``ColumnParallelLinear.forward`` at TP = 1 (no gather, no copy to the TP region): its
    matmul and bias add directly instead of through the autograd Function."""
    return _matmul_bias(self, input_, self.weight if weight is None else weight)


def _direct_row_forward(self: RowParallelLinear, input_: torch.Tensor):
    """``RowParallelLinear.forward`` at TP = 1 (the all-reduce is the identity)."""
    return _matmul_bias(self, input_, self.weight)


def _direct_embedding_forward(self: VocabParallelEmbedding, input_: torch.Tensor):
    """``VocabParallelEmbedding.forward`` at TP = 1 (no vocabulary mask, identity reduce)."""
    if self.deterministic_mode:
        return self.weight[input_]
    return torch.nn.functional.embedding(input_, self.weight)


class _DirectLinears:
    """Runs the model's TP = 1 parallel linears (and vocabulary embedding) without
    megatron-core's training machinery while installed (one generation). A module qualifies when
    it is exactly megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` /
    ``VocabParallelEmbedding`` (a subclass may change ``forward``), its TP group has one rank,
    and its forward has no sequence parallelism, expert communication, deferred embedding
    gradient or embedding reduce-scatter to do; the others keep their forward."""

    _FORWARDS = {ColumnParallelLinear: _direct_column_forward,
                 RowParallelLinear: _direct_row_forward,
                 VocabParallelEmbedding: _direct_embedding_forward}

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self.linears = [m for m in model.modules() if enabled and self._qualifies(m)]
        self._installed: list[torch.nn.Module] = []

    @classmethod
    def _qualifies(cls, module: torch.nn.Module) -> bool:
        if type(module) not in cls._FORWARDS:
            return False  # a subclass may have its own forward
        group = getattr(module, "tp_group", None)
        if group is None or group.size() != 1:
            return False
        if isinstance(module, VocabParallelEmbedding):
            return not module.reduce_scatter_embeddings
        return (not module.sequence_parallel
                and not getattr(module, "explicit_expert_comm", False)
                and not module.config.defer_embedding_wgrad_compute)

    def install(self) -> None:
        # A forward already set on the instance (someone else's wrapper) stays.
        self._installed = [m for m in self.linears if "forward" not in m.__dict__]
        for module in self._installed:
            module.forward = types.MethodType(self._FORWARDS[type(module)], module)

    def remove(self) -> None:
        for module in self._installed:
            module.__dict__.pop("forward", None)
        self._installed = []


class CacheState(NamedTuple):
    """One set of rollouts' decode state: KV cache (with its sequence offset), positions
    ``[..., rows, max_seq]`` and decode mask ``[rows, 1, 1, max_seq]``."""

    context: StaticInferenceContext
    positions: Optional[torch.Tensor]
    decode_mask: Optional[torch.Tensor]


def _vocab_size(model: torch.nn.Module) -> int:
    language_model = getattr(model, "language_model", model)
    return language_model.vocab_size


class RolloutModelAdapter(AbstractModelInferenceWrapper, abc.ABC):
    """prefill(prompts) -> last-token logits; decode(tokens) -> next logits, over a KV cache.

    Subclasses say how a model takes its inputs: ``prompt_positions`` (positions of the prompt
    tokens and the first generated position), ``position_ids_for`` (what the model's forward
    takes for a window of the cache) and, when the model is not a plain GPTModel, ``_forward``.
    Logits are returned on the last pipeline stage only (None elsewhere), ``[rows, vocab]``.

    Args:
        model: this rank's model chunk (possibly DDP / Float16Module wrapped).
        pg_collection: process groups (default: megatron-core's ``parallel_state``).
        cache_rotated_keys: cache keys after rotary (see the module doc).
        attention_backend: ``"sdpa"`` (default) or ``"model"`` (the model's own core attention).
        direct_linears: run TP = 1 parallel linears without the autograd Function (see the
            module doc; the rollouts are bit-identical either way).
    """

    def __init__(self, model: torch.nn.Module, pg_collection=None,
                 cache_rotated_keys: bool = True, attention_backend: str = "sdpa",
                 direct_linears: bool = True):
        if attention_backend not in ("sdpa", "model"):
            raise ValueError(f"attention_backend must be 'sdpa' or 'model', got "
                             f"{attention_backend!r}")
        config = get_model_config(model)
        wrapper_config = InferenceWrapperConfig(
            hidden_size=config.hidden_size,
            params_dtype=config.params_dtype,
            # -1: always the single-batch pipeline path; the micro-batched one slices tokens and
            # positions along dim 0, which is wrong for per-sample masks and [3, b, s] positions.
            inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=_vocab_size(unwrap_model(model)),
            fp32_residual_connection=config.fp32_residual_connection,
        )
        super().__init__(model, wrapper_config, StaticInferenceContext(1, 1), pg_collection)
        self.attention_backend = attention_backend
        # megatron-core's flash-decode path has its own rotated cache and kernel; leave it alone.
        self._attention = RolloutAttention(
            model, cache_rotated_keys=cache_rotated_keys and not config.flash_decode,
            sdpa=attention_backend == "sdpa" and not config.flash_decode)
        self._linears = _DirectLinears(model, direct_linears)
        self._was_training: Optional[bool] = None  # the model's mode before prefill
        self._positions: Optional[torch.Tensor] = None  # [..., rows, max_seq]
        self._rollout_rows: Optional[torch.Tensor] = None  # prompt row of each rollout
        # The layers' decode mask over the whole cache, [rows, 1, 1, max_seq]: built once, each
        # step takes its first `end` columns.
        self._decode_mask: Optional[torch.Tensor] = None

    # -- per-model hooks -------------------------------------------------------------------------

    @abc.abstractmethod
    def prompt_positions(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the prompt tokens ``[..., B, P]`` and each prompt's first generated
        position ``[B]`` (generated token ``k`` sits at that position + k)."""

    @abc.abstractmethod
    def position_ids_for(self, positions: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """The ``position_ids`` the forward takes for cache window ``[start, end)``."""

    def prefill_extras(self, batch: PromptBatch) -> dict[str, Any]:
        """Model inputs besides tokens/positions/mask that only the prefill takes (images)."""
        if batch.pixel_values is not None:
            raise ValueError(f"{type(self).__name__} takes no images; use the Qwen-VL adapter")
        return {}

    # -- the engine's interface ------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_last_stage(self) -> bool:
        return self.pp_group.rank() == self.pp_group.size() - 1

    def prefill(self, batch: PromptBatch, num_samples: int,
                max_new_tokens: int) -> Optional[torch.Tensor]:
        """Prefill ``B`` left-padded prompts once, replicate the cache for ``num_samples`` rollouts
        per prompt (rows ``b*G .. b*G+G-1`` belong to prompt ``b``) and return the logits that
        predict each rollout's first token, ``[B*G, vocab]`` (last stage; None elsewhere)."""
        inputs = self.prefill_inputs(batch, num_samples, max_new_tokens)
        return self.prefill_logits(self.run_one_forward_step(inputs))

    def decode(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Feed one token per rollout ``[B*G]``; the logits of the next, ``[B*G, vocab]`` on the
        last stage (None elsewhere)."""
        logits = self.run_one_forward_step(self.decode_inputs(tokens))
        return None if logits is None else logits[:, -1]

    # The steps of ``prefill`` and ``decode`` for a caller that moves activations between pipeline
    # stages itself (the pipelined decode of ``MegatronRolloutEngine``): inputs, this stage's
    # forward (``stage_forward``), outputs. ``state`` / ``load_state`` switch between the caches of
    # several sets of rollouts.

    def prefill_inputs(self, batch: PromptBatch, num_samples: int,
                       max_new_tokens: int) -> dict[str, Any]:
        """A fresh KV cache for ``batch`` (the current state) and the prefill's model inputs."""
        b, p = batch.input_ids.shape
        if self.attention_backend == "model":
            self._check_model_attention_supported(padded=bool((~batch.attention_mask).any()))
        # B rows: ``select_rows`` makes the B·G-row cache after the prefill (allocating B·G here
        # would hold a second, mostly empty cache of the decode's size through the prefill).
        self.inference_context = StaticInferenceContext(b, p + max_new_tokens)
        self._open()

        prompt_pos, next_pos = self.prompt_positions(batch)
        gen_pos = next_pos[:, None] + torch.arange(max_new_tokens, device=next_pos.device)  # [B, N]
        positions = torch.cat([prompt_pos, gen_pos.expand(*prompt_pos.shape[:-1], -1)], dim=-1)
        generated_valid = batch.attention_mask.new_ones(b, max_new_tokens)
        key_valid = torch.cat([batch.attention_mask, generated_valid], dim=1)  # [B, P + N]
        self._positions = positions
        self._decode_mask = self._layer_mask(~key_valid[:, None, None, :])
        self._rollout_rows = torch.arange(b, device=batch.input_ids.device).repeat_interleave(
            num_samples)
        return {
            "tokens": batch.input_ids,
            "position_ids": self.position_ids_for(positions, 0, p),
            "attention_mask": self._layer_mask(_causal_valid_mask(batch.attention_mask)),
            **self.prefill_extras(batch),
        }

    def prefill_logits(self, logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """After the prefill's forward: the cache replicated for the rollouts, decode mode on,
        and the logits of each rollout's first token (last stage; None elsewhere)."""
        rollout_rows, self._rollout_rows = self._rollout_rows, None
        if len(rollout_rows) != self.inference_context.max_batch_size:
            self.select_rows(rollout_rows)
        self.inference_context.enable_decode_mode()
        if logits is None:
            return None
        return logits[:, -1].index_select(0, rollout_rows.to(logits.device))

    def decode_inputs(self, tokens: torch.Tensor) -> dict[str, Any]:
        """The model inputs of a decode step feeding ``tokens`` ``[rows]``."""
        start = self.inference_context.sequence_len_offset
        end = start + 1
        return {
            "tokens": tokens[:, None],
            "position_ids": self.position_ids_for(self._positions, start, end),
            "attention_mask": self._decode_mask[..., :end],
        }

    def recv_buffer_for(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The buffer this stage receives ``inputs``' activations in from the previous stage."""
        return self._allocate_recv_buffer(*inputs["tokens"].shape)

    def stage_forward(self, inputs: dict[str, Any],
                      received: Optional[torch.Tensor]) -> torch.Tensor:
        """This stage's forward of ``inputs`` (``received``: the previous stage's activations,
        None on the first stage), advancing the cache: the activations to send on, or the logits
        ``[b, s, vocab]`` on the last stage. ``run_one_forward_step`` without the communication."""
        get_attr_wrapped_model(self.model, "set_input_tensor")(received)
        output = self._forward(inputs)
        self.inference_context.increment_sequence_len_offset(inputs["tokens"].shape[1])
        if self.is_last_stage:
            return output.to(self.inference_wrapper_config.params_dtype)
        return output.type(dtype=self.pipeline_communication_dtype)

    def state(self) -> CacheState:
        """The current rollouts' KV cache, positions and decode mask."""
        return CacheState(self.inference_context, self._positions, self._decode_mask)

    def load_state(self, state: CacheState) -> None:
        """Make ``state`` (from ``state()``) the current one."""
        self.inference_context, self._positions, self._decode_mask = state

    def select_rows(self, rows: torch.Tensor) -> None:
        """Decode rows ``rows`` of the current batch from now on, in that order (repeats
        allowed): each prompt's row once per rollout after the prefill, the unfinished rollouts
        later. KV cache, positions and masks follow; ``decode`` then takes ``len(rows)`` tokens.
        """
        rows = rows.to(self.device)
        if self.inference_context.key_value_memory_dict:
            self._attention.select_cache_rows(self.inference_context, rows)
        self._positions = self._positions.index_select(-2, rows.to(self._positions.device))
        self._decode_mask = self._decode_mask.index_select(0, rows.to(self._decode_mask.device))

    def release(self) -> None:
        """Free the KV cache and give the model back in the mode it was in."""
        self.inference_context = StaticInferenceContext(1, 1)
        self._positions = self._decode_mask = self._rollout_rows = None
        if self._was_training is not None:
            self._attention.remove()
            self._linears.remove()
            self.model.train(self._was_training)
            self._was_training = None

    def _open(self) -> None:
        """Eval mode and the rollout attention path, until ``release`` (once per generation,
        however many prefills it runs)."""
        if self._was_training is not None:
            return
        self._was_training = self.model.training
        self.prep_model_for_inference()  # eval mode
        self._attention.install()
        self._linears.install()


    # megatron-core's TextGenerationController protocol; the rollout engine calls prefill/decode.

    def prep_inference_input(self, prompts_tokens):
        raise NotImplementedError(f"{type(self).__name__} is driven by MegatronRolloutEngine "
                                  f"(prefill/decode), not by megatron-core's text controller")

    def get_batch_for_context_window(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is driven by MegatronRolloutEngine "
                                  f"(prefill/decode), not by megatron-core's text controller")

    # -- helpers ---------------------------------------------------------------------------------

    def _layer_mask(self, masked: torch.Tensor) -> torch.Tensor:
        """The mask the layers get: bool (True = masked) for the model's own attention, additive
        for SDPA (converted once, not once per layer)."""
        if self._attention.sdpa:
            return additive_mask(masked, get_model_config(self.model).params_dtype)
        return masked

    def _check_model_attention_supported(self, padded: bool) -> None:
        for module in self.model.modules():
            core = getattr(module, "core_attention", None)
            if core is None:
                continue
            if any(c.__name__ == "TEDotProductAttention" for c in type(core).__mro__):
                # Its mask argument is a [b, 1, 1, s] padding mask under padding_causal; the
                # decode path hands core attentions the [b, 1, s, s] causal one.
                raise NotImplementedError(
                    f"attention_backend='model' with TransformerEngine's core attention "
                    f"({type(core).__name__}) is not supported; use attention_backend='sdpa' "
                    f"(the default) or the local layer spec")
            if padded and not isinstance(core, DotProductAttention):
                raise NotImplementedError(
                    f"rollouts of prompts of different lengths need the key-padding mask at every "
                    f"decode step, which megatron-core 0.16 does not give {type(core).__name__} "
                    f"(it switches attn_mask_type to no_mask after prefill); use "
                    f"attention_backend='sdpa', the local layer spec, or prompts of equal length")


class GPTRolloutAdapter(RolloutModelAdapter):
    """A megatron-core ``GPTModel`` (rope or learned absolute positions).

    ``position_ids`` ``[b, q]`` count valid tokens (only learned absolute embeddings read them;
    rope rotates by cache index, see the module doc).
    """

    def prompt_positions(self, batch):
        valid = batch.attention_mask.long()
        positions = (valid.cumsum(dim=1) - 1).clamp(min=0)  # [B, P]
        return positions, valid.sum(dim=1)

    def position_ids_for(self, positions, start, end):
        return positions[:, start:end]


class QwenVLRolloutAdapter(RolloutModelAdapter):
    """``QwenVLModel`` (``megatron_ease.models.qwen_vl``): vision tower on stage 0, mrope.

    The prefill embeds the prompts with the image features written over the image tokens
    (``QwenVLModel.embed``: the tower runs once per prompt image); decode steps embed text tokens
    only. mrope positions ``[3, b, s]`` come from ``QwenVLModel.position_ids`` (HF
    ``get_rope_index``, padding-independent); generated token ``k`` of a prompt sits at
    ``max(prompt positions) + 1 + k`` in all three rows. With rotated keys cached a step rotates
    only its own queries and keys, so it passes only its own positions (a decode step one: the
    mrope table is rebuilt from the positions at every step, and over the whole prefix that cost
    as much as the step at real sizes); megatron-core's own static path slices the table by
    cache index (queries ``[start, end)``, keys ``[0, end)``), so there every step passes the
    positions of the whole prefix. Under pipeline parallelism a Qwen3-VL prefill with
    images sends DeepStack levels across stages ahead of the layers that add them, so the receive
    buffer takes the stage's ``input_hidden_size`` instead of megatron-core's ``hidden_size``.
    """

    def __init__(self, model: torch.nn.Module, pg_collection=None, **options):
        super().__init__(model, pg_collection, **options)
        self._with_images = False  # the step being run embeds images (prefill of image prompts)

    def _embeds_images(self, inputs) -> bool:
        return unwrap_model(self.model).has_images(inputs.get("pixel_values"),
                                                   inputs.get("image_grid_thw"))

    def run_one_forward_step(self, inference_input, recv_buffer_seq_len=None):
        self._with_images = self._embeds_images(inference_input)
        return super().run_one_forward_step(inference_input, recv_buffer_seq_len)

    def recv_buffer_for(self, inputs):
        self._with_images = self._embeds_images(inputs)
        return super().recv_buffer_for(inputs)

    def _allocate_recv_buffer(self, batch_size, seq_len):
        """megatron-core receives ``[s, b, hidden_size]``; a Qwen3-VL stage that precedes a
        DeepStack layer sends the levels packed after the hidden states, ``[s, b, (1 + l) h]``,
        when the step embeds images (``QwenVLModel.input_hidden_size``)."""
        width = unwrap_model(self.model).input_hidden_size(self._with_images)
        return torch.empty((seq_len, batch_size, width), dtype=self.pipeline_communication_dtype,
                           device=self.device)

    def prompt_positions(self, batch):
        model = unwrap_model(self.model)
        positions = model.position_ids(batch.input_ids, batch.image_grid_thw,
                                       batch.attention_mask)  # [3, B, P]
        masked = positions.masked_fill(~batch.attention_mask[None], -1)
        return positions, masked.amax(dim=(0, 2)) + 1

    def position_ids_for(self, positions, start, end):
        if self._attention.cache_rotated_keys:
            return positions[..., start:end]
        return positions[..., :end]

    def prefill_extras(self, batch):
        return {"pixel_values": batch.pixel_values, "image_grid_thw": batch.image_grid_thw}

    def _forward(self, inference_input):
        model = unwrap_model(self.model)
        tokens = inference_input["tokens"]
        decoder_input = None
        if model.pre_process and "pixel_values" in inference_input:
            decoder_input = model.embed(tokens, inference_input["pixel_values"],
                                        inference_input["image_grid_thw"])  # [s, b, h]
        return model.language_model(
            tokens, inference_input["position_ids"], inference_input["attention_mask"],
            decoder_input=decoder_input, inference_context=self.inference_context,
            runtime_gather_output=True)


def rollout_adapter_for(model: torch.nn.Module, pg_collection=None,
                        **options) -> RolloutModelAdapter:
    """The adapter of a (possibly DDP/Float16-wrapped) model: Qwen-VL or a plain GPTModel.
    ``options``: ``cache_rotated_keys``, ``attention_backend``, ``direct_linears`` (see
    ``RolloutModelAdapter``)."""
    from megatron.core.models.gpt import GPTModel

    inner = unwrap_model(model)
    if hasattr(inner, "vision_model") and hasattr(inner, "language_model"):
        return QwenVLRolloutAdapter(model, pg_collection, **options)
    if isinstance(inner, GPTModel):
        return GPTRolloutAdapter(model, pg_collection, **options)
    raise TypeError(f"no rollout adapter for {type(inner).__name__}: write a "
                    f"RolloutModelAdapter subclass (prompt_positions, position_ids_for, _forward)")
