"""Interleaved multimodal rotary embedding (Qwen3-VL), in the tensor layout megatron-core consumes.

megatron-core 0.16's ``MultimodalRotaryEmbedding`` assigns the rotary frequencies to the three
position rows (temporal, height, width) in *contiguous* sections: frequencies
``[0, s_t)`` rotate by the temporal position, ``[s_t, s_t + s_h)`` by the height, the rest by the
width (Qwen2-VL / Qwen2.5-VL). Its ``rotary_interleaved`` flag is something else (GPT-J style
rotation pairs). Qwen3-VL *interleaves* the rows over the frequencies (HF
``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``):

    frequency i rotates by   height  if i % 3 == 1 and i < 3 * s_h
                             width   if i % 3 == 2 and i < 3 * s_w
                             temporal otherwise

so low and high frequencies both see all three axes. ``InterleavedMultimodalRotaryEmbedding``
returns the same ``[s, b, 1, head_dim]`` angle tensor as megatron's class (each frequency
twice, ``cat(f, f)``, for rotate-half rotation), so megatron's attention applies it unchanged;
``QwenVLModel`` installs it in place of the GPT model's ``rotary_pos_emb`` when
``model.mrope_interleaved`` is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import (
    MultimodalRotaryEmbedding,
    get_pos_emb_on_this_cp_rank,
)


def interleaved_mrope_frequencies(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                                  mrope_section: Sequence[int]) -> torch.Tensor:
    """Rotary angles ``[b, s, head_dim / 2]`` (fp32) of ``[3, b, s]`` mrope positions.

    ``mrope_section`` = (s_t, s_h, s_w) frequencies per axis, summing to ``len(inv_freq)``.
    """
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, b, s], got {tuple(position_ids.shape)}")
    if sum(mrope_section) != inv_freq.numel() or len(mrope_section) != 3:
        raise ValueError(f"mrope_section {list(mrope_section)} must have 3 entries summing to "
                         f"head_dim / 2 = {inv_freq.numel()}")
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3, b, s, d/2]
    angles = freqs[0].clone()
    for axis in (1, 2):
        picked = slice(axis, 3 * mrope_section[axis], 3)
        angles[..., picked] = freqs[axis, ..., picked]
    return angles


class InterleavedMultimodalRotaryEmbedding(MultimodalRotaryEmbedding):
    """megatron-core's ``MultimodalRotaryEmbedding`` with Qwen3-VL's interleaved sections."""

    def __init__(self, kv_channels: int, rotary_percent: float = 1.0,
                 rotary_interleaved: bool = False, seq_len_interpolation_factor=None,
                 rotary_base: float = 10000, cp_group=None) -> None:
        if rotary_interleaved or rotary_percent != 1.0 or seq_len_interpolation_factor:
            raise ValueError("interleaved mrope rotates the whole head with rotate-half pairs: "
                             "rotary_interleaved, rotary_percent < 1 and position interpolation "
                             "are not supported")
        super().__init__(kv_channels, rotary_percent, rotary_interleaved,
                         seq_len_interpolation_factor, rotary_base, cp_group)

    def forward(self, position_ids: torch.Tensor, mrope_section: list[int],
                cp_group: Optional[torch.distributed.ProcessGroup] = None) -> torch.Tensor:
        """``[3, b, s]`` positions -> ``[s, b, 1, head_dim]`` angles (megatron's layout)."""
        angles = interleaved_mrope_frequencies(position_ids.to(self.inv_freq.device),
                                               self.inv_freq, mrope_section)  # [b, s, d/2]
        emb = torch.cat((angles, angles), dim=-1)[..., None, :].transpose(0, 1).contiguous()
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb
