"""Qwen3-VL on megatron-core equals HF's model: interleaved mrope, mrope positions, logits at
TP=1/PP=1, TP=2, and PP=2 with DeepStack levels added on the second stage (gloo), a training step
through that pipeline vs one stage, and the 4B/8B sizes (meta-device parameter counts, examples).

The tiny model (``tiny_qwen3vl_config``) has tied embeddings like the 4B, head_dim independent of
the hidden size, and three DeepStack levels (added after decoder layers 0, 1, 2 of 4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_ease.config import ParallelConfig
from megatron_ease.models.qwen_vl import (
    get_rope_index,
    interleaved_mrope_frequencies,
    model_config_from_hf,
    unpack_deepstack,
)
from tests.harness import run_distributed
from tests.megatron_utils import assert_close_dicts, gathered_grads
from tests.qwen_fixtures import (
    IMAGE,
    QWEN3VL_4B_CONFIG,
    QWEN3VL_8B_CONFIG,
    assert_rope_index_matches_hf,
    current_layout,
    hf_logits,
    run_schedule,
    save_tiny_hf,
    tiny_batch,
    tiny_qwen3vl_config,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HIDDEN = 64  # tiny_qwen3vl_config's text hidden size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny HF Qwen3-VL, its batch, HF's fp32 logits (with images and text-only)."""
    path = tmp_path_factory.mktemp("qwen3vl_tiny")
    model = save_tiny_hf(path, tiny_qwen3vl_config())
    batch = tiny_batch(patch_size=16)
    text_only = {"input_ids": torch.where(batch["input_ids"] == IMAGE, 7, batch["input_ids"]),
                 "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        text_logits = model(input_ids=text_only["input_ids"],
                            attention_mask=text_only["attention_mask"].long()).logits
    return {"hf_dir": str(path), "model": model, "batch": batch,
            "logits": hf_logits(model, batch), "text_only": text_only,
            "text_logits": text_logits}


# -- workers (run on every gloo rank) -------------------------------------------------------------

def _build(hf_dir, first_stage_layers=None, recompute_layers=False):
    from megatron_ease.config import ModelConfig
    from megatron_ease.models.qwen_vl import HFCheckpoint, build_qwen_vl_model, load_hf_weights

    parallel = current_layout(first_stage_layers)
    model_cfg = model_config_from_hf(hf_dir, base=ModelConfig(recompute_layers=recompute_layers))
    model = build_qwen_vl_model(model_cfg, parallel)
    load_hf_weights(model, HFCheckpoint(hf_dir))
    return model


def _logits_worker(hf_dir, batches, first_stage_layers=None):
    """Logits of each batch on the last stage (None elsewhere); the input widths the model
    predicts (with, without images), then the widths this stage received from the previous
    one (None on stage 0)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = _build(hf_dir, first_stage_layers)
    model.eval()
    received = [model.input_hidden_size(with_images=True), model.input_hidden_size(False)]
    model.language_model.decoder.register_forward_pre_hook(
        lambda block, args: received.append(
            None if block.input_tensor is None else block.input_tensor.shape[-1]))

    def loss_fn(logits):
        return logits.sum() * 0, {"logits": gather_from_tensor_model_parallel_region(logits)}

    logits = []
    with torch.no_grad():
        for batch in batches:
            out = run_schedule(model, batch, loss_fn, forward_only=True)
            logits.append(out[0]["logits"] if out else None)
    return logits, received


def _train_step_worker(hf_dir, batch, first_stage_layers=None, recompute_layers=False):
    """Mean token NLL and every gradient (TP-gathered, global layer names) after one step, and
    how often the first vision block's MLP ran (stage 0)."""
    model = _build(hf_dir, first_stage_layers, recompute_layers)
    calls = []
    if model.vision_model is not None:  # forward itself: a recomputation runs no module hooks
        mlp = model.vision_model.blocks[0].mlp
        mlp.forward = lambda *args, _forward=mlp.forward: calls.append(1) or _forward(*args)
    return {**_train_step(model, batch), "tower_block_calls": len(calls)}


def _train_step(model, batch):
    from megatron_ease.models.qwen_vl import vocab_parallel_log_probs

    labels = torch.roll(batch["input_ids"], -1, dims=1)
    mask = batch["attention_mask"] & torch.roll(batch["attention_mask"], -1, dims=1)
    mask[:, -1] = False

    def loss_fn(logits):
        logp = vocab_parallel_log_probs(logits, labels)
        loss = -(logp * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach()}

    out = run_schedule(model, batch, loss_fn, forward_only=False)
    return {"loss": out[0]["loss"] if out else None, "grads": gathered_grads(model)}


def _shared_image_worker(hf_dir, batches):
    """Loss, gradients and the patches the tower encoded, for each batch."""
    results = []
    for batch in batches:
        torch.manual_seed(0)
        model = _build(hf_dir)
        encoded = []
        model.vision_model.register_forward_hook(
            lambda module, args, output: encoded.append(int(args[0].shape[0])))
        results.append({**_train_step(model, batch), "encoded": encoded})
    return results


