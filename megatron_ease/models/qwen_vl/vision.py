"""The Qwen-VL vision towers: HF's modules, replicated over tensor-parallel ranks.

- Qwen2.5-VL: transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (Conv3d patch embed with
  temporal patch 2, 2D rotary, window attention with full attention at ``fullatt_block_indexes``,
  RMSNorm, SwiGLU, 2x2 patch merger).
- Qwen3-VL: transformers' ``Qwen3VLVisionModel`` (patch 16, learned position embeddings
  bilinearly interpolated to each image's grid plus 2D rotary, LayerNorm + GELU blocks, the 2x2
  merger, and one DeepStack merger per ``deepstack_visual_indexes`` block whose outputs feed the
  first decoder layers; see ``deepstack.py``).

HF's modules, as Megatron-Bridge and ms-swift do:

- exact parity with HF for free (window permutation, position-embedding interpolation);
- a tower is small next to the language model (0.67B of 8.3B for Qwen2.5-VL-7B, 0.58B of 8.8B
  for Qwen3-VL-8B), runs once per image on pipeline stage 0 only, and its sequence is the patch
  count, so TP-sharding it would buy little and cost a second implementation to keep equal to HF's.

Replicated over TP, each rank computes the same features. Its gradients are the same on every TP
rank as well: the decoder input's gradient is all-reduced by the first column-parallel linear, so
it is complete on every rank (DeepStack features join the hidden states of the first layers,
whose inputs' gradients are all-reduced the same way). Parameters are still marked
``average_gradients_across_tp_domain`` (megatron-core's ``finalize_model_grads`` then averages
them over TP, as its own HuggingFaceModule does) so replicas cannot drift through
non-deterministic GPU kernels.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch

from megatron_ease.config import ModelConfig
from megatron_ease.models.qwen_vl.hf_config import UnsupportedModelError, hf_vision_config


class VisionFeatures(NamedTuple):
    merged: torch.Tensor  # [num_image_tokens, out_hidden]: written over the image tokens
    deepstack: list[torch.Tensor]  # per DeepStack level, [num_image_tokens, out_hidden]; [] if none


def _tower_class(family: str):
    if family == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        return Qwen3VLVisionModel
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        return Qwen2_5_VisionTransformerPretrainedModel
    raise UnsupportedModelError(f"model.family {family!r} has no vision tower")


def default_attn_implementation(dtype: torch.dtype) -> str:
    """``flash_attention_2`` for a bf16/fp16 tower on a CUDA node with flash-attn installed
    (flash-attn takes no float32), else ``sdpa``.

    HF's towers run their window and per-image attention as one varlen call (``cu_seqlens``)
    only with flash attention; any other implementation loops over the windows in Python, one
    SDPA call each: 64 calls per window layer for a 1024-token image, ~57k per rollout prefill
    of 32 such prompts at 7B. Same math either way.
    """
    from transformers.utils import is_flash_attn_2_available

    if (dtype in (torch.bfloat16, torch.float16) and torch.cuda.is_available()
            and is_flash_attn_2_available()):
        return "flash_attention_2"
    return "sdpa"


def build_vision_tower(model_cfg: ModelConfig, dtype: torch.dtype, initialize: bool = True,
                       attn_implementation: Optional[str] = None) -> torch.nn.Module:
    """The tower in ``dtype``; ``initialize=False`` skips HF's random init (weights get loaded);
    ``attn_implementation``: HF's name, None = ``default_attn_implementation(dtype)``.

    With ``model.recompute_layers`` its blocks recompute their activations in backward too (HF
    gradient checkpointing, non-reentrant): a tower keeps ~65 KiB (Qwen2.5-VL) / ~42 KiB
    (Qwen3-VL) per patch per block in bf16 otherwise, 8 GiB for one 1024-token image of 7B.
    """
    from transformers.initialization import no_init_weights

    config = hf_vision_config(model_cfg)
    config._attn_implementation = attn_implementation or default_attn_implementation(dtype)
    with contextlib.nullcontext() if initialize else no_init_weights():
        tower = _tower_class(model_cfg.family)(config)
    for param in tower.parameters():
        # Parameters only: the rotary inv_freq buffer stays float32, as in HF's bf16 models.
        param.data = param.data.to(dtype)
        param.average_gradients_across_tp_domain = True
        param.requires_grad_(not model_cfg.freeze_vision)
    # A frozen tower keeps no activations for backward: nothing to recompute (and HF's
    # checkpointing would make its output require grad, a backward through it for nothing).
    if model_cfg.recompute_layers and not model_cfg.freeze_vision:
        tower.activation_checkpointing_enable({"use_reentrant": False})
    return tower


def vision_features(tower: torch.nn.Module, pixel_values: torch.Tensor,
                    image_grid_thw: torch.Tensor) -> VisionFeatures:
    """Merged (and DeepStack) features of all images, in batch order.

    ``pixel_values`` is the processor's ``[num_patches, C * T * P * P]`` patch matrix.
    """
    dtype = next(tower.parameters()).dtype
    out = tower(pixel_values.to(dtype), grid_thw=image_grid_thw)
    return VisionFeatures(out.pooler_output, list(getattr(out, "deepstack_features", None) or []))
