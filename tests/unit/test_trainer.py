"""The DAPO + EASE trainer end to end on the tiny config: TP=2 / PP=2 steps on gloo, exact resume
after kill -9, and SIGTERM -> checkpoint + exit 75 -> resume; and one update of the trainer's
model, DDP and optimizer against the parallel invariants (DP = 2 equals one process on the global
batch; replicated and tied parameters stay identical at TP = 2 and PP = 2)."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from megatron_ease.config import load_config
from tests.harness import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "examples", "tiny_cpu_ease.yaml")
COMPARED = ("reward", "accuracy", "kept_groups", "dapo_loss", "ease_loss", "grad_norm",
            "response_length", "clip_frac")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from megatron_ease.data.synthetic import write_synthetic_dataset

    root = str(tmp_path_factory.mktemp("synthetic"))
    write_synthetic_dataset(root, num_train=128, num_eval=32, seed=0, samples_per_shard=64)
    return root


def _overrides(dataset: str, run_dir: str, steps: int, *extra: str) -> list[str]:
    return [f"data.train_shards={dataset}/train/*.tar", f"data.eval_shards={dataset}/eval/*.tar",
            f"data.tokenizer={dataset}/tokenizer", "data.synthetic=false",
            f"logging.run_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt",
            f"train.steps={steps}", "train.prompts_per_step=4", "dapo.group_size=4",
            "train.micro_batch_size=8", "dapo.max_response_length=6",
            "dapo.overlong_buffer_length=2", "dapo.max_gen_batches=48",
            "train.warm_start_steps=30", "train.warm_start_lr=3e-3", *extra]


def _records(run_dir: str, split: str) -> list[dict]:
    """The ``split`` records of the run's metrics.jsonl, in order ([] before it exists; a line
    still being written is left out)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, [line for line in f if line.endswith("\n")])
                if r["split"] == split]


def _metrics(run_dir: str) -> dict[int, dict]:
    """Last record of every training step (a killed run may have logged a step twice)."""
    return {record["step"]: record for record in _records(run_dir, "train")}


def _vocab_size() -> int:
    return load_config(CONFIG).model.vocab_size


def _first_sft_loss(run_dir: str) -> float:
    """The warm start's step-1 loss: about log(vocab) = 5.5 from the random init, on every rank
    and layout (it was half that at DP = 2 and 0 at PP = 2 before the loss was reduced)."""
    for record in _records(run_dir, "warm_start"):
        if record["step"] == 1:
            return record["sft_loss"]
    raise AssertionError(f"no warm-start step 1 in {run_dir}/metrics.jsonl")


def _train_in_pool(overrides):
    from megatron_ease.training.trainer import Trainer

    cfg = load_config(CONFIG, overrides)
    trainer = Trainer(cfg)
    status = trainer.train()
    return status, trainer.evaluate(max_samples=8)


@pytest.mark.parametrize("layout", [{"tensor_model_parallel_size": 2},
                                    {"pipeline_model_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_training_steps_run_at_tp2_and_pp2(dataset, tmp_path, layout):
    run_dir = str(tmp_path / "run")
    key, size = next(iter(layout.items()))
    overrides = _overrides(dataset, run_dir, 2, f"parallel.{key}={size}", "eval.samples=8")
    results = run_distributed(_train_in_pool, overrides, timeout_s=600, **layout)
    assert [status for status, _ in results] == [0, 0]
    assert results[0][1] == results[1][1]  # eval metrics agree on every rank
    assert results[0][1]["eval_samples"] == 8
    metrics = _metrics(run_dir)
    assert sorted(metrics) == [1, 2]
    for record in metrics.values():
        assert record["kept_groups"] == 4
        for name in ("reward", "dapo_loss", "ease_loss", "grad_norm", "attn_in_evidence"):
            assert math.isfinite(record[name]), (name, record)
        assert 0.0 < record["entropy"] < math.log(_vocab_size())
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["attn_in_evidence"] <= 1.0
        # Over all generated rollouts: the kept (mixed) groups' plus the filtered ones'.
        generated = record["generated_groups"]
        assert generated == (record["mixed_groups"] + record["filtered_all_correct"]
                             + record["filtered_all_wrong"])
        assert record["trimmed_groups"] == record["mixed_groups"] - record["kept_groups"]
        expected = (record["accuracy"] * 4 + record["filtered_all_correct"]
                    ) / generated if record["trimmed_groups"] == 0 else None
        if expected is not None:
            assert record["generated_accuracy"] == pytest.approx(expected)
        # Every synthetic sample has a target, so the EASE gate is the verifier's accuracy.
        assert record["no_target"] == 0
        assert record["ease_gated_frac"] == pytest.approx(record["accuracy"])
        if record["accuracy"] > 0:
            assert 0.0 <= record["attn_in_evidence_gated"] <= 1.0
        for layer in (0, 1, 2, 3):  # the tiny config's ease.layers, logged one by one
            assert math.isfinite(record[f"ease/loss/layer_{layer}"])
            assert 0.0 <= record[f"ease/attention_in_evidence/layer_{layer}"] <= 1.0
    assert os.path.isfile(os.path.join(run_dir, "ckpt", "latest"))
    assert 4.5 < _first_sft_loss(run_dir) < 6.5


QWEN3_VL = ["model.family=qwen3_vl", "model.mrope_section=[6,5,5]", "model.mrope_interleaved=true",
            "model.add_qkv_bias=false", "model.qk_layernorm=true",
            "model.tie_word_embeddings=true", "model.vision.patch_size=16",
            "model.vision.num_position_embeddings=64",
            "model.vision.deepstack_visual_indexes=[0,1]", "model.vision.fullatt_block_indexes=[]",
            "data.min_pixels=4096", "data.max_pixels=65536"]  # tests/functional's tiny Qwen3-VL


@pytest.mark.parametrize("family, system", [("qwen2_5_vl", True), ("qwen3_vl", False)])
def test_prompts_follow_each_model_familys_chat_template(dataset, family, system):
    """A user turn without a system message, as each model's chat template renders it:
    Qwen2.5-VL's adds the default system turn, Qwen3-VL's none."""
    from megatron_ease.training import builders

    extra = QWEN3_VL if family == "qwen3_vl" else []
    cfg = load_config(CONFIG, _overrides(dataset, "unused", 1) + extra)
    tokenizer = builders.load_tokenizer(cfg.data.tokenizer)
    batch = next(iter(builders.build_reader(cfg, tokenizer, cfg.data.train_shards, 2, 0, 1)))
    text = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0]])
    want = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert text.startswith(want if system else "<|im_start|>user\n"), text[:80]


def test_reader_takes_the_loader_settings_of_the_config(dataset):
    """data.num_workers and data.prefetch_factor reach torch's DataLoader (each rank keeps
    workers × prefetch batches of pixels in host memory)."""
    from unittest import mock

    from megatron_ease.training import builders

    cfg = load_config(CONFIG, _overrides(dataset, "unused", 1) + ["data.num_workers=2",
                                                                   "data.prefetch_factor=1"])
    tokenizer = builders.load_tokenizer(cfg.data.tokenizer)
    reader = builders.build_reader(cfg, tokenizer, cfg.data.train_shards, 2, 0, 1)
    with mock.patch("megatron_ease.data.reader.DataLoader",
                    wraps=torch.utils.data.DataLoader) as loader:
        batch = next(iter(reader))
    assert batch["input_ids"].shape[0] == 2
    assert loader.call_args.kwargs["num_workers"] == 2
    assert loader.call_args.kwargs["prefetch_factor"] == 1


def test_reader_skips_and_counts_prompts_over_data_max_prompt_tokens(dataset):
    from megatron_ease.training import builders

    cfg = load_config(CONFIG, _overrides(dataset, "unused", 1))
    tokenizer = builders.load_tokenizer(cfg.data.tokenizer)
    batch = next(iter(builders.build_reader(cfg, tokenizer, cfg.data.eval_shards, 4, 0, 1,
                                            train=False)))
    lengths = batch["attention_mask"].sum(1)
    limit = int(lengths.min())  # the shortest prompt of the first batch passes, longer ones not
    cfg = load_config(CONFIG, _overrides(dataset, "unused", 1)
                      + [f"data.max_prompt_tokens={limit}"])
    reader = builders.build_reader(cfg, tokenizer, cfg.data.eval_shards, 4, 0, 1, train=False)
    kept = [int(n) for b in reader for n in b["attention_mask"].sum(1)]
    assert kept and max(kept) <= limit
    assert reader.skipped.get("prompt_too_long", 0) >= int((lengths > limit).sum()) > 0


