"""Tiny random Qwen2.5-VL / Qwen3-VL models built with transformers, and a batch that exercises
the model.

The batch has two padded samples: sample 0 is right-padded and holds two images of different
sizes, sample 1 is left-padded and holds one image. Images are random patch matrices in the
processor's layout (``[num_patches, C * T * P * P]``), so no tokenizer or image processor is needed.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import zlib
from pathlib import Path

import torch

IMAGE, VIDEO, VISION_START, VISION_END, PAD = 251, 252, 249, 250, 0
VOCAB = 256
# (t, H, W) patch grids; merged tokens per image = t * H/2 * W/2
GRIDS = [(1, 4, 6), (1, 6, 8), (1, 8, 4)]

# Qwen2.5-VL-7B-Instruct's config.json as published (legacy flat layout).
QWEN25VL_7B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
        "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def _published_qwen3vl(text: dict, vision: dict, tie: bool) -> dict:
    """A Qwen3-VL config.json as Qwen publishes them (transformers 4.57 layout)."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
            "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
            "initializer_range": 0.02, "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                             "rope_type": "default"},
            "rope_theta": 5000000, "tie_word_embeddings": tie, "use_cache": True,
            "vocab_size": 151936, **text,
        },
        "tie_word_embeddings": tie, "transformers_version": "4.57.0.dev0",
        "video_token_id": 151656,
        "vision_config": {
            "depth": 24, "hidden_act": "gelu_pytorch_tanh", "in_channels": 3,
            "initializer_range": 0.02, "model_type": "qwen3_vl", "num_heads": 16,
            "num_position_embeddings": 2304, "patch_size": 16, "spatial_merge_size": 2,
            "temporal_patch_size": 2, **vision,
        },
        "vision_end_token_id": 151653, "vision_start_token_id": 151652,
    }


# Qwen3-VL-4B-Instruct's and -8B-Instruct's config.json as published.
QWEN3VL_4B_CONFIG = _published_qwen3vl(
    text={"hidden_size": 2560, "intermediate_size": 9728},
    vision={"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_size": 1024,
            "intermediate_size": 4096, "out_hidden_size": 2560},
    tie=True)
QWEN3VL_8B_CONFIG = _published_qwen3vl(
    text={"hidden_size": 4096, "intermediate_size": 12288},
    vision={"deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_size": 1152,
            "intermediate_size": 4304, "out_hidden_size": 4096},
    tie=False)


def tiny_hf_config(num_layers: int = 4, tie_word_embeddings: bool = False):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=512, bos_token_id=PAD, eos_token_id=248, pad_token_id=PAD,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            window_size=56, fullatt_block_indexes=[1, 3], patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tie_word_embeddings,
    )


def tiny_qwen3vl_config(num_layers: int = 4, tie_word_embeddings: bool = True,
                        deepstack_visual_indexes=(0, 1, 3)):
    """Qwen3-VL in miniature: head_dim (32) independent of hidden / heads (16), interleaved mrope
    over 16 frequencies, patch 16 with an 8x8 learned position grid, three DeepStack levels."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
            max_position_embeddings=512, bos_token_id=PAD, eos_token_id=248, pad_token_id=PAD,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                             "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            num_position_embeddings=64, deepstack_visual_indexes=list(deepstack_visual_indexes),
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tie_word_embeddings,
    )


def tiny_hf_model(config=None, seed: int = 0, dtype=torch.float32):
    """An HF Qwen2.5-VL / Qwen3-VL (by ``config.model_type``) with every weight random (biases and
    norms too, so all are tested)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    config = copy.deepcopy(config) if config is not None else tiny_hf_config()
    model_class = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
                   "qwen3_vl": Qwen3VLForConditionalGeneration}[config.model_type]
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            noise = torch.randn(param.shape, generator=gen) * 0.08
            param.copy_(1.0 + noise if "norm" in name or "ln_q" in name else noise)
            # Parameters only: rotary inv_freq buffers stay fp32, as from_pretrained keeps them.
            param.data = param.data.to(dtype)
    return model.eval()


def save_tiny_hf(path, config=None, seed: int = 0, dtype=torch.float32):
    model = tiny_hf_model(config, seed, dtype)
    model.save_pretrained(path)
    return model


def image_tokens(grid):
    """Vision start, the image tokens of a (t, h, w) patch grid (merge size 2), vision end."""
    t, h, w = grid
    return [VISION_START] + [IMAGE] * (t * (h // 2) * (w // 2)) + [VISION_END]


def tiny_batch(seed: int = 0, patch_size: int = 14):
    """Two samples of 32 tokens: [right-padded, two images] and [left-padded, one image]
    (``patch_size`` 14 for Qwen2.5-VL, 16 for Qwen3-VL)."""
    gen = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(1, 248, (n,), generator=gen).tolist()

    sample0 = text(3) + image_tokens(GRIDS[0]) + text(2) + image_tokens(GRIDS[1]) + text(3)
    sample1 = text(2) + image_tokens(GRIDS[2]) + text(17)
    seq = max(len(sample0), len(sample1)) + 2
    pad0, pad1 = seq - len(sample0), seq - len(sample1)
    input_ids = torch.tensor([sample0 + [PAD] * pad0, [PAD] * pad1 + sample1])
    attention_mask = torch.tensor([[1] * len(sample0) + [0] * pad0,
                                   [0] * pad1 + [1] * len(sample1)], dtype=torch.bool)
    patch_dim = 3 * 2 * patch_size * patch_size
    num_patches = sum(t * h * w for t, h, w in GRIDS)
    pixel_values = torch.randn(num_patches, patch_dim, generator=gen)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor(GRIDS),
    }


def hf_logits(model, batch) -> torch.Tensor:
    """HF logits ``[b, s, vocab]`` (3D rope positions need ``mm_token_type_ids``)."""
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"].long(),
            pixel_values=batch["pixel_values"].to(model.dtype),
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=(batch["input_ids"] == IMAGE).int(),
        ).logits


