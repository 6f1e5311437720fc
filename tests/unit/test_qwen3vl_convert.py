"""tools/convert_hf_checkpoint.py on Qwen3-VL (detected from ``model_type``): --verify, bit-exact
round trip, the converted checkpoint at PP=2 with a DeepStack layer on stage 1, and tied
checkpoints that also store ``lm_head.weight``."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ease.models.qwen_vl import QWEN3_VL
from tests.harness import run_distributed
from tests.qwen_fixtures import (
    assert_layout_logits_match,
    assert_megatron_to_hf_is_bit_exact,
    convert,
    converted_checkpoint_logits,
    hf_logits,
    hf_round_trip,
    save_tiny_hf,
    tiny_batch,
    tiny_qwen3vl_config,
)


def _from_pretrained_fp32(path):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny bf16 Qwen3-VL (untied, like the 8B) and its conversion with --verify."""
    root = tmp_path_factory.mktemp("convert_qwen3vl")
    hf_dir, ckpt = root / "hf", root / "ckpt"
    save_tiny_hf(hf_dir, tiny_qwen3vl_config(tie_word_embeddings=False), dtype=torch.bfloat16)
    result = convert("hf-to-megatron", "--hf-dir", str(hf_dir), "--out", str(ckpt), "--verify")
    batch = tiny_batch(patch_size=16)
    return {"root": root, "hf_dir": str(hf_dir), "ckpt": str(ckpt), "result": result,
            "batch": batch, "logits": hf_logits(_from_pretrained_fp32(hf_dir), batch)}


def test_hf_to_megatron_verify_passes_for_qwen3vl(converted):
    result = converted["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"max_abs_logit_diff=(\S+)", last)
    assert m and float(m.group(1)) <= 1e-4, result.stdout
    assert "building qwen3_vl" in result.stderr


def test_round_trip_is_bit_exact_and_loads_with_from_pretrained(converted):
    back, out = assert_megatron_to_hf_is_bit_exact(converted)
    assert any(".deepstack_merger_list." in k for k in back)
    assert any(k.endswith("self_attn.q_norm.weight") for k in back)
    torch.testing.assert_close(hf_logits(_from_pretrained_fp32(out), converted["batch"]),
                               converted["logits"], atol=0, rtol=0)


@pytest.mark.parametrize("tp, pp, first_stage_layers", [(2, 1, None), (1, 2, 1)],
                         ids=["tp2", "pp2_deepstack_on_stage_1"])
def test_converted_checkpoint_loads_at_other_parallel_layouts(converted, tp, pp,
                                                              first_stage_layers):
    assert converted["result"].returncode == 0
    results = run_distributed(converted_checkpoint_logits, converted["hf_dir"],
                              converted["ckpt"], converted["batch"], first_stage_layers,
                              tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    assert_layout_logits_match(converted, results)


def test_tied_checkpoint_storing_lm_head_loads_and_writes_it_back(tmp_path):
    """transformers drops a tied lm_head when saving; other writers keep a copy. Both load."""
    save_tiny_hf(tmp_path, tiny_qwen3vl_config(tie_word_embeddings=True))
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    embedding = "model.language_model.embed_tokens.weight"
    tensors["lm_head.weight"] = tensors[embedding].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    record, back = run_distributed(hf_round_trip, str(tmp_path), QWEN3_VL, torch.float32,
                                   True)[0]
    assert record["tied_copies"] == {"lm_head.weight": embedding}
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_qwen3vl_weight_table_names():
    assert QWEN3_VL.detect_naming(["model.language_model.embed_tokens.weight"]) == "nested"
    layer = "language_model.decoder.layers.5.self_attention."
    _, names = QWEN3_VL.resolve(layer + "linear_qkv.weight", "nested")
    assert names == {r: f"model.language_model.layers.5.self_attn.{r}_proj.weight" for r in "qkv"}
    _, names = QWEN3_VL.resolve(layer + "q_layernorm.weight", "nested")
    assert names == {"weight": "model.language_model.layers.5.self_attn.q_norm.weight"}
    _, names = QWEN3_VL.resolve("vision_model.deepstack_merger_list.2.norm.weight", "nested")
    assert names == {"weight": "model.visual.deepstack_merger_list.2.norm.weight"}
    with pytest.raises(KeyError, match="linear_qkv.bias"):
        QWEN3_VL.resolve(layer + "linear_qkv.bias", "nested")