def _update_batch(cfg, n: int = 4):
    """``n`` warm-start-style sequences (prompt + answer, images, EASE targets) of the shards,
    as ``MicroBatch(i, j)`` factories with fixed advantages and 3 of 4 rows gated for EASE."""
    import torch

    from megatron_ease.training import builders
    from megatron_ease.training.update import MicroBatch

    tokenizer = builders.load_tokenizer(cfg.data.tokenizer)
    batch = next(iter(builders.build_reader(cfg, tokenizer, cfg.data.train_shards, n, 0, 1,
                                            append_answer=True)))
    labels = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
    labels[:, :-1] = batch["input_ids"][:, 1:]
    rows = torch.zeros_like(batch["response_mask"])
    rows[:, :-1] = batch["response_mask"][:, 1:]
    first_patch = [0, *batch["image_grid_thw"].prod(-1).cumsum(0).tolist()]
    advantages = torch.tensor([1.5, -0.5, -1.0, 0.7])
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0]) * batch["has_target"].float()

    def micro_batch(i: int, j: int) -> MicroBatch:
        return MicroBatch(
            batch["input_ids"][i:j], batch["attention_mask"][i:j], labels[i:j], rows[i:j],
            batch["image_mask"][i:j], batch["pixel_values"][first_patch[i]:first_patch[j]],
            batch["image_grid_thw"][i:j], advantages[i:j], batch["evidence_target"][i:j],
            weight[i:j], batch["evidence_mask"][i:j])

    return micro_batch


def _one_update(cfg, micro, dp_group, dp_size: int) -> dict:
    """One DAPO + EASE mini-batch update with the trainer's builders (model, DDP, optimizer)
    from a fixed init; the update of every parameter and the step's metrics."""
    import torch

    from megatron_ease.training import builders
    from megatron_ease.training.update import compute_old_log_probs, train_mini_batch

    torch.manual_seed(0)
    model = builders.build_model(cfg)
    ddp = builders.wrap_ddp(cfg, model)
    optimizer = builders.build_optimizer(cfg, [ddp])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compute_old_log_probs(cfg, [ddp], micro)
    metrics = train_mini_batch(cfg, [ddp], optimizer, micro, dp_group, dp_size, ease_active=True)
    sums = metrics["_policy_sums"]
    return {"grad_norm": metrics["grad_norm"], "ease_loss": metrics["ease/loss"],
            # Last pipeline stage only (the others compute no loss: no tokens).
            "entropy": sums["entropy"] / sums["tokens"] if sums["tokens"] else None,
            "delta": {n: p.detach() - before[n] for n, p in model.named_parameters()},
            "tensor_parallel": {n for n, p in model.named_parameters()
                                if getattr(p, "tensor_model_parallel", False)}}


def _shared_image_update(dataset: str):
    """One update on two prompts x two rollouts (rows 0, 0, 1, 1), the images given once per
    rollout, and once per prompt through ``shared_images``."""
    import torch

    from megatron_ease.training import builders
    from megatron_ease.training.batch import shared_images
    from megatron_ease.training.update import MicroBatch

    cfg = load_config(CONFIG, _overrides(dataset, "unused", 1))
    tokenizer = builders.load_tokenizer(cfg.data.tokenizer)
    batch = next(iter(builders.build_reader(cfg, tokenizer, cfg.data.train_shards, 2, 0, 1,
                                            append_answer=True)))
    labels = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
    labels[:, :-1] = batch["input_ids"][:, 1:]
    response = torch.zeros_like(batch["response_mask"])
    response[:, :-1] = batch["response_mask"][:, 1:]
    patches = batch["image_grid_thw"].prod(-1).tolist()
    pixels = list(batch["pixel_values"].split(patches))
    grids = list(batch["image_grid_thw"].split(1))
    rows = [0, 0, 1, 1]
    fields = dict(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                  labels=labels[rows], response_mask=response[rows],
                  image_mask=batch["image_mask"][rows], advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
                  ease_target=batch["evidence_target"][rows],
                  ease_weight=torch.tensor([1.0, 0.0, 1.0, 0.0]) * batch["has_target"][rows].float(),
                  evidence_mask=batch["evidence_mask"][rows])
    copies = MicroBatch(pixel_values=torch.cat([pixels[r] for r in rows]),
                        image_grid_thw=torch.cat([grids[r] for r in rows]), **fields)
    encoded, slot_grids, image_ids = shared_images([pixels[r] for r in rows],
                                                   [grids[r] for r in rows])
    shared = MicroBatch(pixel_values=encoded, image_grid_thw=slot_grids, image_ids=image_ids,
                        **fields)
    return {"image_ids": image_ids, "copies": _one_update(cfg, [copies], None, 1),
            "shared": _one_update(cfg, [shared], None, 1)}


