"""The DAPO + EASE training loop. Read ``Trainer.train_step`` top to bottom for one RL step:

    rollouts (G per prompt) -> rewards + overlong shaping -> dynamic sampling (B mixed groups)
    -> group advantages -> sequences + EASE targets -> π_old log-probs -> mini-batch updates
    (loss = DAPO + λ·EASE, global normalisers) -> metrics

Everything around it (building, resume, checkpoints, preemption, validation) is in this file's
other methods; the math lives in ``megatron_ease.rl`` and ``megatron_ease.ease``.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from typing import Optional

import torch

from megatron_ease.config import Config, config_changes, config_to_dict, resolve_hf_config
from megatron_ease.distributed import all_reduce_, data_parallel_layout
from megatron_ease.eval.evaluator import Evaluator
from megatron_ease.rl.dapo import group_advantages
from megatron_ease.rl.dynamic_sampling import RolloutBatch
from megatron_ease.training import builders
from megatron_ease.training.batch import (
    assemble_sequences,
    length_sorted_order,
    place_at_image_tokens,
    shared_images,
)
from megatron_ease.training.checkpointing import CheckpointManager
from megatron_ease.training.metrics import MetricsLogger
from megatron_ease.training.preemption import PreemptionHandler
from megatron_ease.training.profiling import StepProfiler
from megatron_ease.training.rollouts import RolloutCollector, stop_token_ids
from megatron_ease.training.update import (
    POLICY_SUMS,
    MicroBatch,
    policy_update,
    supervised_step,
)

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = resolve_hf_config(cfg)  # model.hf_config's sizes, for every part of the run
        self.dp_rank, self.dp_size, self.dp_group, self.is_logging_rank = data_parallel_layout()

        builders.ensure_synthetic_data(cfg)
        self.tokenizer = builders.load_tokenizer(cfg.data.tokenizer)
        builders.check_tokenizer_fits(cfg, self.tokenizer)  # and that it has a pad token
        self.pad_id = self.tokenizer.pad_token_id
        self.image_token_id = cfg.model.image_token_id
        builders.check_eval_shards(cfg)  # the CLI checked before; the demo and tests did not
        if cfg.ease.enabled and not cfg.ease.layers and self.is_logging_rank:
            logger.warning("ease.enabled is true but ease.layers is empty: no layer captures "
                           "attention, so this run trains DAPO alone; set ease.layers (e.g. "
                           "[0, 1]) for EASE, or ease.enabled=false to say so")

        self.model = builders.build_model(cfg)
        self.ddp = builders.wrap_ddp(cfg, self.model)
        self.model_chunks = [self.ddp]
        self.optimizer = builders.build_optimizer(cfg, self.model_chunks)
        self.scheduler = builders.build_scheduler(cfg, self.optimizer)
        self.engine = builders.build_rollout_engine(cfg, self.model, self.tokenizer)
        self.evaluator = Evaluator(self.cfg, self.tokenizer, self.model_chunks, self.engine)
        self.train_reader = builders.build_reader(
            cfg, self.tokenizer, cfg.data.train_shards,
            cfg.train.prompts_per_step // self.dp_size, self.dp_rank, self.dp_size)
        self.train_iter = iter(self.train_reader)
        self.collector = RolloutCollector(cfg, self.engine, self.tokenizer, self.train_iter,
                                          stop_token_ids(cfg), self.dp_rank,
                                          progress=self.is_logging_rank and cfg.logging.progress)
        self.checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last) \
            if cfg.checkpoint.dir else None
        self.step = 0
        self._load_initial_state()
        self.metrics = MetricsLogger(
            cfg.logging.run_dir, config_to_dict(cfg), use_wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
            tensorboard=cfg.logging.tensorboard, enabled=self.is_logging_rank,
            resumed_at=self.step if self.resumed else None,  # step 0: a saved warm start
            console_interval=cfg.logging.log_interval)
        if self.step == 0 and self.cfg.eval.interval and self.cfg.eval.before_train:
            self._validation_due = True  # the starting policy, after the warm start
        if self._validation_due:
            # The checkpoint was saved before its step's validation (or this is step 0's
            # validation before training); if that validation ran and was logged (a later
            # crash, a finished run extended), it is not run again. Rank 0 holds the log:
            # every rank takes its answer (evaluate is collective).
            logged = torch.tensor([float(self.metrics.has_record(self.step, "eval"))])
            if torch.distributed.is_initialized():
                all_reduce_(logged, op=torch.distributed.ReduceOp.MAX)
            self._validation_due = not bool(logged.item())

    # -- start-up ------------------------------------------------------------------------------

    def _load_initial_state(self) -> None:
        self.resumed = False
        self._saved_step: Optional[int] = None  # the step of this run's checkpoint on disk
        self._validation_due = False  # the resumed step's validation may not have run
        # Collective: rank 0's reading of ``latest``, checked to be visible on every rank.
        latest = self.checkpoints.resolve_latest() if self.checkpoints and \
            self.cfg.checkpoint.resume else None
        if latest:
            self.step, meta, rank_state = self.checkpoints.load(
                latest, self.model_chunks, self.optimizer, self.scheduler)
            builders.apply_optimizer_config(self.cfg, self.optimizer, self.scheduler)
            self.resumed = True
            self._saved_step = self.step
            self._validation_due = bool(meta.get("validation_due")) and self._is_validation_step()
            if not meta.get("has_optimizer", True):
                # Saved before any RL step (a warm-start-only run): the optimizer's float32 main
                # copies still hold the init and would overwrite the loaded weights.
                self.optimizer.reload_model_params()
            own = rank_state.get("reader")
            if own is not None and self.train_reader.state_matches(own):
                self.train_reader.load_state_dict(own)
            else:  # saved in another layout (RNG streams not restored): continue its stream
                readers = self.checkpoints.saved_rank_states(latest, "reader")
                if readers and not self.train_reader.load_resharded_state_dict(readers) \
                        and self.is_logging_rank:
                    print(f"data: continuing the saved stream at data-parallel size "
                          f"{self.dp_size} (a few prefetched samples are passed over)", flush=True)
            self.train_iter = iter(self.train_reader)
            self.collector.reader_iter = self.train_iter
            if self.is_logging_rank:
                print(f"resumed from {latest} at step {self.step}", flush=True)
                if self.step >= self.cfg.train.steps:
                    print(f"nothing to train: the checkpoint is at step {self.step} and "
                          f"train.steps is {self.cfg.train.steps} (raise train.steps to go on, "
                          f"or give a new run its own checkpoint.dir)", flush=True)
                # Resuming continues whatever run the checkpoint directory holds: say what
                # differs (a longer run, a new lr) so a new experiment pointed at an old
                # directory by mistake is seen at once. Not refused: changing the length or the
                # learning rate of a resumed run is common.
                changes = config_changes(meta["config"], config_to_dict(self.cfg)) \
                    if meta.get("config") else []
                if changes:
                    print(f"config changed since the checkpoint ({len(changes)}): "
                          + "; ".join(changes), flush=True)
        elif self.cfg.model.init_from:
            from megatron_ease.models.qwen_vl import load_model_checkpoint

            path = load_model_checkpoint(self.model, self.cfg.model.init_from)
            # A mixed-precision optimizer keeps float32 main copies of the weights it was built
            # with: refresh them, or its first step would write the random init back.
            self.optimizer.reload_model_params()
            if self.is_logging_rank:
                print(f"initialised policy from {path}", flush=True)

    # -- supervised warm start -------------------------------------------------------------------

    def warm_start(self) -> None:
        """``train.warm_start_steps`` supervised steps on prompt + answer (its own Adam, lr
        ``train.warm_start_lr``) so RL starts from a policy that answers in the task's format."""
        cfg = self.cfg
        reader = builders.build_reader(cfg, self.tokenizer, cfg.data.train_shards,
                                       cfg.train.micro_batch_size, self.dp_rank, self.dp_size,
                                       append_answer=True)
        optimizer = builders.build_optimizer(cfg, self.model_chunks, lr=cfg.train.warm_start_lr)
        batches = iter(reader)
        for step in range(1, cfg.train.warm_start_steps + 1):
            batch = next(batches)
            labels = torch.full_like(batch["input_ids"], self.pad_id)
            labels[:, :-1] = batch["input_ids"][:, 1:]
            rows = torch.zeros_like(batch["response_mask"])
            rows[:, :-1] = batch["response_mask"][:, 1:]  # label-shifted: predicts an answer token
            n = labels.shape[0]
            mb = MicroBatch(batch["input_ids"], batch["attention_mask"], labels, rows,
                            batch["image_mask"], batch["pixel_values"], batch["image_grid_thw"],
                            torch.zeros(n), torch.zeros(labels.shape), torch.zeros(n),
                            torch.zeros(labels.shape, dtype=torch.bool))
            metrics = supervised_step(cfg, self.model_chunks, optimizer, [mb], self.dp_group,
                                      self.dp_size)
            self.metrics.log(step, metrics, cfg.train.warm_start_steps, prefix="warm_start")

    # -- one RL step -----------------------------------------------------------------------------

    def train_step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        with torch.profiler.record_function("megatron_ease/rollouts"):
            sampled = self.collector.collect(self.step, self.dp_group)  # B/DP mixed groups here
        kept = sampled.batch
        t_rollout = time.perf_counter() - t0
        ease_active = cfg.ease.enabled and cfg.ease.loss_coeff > 0
        # ease.use_filtered_correct: the correct rollouts of groups dynamic sampling dropped as
        # all-correct feed the EASE term too (never the DAPO loss, where their advantage is 0).
        extra = sampled.filtered_correct if ease_active and cfg.ease.layers else None
        mini_batches = self.micro_batches(kept, extra)
        with torch.profiler.record_function("megatron_ease/update"):
            update_metrics = policy_update(cfg, self.model_chunks, self.optimizer, mini_batches,
                                           self.dp_group, self.dp_size, ease_active=ease_active)
        lr = self.optimizer.param_groups[0]["lr"]  # this step's (the scheduler sets the next)
        self.scheduler.step(1)
        self.step += 1
        metrics = self.step_metrics(kept, sampled.stats, update_metrics,
                                    time.perf_counter() - t0, t_rollout, lr)
        # Share of the update's token positions that are padding (micro_batch_size's cost).
        micro = [mb for mini in mini_batches for mb in mini]
        slots = torch.tensor([float(sum(mb.attention_mask.numel() for mb in micro)),
                              float(sum(int(mb.attention_mask.sum()) for mb in micro))],
                             dtype=torch.float64)
        if self.dp_group is not None:
            all_reduce_(slots, group=self.dp_group)
        metrics["update_padding"] = 1.0 - float(slots[1]) / max(1.0, float(slots[0]))
        if cfg.ease.use_filtered_correct and extra is not None:
            metrics["ease_extra_rows"] = self._dp_sum(float(len(extra)))
        return metrics

    def micro_batches(self, kept: RolloutBatch,
                      extra: Optional[RolloutBatch] = None) -> list[list[MicroBatch]]:
        """Kept rollout groups -> mini-batches of micro-batches (this DP rank's share).

        ``extra`` rollouts (EASE only: advantage 0, outside the DAPO token count) are dealt out
        as extra micro-batches across the mini-batches. Their number may differ between DP
        ranks; every count that normalises a loss is global. Each micro-batch is cut to its own
        longest sequence (the sequences are right-padded; megatron-core's pipeline exchanges
        shapes per micro-batch, ``variable_seq_lengths``) and encodes each image once
        (``shared_images``: a group's rollouts share their prompt's). Where micro-batches cut
        groups, each group's rollouts are put in length order first (``length_sorted_order``),
        which cuts the padding; micro-batches of whole groups keep the rollouts' order (the
        order inside them changes only the rounding)."""
        cfg, n = self.cfg, len(kept)
        rollouts = kept if extra is None or len(extra) == 0 else RolloutBatch.concat([kept, extra])
        per_mini = n // cfg.train.ppo_mini_batches
        mbs = cfg.train.micro_batch_size
        if mbs % rollouts.group_size or per_mini % rollouts.group_size:
            rollouts = rollouts.select(length_sorted_order(rollouts.payload["lengths"],
                                                           rollouts.group_size))
        p, total = rollouts.payload, len(rollouts)
        advantages = torch.zeros(total)
        advantages[:n] = group_advantages(rollouts.reward[:n], cfg.dapo.group_size)
        seqs = assemble_sequences(p["prompt_ids"], p["tokens"], p["lengths"], self.pad_id,
                                  self.image_token_id)
        target = place_at_image_tokens(seqs.image_mask, p["target"])
        evidence = place_at_image_tokens(seqs.image_mask, p["evidence"], dtype=torch.bool)
        has_target = torch.tensor([t is not None for t in p["target"]])
        weight = (rollouts.accuracy > 0.5).float() * has_target.float()
        policy = torch.arange(total) < n

        def micro_batch(start: int, stop: int) -> MicroBatch:
            rows, cols = seqs.cut(start, stop)
            pixel_values, grids, image_ids = shared_images(
                [p["pixel_values"][j] for j in range(start, stop)],
                [p["image_grid_thw"][j] for j in range(start, stop)])
            return MicroBatch(
                input_ids=seqs.input_ids[cols], attention_mask=seqs.attention_mask[cols],
                labels=seqs.labels[cols], response_mask=seqs.response_mask[cols],
                image_mask=seqs.image_mask[cols], pixel_values=pixel_values,
                image_grid_thw=grids, advantages=advantages[rows], ease_target=target[cols],
                ease_weight=weight[rows], evidence_mask=evidence[cols],
                policy_rows=None if total == n else policy[rows], image_ids=image_ids)

        out = [[micro_batch(i, min(i + mbs, start + per_mini))
                for i in range(start, start + per_mini, mbs)] for start in range(0, n, per_mini)]
        for k, start in enumerate(range(n, total, mbs)):
            out[k % len(out)].append(micro_batch(start, min(start + mbs, total)))
        return out

    def _dp_sum(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64)
        if self.dp_group is not None:
            all_reduce_(total, group=self.dp_group)
        return float(total)

    def step_metrics(self, kept: RolloutBatch, stats: dict, updates: list[dict],
                     step_time: float, rollout_time: float, lr: float) -> dict:
        from megatron.core import parallel_state as ps

        # Rollout statistics: identical on TP/PP peers, summed over DP.
        lengths = kept.payload["lengths"].double()
        local = torch.tensor([
            float(kept.reward.sum()), float(kept.accuracy.sum()), float(kept.reward.numel()),
            float(lengths.sum()), float((~kept.payload["parse_ok"]).sum()),
            float(sum(t is None for t in kept.payload["target"])),
            float(sum(self.train_reader.skipped.values())),
        ] + [sum(u["_policy_sums"][k] for u in updates) for k in POLICY_SUMS],
            dtype=torch.float64)
        policy_sums = local[7:].clone()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            all_reduce_(policy_sums, group=ps.get_pipeline_model_parallel_group())
        local[7:] = policy_sums
        if self.dp_group is not None:
            all_reduce_(local, group=self.dp_group)
        reward, acc, n, tokens, unparsed, no_target, skipped = local[:7].tolist()
        policy = dict(zip(POLICY_SUMS, local[7:].tolist()))
        resp_tokens = max(1.0, policy["tokens"])
        n_updates = max(1, len(updates))
        metrics = {
            "reward": reward / n, "accuracy": acc / n, "response_length": tokens / n,
            "unparsed": unparsed,
            # Rollouts of samples without an evidence target (DESIGN §3 step 5): never gated.
            "no_target": no_target,
            # Training samples skipped as invalid so far (this run and the runs it resumes),
            # all ranks; each is also logged with its shard, key and reason when read.
            "skipped_samples": skipped, "kept_groups": stats.get("num_groups"),
            "mixed_groups": stats.get("kept_groups"),
            "generated_groups": stats.get("generated_groups"),
            "gen_batches": stats.get("gen_batches"),
            # reward/accuracy above are the training batch's (mixed groups only, so accuracy
            # stays within [1/G, 1 - 1/G]); these are over every rollout generated this step.
            "generated_accuracy": stats.get("generated_accuracy"),
            "generated_reward": stats.get("generated_reward"),
            "filtered_all_correct": stats.get("filtered_all_correct"),
            "filtered_all_wrong": stats.get("filtered_all_wrong"),
            "trimmed_groups": stats.get("trimmed_groups"),
            "dapo_loss": policy["dapo_loss"] / n_updates,
            "clip_frac": (policy["clip_low"] + policy["clip_high"]) / resp_tokens,
            "clip_dual_frac": policy["clip_dual"] / resp_tokens,
            "approx_kl": policy["approx_kl"] / resp_tokens,
            # Mean per-token entropy of π at the sampling temperature over the updates' response
            # tokens (nats); a fall towards 0 is the policy collapsing onto one answer.
            "entropy": policy["entropy"] / resp_tokens,
            "grad_norm": sum(u["grad_norm"] for u in updates) / n_updates,
            "lr": lr,
            "tokens_per_s": tokens / max(step_time, 1e-9),
            "step_time": step_time, "rollout_time": rollout_time,
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB
        }
        # EASE: the headline values under short names (console, golden values), and every
        # per-layer and gated value under its own, averaged over the step's updates.
        short = {"ease/loss": "ease_loss", "ease/attention_in_evidence": "attn_in_evidence",
                 "ease/attention_in_evidence_gated": "attn_in_evidence_gated",
                 "ease/gated_fraction": "ease_gated_frac"}
        for key in dict.fromkeys(k for u in updates for k in u if k.startswith("ease/")):
            values = [u[key] for u in updates if key in u]
            metrics[short.get(key, key)] = sum(values) / len(values)
        return metrics

    # -- validation (megatron_ease.eval.Evaluator) ------------------------------------------------

    def evaluate(self, max_samples: Optional[int] = None) -> dict:
        """``Evaluator.evaluate`` of the current policy (``eval.samples`` by default)."""
        return self.evaluator.evaluate(max_samples)

    def attention_for(self, batch, prompts) -> list[torch.Tensor]:
        """``Evaluator.attention_for`` of the current policy."""
        return self.evaluator.attention_for(batch, prompts)

    # -- the loop --------------------------------------------------------------------------------

    def save(self) -> None:
        if self.checkpoints is None:
            return
        self.checkpoints.save(
            self.step, self.model_chunks, self.optimizer, self.scheduler,
            # A step is saved before its validation: a run resumed here (preempted, or killed
            # while validating) validates it first, else that point of the curve is missing.
            trainer_state={"config": config_to_dict(self.cfg),
                           "validation_due": self._is_validation_step()},
            rank_state={"reader": self.train_reader.state_dict()})
        self._saved_step = self.step

    def _is_validation_step(self) -> bool:
        """Every ``eval.interval`` steps, and the last step (as verl): a run whose length is not
        a multiple of the interval ends validated."""
        interval = self.cfg.eval.interval
        return bool(interval and self.step > 0 and (self.step % interval == 0
                                                    or self.step == self.cfg.train.steps))

    def train(self, preemption: Optional[PreemptionHandler] = None) -> int:
        """Run to ``train.steps``; returns the process exit status: 0 when done, 75 when
        preempted and saved (slurm/common.sh requeues), ``EXIT_STOPPED_UNSAVED`` when preempted
        with no ``checkpoint.dir`` (a requeue would start from scratch). ``preemption``: a
        handler installed by the caller before the trainer was built (``run``), else one is
        installed here."""
        cfg = self.cfg
        own_handler = preemption is None
        preemption = preemption or PreemptionHandler()
        profiler = StepProfiler(cfg.logging.profile_steps, cfg.logging.profile_ranks,
                                os.path.join(cfg.logging.run_dir, "profile"),
                                torch.distributed.get_rank())
        try:
            fresh = self.step == 0 and not self.resumed and cfg.train.warm_start_steps > 0
            if fresh and cfg.model.init_from and self.is_logging_rank:
                print(f"no warm start: the policy starts from model.init_from "
                      f"({cfg.model.init_from}); train.warm_start_steps="
                      f"{cfg.train.warm_start_steps} is for a random initialisation", flush=True)
            if fresh and not cfg.model.init_from:
                self.warm_start()
                self.optimizer.reload_model_params()  # the warm start had its own optimizer
                if preemption.should_stop() and self.step < cfg.train.steps:
                    # Signalled during the warm start: save it (step 0) and go, rather than
                    # after an RL step more; the requeued run starts RL from it.
                    return self._save_preempted()
            if self._validation_due:
                self._validation_due = False
                self.metrics.log(self.step, self.evaluate(), cfg.train.steps, prefix="eval")
            while self.step < cfg.train.steps:
                profiler.before_step(self.step + 1)
                metrics = self.train_step()
                profiler.after_step(self.step)
                self.metrics.log(self.step, metrics, cfg.train.steps)
                stop = preemption.should_stop()
                preempted = stop and self.step < cfg.train.steps  # else the run is complete
                # Saved before validating: a validation that fails (or runs into the time limit)
                # must not cost the step. A preempted run skips the validation of its last step.
                if preempted:
                    return self._save_preempted()
                if self.step >= cfg.train.steps or (
                        cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                    self.save()
                if self._is_validation_step():
                    self.metrics.log(self.step, self.evaluate(), cfg.train.steps, prefix="eval")
                if stop:
                    break  # signalled at the last step: finish as usual, nothing to requeue
            # Decided from this process's own record, not from ``latest`` on disk: a shared
            # filesystem may show a rank a stale ``latest``, and a save is collective.
            if self.checkpoints is not None and self._saved_step != self.step:
                self.save()
            if self.checkpoints is not None:
                self.checkpoints.wait_for_deletions()  # not when preempted: its time is short
            return 0
        finally:
            profiler.finish(self.step)  # a run stopped inside the window keeps its trace
            if own_handler:
                preemption.restore()

    def _save_preempted(self) -> int:
        """Save the current step (with ``checkpoint.dir``) and return the preempted exit status."""
        from megatron_ease.training.preemption import EXIT_REQUEUE, EXIT_STOPPED_UNSAVED

        self.save()

        if self.checkpoints is None:
            message = (f"preempted at step {self.step}: checkpoint.dir is not set, nothing "
                       f"saved; exiting {EXIT_STOPPED_UNSAVED} (not requeued)")
            status = EXIT_STOPPED_UNSAVED
        else:
            message = f"preempted: saved step {self.step}, exiting {EXIT_REQUEUE}"
            status = EXIT_REQUEUE
        if self.is_logging_rank:
            print(message, flush=True)
        return status


def run(cfg: Config, preemption: Optional[PreemptionHandler] = None) -> int:
    """Train ``cfg``. ``preemption``: a handler the caller installed earlier (the CLI, before
    the process group starts); else one is installed here, before the trainer is built: a
    signal while the model and checkpoint load is kept for the first step boundary instead of
    killing the job before it can save."""
    own_handler = preemption is None
    preemption = preemption or PreemptionHandler()
    try:
        os.makedirs(cfg.logging.run_dir, exist_ok=True)
        trainer = Trainer(cfg)
        try:
            return trainer.train(preemption)
        finally:
            trainer.metrics.close()
    finally:
        # The caller's handler stays until the caller is done: restored here, a second signal
        # (Slurm's TERM after USR1) during the process group's teardown took the default
        # action and turned the saved run's exit 75 into 143, which is not requeued.
        if own_handler:
            preemption.restore()
