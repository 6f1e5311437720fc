"""Helpers for tests that compare megatron-core models across parallel layouts.

Weights are set by a deterministic function of each parameter's *global* name (layer numbers
made global across pipeline stages) and of its full, unsharded shape, then sliced for this
tensor-parallel rank, so any TP/PP layout holds the very same model.
"""

from __future__ import annotations

import re
import zlib

import torch


def global_param_name(name: str, module_layer_number: dict[str, int]) -> str:
    """``decoder.layers.0.x`` on a later stage -> ``decoder.layers.<global index>.x``."""
    m = re.match(r"(.*?decoder\.layers\.)(\d+)(\..*)", name)
    if not m:
        return name
    prefix = m.group(1) + m.group(2)
    return f"{m.group(1)}{module_layer_number[prefix] - 1}{m.group(3)}"


def layer_numbers(model: torch.nn.Module) -> dict[str, int]:
    """Map each local layer module path to its global 1-based ``layer_number``."""
    return {name: mod.layer_number for name, mod in model.named_modules()
            if hasattr(mod, "layer_number") and re.search(r"layers\.\d+$", name)}


def full_shape(param: torch.nn.Parameter, tp_size: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def _is_gated_fc1(model: torch.nn.Module, name: str) -> bool:
    # megatron-core keeps a gated MLP's fc1 as [gate; up] at TP=1 and as [gate_r; up_r] per rank.
    return name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit


def shard(full: torch.Tensor, param, gated_fc1: bool, tp_rank: int, tp_size: int):
    if not getattr(param, "tensor_model_parallel", False):
        return full
    if gated_fc1:
        return torch.cat([h.chunk(tp_size, dim=0)[tp_rank] for h in full.chunk(2, dim=0)])
    return full.chunk(tp_size, dim=param.partition_dim)[tp_rank]


def unshard(parts: list[torch.Tensor], param, gated_fc1: bool) -> torch.Tensor:
    if gated_fc1:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(parts, dim=param.partition_dim)


def deterministic_init_(model: torch.nn.Module, tp_rank: int, tp_size: int, scale: float = 0.05):
    """Fill every parameter from a name-seeded generator; TP shards are slices of the full tensor."""
    numbers = layer_numbers(model)
    for name, param in model.named_parameters():
        gname = global_param_name(name, numbers)
        gen = torch.Generator().manual_seed(zlib.crc32(gname.encode()))
        full = torch.randn(full_shape(param, tp_size), generator=gen, dtype=torch.float64) * scale
        if name.endswith("layer_norm_weight") or name.endswith("norm.weight"):
            full = 1.0 + full
        full = shard(full, param, _is_gated_fc1(model, name), tp_rank, tp_size)
        with torch.no_grad():
            param.copy_(full.to(param.dtype))


def gathered_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) gradient of every parameter, keyed by global name. A parameter marked
    ``average_gradients_across_tp_domain`` (the TP-replicated vision tower) gets the TP average
    ``finalize_model_grads`` gives it (each TP rank holds its share of the images' part)."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    numbers = layer_numbers(model)
    out = {}
    for name, param in model.named_parameters():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        averaged = tp_size > 1 and getattr(param, "average_gradients_across_tp_domain", False)
        if grad is None and averaged and param.requires_grad:
            grad = torch.zeros_like(param)  # a TP rank that encoded no image (DDP: main_grad 0)
        if grad is None:
            continue
        grad = grad.detach().clone()
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(grad) for _ in range(tp_size)]
            torch.distributed.all_gather(parts, grad.contiguous(), group=group)
            grad = unshard(parts, param, _is_gated_fc1(model, name))
        elif averaged:
            torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.AVG, group=group)
        out[global_param_name(name, numbers)] = grad
    return out


def assert_close_dicts(a: dict, b: dict, atol: float, rtol: float = 0.0):
    assert a.keys() == b.keys(), f"different keys: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def tiny_gpt_config(**overrides):
    """The TransformerConfig of the tests' tiny megatron GPT (Qwen2 layout: RMSNorm, GQA 4/2,
    qkv bias, SwiGLU) at this process group's TP/PP sizes; ``overrides`` replace fields."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    fields = dict(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, normalization="RMSNorm", add_bias_linear=False, add_qkv_bias=True,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size())
    fields.update(overrides)
    return TransformerConfig(**fields)


def tiny_gpt(vocab_size: int, max_sequence_length: int, pre_process=None, post_process=None,
             config=None, spec=None, init_scale: float = 0.05):
    """This rank's stage of the tiny GPT (``tiny_gpt_config`` unless ``config``; local layer spec
    unless ``spec``; rope), deterministically initialised so every layout holds the same
    weights. ``pre_process`` / ``post_process``: None = this rank's pipeline stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = GPTModel(
        config or tiny_gpt_config(), spec or get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size, max_sequence_length,
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        position_embedding_type="rope")
    deterministic_init_(model, ps.get_tensor_model_parallel_rank(),
                        ps.get_tensor_model_parallel_world_size(), scale=init_scale)
    return model
