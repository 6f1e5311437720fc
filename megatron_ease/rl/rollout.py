"""Rollout generation: G sampled responses per prompt, with token ids, log-probs and lengths.

    engine = MegatronRolloutEngine(model, pad_token_id=cfg.model.pad_token_id,
                                   detokenize=tokenizer.decode)
    params = SamplingParams.from_dapo_config(cfg.dapo, [cfg.model.eos_token_id], seed=step)
    out = engine.generate([Prompt(ids, pixel_values, image_grid_thw), ...], params)
    out.tokens      # [B*G, T] response ids, pad_token_id after each rollout's end
    out.log_probs   # [B*G, T] float32 log softmax(logits / temperature)[token], 0 after the end
    out.lengths     # [B*G] response tokens, including the EOS / stop-string token
    out.finished    # [B*G] ended by a stop token or string (False: cut at max_new_tokens)
    out.prompt_index  # [B*G] rows b*G .. b*G+G-1 answer prompts[b] (RolloutBatch's group order)

``RolloutEngine`` is the interface the trainer sees; ``MegatronRolloutEngine`` generates with the
training model itself (megatron-core's static KV cache, TP and PP as the model is laid out), and a
vLLM engine can implement the same ``generate`` later.

Every rank of the model-parallel group calls ``generate`` with the same prompts and parameters.
The last pipeline stage's first TP rank samples (a ``torch.Generator`` seeded at every step from
``SamplingParams.seed``, the batch and the step, so a seed reproduces the rollouts, and a
rollout's draws do not depend on the other rollouts: dropping finished ones from the batch, or
adding a stop token, leaves the others' tokens as they were); the sampled tokens, their
log-probs and the stop flags are broadcast over TP and then from the last pipeline stage to all
stages, so every rank returns the same ``RolloutOutput`` and feeds the same tokens to the next
step. Data-parallel ranks generate independently: give each its own seed (e.g.
``hash((step, dp_rank))``).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_ease.rl.inference_adapters import RolloutModelAdapter, rollout_adapter_for
from megatron_ease.rl.sampling import SamplingParams, StopStringMatcher, sample_next_tokens


@dataclass
class Prompt:
    """One prompt: token ids, and the patches and grids of its images (Qwen-VL processor layout)."""

    input_ids: Union[Sequence[int], torch.Tensor]
    pixel_values: Optional[torch.Tensor] = None  # [num_patches, C*T*P*P]
    image_grid_thw: Optional[torch.Tensor] = None  # [num_images, 3]


@dataclass
class PromptBatch:
    """Prompts left-padded to a common length, so every prompt ends in the last column."""

    input_ids: torch.Tensor  # [B, P] int64
    attention_mask: torch.Tensor  # [B, P] bool, True = real token
    pixel_values: Optional[torch.Tensor] = None  # [all patches, C*T*P*P], prompt order
    image_grid_thw: Optional[torch.Tensor] = None  # [all images, 3], prompt order

    @classmethod
    def left_padded(cls, prompts: Sequence[Prompt], pad_token_id: int,
                    device: Optional[torch.device] = None) -> "PromptBatch":
        ids = [torch.as_tensor(p.input_ids, dtype=torch.long).reshape(-1) for p in prompts]
        empty = [i for i, t in enumerate(ids) if t.numel() == 0]
        if empty:
            raise ValueError(f"prompts {empty} have no tokens")
        length = max(t.numel() for t in ids)
        input_ids = torch.full((len(ids), length), pad_token_id, dtype=torch.long)
        valid = torch.zeros(len(ids), length, dtype=torch.bool)
        for row, t in enumerate(ids):
            input_ids[row, length - t.numel():] = t
            valid[row, length - t.numel():] = True
        with_images = [p for p in prompts if p.pixel_values is not None]
        for i, p in enumerate(prompts):
            if (p.pixel_values is None) != (p.image_grid_thw is None):
                raise ValueError(f"prompt {i}: pixel_values and image_grid_thw go together")
        pixel_values = grids = None
        if with_images:
            pixel_values = torch.cat([p.pixel_values for p in with_images]).to(device)
            grids = torch.cat([torch.as_tensor(p.image_grid_thw).reshape(-1, 3)
                               for p in with_images]).to(device)
        return cls(input_ids.to(device), valid.to(device), pixel_values, grids)


@dataclass
class RolloutOutput:
    """Rollouts of ``generate``; see the module doc for the fields."""

    tokens: torch.Tensor  # [N, T] int64
    log_probs: torch.Tensor  # [N, T] float32
    lengths: torch.Tensor  # [N] int64
    finished: torch.Tensor  # [N] bool
    prompt_index: torch.Tensor  # [N] int64

    @property
    def response_mask(self) -> torch.Tensor:
        """``[N, T]`` bool, True at generated tokens (including the EOS / stop token)."""
        steps = torch.arange(self.tokens.shape[1], device=self.lengths.device)
        return steps[None, :] < self.lengths[:, None]

    @classmethod
    def concat(cls, outputs: Sequence["RolloutOutput"], pad_token_id: int) -> "RolloutOutput":
        width = max(o.tokens.shape[1] for o in outputs)

        def pad(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return cls(tokens=torch.cat([pad(o.tokens, pad_token_id) for o in outputs]),
                   log_probs=torch.cat([pad(o.log_probs, 0.0) for o in outputs]),
                   lengths=torch.cat([o.lengths for o in outputs]),
                   finished=torch.cat([o.finished for o in outputs]),
                   prompt_index=torch.cat([o.prompt_index for o in outputs]))


# Finished rollouts leave the decode batch once they are this share of it (see _generate_batch).
_DROP_FINISHED_FRACTION = 0.25


def _step_seed(seed: int, first_prompt: int, step: int) -> int:
    """The sampling generator's seed at one step of one batch: a rollout's draws depend on the
    seed, its batch, the step and its own row only (``sample_next_tokens(rows=...)``), not on
    how many draws other rows needed before, nor on which rows are still generating."""
    digest = hashlib.blake2b(f"{seed}/{first_prompt}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class RolloutEngine(abc.ABC):
    """Generates ``sampling_params.n`` rollouts per prompt."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Prompt], sampling_params: SamplingParams) -> RolloutOutput:
        """Rollouts of ``prompts`` in prompt order, ``n`` consecutive rows per prompt."""


