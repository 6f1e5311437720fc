"""Qwen2.5-VL on megatron-core equals HF's model: logits at TP=1/PP=1, TP=2, PP=2 (gloo), mrope
positions, a training step at TP=2 vs TP=1, and the 7B parameter count on the meta device."""

from __future__ import annotations

import pytest
import torch

from megatron_ease.config import ParallelConfig
from megatron_ease.models.qwen_vl import get_rope_index, model_config_from_hf
from tests.harness import run_distributed
from tests.megatron_utils import assert_close_dicts, gathered_grads
from tests.qwen_fixtures import (
    IMAGE,
    PAD,
    QWEN25VL_7B_CONFIG,
    VISION_START,
    assert_rope_index_matches_hf,
    current_layout,
    hf_logits,
    image_tokens,
    run_schedule,
    save_tiny_hf,
    tiny_batch,
    tiny_hf_config,
    tiny_hf_model,
    tiny_qwen3vl_config,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny HF model, its batch and HF's fp32 logits."""
    path = tmp_path_factory.mktemp("qwen25vl_tiny")
    model = save_tiny_hf(path)
    batch = tiny_batch()
    return {"hf_dir": str(path), "batch": batch, "logits": hf_logits(model, batch)}


# -- workers (run on every gloo rank) -------------------------------------------------------------

def _build(hf_dir, first_stage_layers=None, **kwargs):
    from megatron_ease.models.qwen_vl import HFCheckpoint, build_qwen_vl_model, load_hf_weights

    parallel = current_layout(first_stage_layers)
    model = build_qwen_vl_model(model_config_from_hf(hf_dir), parallel, **kwargs)
    load_hf_weights(model, HFCheckpoint(hf_dir))
    return model


def _logits_worker(hf_dir, batch, first_stage_layers=None):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = _build(hf_dir, first_stage_layers)
    model.eval()

    def loss_fn(logits):
        return logits.sum() * 0, {"logits": gather_from_tensor_model_parallel_region(logits)}

    with torch.no_grad():
        out = run_schedule(model, batch, loss_fn, forward_only=True)
    return out[0]["logits"] if out else None


def _override_worker(hf_dir, batch, override_layers):
    import dataclasses

    from megatron.core.transformer.attention import SelfAttention

    marked = type("MarkedSelfAttention", (SelfAttention,), {})
    model = _build(hf_dir, attention_override=lambda spec: dataclasses.replace(spec, module=marked),
                   override_layers=override_layers)
    kinds = [type(layer.self_attention).__name__ for layer in model.language_model.decoder.layers]
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    return kinds, logits


def _log_probs_worker(seed):
    from megatron.core import parallel_state as ps

    from megatron_ease.models.qwen_vl import vocab_parallel_log_probs

    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 16, (2, 5), generator=gen)
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    shard = full.chunk(size, dim=-1)[rank].float().requires_grad_()
    logp = vocab_parallel_log_probs(shard, labels, temperature=0.5)
    logp.sum().backward()
    ref = full.clone().requires_grad_()
    ref_logp = torch.log_softmax(ref / 0.5, dim=-1).gather(-1, labels[..., None])[..., 0]
    ref_logp.sum().backward()
    return logp.detach(), ref_logp.detach().float(), shard.grad, ref.grad.chunk(size, -1)[rank]


def _entropy_worker(seed, chunk_rows):
    from megatron.core import parallel_state as ps

    from megatron_ease.models.qwen_vl import vocab_parallel_entropy

    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64) * 4
    full[0, 1, 3] = 60.0  # a near-deterministic row: the TP-global max keeps it finite
    mask = torch.rand(3, 7, generator=gen) < 0.6
    mask[0, 1] = True
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    shard = full.chunk(size, dim=-1)[rank].float()
    shard = shard.transpose(0, 1).contiguous().transpose(0, 1)  # a [b, s] view of [s, b]
    assert not shard.is_contiguous()
    entropy = vocab_parallel_entropy(shard, mask, temperature=0.7, chunk_rows=chunk_rows)
    p = torch.softmax(full / 0.7, dim=-1)  # naive float64: -Σ p log p over the full vocab
    ref = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)[mask]
    return entropy, ref.float()


