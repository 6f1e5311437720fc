"""The Qwen-VL vision towers: HF's modules, replicated over tensor-parallel ranks, each rank
encoding a share of the images.

- Qwen2.5-VL: transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (Conv3d patch embed with
  temporal patch 2, 2D rotary, window attention with full attention at ``fullatt_block_indexes``,
  RMSNorm, SwiGLU, 2x2 patch merger).
- Qwen3-VL: transformers' ``Qwen3VLVisionModel`` (patch 16, learned position embeddings
  bilinearly interpolated to each image's grid plus 2D rotary, LayerNorm + GELU blocks, the 2x2
  merger, and one DeepStack merger per ``deepstack_visual_indexes`` block whose outputs feed the
  first decoder layers; see ``deepstack.py``).

HF's modules, as Megatron-Bridge and ms-swift do:

- exact parity with HF for free (window permutation, position-embedding interpolation);
- TP-sharding the tower's layers would cost a second implementation to keep equal to HF's;
  splitting the images over the TP ranks (below) divides its work without one.

The tower is replicated over TP, but its work is not: the language model's share of a token's
FLOPs is 1/TP per rank while the tower's (four patches per image token) would be whole on every
rank, about 5 GFLOPs per image token against 15 / TP for 7B's language model. So each TP rank
encodes its share of the batch's images (``split_images``: balanced by patch count) and the
features are all-gathered (``vision_features(tp_group=...)``; ``parallel.split_images_over_tp``,
on by default). Gradients: the decoder input's gradient is complete and the same on every TP rank
(the first column-parallel linear all-reduces it; DeepStack features join the hidden states of
the first layers, whose inputs' gradients are all-reduced the same way), so each rank back-
propagates its own images' rows of it through its replica: its tower gradient is its images'
part of the sum. The parameters are marked ``average_gradients_across_tp_domain``
(megatron-core's ``finalize_model_grads`` averages them over TP, as for its own
HuggingFaceModule), and each rank's part is scaled by the TP size on the way back, so the
average is the sum: the gradient of one rank encoding every image. Without the split (every rank
encodes every image) the average of equal replicas keeps them from drifting through
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
                    image_grid_thw: torch.Tensor,
                    tp_group: Optional[torch.distributed.ProcessGroup] = None) -> VisionFeatures:
    """Merged (and DeepStack) features of all images, in batch order.

    ``pixel_values`` is the processor's ``[num_patches, C * T * P * P]`` patch matrix.
    ``tp_group`` (more than one rank): each rank encodes its share of the images
    (``split_images``) and the features are all-gathered (``_GatherImageFeatures``); every rank
    gets all of them, as if it had encoded every image.
    """
    if tp_group is None or tp_group.size() == 1 or image_grid_thw.shape[0] == 0:
        return _encode(tower, pixel_values, image_grid_thw)
    size, rank = tp_group.size(), tp_group.rank()
    patches = image_grid_thw.prod(dim=-1).tolist()
    merge = tower.config.spatial_merge_size
    tokens = [n // merge**2 for n in patches]
    shares = split_images(patches, size)
    levels = _num_deepstack_levels(tower)
    mine = shares[rank]
    if mine:
        rows = image_rows(patches, mine).to(pixel_values.device)
        local = _encode(tower, pixel_values.index_select(0, rows), image_grid_thw[mine])
        packed = torch.cat([local.merged, *local.deepstack], dim=-1)  # [n_mine, (1 + L) h]
    else:
        width = tower.config.out_hidden_size * (1 + levels)
        dtype = next(tower.parameters()).dtype
        packed = torch.zeros(0, width, dtype=dtype, device=pixel_values.device)
    # Gradients: see the module doc (averaged over TP later, so each rank's part counts ×size).
    gathered = _GatherImageFeatures.apply(packed, shares, tokens, tp_group, float(size))
    merged, *deepstack = gathered.split(gathered.shape[-1] // (1 + levels), dim=-1)
    return VisionFeatures(merged, deepstack)


def split_images(patches: list[int], parts: int) -> list[list[int]]:
    """Image indices per rank, balanced by patch count (largest first, each to the least loaded
    rank, ties to the lower rank), each rank's list in image order. Deterministic: every TP rank
    computes the same split from the batch's ``image_grid_thw``."""
    load, shares = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(patches)), key=lambda i: (-patches[i], i)):
        rank = min(range(parts), key=lambda r: (load[r], r))
        load[rank] += patches[i]
        shares[rank].append(i)
    return [sorted(share) for share in shares]


def image_rows(counts: list[int], images: list[int]) -> torch.Tensor:
    """Rows of ``images`` (in that order, repeats allowed) in a matrix that stacks ``counts[i]``
    rows for each image ``i`` in image order: their patches in ``pixel_values``, their tokens in
    the features. int64, on the CPU."""
    starts = [0]
    for n in counts[:-1]:
        starts.append(starts[-1] + n)
    if not images:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in images])


def _num_deepstack_levels(tower: torch.nn.Module) -> int:
    return len(getattr(tower.config, "deepstack_visual_indexes", None) or [])


def _encode(tower: torch.nn.Module, pixel_values: torch.Tensor,
            image_grid_thw: torch.Tensor) -> VisionFeatures:
    dtype = next(tower.parameters()).dtype
    out = tower(pixel_values.to(dtype), grid_thw=image_grid_thw)
    return VisionFeatures(out.pooler_output, list(getattr(out, "deepstack_features", None) or []))


class _GatherImageFeatures(torch.autograd.Function):
    """Each rank's ``[n_rank, w]`` features -> all images' ``[n, w]`` in image order, on every
    rank of ``group``; backward hands each rank its own images' rows of the (complete,
    TP-replicated) gradient times ``scale``, without communication."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, shares: list[list[int]], tokens: list[int],
                group, scale: float) -> torch.Tensor:
        size, rank = group.size(), group.rank()
        counts = [sum(tokens[i] for i in share) for share in shares]
        block = max(counts)
        padded = local.new_zeros(block, local.shape[-1])
        padded[:counts[rank]] = local
        blocks = [torch.empty_like(padded) for _ in range(size)]
        torch.distributed.all_gather(blocks, padded.contiguous(), group=group)
        # Row of each image token of the output in the gathered [size * block, w].
        source = [None] * len(tokens)
        for r, share in enumerate(shares):
            offset = r * block
            for i in share:
                source[i] = torch.arange(offset, offset + tokens[i])
                offset += tokens[i]
        index = torch.cat(source).to(local.device)
        ctx.own_rows = image_rows(tokens, shares[rank]).to(local.device)
        ctx.scale = scale
        return torch.cat(blocks).index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local = grad.index_select(0, ctx.own_rows)
        if ctx.scale != 1.0:
            local = local * ctx.scale
        return local, None, None, None, None
