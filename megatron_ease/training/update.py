"""Policy updates through megatron-core's schedule: π_old log-probs, then DAPO + λ·EASE.

Scaling invariant (DESIGN §4–5): each micro-batch returns its token-loss *sum* divided by the
mini-batch's global response-token count (all micro-batches, all DP ranks), multiplied by
``num_microbatches · DP`` to undo the schedule's division by the micro-batch count and DDP's
average over DP. The EASE term is injected by the layers themselves (auto-scaler) with the
global gated count and ``ease_gradient_scale``. So the applied gradient is that of
``L_DAPO + λ·L_EASE`` over the mini-batch, whatever the micro-batch count, DP, TP or PP.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from megatron_ease.config import Config
from megatron_ease.distributed import all_reduce_
from megatron_ease.ease.context import (
    EaseContext,
    ease_context,
    ease_gradient_scale,
    global_gated_count,
    reduce_ease_metrics,
)
from megatron_ease.models.qwen_vl.logprobs import vocab_parallel_entropy, vocab_parallel_log_probs
from megatron_ease.rl.dapo import dapo_policy_loss_and_metrics


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, S]
    attention_mask: torch.Tensor  # [b, S] bool
    labels: torch.Tensor  # [b, S]
    response_mask: torch.Tensor  # [b, S] bool, label-shifted
    image_mask: torch.Tensor  # [b, S] bool
    pixel_values: Optional[torch.Tensor]  # [patches, C·T·P·P] of the images to encode
    image_grid_thw: Optional[torch.Tensor]  # [images, 3]
    advantages: torch.Tensor  # [b]
    ease_target: torch.Tensor  # [b, S] p* at image positions
    ease_weight: torch.Tensor  # [b] gate: correct and has a target
    evidence_mask: torch.Tensor  # [b, S] bool, E > 0
    old_log_probs: Optional[torch.Tensor] = None  # [b, S], set on the last stage by π_old pass
    # [b] bool, rows in the DAPO loss; None = all. False for rollouts that only feed EASE (the
    # correct rollouts of filtered all-correct groups, ``ease.use_filtered_correct``).
    policy_rows: Optional[torch.Tensor] = None
    # [image slots] which encoded image fills each image slot (``QwenVLModel.forward``): the
    # rollouts of one prompt share its image, encoded once. None = one image per slot.
    image_ids: Optional[torch.Tensor] = None

    @property
    def policy_mask(self) -> torch.Tensor:
        """``[b, S]`` response tokens of the DAPO loss (EASE reads all of ``response_mask``)."""
        if self.policy_rows is None:
            return self.response_mask
        return self.response_mask & self.policy_rows[:, None]

    @property
    def num_response_tokens(self) -> int:
        """Tokens in the DAPO (or supervised) loss: its global normaliser counts these."""
        return int(self.policy_mask.sum())

    def to(self, device: torch.device) -> "MicroBatch":
        """This micro-batch on ``device`` (the model's); a no-op where it already is."""
        if self.input_ids.device == device:
            return self
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward_backward(cfg: Config, model_chunks, micro_batches: list[MicroBatch], loss_fn,
                      contexts_for, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = model_device(model_chunks[0])

    def forward_step(data_iterator, model):
        mb = next(data_iterator).to(device)  # the rollout bookkeeping lives on the CPU
        context = contexts_for(mb)
        with ease_context(model, context) if context is not None else contextlib.nullcontext():
            output = model(mb.input_ids, attention_mask=mb.attention_mask,
                           pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw,
                           image_ids=mb.image_ids)
        return output, partial(loss_fn, mb)

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=model_chunks,
        num_microbatches=len(micro_batches), seq_length=micro_batches[0].input_ids.shape[1],
        micro_batch_size=micro_batches[0].input_ids.shape[0], forward_only=forward_only)


@torch.no_grad()
def compute_old_log_probs(cfg: Config, model_chunks, micro_batches: list[MicroBatch]) -> None:
    """π_old: one forward pass of the current policy; stored on the last stage's micro-batches."""
    temperature = cfg.dapo.temperature

    def loss_fn(mb, output):
        log_probs = vocab_parallel_log_probs(output, mb.labels, temperature)
        return torch.zeros((), device=output.device), {"log_probs": log_probs}

    for chunk in model_chunks:
        chunk.eval()
    outputs = _forward_backward(cfg, model_chunks, micro_batches, loss_fn, lambda mb: None,
                                forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    for mb, out in zip(micro_batches, outputs or []):
        mb.old_log_probs = out["log_probs"]


def policy_update(cfg: Config, model_chunks, optimizer, mini_batches: list[list[MicroBatch]],
                  dp_group, dp_size: int, ease_active: bool) -> list[dict]:
    """π_old, then ``train.ppo_epochs`` passes over the mini-batches, one optimizer step each.

    π_old is the policy before the first step, and the first mini-batch's first forward runs on
    exactly those weights: its detached log-probs are π_old's (the ratio is 1 there, as the
    separate pass would make it). So only the other mini-batches get a π_old forward pass; with
    one mini-batch and one epoch (the on-policy case) there is none, a quarter of the update's
    compute saved. ``train.recompute_old_log_probs`` runs the pass for all of them (π_old in eval
    mode, the update in train mode: they differ only if the model has dropout)."""
    from_forward = not cfg.train.recompute_old_log_probs
    # Micro-batches without DAPO tokens (only EASE-feeding rows, ease.use_filtered_correct) need
    # no π_old: their policy term is empty.
    separate = [mb for mini in (mini_batches[1:] if from_forward else mini_batches) for mb in mini
                if mb.num_response_tokens > 0]
    if separate:
        compute_old_log_probs(cfg, model_chunks, separate)
    for chunk in model_chunks:  # recomputation (layers, vision tower) runs in train mode only
        chunk.train()
    return [train_mini_batch(cfg, model_chunks, optimizer, mini, dp_group, dp_size, ease_active,
                             old_from_forward=from_forward and epoch == 0 and k == 0)
            for epoch in range(cfg.train.ppo_epochs) for k, mini in enumerate(mini_batches)]


def train_mini_batch(cfg: Config, model_chunks, optimizer, micro_batches: list[MicroBatch],
                     dp_group, dp_size: int, ease_active: bool,
                     old_from_forward: bool = False) -> dict:
    """One optimizer step on a mini-batch; returns metric sums (reduce them with the DP group).

    ``old_from_forward``: the weights are π_old's (nothing stepped since the rollouts), so this
    forward's detached log-probs are taken, and kept, as ``old_log_probs``; otherwise
    ``compute_old_log_probs`` must have set them."""
    d = cfg.dapo
    local_tokens = torch.tensor([float(sum(mb.num_response_tokens for mb in micro_batches))],
                                dtype=torch.float64)
    if dp_group is not None:
        all_reduce_(local_tokens, group=dp_group)
    global_tokens = float(local_tokens)
    undo = len(micro_batches) * dp_size

    def loss_fn(mb, output):
        log_probs = vocab_parallel_log_probs(output, mb.labels, d.temperature)
        old = log_probs.detach() if old_from_forward else mb.old_log_probs
        if old is None and mb.num_response_tokens == 0:  # an EASE-only micro-batch: any π_old
            old = log_probs.detach()
        if old is None:
            raise RuntimeError("train_mini_batch: micro-batch without old_log_probs; run "
                               "compute_old_log_probs first or pass old_from_forward=True")
        loss, sums = dapo_policy_loss_and_metrics(
            log_probs, old, mb.advantages, mb.policy_mask, d.clip_low, d.clip_high, d.clip_c,
            num_tokens=global_tokens)
        # The policy's entropy at the response tokens (DAPO's collapse signal), a metric sum.
        entropy = vocab_parallel_entropy(output, mb.policy_mask, d.temperature)
        sums["entropy"] = entropy.double().sum()
        return loss * undo, {"dapo_loss": loss.detach().double(), "old_log_probs": old, **sums}

    contexts = []
    if cfg.ease.layers:
        normalizer = global_gated_count([mb.ease_weight for mb in micro_batches], group=dp_group)
        scale = ease_gradient_scale(cfg.ease.loss_coeff if ease_active else 0.0,
                                    data_parallel_size=dp_size)

        def contexts_for(mb):
            context = EaseContext(
                mb.image_mask, mb.response_mask, mb.ease_target, mb.ease_weight,
                normalizer=normalizer, num_layers=len(cfg.ease.layers), gradient_scale=scale,
                key_valid_mask=mb.attention_mask, evidence_mask=mb.evidence_mask,
                divergence=cfg.ease.divergence, chunk_size=cfg.ease.chunk_size,
                slice_impl=cfg.ease.slice_impl)
            contexts.append(context)
            return context
    else:
        def contexts_for(mb):
            return None

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = _forward_backward(cfg, model_chunks, micro_batches, loss_fn, contexts_for,
                                forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if old_from_forward:  # kept for later epochs, on the stored micro-batches (the forward step
        for mb, out in zip(micro_batches, outputs or []):  # had device copies of them)
            mb.old_log_probs = out["old_log_probs"]
    sums = dict.fromkeys(POLICY_SUMS, 0.0)
    for out in outputs or []:
        for k in sums:
            sums[k] += float(out[k])
    metrics = {"update_ok": float(bool(ok)), "grad_norm": float(grad_norm or 0.0),
               "_policy_sums": sums}
    if cfg.ease.layers:
        metrics.update(reduce_ease_metrics(contexts, cfg.ease.layers,
                                           data_parallel_group=dp_group))
    return metrics


# The per-update metric sums ``train_mini_batch`` returns under ``_policy_sums`` (the trainer
# reduces them over PP and DP and divides by the step's response tokens).
POLICY_SUMS = ("dapo_loss", "clip_low", "clip_high", "clip_dual", "approx_kl", "ratio",
               "entropy", "tokens")


def supervised_step(cfg: Config, model_chunks, optimizer, micro_batches: list[MicroBatch],
                    dp_group, dp_size: int) -> dict:
    """One supervised (cross-entropy on the response rows) optimizer step: the warm start."""
    local_tokens = torch.tensor([float(sum(mb.num_response_tokens for mb in micro_batches))],
                                dtype=torch.float64)
    if dp_group is not None:
        all_reduce_(local_tokens, group=dp_group)
    global_tokens = max(1.0, float(local_tokens))
    undo = len(micro_batches) * dp_size

    def loss_fn(mb, output):
        log_probs = vocab_parallel_log_probs(output, mb.labels)
        nll = -torch.where(mb.response_mask, log_probs, torch.zeros_like(log_probs)).sum()
        loss = nll / global_tokens
        return loss * undo, {"sft_loss": loss.detach().double()}

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = _forward_backward(cfg, model_chunks, micro_batches, loss_fn, lambda mb: None,
                                forward_only=False)
    optimizer.step()
    # Each rank holds its share of the global token mean on the last stage only: sum over PP
    # (other stages add 0) and DP, so every rank logs the mini-batch's loss.
    from megatron.core import parallel_state as ps

    local = torch.tensor([sum(float(o["sft_loss"]) for o in outputs or [])], dtype=torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        all_reduce_(local, group=ps.get_pipeline_model_parallel_group())
    if dp_group is not None:
        all_reduce_(local, group=dp_group)
    return {"sft_loss": float(local)}
