"""Declarative HF <-> megatron-core weight mappings (after Megatron-Bridge's ``param_mapping.py``).

A mapping names one megatron-core parameter (its checkpoint name, global layer index, ``*`` for
the layer number, ``**`` for any suffix) and the HF tensor(s) it is made of, and knows three
things: how to build the full (TP=1) megatron tensor from the HF tensors, how to split it back,
and which slice a tensor-parallel rank holds.

    ColumnParallelMapping   rows split over TP (column-parallel linear, vocab-parallel embedding)
    RowParallelMapping      columns split over TP (row-parallel linear)
    ReplicatedMapping       the same tensor on every TP rank (norms, the vision tower)
    QKVMapping              q, k, v interleaved per query group: [q_g0 k_g0 v_g0 q_g1 ...], so an
                            even row split gives each TP rank whole groups
    GatedMLPMapping         [gate; up] at TP=1, [gate_r; up_r] on TP rank r

HF names are templates: ``{lm}``, ``{vision}``, ``{head}`` are filled from the checkpoint's naming
convention (see ``hf_tables.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch


@dataclass(frozen=True)
class AttentionLayout:
    """Head counts the QKV interleave needs."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = []
    for token in re.split(r"(\*\*|\*)", pattern):
        if token == "**":
            parts.append("(.+)")
        elif token == "*":
            parts.append(r"(\d+)")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts) + r"\Z")


def _fill_wildcards(template: str, captured: tuple[str, ...]) -> str:
    values = iter(captured)
    return re.sub(r"\*\*|\*", lambda _: next(values), template)


@dataclass(frozen=True)
class ParamMapping:
    """One megatron parameter <- one or more HF tensors (``hf``: role -> name template)."""

    megatron: str
    hf: Mapping[str, str]
    tp_dim: ClassVar[Optional[int]] = None  # None: replicated over TP

    def match(self, megatron_name: str, prefixes: Mapping[str, str]) -> Optional[dict[str, str]]:
        """HF names (role -> name) of ``megatron_name`` if this mapping covers it, else None."""
        m = _pattern_regex(self.megatron).match(megatron_name)
        if m is None:
            return None
        return {role: _fill_wildcards(template.format(**prefixes), m.groups())
                for role, template in self.hf.items()}

    def to_megatron(self, hf: Mapping[str, torch.Tensor], layout: AttentionLayout) -> torch.Tensor:
        """The full (TP=1) megatron tensor."""
        (tensor,) = hf.values()
        return tensor

    def to_hf(self, full: torch.Tensor, layout: AttentionLayout) -> dict[str, torch.Tensor]:
        """HF tensors (role -> tensor) of the full megatron tensor."""
        (role,) = self.hf
        return {role: full}

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This TP rank's slice of the full tensor."""
        if self.tp_dim is None or tp_size == 1:
            return full
        return full.chunk(tp_size, dim=self.tp_dim)[tp_rank]


class ReplicatedMapping(ParamMapping):
    tp_dim = None


class ColumnParallelMapping(ParamMapping):
    tp_dim = 0


class RowParallelMapping(ParamMapping):
    tp_dim = 1


class QKVMapping(ParamMapping):
    """``hf`` roles ``q``, ``k``, ``v`` (weights ``[heads*d, h]`` or biases ``[heads*d]``)."""

    tp_dim = 0

    def to_megatron(self, hf, layout):
        groups, d = layout.num_query_groups, layout.head_dim
        per_group = layout.num_attention_heads // groups
        q, k, v = hf["q"], hf["k"], hf["v"]
        rest = q.shape[1:]
        return torch.cat([q.reshape(groups, per_group * d, *rest),
                          k.reshape(groups, d, *rest),
                          v.reshape(groups, d, *rest)], dim=1).reshape(-1, *rest)

    def to_hf(self, full, layout):
        groups, d = layout.num_query_groups, layout.head_dim
        per_group = layout.num_attention_heads // groups
        rest = full.shape[1:]
        q, k, v = full.reshape(groups, (per_group + 2) * d, *rest).split(
            [per_group * d, d, d], dim=1)
        return {"q": q.reshape(-1, *rest), "k": k.reshape(-1, *rest), "v": v.reshape(-1, *rest)}


class GatedMLPMapping(ParamMapping):
    """``hf`` roles ``gate`` and ``up``; megatron's fc1 is [gate; up], per rank [gate_r; up_r]."""

    tp_dim = 0

    def to_megatron(self, hf, layout):
        return torch.cat([hf["gate"], hf["up"]], dim=0)

    def to_hf(self, full, layout):
        gate, up = full.chunk(2, dim=0)
        return {"gate": gate, "up": up}

    def shard(self, full, tp_rank, tp_size):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
