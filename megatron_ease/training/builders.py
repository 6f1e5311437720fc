"""Build what the trainer runs on, from the config: model (with EASE layers), DDP, optimizer,
LR scheduler, tokenizer, data readers. One function per object, no training logic here."""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

import torch

from megatron_ease.config import Config

logger = logging.getLogger(__name__)


def build_model(cfg: Config) -> torch.nn.Module:
    """This rank's chunk of the policy, EASE-capturing attention at ``ease.layers``.

    The capturing layers are built even with ``ease.enabled: false``: without a gradient scale
    they only record attention (bit-identical training), so a DAPO-only run reports the same
    attention-in-evidence metrics as an EASE run."""
    from megatron_ease.ease.specs import ease_attention_spec
    from megatron_ease.models.qwen_vl import build_qwen_vl_model

    capture = bool(cfg.ease.layers)
    model = build_qwen_vl_model(cfg.model, cfg.parallel,
                                attention_override=ease_attention_spec if capture else None,
                                override_layers=cfg.ease.layers)
    if cfg.model.freeze_vision and getattr(model, "vision_model", None) is not None:
        for p in model.vision_model.parameters():
            p.requires_grad_(False)
    return model


def wrap_ddp(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    """DDP around ``model``, with megatron-core's gradient finalisation wired into its config.

    The pipeline schedules reduce gradients only through ``config.finalize_model_grads_func``,
    called after a step's last micro-batch (DDP's hooks just accumulate into ``main_grad`` when
    ``overlap_grad_reduce`` is off). It averages gradients over DP (reduce-scatter with the
    distributed optimizer), sums the q/k-norm gradients over TP (Qwen3-VL: each TP rank sees its
    own heads only), averages the TP-replicated vision tower's and all-reduces tied embeddings
    across pipeline stages. Without it every replica would step on its own gradient."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(cfg: Config, model_chunks: list, lr: Optional[float] = None):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam", lr=lr if lr is not None else t.lr,
        min_lr=t.min_lr if lr is None else lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
        bf16=cfg.model.bf16, params_dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    # megatron-core gives biases and 1-D weights (norms) wd_mult 0, but only the scheduler
    # applies the multipliers: an optimizer stepped without one (the warm start) decayed them.
    for group in optimizer.param_groups:
        group["lr"] = opt_config.lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = opt_config.weight_decay * group.get("wd_mult", 1.0)
    return optimizer


def apply_optimizer_config(cfg: Config, optimizer, scheduler=None) -> None:
    """The config's optimizer hyper-parameters over those a loaded checkpoint brought back:
    torch's ``load_state_dict`` restores each group's ``betas`` and megatron-core's per-group
    ``max_lr`` / ``min_lr`` (which its scheduler reads before its own), so a resumed run kept
    the checkpoint's whatever the config said. Then the scheduler sets each group's lr and weight
    decay again, at the step it is at."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (cfg.train.adam_beta1, cfg.train.adam_beta2)
        if "max_lr" in group:
            group["max_lr"], group["min_lr"] = cfg.train.lr, cfg.train.min_lr
    if scheduler is not None:
        scheduler.step(0)


def build_scheduler(cfg: Config, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    steps = max(1, t.steps)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if t.lr_warmup_steps else t.lr, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_steps, lr_decay_steps=max(steps, t.lr_warmup_steps + 1),
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
        # A resumed run follows its config's schedule at the checkpoint's step (Megatron-LM's
        # --override-opt_param-scheduler): megatron-core's default kept the checkpoint's max_lr,
        # decay steps and style, so raising train.steps to go on trained at min_lr.
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def check_tokenizer_name(name: str) -> None:
    """``data.tokenizer`` names a directory or a Hugging Face model id (resolved later)."""
    if not name:
        raise ValueError("data.tokenizer is empty: give a tokenizer directory or a Hugging Face "
                         "model id")
    if not os.path.isdir(name) and not _HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"data.tokenizer: no tokenizer directory at {name!r}")


def load_tokenizer(name: str):
    """``data.tokenizer``: a directory, or a Hugging Face model id (``Qwen/Qwen3-VL-8B-Instruct``)
    resolved as ``from_pretrained`` does (the HF cache; offline with ``HF_HUB_OFFLINE=1``)."""
    from transformers import AutoTokenizer

    check_tokenizer_name(name)
    if os.path.isdir(name):
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise ValueError(f"data.tokenizer: cannot load a tokenizer from the directory "
                             f"{name!r} ({type(e).__name__}: {str(e).splitlines()[0]}); it "
                             f"needs the HF model's tokenizer files (tokenizer.json, "
                             f"tokenizer_config.json)") from None
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"data.tokenizer: {name!r} is not a directory and cannot be loaded as a Hugging Face "
            f"model id here ({type(e).__name__}: {str(e).splitlines()[0]}). On nodes without "
            f"internet, download it first (`hf download {name}`, then HF_HUB_OFFLINE=1) or give "
            f"the HF model's directory") from None


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name, as on huggingface.co


