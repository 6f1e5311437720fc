"""``ModelConfig`` + ``ParallelConfig`` -> the language model's megatron-core ``TransformerConfig``.

Qwen2 decoder = GPT layer with RMSNorm, GQA, qkv bias and no other biases, SwiGLU, no dropout,
multimodal rotary (``mrope_section``, rotate-half pairs, base ``rope_theta``). Qwen3 decoder = the
same without the qkv bias, with q/k RMSNorm per head (``qk_layernorm``) and ``kv_channels``
(head_dim) independent of the hidden size; its interleaved mrope sections are the model's rotary
module (``rotary.py``), not a TransformerConfig field.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ease.config import ModelConfig, ParallelConfig
from megatron_ease.models.qwen_vl.hf_config import model_config_from_hf


def resolve_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """When ``model.hf_config`` names an HF config, its sizes replace the YAML's."""
    if model_cfg.hf_config:
        return model_config_from_hf(model_cfg.hf_config, base=model_cfg)
    return model_cfg


def _check_parallel_state(parallel_cfg: ParallelConfig) -> None:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return
    have = (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size())
    want = (parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size)
    if have != want:
        raise ValueError(f"parallel config (TP, PP) = {want} but the process groups were built "
                         f"with {have}")


def qwen_vl_transformer_config(
    model_cfg: ModelConfig,
    parallel_cfg: Optional[ParallelConfig] = None,
    params_dtype: Optional[torch.dtype] = None,
    perform_initialization: bool = True,
    **overrides,
) -> TransformerConfig:
    """The language model's ``TransformerConfig``.

    ``params_dtype`` defaults to bf16 when ``model.bf16`` else fp32. On a machine without CUDA the
    weights are initialised on the CPU (``use_cpu_initialization``).
    """
    parallel_cfg = parallel_cfg or ParallelConfig()
    _check_parallel_state(parallel_cfg)
    if parallel_cfg.context_parallel_size != 1:
        raise NotImplementedError("parallel.context_parallel_size > 1 is not supported by the "
                                  "Qwen-VL model yet (mrope positions and image scatter assume "
                                  "the full sequence on every rank)")
    tp = parallel_cfg.tensor_model_parallel_size
    if model_cfg.vocab_size % tp:
        raise ValueError(f"model.vocab_size ({model_cfg.vocab_size}) must be divisible by "
                         f"parallel.tensor_model_parallel_size ({tp}) for the vocab-parallel "
                         f"embedding and output layer")
    first = parallel_cfg.first_pipeline_stage_layers
    if first is not None and first < 1:
        raise ValueError("parallel.first_pipeline_stage_layers must be >= 1 (megatron-core's "
                         "num_layers_in_first_pipeline_stage); the vision tower already sits "
                         "on stage 0")
    dtype = params_dtype or (torch.bfloat16 if model_cfg.bf16 else torch.float32)
    kwargs = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        qk_layernorm=model_cfg.qk_layernorm,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=list(model_cfg.mrope_section),
        rotary_interleaved=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        num_layers_in_first_pipeline_stage=(
            first if parallel_cfg.pipeline_model_parallel_size > 1 else None),
        # Micro-batches of RL rollouts differ in length; pipeline p2p sends shapes first.
        # (megatron-core refuses this flag with its default MoE dispatcher even for a dense
        # model; the dispatcher type is otherwise unused.)
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=perform_initialization,
    )
    if model_cfg.recompute_layers:
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