def _meta_param_counts(hf_configs):
    from megatron_ease.models.qwen_vl import build_qwen_vl_model

    counts = []
    for hf_config in hf_configs:
        with torch.device("meta"):
            model = build_qwen_vl_model(model_config_from_hf(hf_config), ParallelConfig(),
                                        params_dtype=torch.bfloat16, perform_initialization=False)
        assert all(p.is_meta for p in model.parameters())
        counts.append(sum(p.numel() for p in model.parameters()))
    return counts


# -- tests ----------------------------------------------------------------------------------------

def test_interleaved_mrope_frequencies_equal_hf_rotary(tiny):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    batch = tiny["batch"]
    positions, _ = get_rope_index(batch["input_ids"], batch["image_grid_thw"],
                                  batch["attention_mask"], spatial_merge_size=2,
                                  image_token_id=IMAGE)
    positions = positions + torch.arange(3)[:, None, None] * 5  # three different rows
    hf_rotary = Qwen3VLTextRotaryEmbedding(tiny["model"].config.text_config)
    cos, sin = hf_rotary(torch.zeros(1, dtype=torch.float32), positions)  # [b, s, head_dim]
    angles = interleaved_mrope_frequencies(positions, hf_rotary.inv_freq, [6, 5, 5])
    emb = torch.cat([angles, angles], dim=-1)
    assert torch.equal(emb.cos(), cos) and torch.equal(emb.sin(), sin)
    # Frequency i follows height iff i % 3 == 1, width iff i % 3 == 2 (below 3 * 5): not
    # megatron-core's contiguous sections.
    follows = [[r for r in range(3) if torch.equal(angles[..., i],
                                                   positions[r] * hf_rotary.inv_freq[i])]
               for i in range(16)]
    assert follows == [[0], [1], [2]] * 5 + [[0]]


def test_get_rope_index_matches_hf_qwen3vl_with_padding_and_several_images(tiny):
    assert_rope_index_matches_hf(tiny["model"], tiny["batch"])


@pytest.mark.parametrize("tp, pp, first_stage_layers", [(1, 1, None), (2, 1, None), (1, 2, 1)],
                         ids=["tp1_pp1", "tp2", "pp2_deepstack_on_stage_1"])
def test_logits_match_hf_with_deepstack(tiny, tp, pp, first_stage_layers):
    """Two images + one image, padded both sides; text-only batch too (no DeepStack add), also
    given as an empty image set (the tower raised on it)."""
    no_images = {**tiny["text_only"], "pixel_values": tiny["batch"]["pixel_values"][:0],
                 "image_grid_thw": tiny["batch"]["image_grid_thw"][:0]}
    batches = [tiny["batch"], tiny["text_only"], no_images]
    results = run_distributed(_logits_worker, tiny["hf_dir"], batches, first_stage_layers,
                              tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    last = [logits for logits, _ in results if logits[0] is not None]
    assert len(last) == (2 if pp == 1 else 1)
    valid = tiny["batch"]["attention_mask"]
    for logits, text_logits, empty_set_logits in last:
        torch.testing.assert_close(logits[valid], tiny["logits"][valid], atol=1e-4, rtol=0)
        torch.testing.assert_close(text_logits[valid], tiny["text_logits"][valid], atol=1e-4,
                                   rtol=0)
        assert torch.equal(empty_set_logits, text_logits)
    if pp == 2:
        # Stage 1 holds layers 1..3: it receives levels 1 and 2 packed after the hidden states
        # with the images, plain hidden states without (as ``input_hidden_size`` predicts).
        assert results[0][1] == [4 * HIDDEN, HIDDEN, None, None, None]
        assert results[1][1] == [3 * HIDDEN, HIDDEN] * 2 + [HIDDEN]


def test_train_step_pp2_with_deepstack_on_stage_1_matches_single_stage(tiny):
    """Gradients of the DeepStack levels flow back across the stage boundary to the tower, with
    full activation recomputation (as the examples run) on the pipelined side."""
    batch = tiny["batch"]
    ref = run_distributed(_train_step_worker, tiny["hf_dir"], batch)[0]
    stages = run_distributed(_train_step_worker, tiny["hf_dir"], batch, 1, True,
                             pipeline_model_parallel_size=2)
    torch.testing.assert_close(stages[1]["loss"], ref["loss"], atol=1e-6, rtol=0)
    # The tower recomputes too: its first block runs again in backward.
    assert ref["tower_block_calls"] == 1 and stages[0]["tower_block_calls"] == 2
    grads = {**stages[0]["grads"], **stages[1]["grads"]}
    # Tied embeddings: the last stage's output layer is a copy of the word embeddings; the tied
    # gradient is their sum (finalize_model_grads all-reduces the embedding group).
    embedding = "language_model.embedding.word_embeddings.weight"
    grads[embedding] = grads[embedding] + grads.pop("language_model.output_layer.weight")
    assert_close_dicts(grads, ref["grads"], atol=1e-5)
    for level in range(3):
        name = f"vision_model.deepstack_merger_list.{level}.linear_fc2.weight"
        assert ref["grads"][name].abs().sum() > 0, name


def test_an_image_shared_by_several_sequences_is_encoded_once_with_the_same_gradients(tiny):
    """Rollouts of one prompt share its image: with ``image_ids`` the tower encodes it once and
    its features (DeepStack levels included) fill every slot; loss and every gradient equal those
    of encoding each sequence's copy."""
    batch = tiny["batch"]
    grids = batch["image_grid_thw"]
    patches = [int(g.prod()) for g in grids]
    last = batch["pixel_values"][sum(patches[:2]):]  # sample 1's image
    rows = [0, 1, 1]  # sample 1 twice
    copied = {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows],
              "pixel_values": torch.cat([batch["pixel_values"], last]),
              "image_grid_thw": torch.cat([grids, grids[2:]])}
    shared = {**copied, "pixel_values": batch["pixel_values"], "image_grid_thw": grids,
              "image_ids": torch.tensor([0, 1, 2, 2])}
    one, two = run_distributed(_shared_image_worker, tiny["hf_dir"], [copied, shared])[0]
    assert one["encoded"] == [sum(patches) + patches[2]] and two["encoded"] == [sum(patches)]
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-6, rtol=1e-6)
    assert_close_dicts(two["grads"], one["grads"], atol=1e-6, rtol=1e-5)
    assert any("deepstack" in n and float(g.abs().max()) > 0 for n, g in one["grads"].items())