def _train_step_worker(hf_dir, batch, split_images: bool = True):
    """Mean response-token NLL from our log-prob helper, every gradient (TP-gathered), and the
    patches of each of this rank's vision-tower calls (``split_images``: the model's
    ``split_images_over_tp``)."""
    from megatron_ease.models.qwen_vl import vocab_parallel_log_probs

    model = _build(hf_dir)
    model.split_images_over_tp = split_images
    calls = []
    model.vision_model.register_forward_hook(
        lambda module, args, output: calls.append(int(args[0].shape[0])))
    labels = torch.roll(batch["input_ids"], -1, dims=1)
    mask = batch["attention_mask"] & torch.roll(batch["attention_mask"], -1, dims=1)
    mask[:, -1] = False

    def loss_fn(logits):
        logp = vocab_parallel_log_probs(logits, labels, temperature=0.7)
        loss = -(logp * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach()}

    out = run_schedule(model, batch, loss_fn, forward_only=False)
    return {"loss": out[0]["loss"], "grads": gathered_grads(model), "calls": calls}


# -- tests ----------------------------------------------------------------------------------------

def test_get_rope_index_matches_hf_with_padding_and_several_images(tiny):
    batch = tiny["batch"]
    pos = assert_rope_index_matches_hf(tiny_hf_model(), batch)
    # Padding does not change a sample's positions: sample 1 alone, unpadded.
    valid = batch["attention_mask"][1]
    alone, _ = get_rope_index(batch["input_ids"][1:, valid], batch["image_grid_thw"][2:],
                              spatial_merge_size=2, image_token_id=IMAGE)
    assert torch.equal(alone[:, 0], pos[:, 1, valid])


def _random_layout(gen: torch.Generator, batch_size: int) -> dict:
    """Samples of text and images (non-square grids, 0-3 images each, text between them),
    padded on the left or the right, as the collator and the rollout engine lay them out."""
    def draw(high, low=0):
        return int(torch.randint(low, high, (), generator=gen))

    samples, grids = [], []
    for _ in range(batch_size):
        ids = torch.randint(1, 248, (draw(4, 1),), generator=gen).tolist()
        for _ in range(draw(4)):
            grid = (1, 2 * draw(5, 1), 2 * draw(5, 1))
            grids.append(grid)
            ids += image_tokens(grid) + torch.randint(1, 248, (draw(5, 1),),
                                                          generator=gen).tolist()
        samples.append(ids)
    seq = max(map(len, samples)) + draw(3)
    input_ids = torch.full((batch_size, seq), PAD)
    mask = torch.zeros(batch_size, seq, dtype=torch.bool)
    for row, ids in enumerate(samples):
        cols = slice(seq - len(ids), seq) if draw(2) else slice(0, len(ids))
        input_ids[row, cols], mask[row, cols] = torch.tensor(ids), True
    return {"input_ids": input_ids, "attention_mask": mask,
            "image_grid_thw": torch.tensor(grids).reshape(-1, 3)}


def test_get_rope_index_matches_hf_on_random_layouts():
    """Positions and deltas as HF's on many layouts: text-only samples and batches, several
    images per sample, non-square grids, left and right padding, one sample alone."""
    hf_model, gen = tiny_hf_model(), torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = _random_layout(gen, batch_size=int(torch.randint(1, 5, (), generator=gen)))
        if not len(batch["image_grid_thw"]):
            batch["image_grid_thw"] = None
        assert_rope_index_matches_hf(hf_model, batch)


def _rope(input_ids, grids, mask=None):
    return get_rope_index(input_ids, grids, mask, spatial_merge_size=2, image_token_id=IMAGE)


