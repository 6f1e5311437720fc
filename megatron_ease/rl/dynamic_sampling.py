"""DAPO dynamic sampling (DESIGN §5): generate until B groups with mixed accuracy are collected.

Every data-parallel rank generates its own chunks in lockstep; kept groups are counted over the
DP group, so generation stops on all ranks at once. Kept groups are then moved between ranks so
each trains on exactly B / DP of them: whole groups only, surplus ranks sending to short ranks
point to point, and the global surplus beyond B is dropped (the last-generated groups of the
surplus ranks).
"""

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_ease.distributed import collective_device
from megatron_ease.rl.dapo import mixed_groups

Payload = Union[torch.Tensor, list]


class DynamicSamplingError(RuntimeError):
    """``dapo.max_gen_batches`` chunks were generated without collecting enough mixed groups:
    the policy solves all or none of the rollouts of (nearly) every prompt."""


def _cat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0, right-padding trailing dims with zeros (chunks differ in length)."""
    ndims = {t.dim() for t in tensors}
    if len(ndims) != 1:
        raise ValueError(f"cannot concatenate payload tensors of different ranks {sorted(ndims)}")
    if ndims.pop() <= 1:
        return torch.cat(list(tensors))
    max_shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = []  # F.pad order: last dim first, (left, right) each
        for d in reversed(range(1, t.dim())):
            pad += [0, max_shape[d - 1] - t.shape[d]]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)


@dataclass
class RolloutBatch:
    """Rollouts of whole prompt groups: `group_size` consecutive rollouts per prompt.

    `payload` carries anything else per rollout (token ids, masks, old log-probs, images, ...):
    tensors with a leading [n] dim or lists of length n. Tensors of different chunks may differ
    in trailing sizes; `concat` right-pads them with zeros, which the response mask hides.
    """

    group_size: int
    group_ids: torch.Tensor  # [n] int64, prompt id; constant within a group
    accuracy: torch.Tensor  # [n] verifier verdict in {0, 1}
    reward: torch.Tensor  # [n] shaped reward
    payload: dict[str, Payload] = field(default_factory=dict)

    def __post_init__(self):
        n = self.group_ids.shape[0]
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 rollouts per prompt, got {self.group_size}")
        if n % self.group_size != 0:
            raise ValueError(
                f"RolloutBatch has {n} rollouts, not whole groups of {self.group_size}"
            )
        for name, value in (("accuracy", self.accuracy), ("reward", self.reward)):
            if tuple(value.shape) != (n,):
                raise ValueError(f"RolloutBatch.{name} must be [{n}], got {tuple(value.shape)}")
        for name, value in self.payload.items():
            length = value.shape[0] if isinstance(value, torch.Tensor) else len(value)
            if length != n:
                raise ValueError(
                    f"RolloutBatch payload {name!r} has {length} entries, expected {n}"
                )
        ids = self.group_ids.view(-1, self.group_size)
        if not bool((ids == ids[:, :1]).all()):
            raise ValueError(
                "RolloutBatch groups must be consecutive: group_ids vary inside a group"
            )

    def __len__(self) -> int:
        return self.group_ids.shape[0]

    @property
    def num_groups(self) -> int:
        return len(self) // self.group_size

    def select(self, indices: Union[torch.Tensor, Sequence[int]]) -> "RolloutBatch":
        """Rollouts at `indices` (they must form whole groups)."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        rows = index.tolist()

        def take(value: Payload) -> Payload:
            if isinstance(value, torch.Tensor):
                return value[index.to(value.device)]
            return [value[i] for i in rows]

        return replace(
            self,
            group_ids=take(self.group_ids),
            accuracy=take(self.accuracy),
            reward=take(self.reward),
            payload={name: take(value) for name, value in self.payload.items()},
        )

    def select_groups(self, groups: Union[torch.Tensor, Sequence[int]]) -> "RolloutBatch":
        """Whole groups by group index, or by a bool mask [num_groups]."""
        groups = torch.as_tensor(groups).cpu()
        if groups.dtype == torch.bool:
            groups = groups.nonzero().reshape(-1)
        groups = groups.to(torch.long).reshape(-1, 1)
        rows = groups * self.group_size + torch.arange(self.group_size)  # [k, G]
        return self.select(rows.reshape(-1))

    @classmethod
    def concat(cls, batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one batch")
        first = batches[0]
        for b in batches[1:]:
            if b.group_size != first.group_size or b.payload.keys() != first.payload.keys():
                raise ValueError(
                    f"cannot concatenate RolloutBatches with group_size {b.group_size} vs "
                    f"{first.group_size} and payload keys {sorted(b.payload)} vs "
                    f"{sorted(first.payload)}"
                )

        def join(values: list) -> Payload:
            if isinstance(values[0], torch.Tensor):
                return _cat_padded(values)
            return [item for value in values for item in value]

        return cls(
            group_size=first.group_size,
            group_ids=join([b.group_ids for b in batches]),
            accuracy=join([b.accuracy for b in batches]),
            reward=join([b.reward for b in batches]),
            payload={k: join([b.payload[k] for b in batches]) for k in first.payload},
        )


@dataclass
class DynamicSamplingResult:
    batch: RolloutBatch  # this rank's num_groups / DP groups, all with mixed accuracy
    # Global counts over the DP group: gen_batches, generated_groups, kept_groups (mixed, before
    # trimming), filtered_all_correct, filtered_all_wrong, trimmed_groups, num_groups.
    stats: dict[str, int]
    # This rank's filtered all-correct groups (every rollout correct), when requested; not
    # rebalanced: consumers normalise by global counts.
    filtered_correct: Optional[RolloutBatch] = None


def _transfer_plan(counts: Sequence[int], per_rank: int) -> list[tuple[int, int, int, int]]:
    """(src, dst, first group index on src, number of groups) moving surplus to short ranks.

    Each rank keeps its first min(count, per_rank) groups; surplus ranks never receive and short
    ranks never send, so processing the plan in order with blocking send/recv cannot deadlock.
    """
    surplus = [[r, per_rank, c - per_rank] for r, c in enumerate(counts) if c > per_rank]
    plan = []
    for dst, count in enumerate(counts):
        need = per_rank - count
        while need > 0:
            src = surplus[0]  # caller guarantees sum(counts) >= per_rank * len(counts)
            moved = min(need, src[2])
            plan.append((src[0], dst, src[1], moved))
            src[1] += moved
            src[2] -= moved
            need -= moved
            if src[2] == 0:
                surplus.pop(0)
    return plan


def _rebalance(kept: RolloutBatch, per_rank: int, group) -> RolloutBatch:
    """Give every rank of `group` exactly `per_rank` of the kept groups."""
    device = collective_device(group)
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    local = torch.tensor([kept.num_groups], dtype=torch.long, device=device)
    gathered = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    counts = [int(c.item()) for c in gathered]

    parts = [kept.select_groups(torch.arange(min(kept.num_groups, per_rank)))]
    for src, dst, start, num in _transfer_plan(counts, per_rank):
        if rank == src:
            outgoing = kept.select_groups(torch.arange(start, start + num))
            dist.send_object_list([outgoing], group=group, group_dst=dst, device=device)
        elif rank == dst:
            incoming = [None]
            dist.recv_object_list(incoming, group=group, group_src=src, device=device)
            parts.append(incoming[0])
    return RolloutBatch.concat(parts)


def dynamic_sample(
    generate_chunk: Callable[[], RolloutBatch],
    num_groups: int,
    max_gen_batches: int = 0,
    group: Optional[dist.ProcessGroup] = None,
    keep_filtered_correct: bool = False,
    max_filtered_correct_groups: Optional[int] = None,
) -> DynamicSamplingResult:
    """Collect `num_groups` (B, global) groups with mixed accuracy, B / DP on each rank.

    `generate_chunk()` returns this rank's next chunk of rollout groups; it is called the same
    number of times on every rank of `group` (the DP group; None = single process). A gloo group
    (e.g. megatron's DP gloo group) keeps the payload transfer off the GPU. Raises after
    `max_gen_batches` chunks (0 = no limit) without B kept groups. `keep_filtered_correct`:
    also return this rank's all-correct groups, the first `max_filtered_correct_groups` of them
    when given (an easy data set would otherwise hand the update several times the batch).
    """
    world_size = 1 if group is None else dist.get_world_size(group)
    if num_groups < 1 or num_groups % world_size != 0:
        raise ValueError(
            f"dynamic sampling needs a positive number of groups divisible by the data-parallel "
            f"size {world_size}, got {num_groups}"
        )
    if max_gen_batches < 0:
        raise ValueError(f"dapo.max_gen_batches must be >= 0 (0 = no limit), got {max_gen_batches}")

    device = torch.device("cpu") if group is None else collective_device(group)
    # Groups generated, kept (mixed), all correct, all wrong; rollouts generated and the sums of
    # their accuracy and reward (the policy's, before filtering); summed over ranks. float64
    # holds the counts exactly.
    totals = torch.zeros(7, dtype=torch.float64, device=device)
    kept, correct = [], []
    gen_batches = 0
    while True:
        chunk = generate_chunk()
        gen_batches += 1
        mixed = mixed_groups(chunk.accuracy, chunk.group_size)  # [g]
        all_correct = ~mixed & (chunk.accuracy.view(-1, chunk.group_size)[:, 0] > 0)
        kept.append(chunk.select_groups(mixed))
        if keep_filtered_correct:
            room = None if max_filtered_correct_groups is None else \
                max(0, max_filtered_correct_groups - sum(c.num_groups for c in correct))
            correct.append(chunk.select_groups(all_correct.nonzero().flatten()[:room]))
        num_mixed, num_all_correct = int(mixed.sum()), int(all_correct.sum())
        num_all_wrong = chunk.num_groups - num_mixed - num_all_correct
        counts = torch.tensor(
            [chunk.num_groups, num_mixed, num_all_correct, num_all_wrong, len(chunk),
             float(chunk.accuracy.double().sum()), float(chunk.reward.double().sum())],
            dtype=torch.float64,
            device=device,
        )
        if group is not None:
            dist.all_reduce(counts, group=group)
        totals += counts
        generated, kept_groups, num_correct, num_wrong = (int(c) for c in totals[:4].tolist())
        if kept_groups >= num_groups:
            break
        if max_gen_batches and gen_batches >= max_gen_batches:
            raise DynamicSamplingError(
                f"dynamic sampling kept {kept_groups} of the {num_groups} groups needed after "
                f"{gen_batches} generation batches (dapo.max_gen_batches={max_gen_batches}): "
                f"{generated} groups generated, {num_correct} all correct, {num_wrong} all wrong. "
                "Raise dapo.max_gen_batches (0 = no limit) or use prompts of a difficulty the "
                "policy sometimes solves."
            )

    kept_batch = RolloutBatch.concat(kept)
    per_rank = num_groups // world_size
    if group is None:
        batch = kept_batch.select_groups(torch.arange(per_rank))
    else:
        batch = _rebalance(kept_batch, per_rank, group)
    stats = {
        "gen_batches": gen_batches,
        "generated_groups": generated,
        "kept_groups": kept_groups,
        "filtered_all_correct": num_correct,
        "filtered_all_wrong": num_wrong,
        "trimmed_groups": kept_groups - num_groups,
        "num_groups": num_groups,
        # Over every rollout generated this step, filtered ones included: the policy's own
        # accuracy (the kept mixed groups' lies in [1/G, 1 - 1/G] by construction).
        "generated_accuracy": float(totals[5] / totals[4].clamp(min=1)),
        "generated_reward": float(totals[6] / totals[4].clamp(min=1)),
    }
    filtered_correct = RolloutBatch.concat(correct) if keep_filtered_correct else None
    return DynamicSamplingResult(batch=batch, stats=stats, filtered_correct=filtered_correct)