def test_packed_hidden_states_of_unexpected_width_are_refused():
    hidden, levels = unpack_deepstack(torch.zeros(2, 1, 3 * HIDDEN), HIDDEN)
    assert hidden.shape == (2, 1, HIDDEN) and hidden.is_contiguous() and len(levels) == 2
    with pytest.raises(ValueError, match="neither plain"):
        unpack_deepstack(torch.zeros(2, 1, HIDDEN + 3), HIDDEN)


def test_4b_and_8b_build_on_meta_with_hf_parameter_counts():
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    want = []
    for config in (QWEN3VL_4B_CONFIG, QWEN3VL_8B_CONFIG):
        with torch.device("meta"):
            hf = Qwen3VLForConditionalGeneration(AutoConfig.for_model(**config))
        want.append(sum(p.numel() for p in hf.parameters()))
    counts = run_distributed(_meta_param_counts, [QWEN3VL_4B_CONFIG, QWEN3VL_8B_CONFIG])
    assert counts[0] == want == [4_437_815_808, 8_767_123_696]


@pytest.mark.parametrize("hf_config, sizes", [
    (QWEN3VL_4B_CONFIG, dict(hidden=2560, ffn=9728, tied=True, vision=(24, 1024, 4096, 2560),
                             deepstack=[5, 11, 17])),
    (QWEN3VL_8B_CONFIG, dict(hidden=4096, ffn=12288, tied=False, vision=(27, 1152, 4304, 4096),
                             deepstack=[8, 16, 24])),
], ids=["4b", "8b"])
def test_model_config_from_hf_reads_published_sizes_and_round_trips(hf_config, sizes):
    from megatron_ease.models.qwen_vl import hf_config_from_model_config

    cfg = model_config_from_hf(hf_config)
    assert cfg.family == "qwen3_vl"
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (36, sizes["hidden"],
                                                                      sizes["ffn"])
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (32, 8, 128)
    assert (cfg.vocab_size, cfg.tie_word_embeddings) == (151936, sizes["tied"])
    assert cfg.rope_theta == 5e6 and cfg.mrope_section == [24, 20, 20] and cfg.mrope_interleaved
    assert cfg.qk_layernorm and not cfg.add_qkv_bias
    v = cfg.vision
    assert (v.depth, v.hidden_size, v.intermediate_size, v.out_hidden_size) == sizes["vision"]
    assert (v.num_heads, v.patch_size, v.num_position_embeddings) == (16, 16, 2304)
    assert v.deepstack_visual_indexes == sizes["deepstack"]
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
            cfg.vision_end_token_id) == (151655, 151656, 151652, 151653)
    assert model_config_from_hf(hf_config_from_model_config(cfg)) == cfg


@pytest.mark.parametrize("name, hf_config, world_size", [
    ("qwen3vl_4b_ease.yaml", QWEN3VL_4B_CONFIG, 8),
    ("qwen3vl_8b_ease.yaml", QWEN3VL_8B_CONFIG, 16),
], ids=["4b", "8b"])
def test_example_config_validates_and_carries_the_published_sizes(name, hf_config, world_size):
    from megatron_ease.config import load_config, validate_config

    cfg = load_config(str(EXAMPLES / name))
    validate_config(cfg, world_size=world_size)
    assert model_config_from_hf(hf_config, base=cfg.model) == cfg.model
    assert cfg.model.bf16 and cfg.train.lr == 1e-6