def test_get_rope_index_keeps_adjacent_images_apart():
    """Two images in one run of image tokens (HF refuses that): each image is placed by its own
    grid, the second starting where the first moved the position to."""
    grids = torch.tensor([[1, 2, 4], [1, 4, 2]])
    ids = torch.tensor([[5] + [IMAGE] * 4 + [6]])
    pos, delta = _rope(ids, grids)
    want = torch.tensor([[0, 1, 1, 3, 3, 5],    # t: image 1 starts at 1 + max(1, 2) = 3
                         [0, 1, 1, 3, 4, 5],    # h: image 0 is 1 x 2, image 1 is 2 x 1
                         [0, 1, 2, 3, 3, 5]])   # w
    assert torch.equal(pos[:, 0], want)
    assert delta.tolist() == [[0]]


def test_get_rope_index_refuses_image_tokens_without_a_grid(tiny):
    batch = tiny["batch"]
    with pytest.raises(ValueError, match="sample 1 has more image tokens than image_grid_thw"):
        get_rope_index(batch["input_ids"], batch["image_grid_thw"][:2], batch["attention_mask"],
                       spatial_merge_size=2, image_token_id=IMAGE)
    with pytest.raises(ValueError, match=r"sample 0 has more .* describes \(0 images\)"):
        _rope(batch["input_ids"], None, batch["attention_mask"])


def test_get_rope_index_names_the_image_that_does_not_fit():
    grids = torch.tensor([[1, 4, 4], [1, 4, 4]])
    # Image 1's four tokens are split by a text token (valid position 7 of sample 0).
    ids = torch.tensor([[5] + [IMAGE] * 4 + [6, 6] + [IMAGE] * 2 + [6] + [IMAGE] * 2])
    with pytest.raises(ValueError, match=r"sample 0: image 1 with grid \(1, 4, 4\) needs 4 "
                                         r"image tokens, but only 2 follow at valid position 7"):
        _rope(ids, grids)
    # An image may not run on from one sample into the next.
    ids = torch.tensor([[5, 6] + [IMAGE] * 2, [IMAGE] * 2 + [5, 6]])
    with pytest.raises(ValueError, match="sample 0: image 0 .* only 2 follow at valid position 2"):
        _rope(ids, grids[:1])
    # Fewer image tokens than the grids describe.
    with pytest.raises(ValueError, match="describes 2 images but the batch holds image tokens "
                                         "for 1"):
        _rope(torch.tensor([[5] + [IMAGE] * 4 + [6]]), grids)
    # Padding is not part of the run: the last image token is masked out.
    ids = torch.tensor([[5] + [IMAGE] * 4])
    with pytest.raises(ValueError, match="image 0 .* needs 4 image tokens, but only 3 follow"):
        _rope(ids, grids[:1], torch.tensor([[True] * 4 + [False]]))


@pytest.mark.parametrize("tp, pp, first_stage_layers", [(1, 1, None), (2, 1, None), (1, 2, 1)],
                         ids=["tp1_pp1", "tp2", "pp2_first_stage_1_layer"])
def test_logits_match_hf(tiny, tp, pp, first_stage_layers):
    results = run_distributed(_logits_worker, tiny["hf_dir"], tiny["batch"], first_stage_layers,
                              tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    outputs = [r for r in results if r is not None]  # last stage only
    assert len(outputs) == (2 if pp == 1 else 1)
    valid = tiny["batch"]["attention_mask"]
    for logits in outputs:
        assert logits.shape == tiny["logits"].shape
        torch.testing.assert_close(logits[valid], tiny["logits"][valid], atol=1e-4, rtol=0)


def test_train_step_tensor_parallel_2_matches_single_rank(tiny):
    ref = run_distributed(_train_step_worker, tiny["hf_dir"], tiny["batch"])[0]
    tp2 = run_distributed(_train_step_worker, tiny["hf_dir"], tiny["batch"],
                          tensor_model_parallel_size=2)
    vision = [k for k in ref["grads"] if k.startswith("vision_model.")]
    assert vision and all(ref["grads"][k].abs().sum() > 0 for k in vision)
    for out in tp2:
        torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-6, rtol=0)
        # Vision grads: each rank's images' part, TP-averaged (as finalize_model_grads does).
        assert_close_dicts(out["grads"], ref["grads"], atol=1e-5)


