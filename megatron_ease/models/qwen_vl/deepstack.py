"""DeepStack (Qwen3-VL): visual features added to the hidden states of the first decoder layers,
carried *inside* the hidden-state tensor so pipeline parallelism needs nothing extra.

HF (``Qwen3VLTextModel.forward``): the vision tower returns one merged feature map per
``deepstack_visual_indexes`` entry (``L`` levels, ``[num_image_tokens, h]`` each); after decoder
layer ``j`` (0-based) for ``j < L``, level ``j`` is added at the image-token positions:

    hidden = layer_j(hidden);  hidden[image positions] += deepstack[j]

The packed layout. Stage 0 scatters each level densely into ``[s, b, h]`` (zeros off the image
tokens, so the add is exact: ``x + 0 == x``) and concatenates the levels after the embeddings
along the hidden dimension:

    decoder input        [s, b, (1 + L) h]  = [embeddings | level 0 | ... | level L-1]
    input of layer j     [s, b, (1 + L - j) h]   (j < L)
    output of layer L-1  [s, b, h]               plain hidden states from here on

``DeepstackTransformerLayer`` (the layer module of layers ``0 .. L-1``) splits off the first
level, runs the ordinary megatron-core layer on the hidden part, adds the level, and passes the
remaining levels on. The width says whether levels are present (text-only batches and decode
steps carry none and get no add, as in HF), so the layout needs no side channel:

- pipeline parallelism: the tensor a stage sends is simply wider while levels remain, whatever
  the stage boundaries (a DeepStack layer may sit on any stage, e.g. ``first_pipeline_stage_layers
  < L``, or under virtual pipelining). megatron-core's p2p sends each tensor's shape first when
  ``variable_seq_lengths`` is on (``qwen_vl_transformer_config`` always sets it), and gradients
  of the levels flow back through the same tensors to the vision tower on stage 0;
- activation recomputation and inference (``model.embed`` + ``language_model``, as the rollout
  engine calls them) need no change: the levels are ordinary inputs of the layer call;
- sequence parallelism would scatter the packed tensor along ``s``, which keeps levels aligned.

Cost: a boundary that precedes layer ``L - 1`` sends ``(1 + levels left)`` times the usual
activation; with ``first_pipeline_stage_layers >= L`` (the published models: ``L = 3``) nothing
extra crosses stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


def pack_deepstack(hidden: torch.Tensor, levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[s, b, h]`` hidden states + levels (each ``[s, b, h]``) -> ``[s, b, (1 + L) h]``."""
    if not levels:
        return hidden
    return torch.cat([hidden, *levels], dim=-1)


def unpack_deepstack(packed: torch.Tensor, hidden_size: int
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inverse of ``pack_deepstack``: contiguous hidden states ``[s, b, h]`` and the levels."""
    width = packed.shape[-1]
    if width == hidden_size:
        return packed, []
    if width % hidden_size:
        raise ValueError(f"hidden states of width {width} are neither plain ({hidden_size}) nor "
                         f"packed with DeepStack levels (a multiple of it)")
    hidden, *levels = packed.split(hidden_size, dim=-1)
    return hidden.contiguous(), levels


def scatter_deepstack_levels(features: Sequence[torch.Tensor], seq_idx: torch.Tensor,
                             batch_idx: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
    """Per-level ``[num_image_tokens, h]`` features -> dense ``[s, b, h]`` (zeros elsewhere)."""
    zeros = torch.zeros_like(like)
    return [zeros.index_put((seq_idx, batch_idx), f.to(like.dtype)) for f in features]


class DeepstackTransformerLayer(TransformerLayer):
    """A megatron-core ``TransformerLayer`` that adds its DeepStack level after itself.

    The spec's ``params={"num_deepstack_levels": L}``; the layer's own level is its global index
    (``layer_number - 1``), which must be below ``L``. Parameters and checkpoint keys are those of
    ``TransformerLayer``.
    """

    def __init__(self, *args, num_deepstack_levels: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.deepstack_level = self.layer_number - 1
        if not 0 <= self.deepstack_level < num_deepstack_levels:
            raise ValueError(f"DeepstackTransformerLayer at layer {self.deepstack_level} but only "
                             f"layers 0..{num_deepstack_levels - 1} receive DeepStack features")
        self.levels_in = num_deepstack_levels - self.deepstack_level

    def forward(self, *args, hidden_states: Optional[torch.Tensor] = None, **kwargs):
        if hidden_states is None:
            hidden_states, *args = args
        hidden, levels = unpack_deepstack(hidden_states, self.config.hidden_size)
        if levels and len(levels) != self.levels_in:
            raise ValueError(f"layer {self.deepstack_level} received {len(levels)} DeepStack "
                             f"levels, expected {self.levels_in}: the packed hidden states do not "
                             f"match the model's deepstack_visual_indexes")
        output, context = super().forward(hidden, *args, **kwargs)
        if not levels:
            return output, context
        return pack_deepstack(output + levels[0], levels[1:]), context
