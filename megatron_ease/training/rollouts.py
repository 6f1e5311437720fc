"""One RL step's data: prompts -> G rollouts each -> verifier rewards + overlong shaping ->
dynamic sampling (DESIGN §5) -> a ``RolloutBatch`` of B/DP mixed groups on this DP rank."""

from __future__ import annotations

import dataclasses
import sys
from typing import Iterator

import torch

from megatron_ease.config import Config
from megatron_ease.rl.dapo import mixed_groups, overlong_reward
from megatron_ease.rl.dynamic_sampling import DynamicSamplingResult, RolloutBatch, dynamic_sample
from megatron_ease.rl.rewards import RewardSpec, compute_rewards
from megatron_ease.rl.rollout import Prompt, RolloutEngine, RolloutOutput
from megatron_ease.rl.sampling import SamplingParams


def generate(engine: RolloutEngine, prompts: list[Prompt], params: SamplingParams) -> RolloutOutput:
    """The engine's rollouts (made on the model's device) on the CPU, where a step's bookkeeping
    (rewards, dynamic sampling, sequence assembly) lives; micro-batches go back to the model's
    device in the forward step."""
    out = engine.generate(prompts, params)
    return dataclasses.replace(out, **{f.name: getattr(out, f.name).cpu()
                                       for f in dataclasses.fields(out)})


def split_prompts(batch: dict) -> list[Prompt]:
    """A collated (right-padded) reader batch -> one ``Prompt`` per sample."""
    prompts, patch_start, image_start = [], 0, 0
    grids = batch["image_grid_thw"]
    for i in range(batch["input_ids"].shape[0]):
        n_img = int(batch["num_images"][i])
        grid = grids[image_start:image_start + n_img]
        n_patch = int(grid.prod(dim=1).sum())
        prompts.append(Prompt(batch["input_ids"][i, :int(batch["prompt_lengths"][i])],
                              batch["pixel_values"][patch_start:patch_start + n_patch], grid))
        patch_start += n_patch
        image_start += n_img
    return prompts


def image_values(batch: dict, key: str, i: int):
    """Per-visual-token values of sample ``i`` (the batch's ``evidence_target`` /
    ``evidence_mask`` at its image positions), or None without a target."""
    if not bool(batch["has_target"][i]):
        return None
    return batch[key][i][batch["image_mask"][i]]


def stop_token_ids(cfg: Config) -> tuple[int, ...]:
    """The tokens that end a response: ``model.eos_token_id`` and ``model.stop_token_ids``."""
    return (cfg.model.eos_token_id, *cfg.model.stop_token_ids)


def vision_token_ids(cfg: Config) -> tuple[int, ...]:
    """Placeholders only the processor writes; a response must not contain them."""
    m = cfg.model
    return (m.image_token_id, m.video_token_id, m.vision_start_token_id, m.vision_end_token_id)


class RolloutCollector:
    """Turns reader batches into scored rollout groups for this data-parallel rank."""

    def __init__(self, cfg: Config, engine: RolloutEngine, tokenizer, reader_iter: Iterator,
                 stop_token_ids, dp_rank: int, progress: bool = False):
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        self.reader_iter = reader_iter
        self.stop_token_ids = tuple(stop_token_ids)
        self.dp_rank = dp_rank
        self.progress = progress
        self.reward_spec = RewardSpec(format_reward=cfg.dapo.format_reward)
        self._next_group_id = 0
        self._chunk = 0

    def generate_chunk(self, step: int) -> RolloutBatch:
        cfg, g = self.cfg, self.cfg.dapo.group_size
        batch = next(self.reader_iter)
        prompts = split_prompts(batch)
        # Seeded per (run seed, step, chunk, DP rank): reproducible, different across DP ranks.
        seed = hash((cfg.train.seed, step, self._chunk, self.dp_rank)) % (2**31)
        self._chunk += 1
        params = SamplingParams.from_dapo_config(cfg.dapo, self.stop_token_ids, seed=seed,
                                                 suppress_token_ids=vision_token_ids(cfg))
        out = generate(self.engine, prompts, params)
        n = out.tokens.shape[0]
        owner = out.prompt_index  # [n] which prompt each rollout answers
        texts = self.tokenizer.batch_decode(
            [out.tokens[i, :int(out.lengths[i])].tolist() for i in range(n)],
            skip_special_tokens=True)
        rewards = compute_rewards(texts, [batch["answers"][j] for j in owner.tolist()],
                                  [batch["answer_types"][j] for j in owner.tolist()],
                                  [batch["choices"][j] for j in owner.tolist()],
                                  self.reward_spec)
        shaped = rewards.reward + overlong_reward(
            out.lengths, cfg.dapo.max_response_length, cfg.dapo.overlong_buffer_length,
            cfg.dapo.overlong_penalty_factor)
        group_ids = owner + self._next_group_id
        self._next_group_id += len(prompts)
        records = [batch["records"][j] for j in owner.tolist()]
        return RolloutBatch(
            group_size=g, group_ids=group_ids, accuracy=rewards.accuracy, reward=shaped,
            payload={
                "prompt_ids": [prompts[j].input_ids for j in owner.tolist()],
                "pixel_values": [prompts[j].pixel_values for j in owner.tolist()],
                "image_grid_thw": [prompts[j].image_grid_thw for j in owner.tolist()],
                "target": [image_values(batch, "evidence_target", j) for j in owner.tolist()],
                "evidence": [image_values(batch, "evidence_mask", j) for j in owner.tolist()],
                "tokens": out.tokens, "log_probs": out.log_probs, "lengths": out.lengths,
                "parse_ok": rewards.parse_ok,
                "answer_is_prior": torch.tensor([bool(r.get("answer_is_prior", False))
                                                 for r in records]),
            })

    def collect(self, step: int, dp_group) -> DynamicSamplingResult:
        self._chunk = 0
        dp_size = 1 if dp_group is None else torch.distributed.get_world_size(dp_group)
        # Progress of this rank: its mixed groups against its share of B (dynamic sampling
        # counts them globally and rebalances).
        bar = progress_bar(self.progress, total=self.cfg.train.prompts_per_step // dp_size,
                           desc=f"rollouts, step {step + 1}", unit="group")

        def generate_chunk() -> RolloutBatch:
            chunk = self.generate_chunk(step)
            mixed = int(mixed_groups(chunk.accuracy, chunk.group_size).sum())
            bar.update(min(mixed, bar.total - bar.n))
            bar.set_postfix(generation_batches=self._chunk, refresh=False)
            return chunk

        try:
            return dynamic_sample(generate_chunk, self.cfg.train.prompts_per_step,
                                  self.cfg.dapo.max_gen_batches, group=dp_group,
                                  keep_filtered_correct=self.cfg.ease.use_filtered_correct,
                                  # At most as many EASE-only groups as DAPO groups per rank:
                                  # an easy data set would multiply the update's cost.
                                  max_filtered_correct_groups=self.cfg.train.prompts_per_step
                                  // dp_size)
        finally:
            bar.close()


def progress_bar(enabled: bool, **kwargs):
    """A tqdm bar on stderr that leaves no line behind; a no-op bar when disabled."""
    from tqdm import tqdm

    return tqdm(disable=not enabled, leave=False, file=sys.stderr, mininterval=1.0,
                dynamic_ncols=True, **kwargs)