def image_config(cfg: Config):
    from megatron_ease.data.image import ImageProcessingConfig

    v = cfg.model.vision
    return ImageProcessingConfig.for_family(
        cfg.model.family, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size, min_pixels=cfg.data.min_pixels,
        max_pixels=cfg.data.max_pixels)


def shard_files(spec: str, field: str, hint: str = "") -> list[str]:
    """The shard files of ``spec`` (globs, brace ranges), or an error naming the config
    ``field`` (and ``hint``, what to do) when a pattern matches nothing."""
    from megatron_ease.data.reader import expand_shards

    try:
        files = expand_shards(spec) if spec else []
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{field}: {e}{hint}") from None
    if not files:
        raise FileNotFoundError(f"{field}: no shards match {spec!r}{hint}")
    return files


def check_eval_shards(cfg: Config) -> None:
    """With periodic validation on, ``data.eval_shards`` must match files: found at start, not
    at the first validation hours into the run."""
    if cfg.eval.interval:
        shard_files(cfg.data.eval_shards, "data.eval_shards",
                    f" (eval.interval is {cfg.eval.interval}; fix the path or set "
                    f"eval.interval=0)")


def build_reader(cfg: Config, tokenizer, shards: str, batch_size: int, dp_rank: int, dp_size: int,
                 train: bool = True, append_answer: bool = False,
                 max_samples: Optional[int] = None):
    """Evidence shards -> collated prompt batches for this data-parallel rank. ``train=False``:
    one in-order pass, over the first ``max_samples`` samples when given."""
    from megatron_ease.data.processing import SampleProcessor
    from megatron_ease.data.prompt import PromptConfig
    from megatron_ease.data.reader import EvidenceDataLoader, EvidenceShardDataset

    files = shard_files(shards, "data.train_shards" if train else "data.eval_shards")
    processor = SampleProcessor(tokenizer, image_config(cfg), sigma=cfg.ease.sigma,
                                alpha=cfg.ease.alpha, append_answer=append_answer,
                                max_prompt_tokens=cfg.data.max_prompt_tokens,
                                prompt_config=PromptConfig.for_family(cfg.model.family))
    dataset = EvidenceShardDataset(
        files, processor, batch_size=batch_size, rank=dp_rank, world_size=dp_size,
        seed=cfg.data.shuffle_seed, shuffle=train, num_epochs=None if train else 1,
        even_ranks=train, drop_last=False, strict=cfg.data.strict, padding_side="right",
        max_samples=max_samples)
    return EvidenceDataLoader(dataset, num_workers=cfg.data.num_workers,
                              prefetch_factor=cfg.data.prefetch_factor)


