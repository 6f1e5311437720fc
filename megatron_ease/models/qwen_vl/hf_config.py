"""The one place that knows Hugging Face config names: HF ``config.json`` <-> ``ModelConfig``.

    hf = load_hf_config("Qwen/Qwen3-VL-8B-Instruct")        # a dir, a config.json, or a dict
    model_cfg = model_config_from_hf(hf)                     # sizes, rope, token ids, vision tower
    hf_again = hf_config_from_model_config(model_cfg)        # a transformers config object

Families (HF ``model_type`` -> ``ModelConfig.family``):

- ``qwen2_5_vl``: Qwen2 decoder (qkv bias, head_dim = hidden / heads), mrope in contiguous
  sections, windowed vision tower with patch 14.
- ``qwen3_vl``: Qwen3 decoder (q/k RMSNorm, no biases, ``head_dim`` independent of the hidden
  size), *interleaved* mrope (HF's Qwen3-VL always interleaves; published configs also say
  ``mrope_interleaved: true``), vision tower with patch 16, learned position embeddings
  (``num_position_embeddings``) and DeepStack taps (``deepstack_visual_indexes``).

Both directions cover every field the model's math depends on; HF fields that only matter for
video (``tokens_per_second``) or generation are not carried.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Union

from megatron_ease.config import ModelConfig, VisionConfig

# HF ``model_type`` -> our ``ModelConfig.family`` (each has a weight table in hf_tables.py);
# anything else is refused by name.
SUPPORTED_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}

# ModelConfig fields that are run choices, not sizes: an HF config never overrides them.
_RUN_CHOICE_FIELDS = ("hf_config", "init_from", "freeze_vision", "recompute_layers", "bf16")


class UnsupportedModelError(ValueError):
    """The HF config describes a model family this package has no implementation for."""


class UnreadableFileError(ValueError):
    """An input file is malformed (invalid JSON, a truncated safetensors file, a missing
    field): the message names the file."""


def read_json_file(path: str, what: str = "JSON file", required: tuple = ()) -> dict:
    """The JSON object in ``path``; malformed JSON, a non-object or a missing ``required`` key is
    an ``UnreadableFileError`` naming the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnreadableFileError(f"{what} {path} is not valid JSON ({e}): a truncated or "
                                  f"corrupted file?") from e
    if not isinstance(data, dict):
        raise UnreadableFileError(f"{what} {path} holds a JSON {type(data).__name__}, not an "
                                  f"object")
    missing = [key for key in required if key not in data]
    if missing:
        raise UnreadableFileError(f"{what} {path} has no {missing[0]!r} field")
    return data


def load_hf_config(source: Union[str, os.PathLike, dict, Any]):
    """A transformers config from a directory holding ``config.json``, the file itself, a dict,
    or an existing config object (returned as is). Only ``config.json`` is needed."""
    if not isinstance(source, (str, os.PathLike, dict)):
        return source
    if isinstance(source, dict):
        data = dict(source)
        where = "the given dict"
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HF config at {path}: pass a directory holding config.json")
        data = read_json_file(path, "HF config")
        where = path
    model_type = data.get("model_type")
    check_supported_model_type(model_type, where)
    from transformers import AutoConfig

    return AutoConfig.for_model(**data)


def check_supported_model_type(model_type: Optional[str], where: str = "the HF config") -> str:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    return SUPPORTED_MODEL_TYPES[model_type]