def test_rollouts_of_one_prompt_encode_its_image_once_with_the_same_update(dataset):
    """``shared_images`` gives the G rollouts of a prompt one encoding of its image; the DAPO +
    EASE update is the one of encoding every rollout's copy (the tower's gradient is the sum
    over the slots either way)."""
    import torch

    result = run_distributed(_shared_image_update, dataset, timeout_s=600)[0]
    assert result["image_ids"].tolist() == [0, 0, 1, 1]
    copies, shared = result["copies"], result["shared"]
    assert shared["ease_loss"] == pytest.approx(copies["ease_loss"], rel=1e-6)
    assert shared["grad_norm"] == pytest.approx(copies["grad_norm"], rel=1e-5)
    moved = [n for n, d in copies["delta"].items() if n.startswith("vision") and d.abs().max() > 0]
    assert moved, "the vision tower did not move: the test proves nothing"
    # Adam's first step is ~lr·sign(g) (lr 1e-4): atol 1e-6 admits the summation-order rounding
    # of near-zero gradients (where g is about Adam's eps), not a wrong feature or gradient.
    for name, delta in copies["delta"].items():
        torch.testing.assert_close(shared["delta"][name], delta, atol=1e-6, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_length_sorted_order_sorts_within_groups_by_turns():
    from megatron_ease.training.batch import length_sorted_order

    lengths = torch.tensor([5, 1, 3, 3,  2, 9, 4, 2,  7, 7, 1, 8])
    order = length_sorted_order(lengths, group_size=4)
    assert order.tolist() == [1, 2, 3, 0,  5, 6, 7, 4,  10, 8, 9, 11]
    assert lengths[order].tolist() == [1, 3, 3, 5,  9, 4, 2, 2,  1, 7, 7, 8]

    # Micro-batches of 3 (two straddle groups, and join like lengths): 35 padded positions in
    # the given order, 14 in this one.
    def padding(values):
        return sum(len(values[i:i + 3]) * max(values[i:i + 3]) - sum(values[i:i + 3])
                   for i in range(0, len(values), 3))
    assert padding(lengths.tolist()) == 35 and padding(lengths[order].tolist()) == 14
    with pytest.raises(ValueError, match="multiple of group_size 5"):
        length_sorted_order(lengths, group_size=5)


def test_micro_batches_order_each_groups_rollouts_by_length():
    """``Trainer.micro_batches`` on rollouts of unequal lengths: each group's rollouts go in
    length order (less padding in micro-batches cut to their longest row), every row keeps its
    own advantage, target and image, and a micro-batch encodes each of its prompts' images once."""
    import types

    from megatron_ease.rl.dapo import group_advantages
    from megatron_ease.rl.dynamic_sampling import RolloutBatch
    from megatron_ease.training.trainer import Trainer

    cfg = load_config(CONFIG, ["dapo.group_size=4", "train.micro_batch_size=3",
                               "train.ppo_mini_batches=1"])
    image_token = cfg.model.image_token_id
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 1, 3, 3,  2, 9, 4, 2,  7, 7, 1, 8])
    n, groups = len(lengths), 3
    prompts = [torch.tensor([3, image_token, image_token, image_token, image_token, 4 + g])
               for g in range(groups)]
    pixels = [torch.randn(16, 8, generator=gen) for _ in range(groups)]
    tokens = torch.arange(n * 9).reshape(n, 9) + 1000  # each rollout's tokens are its own
    kept = RolloutBatch(
        group_size=4, group_ids=torch.arange(n) // 4, accuracy=(torch.arange(n) % 2).float(),
        reward=torch.randn(n, generator=gen), payload={
            "prompt_ids": [prompts[i // 4] for i in range(n)],
            "pixel_values": [pixels[i // 4] for i in range(n)],
            "image_grid_thw": [torch.tensor([[1, 4, 4]]) for _ in range(n)],
            "target": [torch.full((4,), float(i)) for i in range(n)],
            "evidence": [torch.ones(4, dtype=torch.bool) for _ in range(n)],
            "tokens": tokens, "lengths": lengths})
    stub = types.SimpleNamespace(cfg=cfg, pad_id=0, image_token_id=image_token)
    [micro] = Trainer.micro_batches(stub, kept)
    rows = [int(row[6]) - 1000 for mb in micro for row in mb.input_ids]  # first response token
    order = [r // 9 for r in rows]
    assert sorted(order) == list(range(n))
    assert lengths[order].tolist() == [1, 3, 3, 5,  9, 4, 2, 2,  1, 7, 7, 8]
    padded = sum(mb.attention_mask.numel() - int(mb.attention_mask.sum()) for mb in micro)
    assert padded == 14  # 35 in the rollouts' own order (test_length_sorted_order_...)
    advantages = group_advantages(kept.reward, 4)
    targets = torch.cat([mb.ease_target.sum(1) / 4 for mb in micro])
    assert torch.equal(torch.cat([mb.advantages for mb in micro]), advantages[order])
    assert torch.equal(torch.cat([mb.ease_weight for mb in micro]),
                       kept.accuracy[order])  # gated: correct and with a target
    assert targets.tolist() == [float(i) for i in order]
    for mb, first in zip(micro, range(0, n, 3)):
        prompt_of = [i // 4 for i in order[first:first + 3]]
        assert mb.image_grid_thw.shape[0] == len(set(prompt_of))  # one encoding per prompt
        for row, g in enumerate(prompt_of):
            assert int(mb.input_ids[row, 5]) == 4 + g  # the row's own prompt
    # Micro-batches of whole groups: the order would change no micro-batch's length, and stays.
    stub.cfg = load_config(CONFIG, ["dapo.group_size=4", "train.micro_batch_size=4",
                                    "train.ppo_mini_batches=1"])
    [micro] = Trainer.micro_batches(stub, kept)
    assert [int(row[6]) - 1000 for mb in micro for row in mb.input_ids] == [
        9 * i for i in range(n)]


def _dp_invariance_update(dataset: str, use_distributed_optimizer: bool):
    """The update at DP = 2 with one micro-batch per rank, and, on every rank, on the whole
    mini-batch as one process runs it (both micro-batches, a DP group of this rank alone)."""
    import torch
    from megatron.core import parallel_state as ps

    cfg = load_config(CONFIG, _overrides(dataset, "unused", 1) + [
        f"parallel.use_distributed_optimizer={str(use_distributed_optimizer).lower()}"])
    micro_batch = _update_batch(cfg)
    rank, world = ps.get_data_parallel_rank(), torch.distributed.get_world_size()
    # new_group is collective: every rank makes every rank's own group.
    alone = [torch.distributed.new_group([r]) for r in range(world)][rank]
    return {"dp1": _one_update(cfg, [micro_batch(0, 2), micro_batch(2, 4)], alone, 1),
            "dp2": _one_update(cfg, [micro_batch(2 * rank, 2 * rank + 2)],
                               ps.get_data_parallel_group(), ps.get_data_parallel_world_size())}


@pytest.mark.parametrize("use_distributed_optimizer", [False, True],
                         ids=["optimizer", "distributed_optimizer"])
def test_data_parallel_update_equals_one_process_on_the_global_batch(dataset,
                                                                     use_distributed_optimizer):
    """DESIGN §4 scaling invariant through the trainer's own builders: DP = 2 (one micro-batch
    per rank) applies the update one process applies to both micro-batches. Gradients reach
    the other replica only through megatron-core's ``finalize_model_grads`` (wired by
    ``builders.wrap_ddp``); without it each rank stepped on its own half of the batch."""
    import torch

    results = run_distributed(_dp_invariance_update, dataset, use_distributed_optimizer,
                              timeout_s=600)
    for result in results:
        dp1, dp2 = result["dp1"], result["dp2"]
        assert dp2["ease_loss"] > 0, "no gated EASE row: the test would not cover EASE"
        assert dp2["grad_norm"] == pytest.approx(dp1["grad_norm"], rel=1e-5)
        moved = sum(int(d.abs().max() > 0) for d in dp1["delta"].values())
        assert moved > len(dp1["delta"]) // 2, "the update moved almost nothing"
        for name, delta in dp1["delta"].items():
            torch.testing.assert_close(dp2["delta"][name], delta, atol=1e-7, rtol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")
    for name, delta in results[0]["dp2"]["delta"].items():  # the replicas stay identical
        assert torch.equal(delta, results[1]["dp2"]["delta"][name]), name


def _qwen3_update(dataset: str, layout: str):
    """The tiny Qwen3-VL's update on the whole mini-batch at the ``layout`` override's TP or PP."""
    cfg = load_config(CONFIG, _overrides(dataset, "unused", 1) + QWEN3_VL + [layout])
    micro_batch = _update_batch(cfg)
    return _one_update(cfg, [micro_batch(0, 2), micro_batch(2, 4)], None, 1)


def test_tp2_update_keeps_replicated_parameters_identical_qwen3_vl(dataset):
    """At TP = 2 every parameter that is not split over TP must stay one value on both ranks:
    the q/k RMSNorm weights (each rank computes their gradient from its own heads only, so it
    is summed over TP), the TP-replicated vision tower and DeepStack mergers (averaged), the
    norms. This is ``finalize_model_grads``' TP part, wired by ``builders.wrap_ddp``."""
    import torch

    ranks = run_distributed(_qwen3_update, dataset, "parallel.tensor_model_parallel_size=2",
                            tensor_model_parallel_size=2, timeout_s=600)
    assert ranks[0]["ease_loss"] > 0
    replicated = sorted(set(ranks[0]["delta"]) - ranks[0]["tensor_parallel"])
    assert any("q_layernorm" in n for n in replicated) and any("deepstack" in n or "merger" in n
                                                              for n in replicated), replicated
    for name in replicated:
        assert float(ranks[0]["delta"][name].abs().max()) > 0, f"{name} did not move"
        assert torch.equal(ranks[0]["delta"][name], ranks[1]["delta"][name]), name


def test_tp2_update_with_images_split_over_tp_equals_tp1_qwen3_vl(dataset):
    """``parallel.split_images_over_tp`` (default): at TP = 2 each rank encodes a share of the
    images, so its tower gradient is its images' part; ``finalize_model_grads``' TP average of
    the parts (scaled by the TP size on the way back) is TP = 1's gradient. The grad norm (the
    tower and DeepStack mergers included) and the tower's update equal TP = 1's."""
    import torch

    tp1 = run_distributed(_qwen3_update, dataset, "parallel.tensor_model_parallel_size=1",
                          world_size=1, timeout_s=600)[0]
    tp2 = run_distributed(_qwen3_update, dataset, "parallel.tensor_model_parallel_size=2",
                          tensor_model_parallel_size=2, timeout_s=600)[0]
    assert tp2["grad_norm"] == pytest.approx(tp1["grad_norm"], rel=1e-5)
    # The policy's entropy, from vocab shards at TP = 2: the full vocabulary's (0 < H < ln V).
    assert 0.0 < tp1["entropy"] < math.log(_vocab_size()) - 1e-3
    assert tp2["entropy"] == pytest.approx(tp1["entropy"], rel=1e-5)
    vision = [n for n in tp1["delta"] if n.startswith("vision_model.")]
    assert any("deepstack" in n for n in vision) and len(vision) > 10
    for name in vision:
        torch.testing.assert_close(tp2["delta"][name], tp1["delta"][name], atol=1e-6, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_pp2_update_keeps_tied_embeddings_tied_qwen3_vl(dataset):
    """Tied embeddings at PP = 2 (Qwen3-VL 4B's layout): stage 0's word embedding and the last
    stage's output-layer copy get one update, from the sum of both stages' gradients
    (``finalize_model_grads``' embedding-group all-reduce)."""
    import torch

    stages = run_distributed(_qwen3_update, dataset, "parallel.pipeline_model_parallel_size=2",
                             pipeline_model_parallel_size=2, timeout_s=600)
    embedding = stages[0]["delta"]["language_model.embedding.word_embeddings.weight"]
    output = stages[1]["delta"]["language_model.output_layer.weight"]
    assert float(embedding.abs().max()) > 0
    assert torch.equal(embedding, output)


def _policy_update_both_ways(dataset: str):
    """``policy_update`` (2 mini-batches x 2 epochs, PP = 2) from one init, with π_old of the
    first mini-batch taken from its first forward and with a separate π_old pass for every
    mini-batch (``train.recompute_old_log_probs``)."""
    import dataclasses

    import torch

    from megatron_ease.training import builders, update

    results = {}
    original, to = update.compute_old_log_probs, update.MicroBatch.to
    for recompute in (False, True):
        cfg = load_config(CONFIG, _overrides(dataset, "unused", 1) + [
            "parallel.pipeline_model_parallel_size=2", "train.ppo_epochs=2",
            "train.ppo_mini_batches=2", f"train.recompute_old_log_probs={str(recompute).lower()}"])
        micro_batch = _update_batch(cfg)
        # Rows that only feed EASE (ease.use_filtered_correct): no π_old pass for them.
        ease_only = dataclasses.replace(micro_batch(2, 4), policy_rows=torch.zeros(2, dtype=bool))
        torch.manual_seed(0)
        model = builders.build_model(cfg)
        ddp = builders.wrap_ddp(cfg, model)
        optimizer = builders.build_optimizer(cfg, [ddp])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        passes = []

        def counting(cfg_, chunks, micro_batches):
            passes.append(len(micro_batches))
            original(cfg_, chunks, micro_batches)

        update.compute_old_log_probs = counting
        # On a GPU the forward step gets a device copy of each stored micro-batch: the same
        # here, so nothing set on the copy can stand in for the stored one.
        update.MicroBatch.to = lambda self, device: dataclasses.replace(self)
        try:
            updates = update.policy_update(cfg, [ddp], optimizer,
                                           [[micro_batch(0, 2)], [micro_batch(2, 4), ease_only]],
                                           None, 1, ease_active=True)
        finally:
            update.compute_old_log_probs, update.MicroBatch.to = original, to
        results[recompute] = {
            "passes": passes, "kl": [u["_policy_sums"]["approx_kl"] for u in updates],
            "delta": {n: p.detach() - before[n] for n, p in model.named_parameters()}}
    return results


def test_first_mini_batch_takes_old_log_probs_from_its_own_forward(dataset):
    """π_old of the first mini-batch is its first forward's (detached) log-probs: the weights
    have not stepped yet. The separate π_old pass then covers only the other mini-batches (none
    when on-policy), and the update (both epochs, the second reusing the kept log-probs) is the
    one every-mini-batch recomputation gives."""
    import torch

    stages = run_distributed(_policy_update_both_ways, dataset, pipeline_model_parallel_size=2,
                             timeout_s=600)
    for stage in stages:
        assert stage[False]["passes"] == [1] and stage[True]["passes"] == [2]
        for name, delta in stage[True]["delta"].items():
            torch.testing.assert_close(stage[False]["delta"][name], delta, atol=1e-8, rtol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
    kl = stages[1][True]["kl"]  # the last stage computes the loss
    assert kl[0] == 0.0 and kl[2] > 1e-9, kl  # epoch 2 of mini-batch 0 is off-policy
    assert stages[1][False]["kl"] == pytest.approx(kl, rel=1e-6, abs=1e-12)


def _decode_batches(overrides):
    from megatron_ease.training.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    rows = []
    prefill = trainer.engine.adapter.prefill

    def recording(batch, num_samples, max_new_tokens):
        rows.append(batch.input_ids.shape[0] * num_samples)
        return prefill(batch, num_samples, max_new_tokens)

    trainer.engine.adapter.prefill = recording
    status = trainer.train()
    trainer.metrics.close()
    return status, rows


def test_max_rollouts_per_batch_bounds_the_rollouts_decoded_together(dataset, tmp_path):
    """``dapo.max_rollouts_per_batch``: a rank's 2 prompts x 4 rollouts per chunk decode as
    batches of at most 4 rollouts (one prompt's group each), so the KV cache holds 4 rows."""
    run_dir = str(tmp_path / "run")
    overrides = _overrides(dataset, run_dir, 1, "dapo.max_rollouts_per_batch=4",
                           "checkpoint.interval=0", "train.warm_start_steps=0")
    results = run_distributed(_decode_batches, overrides, timeout_s=600)
    for status, rows in results:
        assert status == 0 and rows and set(rows) == {4}, rows


def _stale_latest_run(overrides):
    import torch

    from megatron_ease.training.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    if torch.distributed.get_rank() == 1:  # this rank's view of the shared directory lags
        trainer.checkpoints.latest = lambda: None
    saves = []
    save = trainer.checkpoints.save
    trainer.checkpoints.save = lambda step, *a, **k: saves.append(step) or save(step, *a, **k)
    status = trainer.train()
    trainer.metrics.close()
    return status, saves


def test_end_of_run_save_does_not_depend_on_each_ranks_view_of_latest(dataset, tmp_path):
    """The last step was saved by the interval save: no rank saves again, even one whose
    filesystem shows a stale ``latest`` (a save is collective: one rank alone in it hangs)."""
    run_dir = str(tmp_path / "run")
    overrides = _overrides(dataset, run_dir, 1, "checkpoint.interval=1")
    results = run_distributed(_stale_latest_run, overrides, timeout_s=300)
    assert results == [(0, [1]), (0, [1])]


def _bad_shard(path, count):
    """A shard of samples whose image does not decode (skipped as undecodable_image)."""
    record = json.dumps({"question": "Is there a square?", "answer": "yes",
                         "answer_type": "yesno"}).encode()
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            for ext, data in (("json", record), ("png", b"not a png")):
                info = tarfile.TarInfo(f"bad-{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_skipped_samples_are_counted_in_training_and_evaluation_metrics(dataset, tmp_path):
    """Invalid samples are skipped, logged one by one, and counted in the step's metrics
    (DESIGN §6) over all DP ranks; the loaders counted them but nothing reported the count."""
    root = tmp_path / "data"
    for split in ("train", "eval"):
        (root / split).mkdir(parents=True)
        for shard in glob.glob(f"{dataset}/{split}/*.tar"):
            os.symlink(shard, root / split / os.path.basename(shard))
    os.symlink(f"{dataset}/tokenizer", root / "tokenizer")
    _bad_shard(root / "train" / "zz-bad.tar", 128)  # half of the training set
    _bad_shard(root / "eval" / "00-bad.tar", 2)  # the first two eval samples in shard order
    run_dir = str(tmp_path / "run")
    overrides = _overrides(str(root), run_dir, 1, "train.warm_start_steps=0", "eval.samples=8")
    results = run_distributed(_train_in_pool, overrides, timeout_s=600)
    assert [status for status, _ in results] == [0, 0]
    assert results[0][1] == results[1][1]
    assert results[0][1]["skipped_samples"] == 2 and results[0][1]["eval_samples"] == 6
    assert _metrics(run_dir)[1]["skipped_samples"] > 0


def _evaluate_only(overrides, max_samples):
    from megatron_ease.training.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    metrics = trainer.evaluate(max_samples=max_samples)
    trainer.metrics.close()
    return metrics


def test_evaluation_scores_exactly_the_requested_samples_over_data_parallel_ranks(dataset,
                                                                                tmp_path):
    """7 samples at DP = 2: ranks score 4 and 3 (the remainder was dropped), with 2 loader
    workers each; every rank reports the same totals."""
    overrides = _overrides(dataset, str(tmp_path / "run"), 1, "data.num_workers=2",
                           "eval.batch_size=2")
    results = run_distributed(_evaluate_only, overrides, 7, timeout_s=600)
    assert results[0] == results[1] and results[0]["eval_samples"] == 7


def _two_source_eval_set(dataset: str, root) -> str:
    """The dataset with its eval samples relabelled: sample i's ``source`` is ``bench_a`` for
    even i, ``bench_b`` for odd i (so at DP = 2 each rank sees one source only)."""
    root.mkdir()
    for sub in ("train", "tokenizer"):
        os.symlink(f"{dataset}/{sub}", root / sub)
    (root / "eval").mkdir()
    index = 0
    for shard in sorted(glob.glob(f"{dataset}/eval/*.tar")):
        with tarfile.open(shard) as src, tarfile.open(root / "eval" / os.path.basename(shard),
                                                      "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                if member.name.endswith(".json"):
                    record = json.loads(data)
                    record["source"] = "bench_a" if index % 2 == 0 else "bench_b"
                    index += 1
                    data = json.dumps(record).encode()
                info = tarfile.TarInfo(member.name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    return str(root)


def test_evaluation_reports_accuracy_per_source_over_data_parallel_ranks(dataset, tmp_path):
    """``accuracy/<source>`` for each benchmark of a mixed evaluation set (verl's per data
    source): at DP = 2 each rank sees one of the two sources, and every rank reports both, with
    the values one process computes."""
    root = _two_source_eval_set(dataset, tmp_path / "data")
    overrides = _overrides(root, str(tmp_path / "run"), 1, "eval.batch_size=4")
    dp2 = run_distributed(_evaluate_only, overrides, 8, timeout_s=600)
    dp1 = run_distributed(_evaluate_only, overrides, 8, world_size=1, timeout_s=600)[0]
    assert dp2[0] == dp2[1] == dp1
    assert dp1["eval_samples/bench_a"] == dp1["eval_samples/bench_b"] == 4
    assert dp1["accuracy"] == pytest.approx(
        (dp1["accuracy/bench_a"] + dp1["accuracy/bench_b"]) / 2)
    assert not any(k.startswith("accuracy/") and k not in ("accuracy/bench_a",
                                                           "accuracy/bench_b") for k in dp1)


def _evaluate_in_micro_batches(overrides):
    from megatron_ease.training import builders
    from megatron_ease.training.rollouts import split_prompts
    from megatron_ease.training.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    model = trainer.model_chunks[0]
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        results = {}
        for mbs in (8, 3):
            trainer.cfg.train.micro_batch_size = mbs
            rows.clear()
            metrics = trainer.evaluate(max_samples=8)
            reader = builders.build_reader(trainer.cfg, trainer.tokenizer,
                                           trainer.cfg.data.eval_shards, 8, 0, 1, train=False)
            batch = next(iter(reader))
            masses = trainer.attention_for(batch, split_prompts(batch))
            results[mbs] = (metrics, masses, max(rows))
    finally:
        hook.remove()
        trainer.metrics.close()
    return results


@pytest.mark.parametrize("layout", [{}, {"pipeline_model_parallel_size": 2}], ids=["dp2", "pp2"])
def test_evaluation_forward_runs_in_micro_batches_with_the_same_results(dataset, tmp_path,
                                                                         layout):
    """The evaluation's EASE forward goes through ``train.micro_batch_size`` rows at a time
    (``eval.batch_size`` rows at once held all their logits): the same accuracy, attention in
    evidence and per-sample attention maps as one micro-batch of the whole eval batch."""
    overrides = _overrides(dataset, str(tmp_path / "run"), 1, "eval.batch_size=8",
                           "train.warm_start_steps=0",
                           *(f"parallel.{key}={size}" for key, size in layout.items()))
    for results in run_distributed(_evaluate_in_micro_batches, overrides, timeout_s=600,
                                   **layout):  # every rank: each DP rank, each PP stage
        (whole, masses_whole, rows_whole), (split, masses_split, rows_split) = (results[8],
                                                                                results[3])
        assert rows_whole == 8 and rows_split == 3
        assert whole["accuracy"] == split["accuracy"] and whole["eval_samples"] == 8
        assert math.isclose(whole["evidence_attention_mass"], split["evidence_attention_mass"],
                            rel_tol=1e-5)
        assert len(masses_whole) == len(masses_split) == 8
        for a, b in zip(masses_whole, masses_split, strict=True):
            assert a.shape == b.shape and a.sum() > 0
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _train_reporting_reader_start(overrides):
    from megatron_ease.training.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    start = trainer.train_reader.state_dict()["base"]  # where this run's stream begins
    try:
        status = trainer.train()
    finally:
        trainer.metrics.close()
    return status, start


def test_resume_at_another_data_parallel_size_continues_the_data_stream(dataset, tmp_path):
    """A checkpoint of a DP = 1 run (TP = 2) resumed at DP = 2: the readers continue the saved
    stream (RNG streams start afresh: rank r's file is another layout's); before, they
    restarted at sample 0 and
    trained on the same prompts again."""
    run_dir = str(tmp_path / "run")
    first = _overrides(dataset, run_dir, 1, "checkpoint.interval=1",
                       "parallel.tensor_model_parallel_size=2")
    assert run_distributed(_train_reporting_reader_start, first, timeout_s=600,
                           tensor_model_parallel_size=2) == [(0, 0), (0, 0)]
    with open(os.path.join(run_dir, "ckpt", "iter_0000001", "rank_state",
                           "rank_00000.json")) as f:
        saved = json.load(f)["reader"]
    end = max([saved["base"] - 1, *saved["skip"]]) + 1
    assert saved["world_size"] == 1 and end >= 4  # a step took at least its 4 prompts
    second = _overrides(dataset, run_dir, 2, "checkpoint.interval=1")
    results = run_distributed(_train_reporting_reader_start, second, timeout_s=600)
    assert results == [(0, -(-end // 2)), (0, -(-end // 2))]
    assert sorted(_metrics(run_dir)) == [1, 2]


def _failing_validation_run(overrides):
    from megatron_ease.training.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))

    def evaluate(max_samples=None):
        raise RuntimeError("validation failed")

    trainer.evaluate = evaluate
    try:
        trainer.train()
    except RuntimeError as e:
        return str(e), trainer.checkpoints.latest()
    finally:
        trainer.metrics.close()
    return None, None


def test_a_step_is_saved_before_its_validation_and_bad_eval_shards_fail_at_start(dataset,
                                                                                 tmp_path):
    """A validation that fails (bad data, out of memory) must not cost the step it follows: the
    checkpoint is written first. A wrong ``data.eval_shards`` is found when the trainer is
    built, not at the first validation hours later."""
    run_dir = str(tmp_path / "run")
    overrides = _overrides(dataset, run_dir, 2, "checkpoint.interval=1", "eval.interval=1")
    results = run_distributed(_failing_validation_run, overrides, timeout_s=600)
    for error, latest in results:
        assert error == "validation failed" and latest.endswith("iter_0000001"), latest
    bad = overrides + [f"data.eval_shards={dataset}/evl/*.tar"]
    for error in run_distributed(_trainer_error, bad, timeout_s=300):
        assert re.match(r"FileNotFoundError: data.eval_shards: .*evl.*eval.interval is 1", error)


def _trainer_error(overrides) -> str:
    from megatron_ease.training.trainer import Trainer

    try:
        Trainer(load_config(CONFIG, overrides))
    except Exception as e:  # noqa: BLE001 -- the test reads which
        return f"{type(e).__name__}: {e}"
    return "no error"


def _launch(overrides, **kwargs) -> subprocess.Popen:
    # GPUs hidden: the CPU venv's torch on a GPU machine would otherwise be refused.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    # Its own session, so "kill -9" takes the whole job (checkpoint writer processes too).
    return subprocess.Popen([sys.executable, "-m", "megatron_ease.train", "--config", CONFIG,
                             *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **kwargs)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def _latest(run_dir):
    path = os.path.join(run_dir, "ckpt", "latest")
    return open(path).read().strip() if os.path.isfile(path) else None


def test_kill_9_then_resume_reproduces_an_uninterrupted_run(dataset, tmp_path):
    steps = 4
    full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
    full = _launch(_overrides(dataset, full_dir, steps, "checkpoint.interval=1"))
    cut = _launch(_overrides(dataset, cut_dir, steps, "checkpoint.interval=1"))
    _wait_for(lambda: _latest(cut_dir) == "iter_0000002", cut)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.wait()
    assert full.wait(timeout=600) == 0, full.stdout.read()
    # A completed run waits for its old checkpoints' background deletion (keep_last 2 of 4).
    assert sorted(os.listdir(os.path.join(full_dir, "ckpt"))) == [
        "iter_0000003", "iter_0000004", "latest"]
    resumed = _launch(_overrides(dataset, cut_dir, steps, "checkpoint.interval=1"))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "at step 2" in out, out
    assert "config changed" not in out, out
    a, b = _metrics(full_dir), _metrics(cut_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    with open(os.path.join(cut_dir, "metrics.jsonl")) as f:  # once each, though logged twice
        train_steps = [r["step"] for r in map(json.loads, f) if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    for step in (3, 4):
        for name in COMPARED:
            assert a[step][name] == b[step][name], (step, name, a[step][name], b[step][name])


def test_a_signal_during_the_warm_start_saves_it_and_the_requeued_run_goes_on_from_it(
        dataset, tmp_path):
    """USR1 while the supervised warm start runs: the run saved after the next RL step (one
    step late, up to a whole RL step into the time the signal leaves). Now the finished warm
    start is saved as step 0 and the run exits 75; the requeued run does not warm-start again,
    and its RL steps are those of a run never stopped."""
    steps, warm = 2, "train.warm_start_steps=300"
    full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
    full = _launch(_overrides(dataset, full_dir, steps, warm))
    cut = _launch(_overrides(dataset, cut_dir, steps, warm))
    _wait_for(lambda: _records(cut_dir, "warm_start"), cut)
    cut.send_signal(signal.SIGUSR1)
    out, _ = cut.communicate(timeout=600)
    assert cut.returncode == 75, out
    assert "preempted: saved step 0" in out and _latest(cut_dir) == "iter_0000000", out
    assert [r["step"] for r in _records(cut_dir, "warm_start")] == list(range(1, 301))
    assert _records(cut_dir, "train") == []
    again = _launch(_overrides(dataset, cut_dir, steps, warm))
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "at step 0" in out and len(_records(cut_dir, "warm_start")) == 300, out
    assert full.wait(timeout=600) == 0, full.stdout.read()
    a, b = _metrics(full_dir), _metrics(cut_dir)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (1, 2):
        for name in COMPARED:
            assert a[step][name] == b[step][name], (step, name, a[step][name], b[step][name])


def _eval_steps(run_dir: str) -> list[int]:
    return [r["step"] for r in _records(run_dir, "eval")]


def test_sigterm_saves_exits_75_and_the_next_run_resumes(dataset, tmp_path):
    """With validation every step: the preempted step skips its validation to save in time, and
    the resumed run validates it first (that point of the curve was lost)."""
    run_dir = str(tmp_path / "run")
    validation = ("eval.interval=1", "eval.samples=2", "eval.batch_size=2")
    proc = _launch(_overrides(dataset, run_dir, 50, *validation))
    _wait_for(lambda: _records(run_dir, "train"), proc)  # past the warm start: an RL step
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    saved = _latest(run_dir)
    step = int(saved.split("_")[1])
    assert 1 <= step < 50 and f"preempted: saved step {step}" in out
    assert _eval_steps(run_dir) == list(range(1, step))
    again = _launch(_overrides(dataset, run_dir, step + 1, *validation))
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert f"resumed from {os.path.join(run_dir, 'ckpt', saved)} at step {step}" in out
    assert f"config changed since the checkpoint (1): train.steps: 50 -> {step + 1}\n" in out
    assert sorted(_metrics(run_dir))[-1] == step + 1
    assert _eval_steps(run_dir) == list(range(1, step + 2))


def test_a_finished_runs_validated_last_step_is_not_validated_again_when_extended(dataset,
                                                                                  tmp_path):
    """The last step is saved before its validation; the validation then ran. Extending the
    run (or a crash after it) resumed there and validated that step a second time: a wasted
    pass and two eval records for one step."""
    run_dir = str(tmp_path / "run")
    validation = ("eval.interval=1", "eval.samples=2", "eval.batch_size=2",
                  "checkpoint.interval=1")
    outs = []
    for steps in (1, 2, 2):
        proc = _launch(_overrides(dataset, run_dir, steps, *validation))
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        outs.append(out)
    assert "resumed from" in outs[1] and "nothing to train" not in outs[1]
    assert _eval_steps(run_dir) == [1, 2]
    # Run again as it was: says why it trains nothing (the README's second command did that).
    assert "nothing to train: the checkpoint is at step 2 and train.steps is 2" in outs[2]


def test_sigterm_without_checkpoint_dir_says_nothing_was_saved_and_is_not_requeued(dataset,
                                                                                   tmp_path):
    run_dir = str(tmp_path / "run")
    proc = _launch(_overrides(dataset, run_dir, 50, "checkpoint.dir=null"))
    _wait_for(lambda: os.path.isfile(os.path.join(run_dir, "metrics.jsonl"))
              and os.path.getsize(os.path.join(run_dir, "metrics.jsonl")) > 0, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out  # slurm/common.sh requeues 75 only
    assert "checkpoint.dir is not set, nothing saved" in out and "saved step" not in out


def test_signal_while_the_model_loads_is_kept_and_a_run_at_its_last_step_ends_normally(
        dataset, tmp_path):
    """SIGTERM before the first step (the handler is installed before the model is built, so it
    is not fatal) with ``train.steps=1``: the one step runs, the run is complete, so it saves and
    exits 0 instead of asking for a requeue that would only load and exit. The run resumes a
    saved warm start (``train.steps=0`` runs the warm start alone and saves it as step 0): a
    signal during a warm start is honoured after it, at step 0 (see the warm-start test)."""
    run_dir = str(tmp_path / "run")
    warm = _launch(_overrides(dataset, run_dir, 0))
    out, _ = warm.communicate(timeout=300)
    assert warm.returncode == 0 and _latest(run_dir) == "iter_0000000", out
    log_dir = str(tmp_path / "log")  # created once the handler is in place
    proc = _launch(_overrides(dataset, run_dir, 1) + [f"logging.run_dir={log_dir}"])
    _wait_for(lambda: os.path.isdir(log_dir), proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "preempted" not in out and _latest(run_dir) == "iter_0000001"
    assert "resumed from" in out and "at step 0" in out, out
    assert sorted(_metrics(log_dir)) == [1]


def _bf16_run(overrides):
    import torch

    from megatron_ease.training.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    dtypes = sorted({str(p.dtype) for p in trainer.model.parameters()})
    snapshots = {}
    warm_start = trainer.warm_start

    def warm_start_with_snapshots():
        snapshots["init"] = [p.detach().clone() for p in trainer.model.parameters()]
        warm_start()
        snapshots["warm"] = [p.detach().clone() for p in trainer.model.parameters()]

    trainer.warm_start = warm_start_with_snapshots
    status = trainer.train()
    trainer.metrics.close()
    final = [p.detach() for p in trainer.model.parameters()]
    warm_changed = any(not torch.equal(a, b) for a, b in zip(snapshots["init"], snapshots["warm"]))
    warm_kept = all(torch.equal(a, b) for a, b in zip(snapshots["warm"], final))
    # The step-1 checkpoint (mixed-precision optimizer state included) loads back.
    resumed = Trainer(load_config(CONFIG, [o for o in overrides if not o.startswith("train.steps")]
                                  + ["train.steps=2"]))
    resumed.metrics.close()
    return status, dtypes, warm_changed, warm_kept, resumed.step


def test_bf16_training_keeps_the_warm_start_and_checkpoints(dataset, tmp_path):
    """bf16 (megatron's mixed-precision optimizer, float32 main weights): every parameter is bf16
    (a float32 norm weight misaligned the optimizer's checkpoint mapping), and weights changed
    outside the RL optimizer (warm start, ``init_from``) reach its main copies: with lr = 0 the
    first RL update must leave the warm-started weights exactly as they were, not write the
    random init back."""
    run_dir = str(tmp_path / "run")
    overrides = _overrides(dataset, run_dir, 1, "model.bf16=true", "train.lr=0.0",
                           "train.min_lr=0.0", "train.warm_start_steps=3",
                           "checkpoint.interval=1", "parallel.tensor_model_parallel_size=2")
    results = run_distributed(_bf16_run, overrides, tensor_model_parallel_size=2, timeout_s=600)
    for status, dtypes, warm_changed, warm_kept, resumed_step in results:
        assert status == 0
        assert dtypes == ["torch.bfloat16"]
        assert warm_changed, "the warm start did not change the weights: the test proves nothing"
        assert warm_kept, "the first RL step overwrote the warm-started weights"
        assert resumed_step == 1


def _bf16_resume_at_step_0(overrides):
    import torch

    from megatron_ease.training.trainer import Trainer

    first = Trainer(load_config(CONFIG, overrides + ["train.steps=0"]))
    assert first.train() == 0
    first.metrics.close()
    warm = [p.detach().clone() for p in first.model.parameters()]
    resumed = Trainer(load_config(CONFIG, overrides + ["train.steps=1"]))
    warm_starts = []
    resumed.warm_start = lambda: warm_starts.append(1)
    loaded = all(torch.equal(a, b) for a, b in zip(warm, resumed.model.parameters()))
    status = resumed.train()
    resumed.metrics.close()
    kept = all(torch.equal(a, b.detach()) for a, b in zip(warm, resumed.model.parameters()))
    return status, resumed.step, loaded, kept, len(warm_starts)


def test_bf16_resume_from_a_checkpoint_without_optimizer_state_keeps_its_weights(dataset,
                                                                                tmp_path):
    """A run of warm start only (``train.steps=0``) saves step 0 without optimizer state (none
    was stepped). Resumed in bf16 with lr = 0, the first RL update must keep the loaded weights:
    the mixed-precision optimizer's float32 main copies are refreshed from them (they held the
    random init and overwrote the weights), and the warm start is not run again."""
    run_dir = str(tmp_path / "run")
    overrides = _overrides(dataset, run_dir, 1, "model.bf16=true", "train.lr=0.0",
                           "train.min_lr=0.0", "train.warm_start_steps=3")
    for status, step, loaded, kept, warm_starts in run_distributed(
            _bf16_resume_at_step_0, [o for o in overrides if not o.startswith("train.steps")],
            timeout_s=600):
        assert status == 0 and step == 1 and loaded
        assert warm_starts == 0, "the resumed run warm-started again"
        assert kept, "the first RL update overwrote the loaded weights"


def _train_in_pool_recording_warnings(overrides):
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("megatron_ease.training.trainer").addHandler(handler)
    return (*_train_in_pool(overrides), records)


def test_ease_enabled_without_layers_trains_as_dapo(dataset, tmp_path):
    """``ease.enabled: true`` with no ``ease.layers`` (EaseConfig's defaults) is plain DAPO: no
    capture layers, no EASE contexts (this combination used to crash the update), and the
    logging rank says so."""
    run_dir = str(tmp_path / "run")
    overrides = _overrides(dataset, run_dir, 1, "ease.enabled=true", "ease.layers=[]",
                           "eval.samples=8")
    results = run_distributed(_train_in_pool_recording_warnings, overrides, timeout_s=600)
    assert [status for status, _, _ in results] == [0, 0]
    assert "evidence_attention_mass" not in results[0][1]
    said = [m for m in results[0][2] if "ease.layers is empty" in m]
    assert len(said) == 1 and "trains DAPO alone" in said[0], results[0][2]
    assert not any("ease.layers is empty" in m for m in results[1][2])  # once, not per rank
    record = _metrics(run_dir)[1]
    assert "ease_loss" not in record and "attn_in_evidence" not in record
    assert math.isfinite(record["dapo_loss"]) and math.isfinite(record["grad_norm"])
    assert 4.5 < _first_sft_loss(run_dir) < 6.5  # data parallel 2


def _filtered_correct_run(overrides):
    import torch

    from megatron_ease.training.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    seen = []
    build = trainer.micro_batches

    def micro_batches(kept, extra=None):
        out = build(kept, extra)
        kept_only = build(kept)
        flat = [mb for mini in out for mb in mini]
        policy_rows = sum(int(mb.policy_rows.sum()) if mb.policy_rows is not None
                          else mb.input_ids.shape[0] for mb in flat)
        extra_rows = sum(mb.input_ids.shape[0] for mb in flat) - policy_rows
        extra_advantage = max((float(mb.advantages[~mb.policy_rows].abs().max())
                               for mb in flat if mb.policy_rows is not None
                               and not bool(mb.policy_rows.all())), default=0.0)
        seen.append(dict(
            kept=len(kept), extra=0 if extra is None else len(extra),
            policy_rows=policy_rows, extra_rows=extra_rows, extra_advantage=extra_advantage,
            extra_gated=sum(float(mb.ease_weight[~mb.policy_rows].sum()) for mb in flat
                            if mb.policy_rows is not None),
            tokens=sum(mb.num_response_tokens for mb in flat),
            kept_tokens=sum(mb.num_response_tokens for mini in kept_only for mb in mini),
            # Each micro-batch is cut to its own longest sequence.
            trimmed=all(int(mb.attention_mask.sum(1).max()) == mb.input_ids.shape[1]
                        for mb in flat),

            # Image slots vs images encoded: a micro-batch of one group's rollouts encodes the
            # prompt's image once.
            slots=sum(int(mb.image_mask.sum()) for mb in flat),
            encoded=sum(int(mb.image_grid_thw.prod(-1).sum()) // 4 for mb in flat),
            shared=all(mb.image_ids is not None for mini in kept_only for mb in mini),
            minis=len(out),
            # Each mini-batch starts with the kept rows' micro-batches, as without extras (the
            # joint assembly may pad them further).
            kept_first=all(torch.equal(a.input_ids, b.input_ids[:, :a.input_ids.shape[1]])
                           for mini_a, mini_b in zip(kept_only, out)
                           for a, b in zip(mini_a, mini_b))))
        return out

    trainer.micro_batches = micro_batches
    status = trainer.train()
    trainer.metrics.close()
    return status, seen


def test_filtered_correct_rollouts_feed_ease_but_not_dapo(dataset, tmp_path):
    """``ease.use_filtered_correct``: the correct rollouts of all-correct groups (which dynamic
    sampling drops) join the step as EASE-only rows: gated in, advantage 0, outside the DAPO
    token count. Every micro-batch is cut to its longest sequence and encodes its group's image
    once."""
    run_dir = str(tmp_path / "run")
    # Groups of 2 so that all-correct groups are common after the short warm start.
    overrides = _overrides(dataset, run_dir, 2, "ease.use_filtered_correct=true",
                           "dapo.group_size=2", "train.ppo_mini_batches=2",
                           "train.micro_batch_size=2", "dapo.max_gen_batches=0",
                           "checkpoint.interval=0")
    results = run_distributed(_filtered_correct_run, overrides, timeout_s=600)
    assert [status for status, _ in results] == [0, 0]
    steps = [step for _, seen in results for step in seen]
    assert any(step["extra"] > 0 for step in steps), "no all-correct group: the test proves nothing"
    for step in steps:
        assert step["policy_rows"] == step["kept"] and step["extra_rows"] == step["extra"]
        assert step["extra_advantage"] == 0.0
        assert step["extra_gated"] == step["extra"]  # all correct, all with a target
        assert step["tokens"] == step["kept_tokens"]  # the DAPO normaliser ignores them
        assert step["trimmed"] and step["minis"] == 2 and step["kept_first"]
        assert step["shared"] and step["encoded"] * 2 <= step["slots"]
    metrics = _metrics(run_dir)
    assert all("ease_extra_rows" in record for record in metrics.values())
    assert all(0 <= record["update_padding"] < 0.5 for record in metrics.values())
    # Capped at the step's own groups (train.prompts_per_step x G rollouts).
    cfg = load_config(CONFIG, overrides)
    cap = cfg.train.prompts_per_step * cfg.dapo.group_size
    assert all(0 <= record["ease_extra_rows"] <= cap for record in metrics.values())


def test_rollouts_and_validation_show_progress_bars(dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = _launch(_overrides(dataset, run_dir, 1, "eval.interval=1", "eval.samples=8",
                              "checkpoint.interval=0"))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "rollouts, step 1" in out and "group" in out, out
    assert "validation" in out and "sample" in out, out


def test_log_interval_thins_the_console_not_the_records(tmp_path, capsys):
    """``logging.log_interval`` (a config field that did nothing): console lines every N
    training steps and at the last; validation lines always; every record in metrics.jsonl."""
    from megatron_ease.training.metrics import MetricsLogger

    log = MetricsLogger(str(tmp_path), use_wandb=False, console_interval=3)
    for step in range(1, 8):
        log.log(step, {"reward": 0.5}, total_steps=7)
    log.log(2, {"accuracy": 1.0}, total_steps=7, prefix="eval")
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in lines] == [
        "[train] step 3/7", "[train] step 6/7", "[train] step 7/7", "[eval] step 2/7"]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 2]


def test_profile_steps_write_a_trace_of_those_steps_only(dataset, tmp_path):
    """``logging.profile_steps=[2,2]``: rank 0 writes a Chrome trace and an operator table of RL
    step 2, with the trainer's phases labelled; the other steps run unprofiled."""
    run_dir = tmp_path / "run"
    proc = _launch(_overrides(dataset, str(run_dir), 3, "logging.profile_steps=[2,2]",
                              "checkpoint.interval=0", "train.warm_start_steps=4"))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert sorted(os.listdir(run_dir / "profile")) == ["rank0-steps2-2.json",
                                                       "rank0-steps2-2.txt"], out
    with open(run_dir / "profile" / "rank0-steps2-2.json") as f:
        names = {event.get("name") for event in json.load(f)["traceEvents"]}
    assert {"megatron_ease/rollouts", "megatron_ease/update"} <= names
    table = (run_dir / "profile" / "rank0-steps2-2.txt").read_text()
    assert "Self CPU" in table and "aten::" in table


@pytest.mark.parametrize("override, message", [
    ("model.vocab_size=200", r"model.vocab_size \(200\) is smaller than data.tokenizer .*'s "
                             r"vocabulary \(255 tokens\)"),
    ("model.image_token_id=100", r"model.image_token_id \(100\) is not data.tokenizer .*'s "
                                 r"<\|image_pad\|> \(251\)"),
    ("model.vision_start_token_id=1", r"model.vision_start_token_id \(1\)"),
    ("model.eos_token_id=5", r"neither model.eos_token_id \(5\) nor model.stop_token_ids \[\] is "
                             r"data.tokenizer .*'s <\|im_end\|> \(248\)"),
])
def test_model_token_ids_must_be_the_tokenizers(dataset, override, message):
    """Found at start-up, naming the field: these failed inside the first forward ("index out
    of range", "0 image tokens") or trained with rollouts that never stopped."""
    from megatron_ease.training import builders

    cfg = load_config(CONFIG, _overrides(dataset, "unused", 1))
    tokenizer = builders.load_tokenizer(cfg.data.tokenizer)
    builders.check_tokenizer_fits(cfg, tokenizer)
    with pytest.raises(ValueError, match=message):
        builders.check_tokenizer_fits(load_config(CONFIG, _overrides(dataset, "unused", 1)
                                                  + [override]), tokenizer)
    # An eos the template does not use is fine when <|im_end|> is among the stop ids.
    builders.check_tokenizer_fits(load_config(CONFIG, _overrides(dataset, "unused", 1) + [
        "model.eos_token_id=5", "model.stop_token_ids=[248]"]), tokenizer)


def test_a_signal_while_the_process_group_starts_is_kept_not_fatal(tmp_path):
    """USR1 before the trainer exists (NCCL set-up takes minutes on a large job) killed the job
    with the signal's default action (not requeued); the CLI installs its handler first."""
    script = (
        "import os, signal, sys\n"
        "from megatron_ease import distributed, train\n"
        "def start(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    raise SystemExit(7)\n"
        "distributed.initialize_distributed = start\n"
        f"train.main(['--config', {CONFIG!r}, 'logging.run_dir={tmp_path}/run',\n"
        f"            'checkpoint.dir={tmp_path}/ckpt'])\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 7, (result.returncode, result.stderr[-2000:])


def test_rollout_collector_caps_filtered_correct_groups_at_this_ranks_share_of_b(monkeypatch):
    """The cap reaches dynamic sampling: at most B / DP all-correct groups per rank."""
    from unittest import mock

    from megatron_ease.training import rollouts

    cfg = load_config(CONFIG, ["ease.use_filtered_correct=true", "train.prompts_per_step=8"])
    collector = rollouts.RolloutCollector(cfg, engine=None, tokenizer=None,
                                          reader_iter=iter(()), stop_token_ids=[248], dp_rank=0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group: 2)
    with mock.patch.object(rollouts, "dynamic_sample", return_value="sampled") as sample:
        assert collector.collect(step=0, dp_group=object()) == "sampled"
    kwargs = sample.call_args.kwargs
    assert kwargs["keep_filtered_correct"] is True and kwargs["max_filtered_correct_groups"] == 4


def _resume_with_a_new_schedule(overrides):
    from megatron_ease.training.trainer import Trainer

    first = Trainer(load_config(CONFIG, overrides + ["train.steps=2", "train.lr=1e-4"]))
    assert first.train() == 0
    first.metrics.close()
    resumed = Trainer(load_config(CONFIG, overrides + ["train.steps=4", "train.lr=2e-4",
                                                       "train.adam_beta2=0.95"]))
    s = resumed.scheduler
    schedule = (s.max_lr, s.min_lr, s.lr_decay_steps, s.lr_decay_style, s.num_steps)
    betas = {tuple(g["betas"]) for g in resumed.optimizer.param_groups}
    assert resumed.train() == 0
    resumed.metrics.close()
    return schedule, betas


def test_a_resumed_run_follows_its_configs_schedule_and_logs_the_lr_each_step_used(dataset,
                                                                                     tmp_path):
    """Resumed with train.steps raised (the trainer's own advice to go on) and a new lr,
    megatron-core's scheduler kept the checkpoint's max_lr and decay length, so the new steps
    trained at min_lr; Adam kept the checkpoint's betas. The config's schedule now applies at the
    checkpoint's step, and the logged lr is the one the step trained with (it was the next
    step's: a warmup's first step trains at 0)."""
    run_dir = str(tmp_path / "run")
    overrides = [o for o in _overrides(dataset, run_dir, 1, "train.warm_start_steps=2",
                                       "train.lr_decay_style=linear", "train.min_lr=0.0",
                                       "train.lr_warmup_steps=0")
                 if not o.startswith("train.steps")]
    schedule, betas = run_distributed(_resume_with_a_new_schedule, overrides, world_size=1,
                                      timeout_s=600)[0]
    assert schedule == (2e-4, 0.0, 4, "linear", 2)
    assert betas == {(0.9, 0.95)}
    logged = {step: record["lr"] for step, record in _metrics(run_dir).items()}
    # linear decay from max_lr at step 0 to 0 at the last: lr(n) = max_lr (1 - n / steps)
    assert logged == pytest.approx({1: 1e-4, 2: 0.5e-4, 3: 2e-4 * 2 / 4, 4: 2e-4 * 1 / 4}), logged


def _warm_start_optimizer_decay(overrides):
    from megatron_ease.training import builders

    cfg = load_config(CONFIG, overrides)
    model = builders.build_model(cfg)
    ddp = builders.wrap_ddp(cfg, model)
    optimizer = builders.build_optimizer(cfg, [ddp], lr=0.1)  # no scheduler, as the warm start
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()  # zero gradients: Adam moves nothing, only weight decay acts
    return {n: bool(torch.equal(p.detach(), before[n])) for n, p in model.named_parameters()
            if n in before}


def test_an_optimizer_without_a_scheduler_does_not_decay_biases_and_norms(dataset, tmp_path):
    """megatron-core gives biases and 1-D weights wd_mult 0, which only its scheduler applied:
    the warm start's optimizer (no scheduler) decayed norm weights and biases."""
    kept = run_distributed(_warm_start_optimizer_decay, _overrides(
        dataset, str(tmp_path / "run"), 1, "train.weight_decay=0.5"), world_size=1)[0]
    one_d = [n for n in kept if n.endswith(("bias", "layernorm.weight", "norm.weight"))]
    assert one_d and all(kept[n] for n in one_d), [n for n in one_d if not kept[n]]
    assert not kept["language_model.decoder.layers.0.mlp.linear_fc1.weight"]


def test_validation_runs_every_interval_and_at_the_last_step(dataset, tmp_path):
    """eval.interval=2 over 3 steps validated at step 2 only: the run's final policy went
    unmeasured whenever train.steps was not a multiple of the interval."""
    run_dir = str(tmp_path / "run")
    overrides = _overrides(dataset, run_dir, 3, "train.warm_start_steps=2", "eval.interval=2",
                           "eval.samples=2", "eval.batch_size=2", "checkpoint.dir=null")
    status, _ = run_distributed(_train_in_pool, overrides, world_size=1, timeout_s=600)[0]
    assert status == 0
    assert [record["step"] for record in _records(run_dir, "eval")] == [2, 3]


def test_before_train_validates_the_starting_policy_once(dataset, tmp_path):
    """eval.before_train (verl's val_before_train): the policy after the warm start is validated
    at step 0, the curve's first point; the run extended from its checkpoint does not repeat it."""
    run_dir = str(tmp_path / "run")
    validation = ("train.warm_start_steps=2", "eval.interval=2", "eval.before_train=true",
                  "eval.samples=2", "eval.batch_size=2", "checkpoint.interval=1")
    for steps in (1, 2):
        proc = _launch(_overrides(dataset, run_dir, steps, *validation))
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    assert "resumed from" in out
    assert _eval_steps(run_dir) == [0, 1, 2]


def _init_from_with_warm_start_steps(first, second):
    import contextlib

    from megatron_ease.training.trainer import Trainer

    status, _ = _train_in_pool(first)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer = Trainer(load_config(CONFIG, second))
        warm_starts = []
        trainer.warm_start = lambda: warm_starts.append(1)
        status2 = trainer.train()
        trainer.metrics.close()
    return status, status2, len(warm_starts), out.getvalue()


def test_init_from_skips_the_warm_start_and_says_so(dataset, tmp_path):
    """model.init_from with train.warm_start_steps > 0 skipped the warm start without a word."""
    first = _overrides(dataset, str(tmp_path / "first"), 1, "train.warm_start_steps=2")
    second = _overrides(dataset, str(tmp_path / "second"), 1, "train.warm_start_steps=5",
                        f"model.init_from={tmp_path}/first/ckpt")
    status, status2, warm_starts, printed = run_distributed(
        _init_from_with_warm_start_steps, first, second, world_size=1, timeout_s=600)[0]
    assert (status, status2, warm_starts) == (0, 0, 0)
    assert "no warm start: the policy starts from model.init_from" in printed
    assert "train.warm_start_steps=5" in printed