def check_tokenizer_fits(cfg: Config, tokenizer) -> None:
    """The model's token ids must be the tokenizer's: a vocabulary larger than the embedding
    fails as an index error inside the first forward, another image token id as "0 image
    tokens" in the vision scatter, and an eos the chat template never emits lets every rollout
    run to ``dapo.max_response_length``. Raises ValueError naming the config field."""
    from megatron_ease.data.prompt import QwenSpecialTokens

    m, name = cfg.model, cfg.data.tokenizer
    if len(tokenizer) > m.vocab_size:
        raise ValueError(f"model.vocab_size ({m.vocab_size}) is smaller than data.tokenizer "
                         f"{name!r}'s vocabulary ({len(tokenizer)} tokens)")
    special = QwenSpecialTokens.from_tokenizer(tokenizer)
    for field, want, token in (("image_token_id", special.image_pad, "<|image_pad|>"),
                               ("vision_start_token_id", special.vision_start, "<|vision_start|>"),
                               ("vision_end_token_id", special.vision_end, "<|vision_end|>")):
        if getattr(m, field) != want:
            raise ValueError(f"model.{field} ({getattr(m, field)}) is not data.tokenizer "
                             f"{name!r}'s {token} ({want})")
    if special.im_end not in (m.eos_token_id, *m.stop_token_ids):
        raise ValueError(f"neither model.eos_token_id ({m.eos_token_id}) nor "
                         f"model.stop_token_ids {m.stop_token_ids} is data.tokenizer {name!r}'s "
                         f"<|im_end|> ({special.im_end}), which ends the chat template's "
                         f"answers: rollouts would never stop before dapo.max_response_length")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"data.tokenizer {name} has no pad token")


def check_paths(cfg: Config) -> None:
    """The paths a run reads or writes, checked on every rank before anything is built: a wrong
    path is one line naming its config field, instead of a traceback per rank after the model
    and optimizer were built (minutes at 8B). The training CLI agrees on the verdicts over the
    process group (``distributed.errors_of_all_ranks``: a path may be missing on some nodes).
    Raises FileNotFoundError / ValueError / PermissionError. Missing shards are fine with ``data.synthetic`` (rank 0 writes them); a
    missing ``model.init_from`` is fine when the run resumes from ``checkpoint.dir`` (a requeued
    job whose initial weights were purged from scratch space still resumes). Hub tokenizer ids
    are resolved later, by ``load_tokenizer``."""
    if not cfg.data.synthetic:
        shard_files(cfg.data.train_shards, "data.train_shards")
        check_eval_shards(cfg)
        check_tokenizer_name(cfg.data.tokenizer)
    from megatron_ease.training.checkpointing import LATEST

    ckpt = cfg.checkpoint.dir
    resumable = bool(ckpt and cfg.checkpoint.resume
                     and os.path.isfile(os.path.join(ckpt, LATEST)))  # as the trainer resumes
    if cfg.model.init_from and not resumable:
        check_checkpoint(cfg.model.init_from, "model.init_from")
    for field, path in (("checkpoint.dir", ckpt), ("logging.run_dir", cfg.logging.run_dir)):
        if not path:
            continue
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{field}: {existing!r} is a file, not a directory "
                                     f"(from {path!r})")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{field}: {existing!r} is not writable (from {path!r})")


def check_checkpoint(path: str, field: str) -> None:
    """``path`` is what a weights load reads: a checkpoint, or a directory pointing to one
    (``resolve_checkpoint_dir``). Errors name ``field`` (a config field or a flag)."""
    from megatron_ease.models.qwen_vl.checkpoint import resolve_checkpoint_dir

    if not os.path.exists(path):
        raise FileNotFoundError(f"{field}: no checkpoint at {path!r}")
    try:
        resolve_checkpoint_dir(path)
    except (FileNotFoundError, ValueError) as e:  # a directory of another kind
        raise ValueError(f"{field}: {e}") from None


def build_rollout_engine(cfg: Config, model: torch.nn.Module, tokenizer):
    """The rollout engine over ``model`` (this rank's chunk) with the ``dapo`` settings."""
    from megatron_ease.rl.rollout import MegatronRolloutEngine

    return MegatronRolloutEngine(
        model, pad_token_id=tokenizer.pad_token_id, detokenize=tokenizer.decode,
        max_rollouts_per_batch=cfg.dapo.max_rollouts_per_batch or None,
        pipelined=cfg.dapo.pipelined_rollouts)


def ensure_synthetic_data(cfg: Config) -> None:
    """``data.synthetic``: rank 0 writes the synthetic dataset when missing; others wait."""
    if not cfg.data.synthetic:
        return
    from megatron_ease.data.synthetic import write_synthetic_dataset

    root = os.path.dirname(os.path.dirname(cfg.data.train_shards.rstrip("/")))
    if torch.distributed.get_rank() == 0:
        write_synthetic_dataset(root, cfg.data.synthetic_train_samples,
                                cfg.data.synthetic_eval_samples, seed=cfg.data.shuffle_seed)
    torch.distributed.barrier()