def _first_id(value) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def model_config_from_hf(hf_config, base: Optional[ModelConfig] = None) -> ModelConfig:
    """``ModelConfig`` with the sizes of ``hf_config`` (a transformers config, dir, file or dict).

    Run choices of ``base`` (``bf16``, ``freeze_vision``, ``recompute_layers``, ``init_from``,
    ``hf_config``) are kept. Refuses configs the model cannot reproduce exactly (sliding-window
    attention, a non-default rope type, an activation other than SiLU, Qwen3 attention biases).
    """
    hf = load_hf_config(hf_config)
    family = check_supported_model_type(getattr(hf, "model_type", None))
    quantization = getattr(hf, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", None)
        raise UnsupportedModelError(f"a quantized model (quantization_config, quant_method "
                                    f"{method!r}) is not supported: use the bf16 release")
    text, vision = hf.text_config, hf.vision_config
    rope = dict(text.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"text rope_type {rope['rope_type']!r} is not supported "
                                    f"(only the default mrope)")
    if getattr(text, "use_sliding_window", False):
        raise UnsupportedModelError("use_sliding_window=true is not supported")
    if text.hidden_act != "silu":
        raise UnsupportedModelError(f"text hidden_act {text.hidden_act!r} is not supported (silu)")
    if family == "qwen3_vl":
        if getattr(text, "attention_bias", False):
            # HF's attention_bias also puts a bias on o_proj, which megatron's qkv bias does not.
            raise UnsupportedModelError("Qwen3-VL text attention_bias=true is not supported")
        head_dim = text.head_dim or text.hidden_size // text.num_attention_heads
    else:
        if text.hidden_size % text.num_attention_heads:
            raise UnsupportedModelError(f"hidden_size {text.hidden_size} is not divisible by "
                                        f"num_attention_heads {text.num_attention_heads}")
        head_dim = text.hidden_size // text.num_attention_heads  # Qwen2.5-VL ignores head_dim
    mrope_section = list(rope.get("mrope_section") or [])
    if sum(mrope_section) != head_dim // 2:
        raise UnsupportedModelError(f"mrope_section {mrope_section} must sum to head_dim/2 = "
                                    f"{head_dim // 2}")
    base = base or ModelConfig()
    bos = _first_id(getattr(text, "bos_token_id", None))
    pad = _first_id(getattr(text, "pad_token_id", None))
    qwen3 = family == "qwen3_vl"
    sizes = dict(
        family=family,
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads or text.num_attention_heads,
        kv_channels=head_dim,
        vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 1_000_000.0)),
        mrope_section=mrope_section,
        mrope_interleaved=qwen3,
        rms_norm_eps=text.rms_norm_eps,
        add_qkv_bias=not qwen3,
        qk_layernorm=qwen3,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        image_token_id=hf.image_token_id,
        video_token_id=hf.video_token_id,
        vision_start_token_id=hf.vision_start_token_id,
        vision_end_token_id=hf.vision_end_token_id,
        eos_token_id=_first_id(getattr(text, "eos_token_id", None)),
        # Qwen tokenizers pad with <|endoftext|>, which the configs carry as bos_token_id.
        pad_token_id=pad if pad is not None else (bos if bos is not None else base.pad_token_id),
        vision=_vision_config_from_hf(vision, family),
    )
    if sizes["eos_token_id"] is None:
        sizes["eos_token_id"] = base.eos_token_id
    if sizes["vision"].out_hidden_size != sizes["hidden_size"]:
        raise UnsupportedModelError(f"vision out_hidden_size {vision.out_hidden_size} must equal "
                                    f"the text hidden_size {text.hidden_size}")
    deepstack = sizes["vision"].deepstack_visual_indexes
    if len(deepstack) > text.num_hidden_layers:
        raise UnsupportedModelError(f"{len(deepstack)} deepstack_visual_indexes feed the first "
                                    f"{len(deepstack)} decoder layers, but there are only "
                                    f"{text.num_hidden_layers}")
    keep = {name: getattr(base, name) for name in _RUN_CHOICE_FIELDS}
    return dataclasses.replace(base, **sizes, **keep)


# VisionConfig fields with the same name and meaning in HF's vision_config (both families).
_SHARED_VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                         "patch_size", "spatial_merge_size", "temporal_patch_size",
                         "out_hidden_size", "hidden_act")


def _vision_config_from_hf(vision, family: str) -> VisionConfig:
    common = {name: getattr(vision, name) for name in _SHARED_VISION_FIELDS}
    common["rope_theta"] = float((vision.rope_parameters or {}).get("rope_theta", 10_000.0))
    if family == "qwen3_vl":
        indexes = list(vision.deepstack_visual_indexes)
        bad = [i for i in indexes if not 0 <= i < vision.depth]
        if bad or len(set(indexes)) != len(indexes):
            raise UnsupportedModelError(f"deepstack_visual_indexes {indexes} must be distinct "
                                        f"vision block indices in [0, {vision.depth})")
        return VisionConfig(**common, num_position_embeddings=vision.num_position_embeddings,
                            deepstack_visual_indexes=indexes)
    return VisionConfig(**common, window_size=vision.window_size,
                        fullatt_block_indexes=list(vision.fullatt_block_indexes))


