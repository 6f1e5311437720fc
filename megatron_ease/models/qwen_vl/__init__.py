"""Qwen2.5-VL and Qwen3-VL on megatron-core, with exact HF parity, TP/PP, and HF <-> megatron
weight mapping. ``model.family`` (from the HF ``model_type``) picks the variant; one code path.

Building (every rank, after ``megatron_ease.distributed.initialize_distributed``)::

    model = build_qwen_vl_model(cfg.model, cfg.parallel)          # this rank's chunk
    model = build_qwen_vl_model(cfg.model, cfg.parallel,           # EASE at some layers
                                attention_override=lambda spec: dataclasses.replace(
                                    spec, module=EaseSelfAttention),
                                override_layers=cfg.ease.layers)

- ``model.vision_model``: HF's vision tower (Qwen2.5-VL's, or Qwen3-VL's with DeepStack), first
  pipeline stage only, replicated over TP (grads averaged over TP by ``finalize_model_grads``);
  ``model.language_model``: megatron-core ``GPTModel`` (TP over heads/FFN/vocab, PP over layers,
  mrope; Qwen3-VL: q/k norms, ``kv_channels`` = head_dim, interleaved mrope via
  ``InterleavedMultimodalRotaryEmbedding``).
- ``qwen_vl_layer_specs(config, use_te, attention_override, override_layers,
  num_deepstack_levels)`` -> one ``ModuleSpec`` per layer (local on CPU, TE when importable;
  ``DeepstackTransformerLayer`` at the first ``num_deepstack_levels`` layers);
  ``qwen_vl_block_spec`` slices this stage's layers.
- DeepStack (Qwen3-VL, ``deepstack.py``): the levels ride inside the hidden-state tensor,
  ``[s, b, (1 + levels left) h]``, until the layer that adds the last one, so they cross pipeline
  stages with the activations (any layout; no side channel).

Forward (training/RL; megatron-core schedules call ``model.set_input_tensor`` between stages)::

    out = model(input_ids,                 # [b, s]; every stage (positions derive from it)
                attention_mask=valid,      # [b, s] bool, True = real token; left/right padding
                                           # (right only with the TransformerEngine spec)
                pixel_values=px,           # [num_patches, C*T*P*P] (stage 0)
                image_grid_thw=grids,      # [num_images, 3], batch order (every stage)
                position_ids=None,         # [3, b, s] mrope; None = derived (get_rope_index)
                labels=None)               # given: [b, s] -log p instead of logits
    # last stage: [b, s, vocab/TP] vocab-parallel logits; other stages: [s, b, h] (wider while
    # DeepStack levels remain for later stages)
    logp = vocab_parallel_log_probs(out, shifted_labels, temperature)   # [b, s] fp32
    model.image_token_mask(input_ids)       # [b, s] bool: the image columns the model used
    model.position_ids(input_ids, grids, valid)                         # [3, b, s]

Configs: ``model_config_from_hf(hf_config_or_dir) -> ModelConfig`` and
``hf_config_from_model_config(ModelConfig) -> Qwen2_5_VLConfig | Qwen3VLConfig``
(``hf_config.py`` is the one place that knows HF config names); ``qwen_vl_transformer_config``
builds megatron's config.

Weights: ``HFCheckpoint`` + ``load_hf_weights(model, hf)`` load HF safetensors straight into any
TP rank / PP stage; ``hf_tensors`` + ``save_hf_weights`` write full tensors (streamed from a
checkpoint by ``CheckpointModelTensors``, or a TP=1 model's ``canonical_parameters``) back as HF
safetensors; both directions go through one declarative table per HF ``model_type``
(``hf_tables.QWEN2_5_VL``, ``hf_tables.QWEN3_VL``). Distributed checkpoints:
``save_model_checkpoint`` / ``load_model_checkpoint`` (``checkpoint.py`` documents the accepted
layouts: a dist-checkpoint dir, or a dir with ``latest_checkpointed_iteration.txt``/``latest``;
model keys under any prefix, ``model.`` by default).
"""

from megatron_ease.models.qwen_vl.checkpoint import (
    MODEL_PREFIX,
    CheckpointModelTensors,
    load_model_checkpoint,
    model_sharded_state_dict,
    resolve_checkpoint_dir,
    save_model_checkpoint,
)
from megatron_ease.models.qwen_vl.deepstack import (
    DeepstackTransformerLayer,
    pack_deepstack,
    unpack_deepstack,
)
from megatron_ease.models.qwen_vl.hf_config import (
    UnsupportedModelError,
    hf_config_from_model_config,
    load_hf_config,
    model_config_from_hf,
)
from megatron_ease.models.qwen_vl.hf_tables import (
    QWEN2_5_VL,
    QWEN3_VL,
    HFWeightTable,
    weight_table,
)
from megatron_ease.models.qwen_vl.hf_weights import (
    HFCheckpoint,
    WeightMismatchError,
    attention_layout,
    canonical_parameters,
    hf_tensors,
    load_hf_weights,
    save_hf_weights,
)
from megatron_ease.models.qwen_vl.logprobs import (
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
)
from megatron_ease.models.qwen_vl.model import (
    QwenVLModel,
    attention_mask_for,
    build_qwen_vl_model,
)
from megatron_ease.models.qwen_vl.rope import get_rope_index, image_token_mask
from megatron_ease.models.qwen_vl.rotary import (
    InterleavedMultimodalRotaryEmbedding,
    interleaved_mrope_frequencies,
)
from megatron_ease.models.qwen_vl.specs import (
    qwen_vl_block_spec,
    qwen_vl_layer_spec,
    qwen_vl_layer_specs,
    transformer_engine_available,
)
from megatron_ease.models.qwen_vl.transformer_config import (
    qwen_vl_transformer_config,
    resolve_model_config,
)

__all__ = [
    "MODEL_PREFIX", "CheckpointModelTensors", "DeepstackTransformerLayer", "HFCheckpoint",
    "HFWeightTable", "InterleavedMultimodalRotaryEmbedding", "QWEN2_5_VL", "QWEN3_VL",
    "QwenVLModel", "UnsupportedModelError", "WeightMismatchError", "attention_layout",
    "attention_mask_for", "build_qwen_vl_model", "canonical_parameters",
    "get_rope_index", "hf_config_from_model_config", "hf_tensors",
    "image_token_mask", "interleaved_mrope_frequencies", "load_hf_config", "load_hf_weights",
    "load_model_checkpoint", "model_config_from_hf", "model_sharded_state_dict",
    "pack_deepstack", "unpack_deepstack", "qwen_vl_block_spec",
    "qwen_vl_layer_spec", "qwen_vl_layer_specs", "qwen_vl_transformer_config",
    "resolve_checkpoint_dir", "resolve_model_config", "save_hf_weights", "save_model_checkpoint",
    "transformer_engine_available", "vocab_parallel_entropy", "vocab_parallel_log_probs",
    "weight_table",
]
