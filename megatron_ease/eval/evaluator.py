"""Held-out evaluation of a policy: greedy accuracy, anti-prior accuracy (samples whose answer is
not the language-prior one), the share of response→image attention inside the evidence, and the
per-sample attention grids the overlays draw.

    evaluator = Evaluator(cfg, tokenizer, model_chunks, engine)
    evaluator.evaluate(max_samples=500)   # {"accuracy", "anti_prior_accuracy", ...}
    attention_maps(evaluator, 4)          # per sample: image, evidence target, attention grids

The trainer validates through one (``eval.interval``), the demo evaluates its arms with it, and
``python -m megatron_ease.evaluate`` evaluates a checkpoint without training. Every rank of the
model-parallel group calls the same methods (generation and the forward are collective);
data-parallel ranks evaluate their own share of the samples.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_ease.config import Config
from megatron_ease.distributed import all_reduce_, data_parallel_layout
from megatron_ease.rl.rollout import RolloutEngine
from megatron_ease.rl.sampling import SamplingParams
from megatron_ease.training import builders
from megatron_ease.training.batch import assemble_sequences, place_at_image_tokens
from megatron_ease.training.rollouts import (
    generate,
    image_values,
    progress_bar,
    split_prompts,
    stop_token_ids,
    vision_token_ids,
)
from megatron_ease.training.update import MicroBatch, _forward_backward


def source_name(record: dict) -> str:
    """The sample's benchmark or dataset name (its JSON ``source``, DESIGN §6), for per-source
    metrics; ``unspecified`` where the record has none."""
    source = record.get("source")
    name = "" if source is None else str(source).strip()
    return name or "unspecified"


def answer_is_prior(record: dict) -> Optional[bool]:
    """Whether the sample's answer is the language-prior one (what a model that does not look at
    the image says): the record's ``answer_is_prior``, else its ``prior_answer`` compared with
    its ``answer``; None when the record names no prior (a real benchmark's sample), which puts
    it in neither subset: anti-prior accuracy is over the samples known to go against the prior.
    """
    flag = record.get("answer_is_prior")
    if isinstance(flag, bool):
        return flag
    if isinstance(flag, str) and flag.strip().lower() in ("true", "false"):
        return flag.strip().lower() == "true"
    prior = record.get("prior_answer")
    if prior is None or record.get("answer") is None:
        return None
    return str(prior).strip().lower() == str(record["answer"]).strip().lower()


def json_safe(value):
    """``value`` with every non-finite float (a metric without samples is NaN) as None, so that
    ``json.dumps(..., allow_nan=False)`` writes standard JSON (``null``, not ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class Evaluator:
    """Evaluation of the policy ``model_chunks`` (this rank's chunks, wrapped or not) that
    ``engine`` generates with, on ``cfg.data.eval_shards``."""

    def __init__(self, cfg: Config, tokenizer, model_chunks: list, engine: RolloutEngine):
        self.cfg, self.tokenizer, self.model_chunks, self.engine = (cfg, tokenizer, model_chunks,
                                                                    engine)
        self.pad_id = tokenizer.pad_token_id
        self.image_token_id = cfg.model.image_token_id
        self.dp_rank, self.dp_size, self.dp_group, self.is_logging_rank = data_parallel_layout()

    def _greedy(self) -> SamplingParams:
        """Evaluation's decoding: greedy, one answer per prompt, up to the training length."""
        return SamplingParams(max_new_tokens=self.cfg.dapo.max_response_length, temperature=0.0,
                              n=1, stop_token_ids=stop_token_ids(self.cfg),
                              suppress_token_ids=vision_token_ids(self.cfg))

    @torch.no_grad()
    def evaluate(self, max_samples: Optional[int] = None) -> dict:
        """Greedy accuracy (all, and anti-prior samples) and attention in evidence on the first
        ``max_samples`` (default ``eval.samples``) samples of the held-out shards, in shard
        order, each DP rank on its own part: the same samples whatever the DP size, loader
        workers or batch size. Metrics are NaN if no sample could be read (anti-prior accuracy
        also when no sample is known to go against the language prior: ``answer_is_prior``);
        ``json_safe`` turns them into JSON nulls."""
        from megatron_ease.rl.rewards import compute_rewards

        cfg = self.cfg
        samples = max_samples or cfg.eval.samples
        reader = builders.build_reader(cfg, self.tokenizer, cfg.data.eval_shards,
                                       cfg.eval.batch_size, self.dp_rank, self.dp_size,
                                       train=False, max_samples=samples)
        # This rank's share (of the samples there are: ``samples`` may exceed the set).
        limit = getattr(getattr(reader, "dataset", None), "epoch_length",
                        len(range(self.dp_rank, samples, self.dp_size)))
        params = self._greedy()
        # correct, n, anti correct, anti n, ev, ev n, skipped samples
        totals = torch.zeros(7, dtype=torch.float64)
        by_source: dict[str, list[float]] = {}  # the record's "source": [correct, n]
        bar = progress_bar(self.is_logging_rank and cfg.logging.progress, total=limit,
                           desc="validation", unit="sample")
        for batch in reader:
            prompts = split_prompts(batch)
            out = generate(self.engine, prompts, params)
            texts = self.tokenizer.batch_decode(
                [out.tokens[i, :int(out.lengths[i])].tolist() for i in range(len(prompts))],
                skip_special_tokens=True)
            rewards = compute_rewards(texts, batch["answers"], batch["answer_types"],
                                      batch["choices"])
            # Samples known to go against the prior; one that names no prior is in neither set.
            anti = torch.tensor([answer_is_prior(r) is False for r in batch["records"]],
                                dtype=torch.float64)
            acc = rewards.accuracy.double()
            totals[:4] += torch.tensor([acc.sum(), len(prompts), (acc * anti).sum(), anti.sum()])
            for record, correct in zip(batch["records"], acc.tolist()):
                counts = by_source.setdefault(source_name(record), [0.0, 0.0])
                counts[0] += correct
                counts[1] += 1.0
            if cfg.ease.layers:
                ev_sum, ev_n = self._evidence_attention(batch, prompts, out)
                totals[4:6] += torch.tensor([ev_sum, ev_n])
            bar.update(len(prompts))
        bar.close()
        totals[6] = float(sum(reader.skipped.values()))
        if self.dp_group is not None:
            all_reduce_(totals, group=self.dp_group)
        c, n, ac, an, ev, evn, skipped = totals.tolist()
        nan = float("nan")
        metrics = {"accuracy": c / n if n else nan, "anti_prior_accuracy": ac / an if an else nan,
                   "eval_samples": int(n), "anti_prior_samples": int(an),
                   "skipped_samples": int(skipped)}
        if evn > 0:
            metrics["evidence_attention_mass"] = ev / evn
        metrics.update(self._per_source(by_source))
        return metrics

    def _per_source(self, by_source: dict[str, list[float]]) -> dict:
        """``accuracy/<source>`` and ``eval_samples/<source>`` for every source any DP rank saw
        (an evaluation set that mixes benchmarks, as verl reports per data source)."""
        names = sorted(by_source)
        if self.dp_group is not None:  # a rank may not have seen every source
            gathered = [None] * self.dp_size
            torch.distributed.all_gather_object(gathered, names, group=self.dp_group)
            names = sorted({name for part in gathered for name in part})
        counts = torch.tensor([by_source.get(name, [0.0, 0.0]) for name in names],
                              dtype=torch.float64).reshape(len(names), 2)
        if self.dp_group is not None and names:
            all_reduce_(counts, group=self.dp_group)
        out = {}
        for name, (correct, n) in zip(names, counts.tolist()):
            out[f"accuracy/{name}"] = correct / n
            out[f"eval_samples/{name}"] = int(n)
        return out

    def _eval_contexts(self, batch, prompts, out, keep_mass: bool = False):
        """Forward (no grad, λ = 0) over prompt + response with an EASE context: the EASE layers
        record attention-in-evidence (and with ``keep_mass`` the mass) of these samples.

        The samples go through in micro-batches of ``train.micro_batch_size`` rows, each cut to
        its own longest sequence, as in training: ``eval.batch_size`` rows at once would hold
        that many rows' logits and activations. Returns one context and one ``[b, S_k]`` image
        mask per micro-batch, in sample order."""
        from megatron_ease.ease.context import EaseContext

        n = len(prompts)
        seqs = assemble_sequences([p.input_ids for p in prompts], out.tokens, out.lengths,
                                  self.pad_id, self.image_token_id)
        per_sample = [image_values(batch, "evidence_target", i) for i in range(n)]
        targets = place_at_image_tokens(seqs.image_mask, per_sample)
        evidence = place_at_image_tokens(seqs.image_mask,
                                         [image_values(batch, "evidence_mask", i)
                                          for i in range(n)], dtype=torch.bool)
        has = torch.tensor([t is not None for t in per_sample], dtype=torch.float32)
        mbs = []
        for start in range(0, n, self.cfg.train.micro_batch_size):
            rows, cols = seqs.cut(start, min(n, start + self.cfg.train.micro_batch_size))
            mbs.append(MicroBatch(
                seqs.input_ids[cols], seqs.attention_mask[cols], seqs.labels[cols],
                seqs.response_mask[cols], seqs.image_mask[cols],
                torch.cat([p.pixel_values for p in prompts[rows]]),
                torch.cat([p.image_grid_thw for p in prompts[rows]]),
                torch.zeros(rows.stop - start), targets[cols], has[rows], evidence[cols]))
        contexts = []

        def contexts_for(m):
            ctx = EaseContext(m.image_mask, m.response_mask, m.ease_target, m.ease_weight,
                              normalizer=1.0, num_layers=len(self.cfg.ease.layers),
                              gradient_scale=0.0, key_valid_mask=m.attention_mask,
                              evidence_mask=m.evidence_mask, keep_mass=keep_mass,
                              slice_impl=self.cfg.ease.slice_impl)
            contexts.append(ctx)
            return ctx

        def loss_fn(m, output):
            return torch.zeros((), device=output.device), {}

        for chunk in self.model_chunks:
            chunk.eval()
        _forward_backward(self.cfg, self.model_chunks, mbs, loss_fn, contexts_for,
                          forward_only=True)
        for chunk in self.model_chunks:
            chunk.train()
        return contexts, [m.image_mask for m in mbs]

    def _evidence_attention(self, batch, prompts, out) -> tuple[float, float]:
        """Σ over samples of attention-in-evidence (mean over EASE layers), and the count."""
        from megatron.core import parallel_state as ps

        contexts, _ = self._eval_contexts(batch, prompts, out)
        # Per-layer sums of this stage's EASE layers, summed over pipeline stages only: DP ranks
        # evaluate different numbers of batches, so nothing here may wait on DP peers.
        sums = torch.zeros(2, dtype=torch.float64)
        for record in (r for c in contexts for r in c.records.values()):
            if record.evidence_samples is not None and float(record.evidence_samples) > 0:
                sums += torch.tensor([float(record.evidence_attention_sum),
                                      float(record.evidence_samples)])
        if ps.get_pipeline_model_parallel_world_size() > 1:
            all_reduce_(sums, group=ps.get_pipeline_model_parallel_group())
        layers = len(self.cfg.ease.layers)
        return float(sums[0]) / layers, float(sums[1]) / layers

    @torch.no_grad()
    def attention_for(self, batch, prompts) -> list[torch.Tensor]:
        """Greedy answers, then per sample the response→image attention mass over its visual
        tokens, averaged over all EASE layers (summed over pipeline stages: a stage may hold
        none of them), on every rank."""
        from megatron.core import parallel_state as ps

        if not self.cfg.ease.layers:
            raise ValueError("attention overlays show the EASE layers' attention: set "
                             "ease.layers (the layers to read, e.g. ease.layers=[0,1])")
        out = generate(self.engine, prompts, self._greedy())
        contexts, image_masks = self._eval_contexts(batch, prompts, out, keep_mass=True)
        result = []
        for context, image_mask in zip(contexts, image_masks):
            total = torch.zeros(image_mask.shape, dtype=torch.float32)
            for record in context.records.values():  # this stage's EASE layers
                total += record.mass.float().cpu()
            if ps.get_pipeline_model_parallel_world_size() > 1:
                all_reduce_(total, group=ps.get_pipeline_model_parallel_group())
            masses = total / len(self.cfg.ease.layers)
            result.extend(masses[i][image_mask[i]] for i in range(len(image_mask)))
        return result


def attention_maps(evaluator: Evaluator, num_samples: int) -> list[dict]:
    """Greedy answers and the EASE layers' response→image attention for the first held-out
    samples: per sample the evidence target and attention as visual-token grids, of every image
    (``images``: grid, target, evidence, attention each) and of the first at the top level (none
    for ``num_samples`` 0). Every rank reads the same samples (the forward is collective).
    ``evaluator``: an ``Evaluator``, or what has its ``cfg``, ``tokenizer`` and
    ``attention_for`` (the ``Trainer``)."""
    if num_samples <= 0:
        return []
    cfg = evaluator.cfg
    reader = builders.build_reader(cfg, evaluator.tokenizer, cfg.data.eval_shards, num_samples,
                                   0, 1, train=False)
    batch = next(iter(reader))
    prompts = split_prompts(batch)[:num_samples]
    masses = evaluator.attention_for(batch, prompts)
    merge = cfg.model.vision.spatial_merge_size
    out = []
    for i, prompt in enumerate(prompts):
        image_mask = batch["image_mask"][i][:batch["input_ids"].shape[1]]
        target = batch["evidence_target"][i][image_mask]
        # E > 0: the target p* is smoothed with an alpha / N floor, so it is positive everywhere.
        evidence = batch["evidence_mask"][i][image_mask]
        images, start = [], 0
        for t, h, w in prompt.image_grid_thw.tolist():  # the sample's images, in token order
            h, w = int(h) // merge, int(w) // merge
            rows = slice(start, start + h * w)
            images.append({"grid": [h, w], "target": target[rows].reshape(h, w).tolist(),
                           "evidence": evidence[rows].reshape(h, w).tolist(),
                           "attention": masses[i][rows].reshape(h, w).tolist()})
            start += int(t) * h * w
        # The first image's grids at the top level (as before multi-image samples were drawn).
        out.append({"key": batch["keys"][i], "shard": batch["shards"][i],
                    "question": batch["records"][i]["question"],
                    "answer": batch["answers"][i], **images[0], "images": images})
    return out