def test_split_images_balances_patches_deterministically():
    from megatron_ease.models.qwen_vl.vision import split_images

    assert split_images([16, 64, 16, 32], 2) == [[1], [0, 2, 3]]
    assert split_images([8, 8, 8], 2) == [[0, 2], [1]]
    assert split_images([8], 2) == [[0], []]
    assert split_images([], 4) == [[], [], [], []]
    shares = split_images([5, 9, 3, 7, 7, 1, 4], 3)
    assert sorted(i for share in shares for i in share) == list(range(7))


@pytest.mark.parametrize("images", ["three_images", "one_image"])
def test_tp2_ranks_encode_a_share_of_the_images_each_with_tp1_loss_and_gradients(tiny, images):
    """At TP = 2 each rank runs the vision tower on its images only (three images: one rank
    the two small ones, the other the large one; one image: one rank idles) and all-gathers the
    features: the loss and every gradient (vision tower included, after finalize_model_grads'
    TP average) are TP = 1's. ``split_images_over_tp=False``: every rank encodes every image."""
    batch = tiny["batch"]
    if images == "one_image":
        batch = {k: v[1:] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
        patches = tiny["batch"]["image_grid_thw"].prod(-1).tolist()
        batch["pixel_values"] = tiny["batch"]["pixel_values"][sum(patches[:2]):]
        batch["image_grid_thw"] = tiny["batch"]["image_grid_thw"][2:]
    patches = batch["image_grid_thw"].prod(-1).tolist()
    ref = run_distributed(_train_step_worker, tiny["hf_dir"], batch, True)[0]
    assert ref["calls"] == [sum(patches)]
    vision = [k for k in ref["grads"] if k.startswith("vision_model.")]
    assert vision and all(ref["grads"][k].abs().sum() > 0 for k in vision)
    for split in (True, False):
        ranks = run_distributed(_train_step_worker, tiny["hf_dir"], batch, split,
                                tensor_model_parallel_size=2)
        for out in ranks:
            torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-6, rtol=0)
            assert_close_dicts(out["grads"], ref["grads"], atol=1e-5)
        calls = sorted(sum(r["calls"]) for r in ranks)
        if not split:
            assert calls == [sum(patches)] * 2
        elif len(patches) == 1:
            assert calls == [0, patches[0]]
        else:
            assert sum(calls) == sum(patches) and max(calls) < sum(patches), (calls, patches)


def _mixed_batch(patch_size: int) -> dict:
    """Four samples as a trainer batch may hold them: an image token in the very first column
    then long text (left-padded), three images of different aspect ratios (right-padded), text
    only (left-padded), text ending in an image (no vision-end token)."""
    gen = torch.Generator().manual_seed(5)

    def text(n):
        return torch.randint(1, 248, (n,), generator=gen).tolist()

    grids = [(1, 2, 6), (1, 6, 2), (1, 4, 4), (1, 2, 8), (1, 4, 6)]
    samples = [[IMAGE] * 3 + text(20),
               text(2) + image_tokens(grids[1]) + text(1) + image_tokens(grids[2]) + text(1)
               + image_tokens(grids[3]) + text(1),
               text(9),
               text(5) + [VISION_START] + [IMAGE] * 6]
    seq = max(map(len, samples)) + 1
    input_ids = torch.full((4, seq), PAD)
    mask = torch.zeros(4, seq, dtype=torch.bool)
    for row, ids in enumerate(samples):
        cols = slice(0, len(ids)) if row == 1 else slice(seq - len(ids), seq)
        input_ids[row, cols], mask[row, cols] = torch.tensor(ids), True
    patches = sum(t * h * w for t, h, w in grids)
    return {"input_ids": input_ids, "attention_mask": mask,
            "pixel_values": torch.randn(patches, 3 * 2 * patch_size ** 2, generator=gen),
            "image_grid_thw": torch.tensor(grids)}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_logits_match_hf_on_a_mixed_batch(tmp_path, family):
    """0, 1 and 3 images per sample, an image at the very start and at the very end, a
    text-only row, both padding sides in one batch: HF's logits at every real token."""
    qwen3 = family == "qwen3_vl"
    model = save_tiny_hf(tmp_path, tiny_qwen3vl_config() if qwen3 else None)
    batch = _mixed_batch(patch_size=16 if qwen3 else 14)
    want = hf_logits(model, batch)
    got = run_distributed(_logits_worker, str(tmp_path), batch, world_size=1)[0]
    valid = batch["attention_mask"]
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=0)