class MegatronRolloutEngine(RolloutEngine):
    """Generation with a megatron-core model on its own TP/PP layout, over a static KV cache.

    Args:
        model: this rank's model chunk (a ``GPTModel`` or ``QwenVLModel``, possibly wrapped in
            DDP / Float16Module); its train/eval mode is restored after each call.
        pad_token_id: fills prompts on the left and responses after their end.
        detokenize: ``ids -> text``, needed for ``SamplingParams.stop_strings``.
        max_rollouts_per_batch: the most rollouts (prompts × n) decoded together, which bounds
            the KV cache (``rollouts × (prompt + max_new_tokens)`` per layer); more prompts are
            generated in consecutive batches. None = all at once.
        adapter: how the model is called (default: ``rollout_adapter_for(model)``).
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int,
                 detokenize: Optional[Callable[[list[int]], str]] = None,
                 max_rollouts_per_batch: Optional[int] = None,
                 adapter: Optional[RolloutModelAdapter] = None):
        self.adapter = adapter or rollout_adapter_for(model)
        self.pad_token_id = pad_token_id
        self.detokenize = detokenize
        self.max_rollouts_per_batch = max_rollouts_per_batch

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], sampling_params: SamplingParams) -> RolloutOutput:
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        matcher = None
        if sampling_params.stop_strings:
            if self.detokenize is None:
                raise ValueError("SamplingParams.stop_strings need MegatronRolloutEngine("
                                 "detokenize=...)")
            matcher = StopStringMatcher(sampling_params.stop_strings, self.detokenize)
        per_batch = len(prompts)
        if self.max_rollouts_per_batch is not None:
            per_batch = max(1, self.max_rollouts_per_batch // sampling_params.n)
        outputs = []
        for first in range(0, len(prompts), per_batch):
            out = self._generate_batch(prompts[first:first + per_batch], first, sampling_params,
                                       matcher)
            out.prompt_index += first
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else RolloutOutput.concat(outputs,
                                                                         self.pad_token_id)

    # -- one batch -------------------------------------------------------------------------------

    def _generate_batch(self, prompts: Sequence[Prompt], first_prompt: int,
                        params: SamplingParams,
                        matcher: Optional[StopStringMatcher]) -> RolloutOutput:
        """Rollouts of ``prompts`` (``prompts[0]`` is prompt ``first_prompt`` of the call).

        Each step decodes the rollouts of ``in_batch`` only: once the finished ones make up
        ``_DROP_FINISHED_FRACTION`` of it they leave the KV cache (a copy of the cache's filled
        part, about what one step's attention reads), until then they are fed padding and their
        samples ignored. A step costs one host synchronisation (how many rows are done)."""
        device = self.adapter.device
        batch = PromptBatch.left_padded(prompts, self.pad_token_id, device)
        rows, steps = len(prompts) * params.n, params.max_new_tokens
        tokens = torch.full((rows, steps), self.pad_token_id, dtype=torch.long, device=device)
        log_probs = torch.zeros(rows, steps, dtype=torch.float32, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        suppressed = torch.tensor(params.suppress_token_ids, dtype=torch.long, device=device)
        in_batch = torch.arange(rows, device=device)  # rollouts in the decode batch, in row order
        generator = None
        if self._is_sampling_rank:
            generator = torch.Generator(device=device)
        try:
            logits = self.adapter.prefill(batch, params.n, steps)  # [rows, V] on the last stage
            for step in range(steps):
                active = ~finished[in_batch]
                packed = None
                if self._is_sampling_rank:
                    generator.manual_seed(_step_seed(params.seed, first_prompt, step))
                    token, log_prob = sample_next_tokens(logits, params, generator,
                                                         rows=in_batch, num_rows=rows,
                                                         suppressed=suppressed)
                    token = torch.where(active, token, self.pad_token_id)
                    log_prob = torch.where(active, log_prob, 0.0)
                    stop = active & torch.isin(token, stop_ids)
                    if matcher is not None:
                        tokens[in_batch, step] = token
                        stop |= matcher(tokens[in_batch], lengths[in_batch] + 1, active & ~stop)
                    packed = torch.stack([token.double(), log_prob.double(), stop.double()])
                packed = self._share(packed, len(in_batch))  # [3, len(in_batch)] on every rank
                tokens[in_batch, step] = packed[0].long()
                log_probs[in_batch, step] = packed[1].float()
                lengths[in_batch] += active.long()
                done = ~active | packed[2].bool()
                finished[in_batch] = done
                num_done = int(done.sum())
                if num_done == len(in_batch) or step == steps - 1:
                    break
                if num_done >= _DROP_FINISHED_FRACTION * len(in_batch):
                    unfinished = (~done).nonzero()[:, 0]
                    self.adapter.select_rows(unfinished)
                    in_batch = in_batch[unfinished]
                logits = self.adapter.decode(tokens[in_batch, step])
        finally:
            self.adapter.release()
        width = max(1, int(lengths.max()))
        return RolloutOutput(
            tokens=tokens[:, :width].contiguous(), log_probs=log_probs[:, :width].contiguous(),
            lengths=lengths, finished=finished,
            prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(params.n))

    # -- who samples, and sharing what was sampled ------------------------------------------------

    @property
    def _is_sampling_rank(self) -> bool:
        return self.adapter.is_last_stage and self.adapter.tp_group.rank() == 0

    def _share(self, packed: Optional[torch.Tensor], rows: int) -> torch.Tensor:
        """The sampling rank's ``[3, rows]`` float64 (tokens, log-probs, stop flags) on all ranks:
        over TP on the last stage, then from the last stage to every stage."""
        if packed is None:
            packed = torch.empty(3, rows, dtype=torch.float64, device=self.adapter.device)
        tp, pp = self.adapter.tp_group, self.adapter.pp_group
        if tp.size() > 1 and self.adapter.is_last_stage:
            dist.broadcast(packed, dist.get_process_group_ranks(tp)[0], group=tp)
        if pp.size() > 1:
            dist.broadcast(packed, dist.get_process_group_ranks(pp)[-1], group=pp)
        return packed