def current_layout(first_stage_layers=None):
    """``ParallelConfig`` of this gloo rank's megatron process groups (worker side)."""
    from megatron.core import parallel_state as ps

    from megatron_ease.config import ParallelConfig

    return ParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        first_pipeline_stage_layers=first_stage_layers)


def run_schedule(model, batch, loss_fn, forward_only):
    """One micro-batch of a ``tiny_batch``-style dict through megatron-core's schedule (pipelined
    when PP > 1); returns the last stage's loss-function outputs."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["input_ids"], attention_mask=b["attention_mask"],
                    pixel_values=b.get("pixel_values"), image_grid_thw=b.get("image_grid_thw"),
                    image_ids=b.get("image_ids"))
        return out, loss_fn

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
        num_microbatches=1, seq_length=batch["input_ids"].shape[1],
        micro_batch_size=batch["input_ids"].shape[0], forward_only=forward_only)


def converted_checkpoint_logits(hf_dir, ckpt, batch, first_stage_layers=None):
    """Gloo-rank worker: the model of ``hf_dir`` at this process group's TP/PP layout, weights
    from the megatron checkpoint ``ckpt``, logits of ``batch`` (gathered over TP) on the last
    stage, None on the others."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_ease.models.qwen_vl import (
        build_qwen_vl_model,
        load_model_checkpoint,
        model_config_from_hf,
    )

    model = build_qwen_vl_model(model_config_from_hf(hf_dir), current_layout(first_stage_layers),
                                params_dtype=torch.float32, perform_initialization=False)
    load_model_checkpoint(model, ckpt)
    model.eval()
    with torch.no_grad():
        out = run_schedule(model, batch, lambda x: (
            x.sum() * 0, {"logits": gather_from_tensor_model_parallel_region(x)}), True)
    return out[0]["logits"] if out else None


def assert_layout_logits_match(converted: dict, results: list) -> None:
    """The last stage's logits (``converted_checkpoint_logits`` on every rank) equal the
    single-process logits of the conversion fixture at the valid positions."""
    valid = converted["batch"]["attention_mask"]
    outputs = [r for r in results if r is not None]
    assert outputs
    for logits in outputs:
        torch.testing.assert_close(logits[valid], converted["logits"][valid], atol=1e-4, rtol=0)


CONVERTER = Path(__file__).resolve().parents[1] / "tools" / "convert_hf_checkpoint.py"


def convert(*args: str) -> subprocess.CompletedProcess:
    """``tools/convert_hf_checkpoint.py ARGS`` in a subprocess from the repo root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(CONVERTER), *args], capture_output=True,
                          text=True, env=env, cwd=CONVERTER.parents[1], timeout=300)


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in directory ``path``."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_rope_index_matches_hf(hf_model, batch) -> torch.Tensor:
    """Our ``get_rope_index`` equals the HF model's (positions and deltas) on ``batch``; returns
    our ``[3, b, s]`` positions."""
    from megatron_ease.models.qwen_vl import get_rope_index

    want_pos, want_delta = hf_model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=(batch["input_ids"] == IMAGE).int(),
        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"].long())
    pos, delta = get_rope_index(batch["input_ids"], batch["image_grid_thw"],
                                batch["attention_mask"], spatial_merge_size=2,
                                image_token_id=IMAGE)
    assert torch.equal(pos, want_pos)
    assert torch.equal(delta, want_delta)
    return pos


def hf_round_trip(hf_dir, table, params_dtype, keep_checkpoint_dtypes=False):
    """Gloo-rank worker (TP = PP = 1): load the HF checkpoint ``hf_dir`` into our model, write it
    back out through ``table``; returns the load record and ``{hf name: tensor}``.
    ``keep_checkpoint_dtypes`` also restores the checkpoint's dtypes and tied copies."""
    from megatron_ease.config import ParallelConfig
    from megatron_ease.models.qwen_vl import (
        HFCheckpoint,
        attention_layout,
        build_qwen_vl_model,
        canonical_parameters,
        hf_tensors,
        load_hf_weights,
        model_config_from_hf,
    )

    model_cfg = model_config_from_hf(hf_dir)
    model = build_qwen_vl_model(model_cfg, ParallelConfig(), params_dtype=params_dtype,
                                perform_initialization=False)
    record = load_hf_weights(model, HFCheckpoint(hf_dir))
    extra = dict(dtypes=record["dtypes"], tied_copies=record["tied_copies"]) \
        if keep_checkpoint_dtypes else {}
    return record, dict(hf_tensors(canonical_parameters(model).items(), table,
                                   attention_layout(model_cfg), record["naming"], **extra))


def assert_megatron_to_hf_is_bit_exact(converted: dict):
    """``megatron-to-hf`` of the conversion fixture's checkpoint writes back every tensor of the
    original HF checkpoint, same names, dtypes and bits; returns (written tensors, out dir)."""
    out = converted["root"] / "hf_back"
    result = convert("megatron-to-hf", "--ckpt", converted["ckpt"], "--hf-config",
                     converted["hf_dir"], "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    original, back = read_safetensors(converted["hf_dir"]), read_safetensors(out)
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    return back, out