def test_tied_embeddings_pp2_logits_match_hf(tmp_path):
    """Tied HF checkpoints have no lm_head: the last stage's output layer loads embed_tokens."""
    config = tiny_hf_config(tie_word_embeddings=True)
    model = save_tiny_hf(tmp_path, config)
    batch = tiny_batch(seed=1)
    want = hf_logits(model, batch)
    results = run_distributed(_logits_worker, str(tmp_path), batch,
                              pipeline_model_parallel_size=2)
    valid = batch["attention_mask"]
    torch.testing.assert_close(results[1][valid], want[valid], atol=1e-4, rtol=0)


def test_attention_override_reaches_only_the_selected_layers(tiny):
    kinds, logits = run_distributed(_override_worker, tiny["hf_dir"], tiny["batch"], [1, 3])[0]
    assert kinds == ["SelfAttention", "MarkedSelfAttention", "SelfAttention",
                     "MarkedSelfAttention"]
    valid = tiny["batch"]["attention_mask"]
    torch.testing.assert_close(logits[valid], tiny["logits"][valid], atol=1e-4, rtol=0)


def test_vocab_parallel_log_probs_equal_log_softmax_with_temperature():
    for logp, ref, grad, ref_grad in run_distributed(_log_probs_worker, 0,
                                                     tensor_model_parallel_size=2):
        torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(grad, ref_grad.float(), atol=1e-5, rtol=0)


def test_vocab_parallel_entropy_equals_full_vocab_entropy():
    for chunk_rows in (2, 1024):
        for tp in (1, 2):
            for entropy, ref in run_distributed(_entropy_worker, 1, chunk_rows,
                                                tensor_model_parallel_size=tp):
                assert entropy.shape == ref.shape and ref.numel() > 3
                torch.testing.assert_close(entropy, ref, atol=1e-5, rtol=1e-5)
                assert 0.0 <= float(ref.min()) < 1e-3 and float(ref.max()) > 1.0


def _meta_param_count(hf_config_dict):
    from megatron_ease.models.qwen_vl import build_qwen_vl_model

    with torch.device("meta"):
        model = build_qwen_vl_model(model_config_from_hf(hf_config_dict), ParallelConfig(),
                                    params_dtype=torch.bfloat16, perform_initialization=False)
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


