"""Qwen2.5-VL / Qwen3-VL on megatron-core: HF vision tower (stage 0) + megatron-core GPTModel.

    model = build_qwen_vl_model(cfg.model, cfg.parallel)
    logits = model(input_ids, attention_mask=valid, pixel_values=px, image_grid_thw=grids)
    # last stage: [b, s, vocab / TP] vocab-parallel logits; other stages: [s, b, h] hidden states

Forward, on every pipeline stage:

1. mrope positions ``[3, b, s]`` from ``input_ids``, ``image_grid_thw`` and the valid mask
   (``rope.get_rope_index``), unless given;
2. stage 0 only: token embeddings ``[s, b, h]``, the vision tower's merged features written over
   the image-token positions (``image_token_mask``), in batch-major token order like HF; for
   Qwen3-VL the DeepStack levels are packed after them along the hidden dimension
   (``[s, b, (1 + L) h]``, consumed by the first ``L`` layers: ``deepstack.py``);
3. the attention mask for the layer spec (``attention_mask_for``), then megatron-core's GPTModel
   with ``decoder_input`` on stage 0 and the pipeline's input tensor elsewhere
   (``set_input_tensor``, as megatron-core's schedules call it).

Rotary: megatron-core's ``MultimodalRotaryEmbedding`` (contiguous mrope sections, Qwen2.5-VL) or,
with ``model.mrope_interleaved`` (Qwen3-VL), ``InterleavedMultimodalRotaryEmbedding``
(``rotary.py``), installed as the GPT model's ``rotary_pos_emb``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ease.config import ModelConfig, ParallelConfig
from megatron_ease.models.qwen_vl.deepstack import pack_deepstack, scatter_deepstack_levels
from megatron_ease.models.qwen_vl.rope import get_rope_index, image_token_mask
from megatron_ease.models.qwen_vl.rotary import InterleavedMultimodalRotaryEmbedding
from megatron_ease.models.qwen_vl.specs import (
    AttentionOverride,
    qwen_vl_block_spec,
    qwen_vl_layer_specs,
    spec_attention_mask_type,
)
from megatron_ease.models.qwen_vl.transformer_config import (
    qwen_vl_transformer_config,
    resolve_model_config,
)
from megatron_ease.models.qwen_vl.vision import (
    build_vision_tower,
    image_rows,
    vision_features,
)


def attention_mask_for(valid_mask: Optional[torch.Tensor], batch: int, seq_len: int,
                       mask_type: AttnMaskType, device=None) -> torch.Tensor:
    """The attention mask a layer spec expects, True = masked.

    ``causal`` (local spec): ``[b, 1, s, s]``, causal and key padding in one mask (megatron-core's
    local attention applies the mask it is given), any padding layout. ``padding_causal`` (TE
    spec): ``[b, 1, 1, s]`` key padding; the kernel adds the causal part. TransformerEngine reads
    only each row's count of valid tokens from that mask (``cu_seqlens``) and takes them to be the
    row's first columns, so its rows must be right-padded: any other layout (left padding, holes)
    is refused here rather than attended wrongly.
    """
    valid = (torch.ones(batch, seq_len, dtype=torch.bool, device=device) if valid_mask is None
             else valid_mask.to(device=device, dtype=torch.bool))
    if mask_type == AttnMaskType.padding_causal:
        if valid_mask is not None:
            _check_right_padded(valid)
        return ~valid[:, None, None, :]
    if mask_type == AttnMaskType.causal:
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=valid.device).tril()
        return ~(causal[None, None] & valid[:, None, None, :])
    raise ValueError(f"unsupported attn_mask_type {mask_type} for the Qwen-VL layer spec")


def _check_right_padded(valid: torch.Tensor) -> None:
    """Every row's valid tokens are a prefix of it (what TransformerEngine's padding masks mean)."""
    later = valid[:, 1:] & ~valid[:, :-1]  # a valid token right after padding
    if bool(later.any()):
        rows = later.any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {rows} of the attention mask have padding before a real token (left padding?): "
            f"the TransformerEngine layer spec (attn_mask_type padding_causal) treats the first "
            f"mask.sum() columns of each row as its tokens, so it takes right-padded rows only. "
            f"Right-pad the batch (mrope positions do not depend on the padding side), or build "
            f"the model with use_te=False")


class QwenVLModel(MegatronModule):
    """Vision tower (``vision_model``, stage 0 only) + language model (``language_model``)."""

    def __init__(self, config: TransformerConfig, model_cfg: ModelConfig,
                 block_spec: TransformerBlockSubmodules, pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None,
                 initialize_vision: bool = True, split_images_over_tp: bool = False):
        super().__init__(config=config)
        self.model_cfg = model_cfg
        # Each TP rank encodes a share of the images, all-gathered (vision.vision_features).
        self.split_images_over_tp = split_images_over_tp
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules
        self.share_embeddings_and_output_weights = model_cfg.tie_word_embeddings
        self.attn_mask_type = spec_attention_mask_type(block_spec)
        # Built before the language model so its random init draws the same numbers on every
        # TP rank (the language model's TP-sharded init advances the generators differently).
        self.vision_model = (build_vision_tower(model_cfg, config.params_dtype, initialize_vision)
                             if pre_process else None)
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec,
            vocab_size=model_cfg.vocab_size,
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=model_cfg.rope_theta,
            # Image features are written into the full sequence before any scatter.
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        if model_cfg.mrope_interleaved:
            self.language_model.rotary_pos_emb = InterleavedMultimodalRotaryEmbedding(
                kv_channels=config.kv_channels, rotary_base=model_cfg.rope_theta)

    # -- megatron-core model protocol -------------------------------------------------------------

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        """For ``finalize_model_grads``' tied-embedding all-reduce."""
        return self.language_model.shared_embedding_or_output_weight()

    def input_hidden_size(self, with_images: bool) -> int:
        """Width of the hidden states this stage takes in (from ``embed`` on the first stage,
        from the previous stage otherwise): ``h``, or ``(1 + l) h`` for a batch with images while
        ``l`` DeepStack levels remain for this stage's layers and later ones (``deepstack.py``).
        For code that preallocates pipeline receive buffers (megatron-core's inference wrappers
        use ``h``)."""
        levels = len(self.model_cfg.vision.deepstack_visual_indexes)
        layers = self.language_model.decoder.layers
        first = layers[0].layer_number - 1 if len(layers) else self.config.num_layers
        remaining = max(0, levels - first) if with_images else 0
        return (1 + remaining) * self.config.hidden_size

    # -- inputs -----------------------------------------------------------------------------------

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` bool: the positions that receive image features (the EASE image columns)."""
        return image_token_mask(input_ids, self.model_cfg.image_token_id)

    def position_ids(self, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                     attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[3, b, s]`` mrope positions (HF ``get_rope_index`` semantics)."""
        return get_rope_index(input_ids, image_grid_thw, attention_mask,
                              spatial_merge_size=self.model_cfg.vision.spatial_merge_size,
                              image_token_id=self.model_cfg.image_token_id)[0]

    @staticmethod
    def has_images(pixel_values: Optional[torch.Tensor],
                   image_grid_thw: Optional[torch.Tensor]) -> bool:
        """Whether a step embeds images: not when none are given, nor for an empty set (text-only
        sequences, which the tower cannot encode: it raised inside HF's code). One predicate for
        ``embed`` and for the pipeline's receive width (``input_hidden_size``): a stage that
        counted an empty set as images received DeepStack-wide buffers that stage 0 never sent
        (garbage rollouts, no error)."""
        return pixel_values is not None and not (image_grid_thw is not None
                                                 and image_grid_thw.shape[0] == 0)

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_grid_thw: Optional[torch.Tensor] = None,
              image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Stage 0: ``[s, b, h]`` token embeddings with image features at image-token positions.

        With DeepStack (Qwen3-VL) and images: ``[s, b, (1 + L) h]``, the ``L`` levels packed after
        the embeddings (``deepstack.py``); pass it on as ``decoder_input`` unchanged.
        ``image_ids``: see ``forward``.
        """
        if not self.pre_process:
            raise RuntimeError("embed() runs on the first pipeline stage only")
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        image_mask = self.image_token_mask(input_ids)  # [b, s]
        num_tokens = int(image_mask.sum())
        if not self.has_images(pixel_values, image_grid_thw):
            if num_tokens:
                raise ValueError(f"input_ids hold {num_tokens} image tokens but no pixel_values "
                                 f"were given")
            return embeddings
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        tp_group = None
        if self.split_images_over_tp and parallel_state.get_tensor_model_parallel_world_size() > 1:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        features, deepstack = vision_features(self.vision_model, pixel_values, image_grid_thw,
                                              tp_group)  # [n, h], L x [n, h]
        if image_ids is not None:  # each encoded image's features at each of its slots
            index = self._image_slot_token_index(image_grid_thw, image_ids).to(features.device)
            features, deepstack = features[index], [level[index] for level in deepstack]
        if features.shape[0] != num_tokens:
            raise ValueError(f"the images give {features.shape[0]} features (image_grid_thw "
                             f"{image_grid_thw.tolist()}) but input_ids hold {num_tokens} image "
                             f"tokens (id {self.model_cfg.image_token_id})")
        batch_idx, seq_idx = image_mask.nonzero(as_tuple=True)  # batch-major, like HF's scatter
        levels = scatter_deepstack_levels(deepstack, seq_idx, batch_idx, embeddings)
        embeddings = embeddings.index_put((seq_idx, batch_idx), features.to(embeddings.dtype))
        return pack_deepstack(embeddings, levels)  # [s, b, (1 + L) h]

    def _image_slot_token_index(self, image_grid_thw: torch.Tensor,
                                image_ids: torch.Tensor) -> torch.Tensor:
        """``[tokens of all slots]``: rows of the encoded images' features, slot by slot."""
        if image_ids.dim() != 1 or (image_ids.numel() and (
                int(image_ids.min()) < 0 or int(image_ids.max()) >= image_grid_thw.shape[0])):
            raise ValueError(f"image_ids must index the {image_grid_thw.shape[0]} encoded images "
                             f"(image_grid_thw rows), got {image_ids.tolist()}")
        merge = self.model_cfg.vision.spatial_merge_size
        tokens = (image_grid_thw.prod(dim=-1) // merge**2).tolist()
        return image_rows(tokens, image_ids.tolist())

    @staticmethod
    def slot_grids(image_grid_thw: Optional[torch.Tensor],
                   image_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``[num_slots, 3]``: the grid of each image slot of the batch, in batch order."""
        if image_grid_thw is None or image_ids is None:
            return image_grid_thw
        return image_grid_thw[image_ids.to(image_grid_thw.device)]

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        decoder_input: Optional[torch.Tensor] = None,
        extra_block_kwargs: Optional[dict] = None,
        runtime_gather_output: Optional[bool] = None,
        image_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run this stage.

        Args:
            input_ids: ``[b, s]`` token ids (every stage: positions derive from them).
            position_ids: ``[3, b, s]`` mrope positions; None = derived here.
            attention_mask: ``[b, s]`` bool valid-token mask (True = real token); None = no
                padding. The layers get ``attention_mask_for`` of it: any padding side with the
                local layer spec, right padding only with TransformerEngine's (others raise).
            pixel_values: ``[num_patches, C*T*P*P]`` patches of all images (stage 0).
            image_grid_thw: ``[num_images, 3]`` patch grids, batch order.
            labels: ``[b, s]``; when given, the last stage returns per-token ``-log p`` ``[b, s]``
                (megatron-core's vocab-parallel cross entropy) instead of logits.
            decoder_input: precomputed stage-0 ``embed`` output (``[s, b, h]``, or packed with
                DeepStack levels).
            extra_block_kwargs: passed to megatron's ``TransformerBlock.forward``.
            runtime_gather_output: gather the vocab-parallel logits over TP (megatron-core).
            image_ids: ``[num_slots]`` which image of ``pixel_values`` / ``image_grid_thw`` fills
                each image slot of the batch (batch order), so an image that several sequences
                share (the G rollouts of one prompt) is encoded once; None = the images are the
                slots, in order. Gradients are those of encoding every slot's image separately.

        Returns:
            Last stage: ``[b, s, vocab / TP]`` logits (or ``[b, s]`` losses with labels).
            Other stages: ``[s, b, h]`` hidden states for the next stage (``[s, b, (1 + l) h]``
            while ``l`` DeepStack levels are still to be added on later stages).
        """
        batch, seq_len = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be the [b, s] valid-token mask "
                             f"{list(input_ids.shape)}, got {list(attention_mask.shape)}")
        if position_ids is None:
            position_ids = self.position_ids(input_ids, self.slot_grids(image_grid_thw, image_ids),
                                             attention_mask)
        if self.pre_process and decoder_input is None:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, image_ids)
        layer_mask = attention_mask_for(attention_mask, batch, seq_len, self.attn_mask_type,
                                        device=input_ids.device)
        return self.language_model(
            input_ids, position_ids, layer_mask, decoder_input=decoder_input, labels=labels,
            extra_block_kwargs=extra_block_kwargs, runtime_gather_output=runtime_gather_output)


def build_qwen_vl_model(
    model_cfg: ModelConfig,
    parallel_cfg: Optional[ParallelConfig] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    attention_override: Optional[AttentionOverride] = None,
    override_layers: Sequence[int] = (),
    use_te: Optional[bool] = None,
    params_dtype: Optional[torch.dtype] = None,
    perform_initialization: bool = True,
) -> QwenVLModel:
    """This rank's model chunk (megatron-core process groups must be initialised).

    Args:
        model_cfg: sizes (replaced by ``model_cfg.hf_config``'s when set).
        parallel_cfg: TP/PP sizes (must match the process groups) and
            ``first_pipeline_stage_layers``.
        pre_process / post_process: first / last pipeline stage; None = from ``parallel_state``.
        vp_stage: virtual pipeline chunk index.
        attention_override, override_layers: another self-attention spec at these 0-based
            layers (``qwen_vl_layer_specs``), e.g. EASE's capturing attention.
        use_te: TransformerEngine layer spec; None = when TE imports.
        params_dtype: default bf16 if ``model_cfg.bf16`` else fp32.
        perform_initialization: False skips random init (weights are loaded next; use it with
            ``torch.device("meta")`` to build a model without memory).
    """
    model_cfg = resolve_model_config(model_cfg)
    config = qwen_vl_transformer_config(model_cfg, parallel_cfg, params_dtype=params_dtype,
                                        perform_initialization=perform_initialization)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    layer_specs = qwen_vl_layer_specs(
        config, use_te, attention_override, override_layers,
        num_deepstack_levels=len(model_cfg.vision.deepstack_visual_indexes))
    block_spec = qwen_vl_block_spec(config, layer_specs, use_te, vp_stage=vp_stage)
    model = QwenVLModel(config, model_cfg, block_spec, pre_process, post_process, vp_stage,
                        initialize_vision=perform_initialization,
                        split_images_over_tp=getattr(parallel_cfg, "split_images_over_tp", False))
    if config.params_dtype != torch.float32:
        # megatron-core's torch norms (local specs) build float32 weights whatever params_dtype;
        # Megatron-LM casts the whole model (Float16Module). Its mixed-precision optimizer maps
        # optimizer state to checkpoint tensors by position among the low-precision parameters,
        # so one float32 weight misaligns every tensor after it. Buffers (rotary inv_freq) stay.
        for param in model.parameters():
            if param.dtype == torch.float32:
                param.data = param.data.to(config.params_dtype)
    if not config.use_cpu_initialization and not any(p.is_meta for p in model.parameters()):
        # As megatron-core's trainers do after building: its parallel layers are allocated on the
        # current GPU already, but torch norms, the HF vision tower and some buffers are not.
        model.cuda(torch.cuda.current_device())
    if not perform_initialization:
        _set_tensor_parallel_attributes(model)
    return model


def _set_tensor_parallel_attributes(model: torch.nn.Module) -> None:
    """megatron-core (0.16) marks the weights of its parallel layers as TP-sharded inside their
    random init, so ``perform_initialization=False`` leaves them unmarked; grad-norm dedup,
    ``finalize_model_grads`` and the weight loader all read the marks."""
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
            set_tensor_model_parallel_attributes(weight, True, 0, 1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, 1)
