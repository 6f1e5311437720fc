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

Under pipeline parallelism a batch of two or more prompts is decoded as a wavefront
(``_PipelinedDecode``): one prompt group per stage, each with its own KV cache, the stages
running different groups at the same time instead of each step of the whole batch going through
the stages one after the other (``pipelined=False``). The rollouts are the same.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_ease.rl.inference_adapters import (
    CacheState,
    RolloutModelAdapter,
    rollout_adapter_for,
)
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
                    device: Optional[torch.device] = None,
                    length: Optional[int] = None) -> "PromptBatch":
        """``length``: pad to at least this many columns (default: the longest prompt's)."""
        ids = [torch.as_tensor(p.input_ids, dtype=torch.long).reshape(-1) for p in prompts]
        empty = [i for i, t in enumerate(ids) if t.numel() == 0]
        if empty:
            raise ValueError(f"prompts {empty} have no tokens")
        length = max([t.numel() for t in ids] + [length or 0])
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
        pipelined: under pipeline parallelism, decode the batch's prompts in one group per stage
            with the stages working on different groups at once (``_PipelinedDecode``); False
            runs every step of the whole batch through the stages one after the other.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int,
                 detokenize: Optional[Callable[[list[int]], str]] = None,
                 max_rollouts_per_batch: Optional[int] = None,
                 adapter: Optional[RolloutModelAdapter] = None, pipelined: bool = True):
        self.adapter = adapter or rollout_adapter_for(model)
        self.pad_token_id = pad_token_id
        self.detokenize = detokenize
        self.max_rollouts_per_batch = max_rollouts_per_batch
        self.pipelined = pipelined

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
        samples ignored. A step costs one host synchronisation (how many rows are done).

        Until rows leave, the table is indexed with ``_ALL_ROWS`` (views and strided copies
        instead of gathers and scatters by an index tensor), and a step whose batch has no
        finished rollout (known from the previous step's synchronisation) skips masking them:
        about a third of the table's work per step, which on a small model is a sizeable part of
        the step."""
        if self.pipelined and self.adapter.pp_group.size() > 1 and len(prompts) > 1:
            return _PipelinedDecode(self, prompts, first_prompt, params, matcher).run()
        batch = PromptBatch.left_padded(prompts, self.pad_token_id, self.adapter.device)
        table = _RolloutTable(self, len(prompts), first_prompt, params, matcher)
        in_batch = table.all_rows()  # rollouts in the decode batch, in row order
        rows: _Rows = _ALL_ROWS  # in_batch as the table's index
        all_active = True  # no rollout of the batch has finished
        try:
            logits = self.adapter.prefill(batch, params.n, params.max_new_tokens)
            for step in range(params.max_new_tokens):
                packed = self._share(table.sample(logits, rows, step, all_active),
                                     len(in_batch))
                done = table.record(rows, step, packed, all_active)
                ended, keep = table.next_batch(done, step)
                if ended:
                    break
                # The drop leaves only unfinished rollouts; else none finished if none is done.
                all_active = keep is not None or table.num_done == 0
                if keep is not None:
                    self.adapter.select_rows(keep)
                    in_batch = rows = in_batch[keep]
                logits = self.adapter.decode(table.tokens[rows, step])
        finally:
            self.adapter.release()
        return table.output()

    # -- who samples, and sharing what was sampled ------------------------------------------------

    @property
    def _is_sampling_rank(self) -> bool:
        return self.adapter.is_last_stage and self.adapter.tp_group.rank() == 0

    def _share(self, packed: Optional[torch.Tensor], rows: int) -> torch.Tensor:
        """The sampling rank's ``[3, rows]`` float64 (tokens, log-probs, stop flags) on all ranks:
        over TP on the last stage, then from the last stage to every stage."""
        packed = self._share_tp(packed, rows)
        pp = self.adapter.pp_group
        if pp.size() > 1:
            dist.broadcast(packed, dist.get_process_group_ranks(pp)[-1], group=pp)
        return packed

    def _share_tp(self, packed: Optional[torch.Tensor], rows: int) -> torch.Tensor:
        """On the last stage: the sampling rank's ``packed`` on every TP rank. Elsewhere: an
        empty ``[3, rows]`` buffer to receive it in."""
        if packed is None:
            packed = torch.empty(3, rows, dtype=torch.float64, device=self.adapter.device)
        tp = self.adapter.tp_group
        if tp.size() > 1 and self.adapter.is_last_stage:
            dist.broadcast(packed, dist.get_process_group_ranks(tp)[0], group=tp)
        return packed


# The table's rows of a decode batch: an index tensor, or every row in order (a basic index).
_Rows = Union[torch.Tensor, slice]
_ALL_ROWS = slice(None)


class _RolloutTable:
    """One batch's rollouts as they are generated, the same on every rank: tokens, log-probs,
    lengths and finished flags; and the sampling of a step on the sampling rank.

    ``in_batch`` (rows of a decode batch): an index tensor, or ``_ALL_ROWS``. ``all_active``:
    the caller knows that none of them has finished (so none needs padding)."""

    def __init__(self, engine: MegatronRolloutEngine, num_prompts: int, first_prompt: int,
                 params: SamplingParams, matcher: Optional[StopStringMatcher]):
        device = engine.adapter.device
        self.params, self.matcher, self.first_prompt = params, matcher, first_prompt
        self.pad_token_id = engine.pad_token_id
        self.num_prompts, self.rows = num_prompts, num_prompts * params.n
        shape = (self.rows, params.max_new_tokens)
        self.tokens = torch.full(shape, self.pad_token_id, dtype=torch.long, device=device)
        self.log_probs = torch.zeros(shape, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(self.rows, dtype=torch.long, device=device)
        self.finished = torch.zeros(self.rows, dtype=torch.bool, device=device)
        self.stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        self.suppressed = torch.tensor(params.suppress_token_ids, dtype=torch.long, device=device)
        self.generator = torch.Generator(device=device) if engine._is_sampling_rank else None
        self.num_done = 0  # done rollouts of the batch of the last ``next_batch``

    def all_rows(self) -> torch.Tensor:
        return torch.arange(self.rows, device=self.lengths.device)

    def sample(self, logits: Optional[torch.Tensor], in_batch: _Rows, step: int,
               all_active: bool = False) -> Optional[torch.Tensor]:
        """Token ``step`` of rollouts ``in_batch`` from their ``logits``: ``[3, len(in_batch)]``
        float64 (tokens, log-probs, stop flags) on the sampling rank, None elsewhere. Finished
        rollouts get padding."""
        if self.generator is None:
            return None
        self.generator.manual_seed(_step_seed(self.params.seed, self.first_prompt, step))
        token, log_prob = sample_next_tokens(
            logits, self.params, self.generator,
            rows=None if in_batch is _ALL_ROWS else in_batch,  # all rows: the same draws
            num_rows=self.rows, suppressed=self.suppressed)
        if all_active:
            stop = torch.isin(token, self.stop_ids)
        else:
            active = ~self.finished[in_batch]
            token = torch.where(active, token, self.pad_token_id)
            log_prob = torch.where(active, log_prob, 0.0)
            stop = active & torch.isin(token, self.stop_ids)
        if self.matcher is not None:
            self.tokens[in_batch, step] = token
            unstopped = ~stop if all_active else active & ~stop
            stop |= self.matcher(self.tokens[in_batch], self.lengths[in_batch] + 1, unstopped)
        return torch.stack([token.double(), log_prob.double(), stop.double()])

    def record(self, in_batch: _Rows, step: int, packed: torch.Tensor,
               all_active: bool = False) -> torch.Tensor:
        """Write ``sample``'s ``packed`` (as shared to this rank) for step ``step``; returns which
        of ``in_batch`` are done (finished before or now), ``[len(in_batch)]`` bool."""
        self.tokens[in_batch, step] = packed[0].long()
        self.log_probs[in_batch, step] = packed[1].float()
        if all_active:
            self.lengths[in_batch] += 1
            done = packed[2].bool()
        else:
            active = ~self.finished[in_batch]
            self.lengths[in_batch] += active.long()
            done = ~active | packed[2].bool()
        self.finished[in_batch] = done
        return done

    def next_batch(self, done: torch.Tensor,
                   step: int) -> tuple[bool, Optional[torch.Tensor]]:
        """After ``record`` of a decode batch's step: ``(ended, keep)``. Ended when every rollout
        of the batch is done or ``step`` was the last; else ``keep`` are the positions in the
        batch of its unfinished rollouts once the finished make up
        ``_DROP_FINISHED_FRACTION`` of it (they then leave the KV cache), None to keep all. A
        host synchronisation (how many are done, kept in ``num_done``)."""
        num_done = self.num_done = int(done.sum())
        if num_done == len(done) or step == self.params.max_new_tokens - 1:
            return True, None
        if num_done >= _DROP_FINISHED_FRACTION * len(done):
            return False, (~done).nonzero()[:, 0]
        return False, None

    def output(self) -> RolloutOutput:
        width = max(1, int(self.lengths.max()))
        return RolloutOutput(
            tokens=self.tokens[:, :width].contiguous(),
            log_probs=self.log_probs[:, :width].contiguous(),
            lengths=self.lengths, finished=self.finished,
            prompt_index=torch.arange(self.num_prompts, device=self.lengths.device
                                      ).repeat_interleave(self.params.n))


@dataclass
class _Group:
    """Prompts ``[first, end)`` of a batch and their rollouts in the pipelined decode."""

    first: int
    end: int
    in_batch: torch.Tensor  # the group's rollouts still in its decode batch (rows of the table)
    state: Optional[CacheState] = None  # its KV cache etc. on this stage (None: not yet / freed)
    recorded: int = -1  # the last step whose samples are in the table
    open: bool = True  # more steps to run


class _PipelinedDecode:
    """A batch's rollouts under pipeline parallelism with every stage busy.

    Decoding the whole batch step by step sends each step through the stages one after the
    other: with ``S`` stages each idles ``(S - 1) / S`` of the time. Here the batch's prompts are
    split into ``S`` groups (contiguous, sizes within one prompt of each other, each with its own
    KV cache) and run as a wavefront: at tick ``t`` stage ``s`` runs step ``k`` of group ``g``
    with ``t = k·S + g + s`` (step 0 is the group's prefill, step ``k`` feeds token ``k - 1``).
    The last stage samples the group's tokens right after its forward and sends them to every
    other stage at the next tick, when stage 0 starts the group's next step. Each tick every rank
    makes one ``batch_isend_irecv`` of all its sends and receives (activations of the previous
    tick to the next stage, the previous tick's samples from the last stage), so the stages agree
    on every message without a collective over the pipeline, as megatron-core's 1F1B schedule
    does.

    Every rank knows when a group's step runs from the samples it has received, so all agree on
    which messages a tick carries. A rollout's tokens are those of the sequential decode: the
    same draws (``_step_seed`` per step and batch, a row's own uniform) from the same logits up to
    the float noise of a smaller matmul; groups drop their finished rollouts on their own
    (``_DROP_FINISHED_FRACTION`` of the group). The KV caches together hold what the batch's
    cache held.
    """

    def __init__(self, engine: MegatronRolloutEngine, prompts: Sequence[Prompt],
                 first_prompt: int, params: SamplingParams,
                 matcher: Optional[StopStringMatcher]):
        self.engine, self.adapter, self.params, self.prompts = engine, engine.adapter, params, prompts
        # Every group is left-padded to the batch's longest prompt: the sequential decode's
        # layout (rope positions by cache index, as the module doc of inference_adapters says).
        self.width = max(len(torch.as_tensor(p.input_ids).reshape(-1)) for p in prompts)
        self.table = _RolloutTable(engine, len(prompts), first_prompt, params, matcher)
        pp = self.adapter.pp_group
        self.num_stages, self.stage = pp.size(), pp.rank()
        self.ranks = dist.get_process_group_ranks(pp)
        self.is_last = self.stage == self.num_stages - 1
        count = min(self.num_stages, len(prompts))
        bounds = [len(prompts) * i // count for i in range(count + 1)]
        n, device = params.n, self.adapter.device
        self.groups = [_Group(first, end, torch.arange(first * n, end * n, device=device))
                       for first, end in zip(bounds[:-1], bounds[1:])]
        self._send: Optional[torch.Tensor] = None  # this stage's output of the previous tick
        self._sent_by_last: Optional[torch.Tensor] = None  # the last stage's previous samples

    def run(self) -> RolloutOutput:
        try:
            tick = 0
            while True:
                inputs, received = self._exchange(tick)
                if not any(group.open for group in self.groups):
                    break
                self._work(tick, inputs, received)
                tick += 1
        finally:
            self.groups = []
            self.adapter.release()
        return self.table.output()

    # -- the schedule ----------------------------------------------------------------------------

    def _item(self, stage: int, tick: int) -> Optional[tuple[int, int]]:
        """``(group, step)`` that ``stage`` runs at ``tick``, None when it idles. Asked before the
        group's samples of step - 1 are recorded only by stage 0, which records them first."""
        if tick < stage:
            return None
        step, g = divmod(tick - stage, self.num_stages)
        if g >= len(self.groups):
            return None
        group = self.groups[g]
        if step == 0 or (group.open and group.recorded == step - 1):
            return g, step
        return None

    def _inputs(self, g: int, step: int) -> dict:
        """Model inputs of group ``g``'s step (its cache becomes the adapter's current one)."""
        group = self.groups[g]
        if step == 0:
            batch = PromptBatch.left_padded(self.prompts[group.first:group.end],
                                            self.engine.pad_token_id, self.adapter.device,
                                            length=self.width)
            return self.adapter.prefill_inputs(batch, self.params.n, self.params.max_new_tokens)
        self.adapter.load_state(group.state)
        return self.adapter.decode_inputs(self.table.tokens[group.in_batch, step - 1])

    def _exchange(self, tick: int) -> tuple[Optional[dict], Optional[torch.Tensor]]:
        """This tick's messages, then the samples they carried recorded. Returns the inputs of
        this stage's item and its received activations (stages after the first)."""
        ops, inputs, received, samples = [], None, None, None
        pp = self.adapter.pp_group  # global ranks on the pipeline's group, as megatron-core's 1F1B
        item = self._item(self.stage, tick) if self.stage > 0 else None
        if item is not None:
            inputs = self._inputs(*item)
            self.groups[item[0]].state = self.adapter.state()
            received = self.adapter.recv_buffer_for(inputs)
            ops.append(dist.P2POp(dist.irecv, received, self.ranks[self.stage - 1], pp))
        if self._send is not None:
            ops.append(dist.P2POp(dist.isend, self._send, self.ranks[self.stage + 1], pp))
        if self._sent_by_last is not None:
            samples = self._sent_by_last
            ops.extend(dist.P2POp(dist.isend, samples, rank, pp) for rank in self.ranks[:-1])
        # The last stage's item of the previous tick: its samples reach every stage now.
        sampled = self._item(self.num_stages - 1, tick - 1)
        if sampled is not None and not self.is_last:
            rows = len(self.groups[sampled[0]].in_batch)
            samples = torch.empty(3, rows, dtype=torch.float64, device=self.adapter.device)
            ops.append(dist.P2POp(dist.irecv, samples, self.ranks[-1], pp))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
            if self.adapter.device.type == "cuda":
                torch.cuda.synchronize()  # as megatron-core after batch_isend_irecv
        self._send = self._sent_by_last = None
        if sampled is not None:
            self._record(*sampled, samples)
        return inputs, received

    def _record(self, g: int, step: int, samples: torch.Tensor) -> None:
        """Group ``g``'s samples of ``step`` into the table; the group ends, or drops its
        finished rollouts from its cache, as the sequential decode does."""
        group = self.groups[g]
        ended, keep = self.table.next_batch(self.table.record(group.in_batch, step, samples),
                                            step)
        group.recorded = step
        if ended:
            group.open, group.state = False, None  # frees its cache
        elif keep is not None:
            self.adapter.load_state(group.state)
            self.adapter.select_rows(keep)
            group.state = self.adapter.state()
            group.in_batch = group.in_batch[keep]

    def _work(self, tick: int, inputs: Optional[dict], received: Optional[torch.Tensor]) -> None:
        """This stage's item of ``tick``: its forward, then the samples (last stage) or the
        activations to send at the next tick."""
        item = self._item(self.stage, tick)
        if item is None:
            return
        g, step = item
        group = self.groups[g]
        if inputs is None:  # stage 0
            inputs = self._inputs(g, step)
        else:
            self.adapter.load_state(group.state)
        output = self.adapter.stage_forward(inputs, received)
        logits = output if self.is_last else None
        if step == 0:
            logits = self.adapter.prefill_logits(logits)
        elif logits is not None:
            logits = logits[:, -1]
        group.state = self.adapter.state()
        if not self.is_last:
            self._send = output
            return
        samples = self.table.sample(logits, group.in_batch, step)
        self._sent_by_last = self.engine._share_tp(samples, len(group.in_batch))