def _text_config_common(model_cfg: ModelConfig) -> dict:
    return dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups,
        hidden_act="silu",
        max_position_embeddings=model_cfg.max_position_embeddings,
        rms_norm_eps=model_cfg.rms_norm_eps,
        bos_token_id=model_cfg.pad_token_id,
        eos_token_id=model_cfg.eos_token_id,
        pad_token_id=model_cfg.pad_token_id,
    )


def _hf_vision_fields(model_cfg: ModelConfig) -> dict:
    v = model_cfg.vision
    fields = {name: getattr(v, name) for name in _SHARED_VISION_FIELDS}
    fields["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
    if model_cfg.family == "qwen3_vl":
        return dict(fields, num_position_embeddings=v.num_position_embeddings,
                    deepstack_visual_indexes=list(v.deepstack_visual_indexes))
    return dict(fields, window_size=v.window_size,
                fullatt_block_indexes=list(v.fullatt_block_indexes))


def _check_family_layout(model_cfg: ModelConfig) -> None:
    """The ModelConfig flags that are fixed per HF family (HF has no switch for them)."""
    qwen3 = model_cfg.family == "qwen3_vl"
    want = {"mrope_interleaved": qwen3, "qk_layernorm": qwen3, "add_qkv_bias": not qwen3}
    wrong = {k: getattr(model_cfg, k) for k, v in want.items() if getattr(model_cfg, k) != v}
    if wrong:
        fixed = ", ".join(f"{k}={v}" for k, v in want.items())
        raise UnsupportedModelError(f"model.family {model_cfg.family!r} has {fixed} in HF; the "
                                    f"config says {wrong}")
    if not qwen3 and model_cfg.vision.deepstack_visual_indexes:
        raise UnsupportedModelError("model.vision.deepstack_visual_indexes is a Qwen3-VL feature; "
                                    "Qwen2.5-VL has none")


def hf_config_from_model_config(model_cfg: ModelConfig):
    """The transformers config (``Qwen2_5_VLConfig`` or ``Qwen3VLConfig``) of a ``ModelConfig``."""
    if model_cfg.family not in SUPPORTED_MODEL_TYPES.values():
        raise UnsupportedModelError(f"model.family {model_cfg.family!r} has no HF config mapping; "
                                    f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    _check_family_layout(model_cfg)
    head_dim = model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads
    tokens = dict(
        image_token_id=model_cfg.image_token_id,
        video_token_id=model_cfg.video_token_id,
        vision_start_token_id=model_cfg.vision_start_token_id,
        vision_end_token_id=model_cfg.vision_end_token_id,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
    )
    rope = {"rope_type": "default", "rope_theta": model_cfg.rope_theta,
            "mrope_section": list(model_cfg.mrope_section)}
    if model_cfg.family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(
            architectures=["Qwen3VLForConditionalGeneration"],  # what loaders (vLLM) dispatch on
            text_config=dict(**_text_config_common(model_cfg), head_dim=head_dim,
                             attention_bias=False,
                             rope_parameters={**rope, "mrope_interleaved": True}),
            vision_config=_hf_vision_fields(model_cfg),
            **tokens,
        )
    from transformers import Qwen2_5_VLConfig

    if head_dim * model_cfg.num_attention_heads != model_cfg.hidden_size:
        raise UnsupportedModelError("Qwen2.5-VL needs kv_channels = hidden_size / "
                                    "num_attention_heads")
    return Qwen2_5_VLConfig(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        text_config=dict(**_text_config_common(model_cfg), rope_parameters=rope),
        vision_config=_hf_vision_fields(model_cfg),
        **tokens,
    )


def hf_vision_config(model_cfg: ModelConfig):
    """The HF vision-tower config of a ``ModelConfig`` (the tower is HF's module, see vision.py)."""
    if model_cfg.family == "qwen3_vl":
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

        return Qwen3VLVisionConfig(**_hf_vision_fields(model_cfg))
    if model_cfg.family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
            Qwen2_5_VLVisionConfig,
        )

        return Qwen2_5_VLVisionConfig(**_hf_vision_fields(model_cfg))
    raise UnsupportedModelError(f"model.family {model_cfg.family!r} has no vision tower; "
                                f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
