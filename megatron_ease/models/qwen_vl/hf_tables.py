"""The HF <-> megatron weight tables, one per HF ``model_type``: the only place that knows HF
parameter names.

Megatron names are checkpoint names with the global layer index: the local spec's separate norms
appear under TE's fused names (``linear_qkv.layer_norm_weight``), exactly as megatron-core writes
them to a distributed checkpoint, so one table serves both specs.

HF checkpoints of the same model come with different prefixes (transformers 5 saves Qwen2.5-VL
under the legacy ``model.layers.*`` / ``visual.*`` names and loads both); a table lists the
conventions it knows, the checkpoint's own is detected, and the converter writes it back.
Qwen3-VL has one convention (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``); its
table differs from Qwen2.5-VL's by the q/k norms and the missing qkv bias (the DeepStack mergers
are part of the vision tower, HF's own module, and map by name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Optional

from megatron_ease.models.qwen_vl.hf_config import check_supported_model_type
from megatron_ease.models.qwen_vl.param_mapping import (
    ColumnParallelMapping,
    GatedMLPMapping,
    ParamMapping,
    QKVMapping,
    ReplicatedMapping,
    RowParallelMapping,
)

# Megatron names are ours, the same for every family: the word embeddings exist in all of them.
_EMBEDDING = "language_model.embedding.word_embeddings.weight"


@dataclass(frozen=True)
class HFWeightTable:
    model_type: str
    mappings: tuple[ParamMapping, ...]
    # naming convention -> {placeholder: prefix}; the first one is the default for writing.
    namings: Mapping[str, Mapping[str, str]]
    # megatron name -> megatron name whose HF tensor it is when embeddings are tied
    # (the last pipeline stage's copy of the word embeddings).
    tied: Mapping[str, str] = field(default_factory=dict)

    @property
    def default_naming(self) -> str:
        return next(iter(self.namings))

    def detect_naming(self, hf_names: Iterable[str]) -> str:
        """The convention under which the word embeddings (every checkpoint has them) are found;
        the default when none matches (loading then names the missing tensor)."""
        names = set(hf_names)
        for naming in self.namings:
            _, hf = self.resolve(_EMBEDDING, naming)
            if set(hf.values()) <= names:
                return naming
        return self.default_naming

    def tied_hf_names(self, naming: str) -> dict[str, str]:
        """HF name of each tied tensor (e.g. ``lm_head.weight``) -> HF name of its source (the
        embeddings): a tied checkpoint may store such a copy, which HF ignores on load."""
        out = {}
        for target, source in self.tied.items():
            _, copies = self.resolve(target, naming)
            _, sources = self.resolve(source, naming)
            out.update(zip(copies.values(), sources.values(), strict=True))
        return out

    def resolve(self, megatron_name: str, naming: str,
                tie_word_embeddings: bool = False) -> tuple[ParamMapping, dict[str, str]]:
        """The mapping of a megatron parameter and its HF names (role -> name)."""
        source = self.tied.get(megatron_name, megatron_name) if tie_word_embeddings \
            else megatron_name
        prefixes = self.namings[naming]
        for mapping in self.mappings:
            hf_names = mapping.match(source, prefixes)
            if hf_names is not None:
                return mapping, hf_names
        raise KeyError(f"no {self.model_type} weight mapping for megatron parameter "
                       f"'{megatron_name}'")


_LAYER = "language_model.decoder.layers.*."
_HF_LAYER = "{lm}layers.*."

_DECODER = (
    ColumnParallelMapping(_EMBEDDING, {"weight": "{lm}embed_tokens.weight"}),
    ReplicatedMapping(_LAYER + "self_attention.linear_qkv.layer_norm_weight",
                      {"weight": _HF_LAYER + "input_layernorm.weight"}),
    QKVMapping(_LAYER + "self_attention.linear_qkv.weight",
               {"q": _HF_LAYER + "self_attn.q_proj.weight",
                "k": _HF_LAYER + "self_attn.k_proj.weight",
                "v": _HF_LAYER + "self_attn.v_proj.weight"}),
    RowParallelMapping(_LAYER + "self_attention.linear_proj.weight",
                       {"weight": _HF_LAYER + "self_attn.o_proj.weight"}),
    ReplicatedMapping(_LAYER + "mlp.linear_fc1.layer_norm_weight",
                      {"weight": _HF_LAYER + "post_attention_layernorm.weight"}),
    GatedMLPMapping(_LAYER + "mlp.linear_fc1.weight",
                    {"gate": _HF_LAYER + "mlp.gate_proj.weight",
                     "up": _HF_LAYER + "mlp.up_proj.weight"}),
    RowParallelMapping(_LAYER + "mlp.linear_fc2.weight",
                       {"weight": _HF_LAYER + "mlp.down_proj.weight"}),
    ReplicatedMapping("language_model.decoder.final_layernorm.weight",
                      {"weight": "{lm}norm.weight"}),
    ColumnParallelMapping("language_model.output_layer.weight", {"weight": "{head}weight"}),
    # The vision tower is HF's own module: same names under another prefix.
    ReplicatedMapping("vision_model.**", {"weight": "{vision}**"}),
)
_TIED = {"language_model.output_layer.weight": _EMBEDDING}

QWEN2_5_VL = HFWeightTable(
    model_type="qwen2_5_vl",
    mappings=_DECODER + (
        QKVMapping(_LAYER + "self_attention.linear_qkv.bias",
                   {"q": _HF_LAYER + "self_attn.q_proj.bias",
                    "k": _HF_LAYER + "self_attn.k_proj.bias",
                    "v": _HF_LAYER + "self_attn.v_proj.bias"}),
    ),
    namings={
        "legacy": {"lm": "model.", "vision": "visual.", "head": "lm_head."},
        "nested": {"lm": "model.language_model.", "vision": "model.visual.", "head": "lm_head."},
    },
    tied=_TIED,
)

QWEN3_VL = HFWeightTable(
    model_type="qwen3_vl",
    mappings=_DECODER + (
        # Per-head RMSNorm of queries and keys (before rotary), the same on every TP rank.
        ReplicatedMapping(_LAYER + "self_attention.q_layernorm.weight",
                          {"weight": _HF_LAYER + "self_attn.q_norm.weight"}),
        ReplicatedMapping(_LAYER + "self_attention.k_layernorm.weight",
                          {"weight": _HF_LAYER + "self_attn.k_norm.weight"}),
    ),
    namings={
        "nested": {"lm": "model.language_model.", "vision": "model.visual.", "head": "lm_head."},
    },
    tied=_TIED,
)

WEIGHT_TABLES = {table.model_type: table for table in (QWEN2_5_VL, QWEN3_VL)}


def weight_table(model_type: Optional[str]) -> HFWeightTable:
    """The table of an HF ``model_type``; an unsupported one is an error naming it."""
    check_supported_model_type(model_type)
    return WEIGHT_TABLES[model_type]