def test_transformer_engine_mask_refuses_rows_that_are_not_right_padded():
    """TransformerEngine turns a ``padding_causal`` mask into per-row lengths (``cu_seqlens``)
    and attends to each row's first ``length`` columns: a left-padded row would attend to its
    padding and drop its last tokens, with no error. So that spec's mask takes right-padded rows
    only (and says which rows are not); the local spec's explicit mask keeps any layout."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ease.models.qwen_vl import attention_mask_for

    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    mask = attention_mask_for(right, 3, 4, AttnMaskType.padding_causal)
    assert mask.shape == (3, 1, 1, 4)
    lengths = (~mask).sum(dim=-1).flatten()  # what TE reads of it
    assert torch.equal(torch.arange(4) < lengths[:, None], right)
    assert not attention_mask_for(None, 2, 4, AttnMaskType.padding_causal).any()
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"rows \[1, 2\] .* padding before a real token"):
        attention_mask_for(left, 3, 4, AttnMaskType.padding_causal)
    causal = attention_mask_for(left, 3, 4, AttnMaskType.causal)  # [b, 1, s, s], True = masked
    assert torch.equal(~causal[:, 0, -1], left)
    assert torch.equal(~causal[1, 0], torch.ones(4, 4).tril().bool() & left[1])


def test_7b_builds_on_meta_with_hf_parameter_count():
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(AutoConfig.for_model(**QWEN25VL_7B_CONFIG))
    want = sum(p.numel() for p in hf.parameters())
    counts = run_distributed(_meta_param_count, QWEN25VL_7B_CONFIG)
    assert counts[0] == want == 8_292_166_656


def test_model_config_from_hf_reads_7b_sizes_and_round_trips():
    from megatron_ease.models.qwen_vl import hf_config_from_model_config

    cfg = model_config_from_hf(QWEN25VL_7B_CONFIG)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (28, 3584, 18944)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (28, 4, 128)
    assert cfg.mrope_section == [16, 24, 24] and cfg.rope_theta == 1e6
    assert (cfg.vision.depth, cfg.vision.fullatt_block_indexes) == (32, [7, 15, 23, 31])
    assert cfg.image_token_id == 151655 and not cfg.tie_word_embeddings
    assert model_config_from_hf(hf_config_from_model_config(cfg)) == cfg
    tiny_cfg = model_config_from_hf(tiny_hf_config(tie_word_embeddings=True))
    assert tiny_cfg.tie_word_embeddings
    assert model_config_from_hf(hf_config_from_model_config(tiny_cfg)) == tiny_cfg


def test_unsupported_model_type_is_refused_by_name():
    from megatron_ease.models.qwen_vl import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="'llava'"):
        model_config_from_hf({**QWEN25VL_7B_CONFIG, "model_type": "llava"})


def test_7b_example_config_validates_and_carries_the_published_sizes():
    from pathlib import Path

    from megatron_ease.config import load_config, validate_config

    path = Path(__file__).resolve().parents[2] / "examples" / "qwen25vl_7b_ease.yaml"
    cfg = load_config(str(path))
    validate_config(cfg, world_size=16)
    from_hf = model_config_from_hf(QWEN25VL_7B_CONFIG, base=cfg.model)
    assert from_hf == cfg.model
    assert cfg.parallel.tensor_model_parallel_size == 4 and cfg.model.bf16


def test_vision_tower_uses_flash_attention_varlen_on_cuda_nodes_that_have_it(monkeypatch):
    """HF's towers run window attention as one varlen call only under flash attention (else a
    Python loop of one SDPA call per window): chosen for a bf16/fp16 tower when CUDA and
    flash-attn are present (flash-attn takes no float32)."""
    import transformers.utils

    from megatron_ease.models.qwen_vl import vision

    cfg = model_config_from_hf(tiny_hf_config())
    assert vision.build_vision_tower(cfg, torch.float32).config._attn_implementation == "sdpa"
    bf16, fp32 = torch.bfloat16, torch.float32
    for cuda, flash, dtype, want in ((True, True, bf16, "flash_attention_2"),
                                     (True, True, torch.float16, "flash_attention_2"),
                                     (True, True, fp32, "sdpa"), (True, False, bf16, "sdpa"),
                                     (False, True, bf16, "sdpa")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available",
                            lambda flash=flash: flash)
        assert vision.default_attn_implementation(dtype) == want, (cuda, flash, dtype)
    monkeypatch.setattr(vision, "default_attn_implementation", lambda dtype: "eager")
    assert vision.build_vision_tower(cfg, torch.float32).config._attn_implementation == "eager"


def test_frozen_vision_tower_is_not_recomputed_and_has_no_graph():
    """``model.freeze_vision`` with ``model.recompute_layers``: the tower keeps nothing for
    backward, so it is not checkpointed (HF's checkpointing would make its output require grad
    and run a backward through every block for no gradient)."""
    import dataclasses

    from megatron_ease.models.qwen_vl import vision

    base = model_config_from_hf(tiny_hf_config())
    batch = tiny_batch()
    for freeze, requires_grad in ((True, False), (False, True)):
        cfg = dataclasses.replace(base, freeze_vision=freeze, recompute_layers=True)
        tower = vision.build_vision_tower(cfg, torch.float32)
        features = vision.vision_features(tower, batch["pixel_values"], batch["image_grid_thw"])
        assert features.merged.requires_grad == requires_grad, freeze
        assert tower.blocks[0].gradient_checkpointing == (not freeze)
