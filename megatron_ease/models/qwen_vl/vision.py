"""The Qwen2.5-VL vision tower: HF's module, replicated over tensor-parallel ranks.

The tower (Conv3d patch embed with temporal patch 2, 2D rotary, window attention with full
attention at ``fullatt_block_indexes``, RMSNorm, SwiGLU, 2x2 patch merger) is transformers'
``Qwen2_5_VisionTransformerPretrainedModel``, as Megatron-Bridge and ms-swift do:

- exact parity with HF for free, including the window permutation and its inverse;
- it is small next to the language model (0.67B of 8.3B for 7B), runs once per image on pipeline
  stage 0 only, and its sequence is the patch count, so TP-sharding it would buy little and cost
  a second implementation to keep equal to HF's.

Replicated over TP, each rank computes the same features. Its gradients are the same on every TP
rank as well: the decoder input's gradient is all-reduced by the first column-parallel linear, so
it is complete on every rank. Parameters are still marked ``average_gradients_across_tp_domain``
(megatron-core's ``finalize_model_grads`` then averages them over TP, as its own HuggingFaceModule
does) so replicas cannot drift through non-deterministic GPU kernels.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_ease.config import ModelConfig
from megatron_ease.models.qwen_vl.hf_config import hf_vision_config


def build_vision_tower(model_cfg: ModelConfig, dtype: torch.dtype, initialize: bool = True,
                       attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The tower in ``dtype``; ``initialize=False`` skips HF's random init (weights get loaded)."""
    from transformers.initialization import no_init_weights
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    config = hf_vision_config(model_cfg)
    config._attn_implementation = attn_implementation
    with contextlib.nullcontext() if initialize else no_init_weights():
        tower = Qwen2_5_VisionTransformerPretrainedModel(config)
    for param in tower.parameters():
        # Parameters only: the rotary inv_freq buffer stays float32, as in HF's bf16 models.
        param.data = param.data.to(dtype)
        param.average_gradients_across_tp_domain = True
        param.requires_grad_(not model_cfg.freeze_vision)
    return tower


def vision_features(tower: torch.nn.Module, pixel_values: torch.Tensor,
                    image_grid_thw: torch.Tensor) -> torch.Tensor:
    """``[num_image_tokens, out_hidden]`` merged features of all images, in batch order.

    ``pixel_values`` is the processor's ``[num_patches, C * T * P * P]`` patch matrix.
    """
    dtype = next(tower.parameters()).dtype
    return tower(pixel_values.to(dtype), grid_thw=image_grid_thw).pooler_output
