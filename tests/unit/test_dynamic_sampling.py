"""DAPO dynamic sampling: filtering, trimming, limits, stats, and DP rebalancing over gloo."""

import itertools
import random

import pytest
import torch

from megatron_ease.rl.dynamic_sampling import (
    RolloutBatch,
    _transfer_plan,
    dynamic_sample,
)

G = 3
# Accuracy patterns of one group: mixed, all correct, all wrong.
PATTERNS = {"M": [1.0, 0.0, 1.0], "C": [1.0, 1.0, 1.0], "W": [0.0, 0.0, 0.0]}


def make_chunk(kinds: str, first_id: int, response_length: int = 4) -> RolloutBatch:
    """Groups of the given kinds; every payload entry encodes its rollout's group id."""
    ids = torch.arange(first_id, first_id + len(kinds)).repeat_interleave(G)
    accuracy = torch.tensor([a for kind in kinds for a in PATTERNS[kind]])
    return RolloutBatch(
        group_size=G,
        group_ids=ids,
        accuracy=accuracy,
        reward=accuracy * 2 - 1,
        payload={
            "tokens": ids.unsqueeze(1).repeat(1, response_length) + 1,  # [n, T], never 0
            "response_mask": torch.ones(len(ids), response_length, dtype=torch.bool),
            "text": [f"group {i}" for i in ids.tolist()],
        },
    )


class ScriptedGenerator:
    """generate_chunk() over a script of group kinds; group ids keep counting across chunks."""

    def __init__(self, script, id_offset=0):
        self.script = iter(script)
        self.next_id = id_offset
        self.calls = 0

    def __call__(self) -> RolloutBatch:
        kinds, response_length = next(self.script)
        chunk = make_chunk(kinds, self.next_id, response_length)
        self.next_id += len(kinds)
        self.calls += 1
        return chunk


def group_ids_of(batch: RolloutBatch) -> list[int]:
    return batch.group_ids.view(-1, G)[:, 0].tolist()


def assert_payload_consistent(batch: RolloutBatch):
    tokens = batch.payload["tokens"]
    for row, group_id in enumerate(batch.group_ids.tolist()):
        real = tokens[row][tokens[row] != 0]  # zeros are right-padding from concat
        assert real.numel() > 0 and torch.all(real == group_id + 1)
        assert torch.equal(batch.payload["response_mask"][row], tokens[row] != 0)
        assert batch.payload["text"][row] == f"group {group_id}"


# --- single process ---------------------------------------------------------------------------


def test_keeps_only_mixed_groups_until_enough_are_collected():
    gen = ScriptedGenerator([("MCW", 4), ("MM", 6), ("MMMM", 5)])
    result = dynamic_sample(gen, num_groups=3)
    assert gen.calls == 2
    assert group_ids_of(result.batch) == [0, 3, 4]
    accuracy = result.batch.accuracy.view(-1, G)
    assert torch.all(accuracy.amax(1) != accuracy.amin(1))
    assert result.stats == {
        "gen_batches": 2,
        "generated_groups": 5,
        "kept_groups": 3,
        "filtered_all_correct": 1,
        "filtered_all_wrong": 1,
        "trimmed_groups": 0,
        "num_groups": 3,
        # All 15 rollouts generated, the filtered groups' too: 9 correct (M C W M M).
        "generated_accuracy": pytest.approx(9 / 15),
        "generated_reward": pytest.approx((9 - 6) / 15),
    }
    # Chunks of different response lengths are right-padded to the longest one.
    assert result.batch.payload["tokens"].shape == (9, 6)
    assert_payload_consistent(result.batch)


def test_trims_to_the_requested_number_of_groups():
    result = dynamic_sample(ScriptedGenerator([("MWMMM", 4)]), num_groups=3)
    assert group_ids_of(result.batch) == [0, 2, 3]
    assert result.stats["kept_groups"] == 4 and result.stats["trimmed_groups"] == 1
    assert len(result.batch) == 3 * G
    assert_payload_consistent(result.batch)


def test_stops_with_a_clear_error_after_max_gen_batches():
    gen = ScriptedGenerator(itertools.repeat(("CWM", 4)))
    with pytest.raises(RuntimeError) as info:
        dynamic_sample(gen, num_groups=8, max_gen_batches=3)
    assert gen.calls == 3
    message = str(info.value)
    for part in ("dapo.max_gen_batches=3", "kept 3 of the 8 groups", "after 3 generation batches",
                 "9 groups generated", "3 all correct", "3 all wrong"):
        assert part in message


def test_zero_max_gen_batches_means_no_limit():
    gen = ScriptedGenerator(itertools.chain([("CW", 4)] * 60, [("MM", 4)]))
    result = dynamic_sample(gen, num_groups=2, max_gen_batches=0)
    assert result.stats["gen_batches"] == 61 and gen.calls == 61
    assert result.stats["filtered_all_correct"] == 60 and result.stats["filtered_all_wrong"] == 60
    assert group_ids_of(result.batch) == [120, 121]


def test_filtered_all_correct_groups_can_be_returned():
    gen = ScriptedGenerator([("CMW", 4), ("WCCM", 5)])
    result = dynamic_sample(gen, num_groups=2, keep_filtered_correct=True)
    assert group_ids_of(result.filtered_correct) == [0, 4, 5]
    assert torch.all(result.filtered_correct.accuracy == 1)
    assert_payload_consistent(result.filtered_correct)
    assert dynamic_sample(ScriptedGenerator([("CM", 4)]), 1).filtered_correct is None


def test_filtered_all_correct_groups_are_capped_at_the_first_ones():
    """An easy data set: many all-correct groups before enough mixed ones; the update gets at
    most ``max_filtered_correct_groups`` of them as EASE-only rows, the first generated."""
    script = [("CCM", 4), ("CCC", 4), ("CMC", 5)]
    capped = dynamic_sample(ScriptedGenerator(script), num_groups=2, keep_filtered_correct=True,
                            max_filtered_correct_groups=3)
    assert group_ids_of(capped.filtered_correct) == [0, 1, 3]
    assert capped.stats["filtered_all_correct"] == 7  # counted all the same
    assert_payload_consistent(capped.filtered_correct)
    none = dynamic_sample(ScriptedGenerator(script), num_groups=2, keep_filtered_correct=True,
                          max_filtered_correct_groups=0)
    assert len(none.filtered_correct) == 0
    uncapped = dynamic_sample(ScriptedGenerator(script), num_groups=2, keep_filtered_correct=True)
    assert group_ids_of(uncapped.filtered_correct) == [0, 1, 3, 4, 5, 6, 8]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive number of groups"):
        dynamic_sample(ScriptedGenerator([("M", 4)]), num_groups=0)
    with pytest.raises(ValueError, match="dapo.max_gen_batches must be >= 0"):
        dynamic_sample(ScriptedGenerator([("M", 4)]), num_groups=1, max_gen_batches=-1)


# --- RolloutBatch -----------------------------------------------------------------------------


def test_rollout_batch_select_and_concat_keep_groups_and_payload_together():
    batch = RolloutBatch.concat([make_chunk("MCW", 0, 2), make_chunk("WM", 3, 5)])
    assert batch.num_groups == 5 and batch.payload["tokens"].shape == (15, 5)
    picked = batch.select_groups(torch.tensor([False, True, False, True, True]))
    assert group_ids_of(picked) == [1, 3, 4]
    assert_payload_consistent(picked)
    assert group_ids_of(batch.select_groups([4, 0])) == [4, 0]
    empty = batch.select_groups(torch.zeros(5, dtype=torch.bool))
    assert len(empty) == 0 and empty.payload["text"] == [] and empty.payload["tokens"].shape[1] == 5


def test_rollout_batch_validates_its_structure():
    chunk = make_chunk("MM", 0)
    with pytest.raises(ValueError, match="group_ids vary inside a group"):
        RolloutBatch(G, torch.arange(6), chunk.accuracy, chunk.reward)
    with pytest.raises(ValueError, match="not whole groups"):
        chunk.select(torch.arange(4))
    with pytest.raises(ValueError, match="payload 'text' has 5 entries"):
        RolloutBatch(G, chunk.group_ids, chunk.accuracy, chunk.reward, {"text": ["x"] * 5})
    with pytest.raises(ValueError, match="accuracy must be"):
        RolloutBatch(G, chunk.group_ids, chunk.accuracy[:3], chunk.reward)
    with pytest.raises(ValueError, match="cannot concatenate"):
        RolloutBatch.concat([chunk, RolloutBatch(G, chunk.group_ids, chunk.accuracy, chunk.reward)])


@pytest.mark.parametrize("seed", range(20))
def test_transfer_plan_gives_every_rank_its_share_without_duplicates(seed):
    rng = random.Random(seed)
    world_size = rng.randint(1, 6)
    per_rank = rng.randint(1, 4)
    counts = [rng.randint(0, 3 * per_rank) for _ in range(world_size)]
    counts[rng.randrange(world_size)] += per_rank * world_size  # enough in total
    plan = _transfer_plan(counts, per_rank)
    received = [min(c, per_rank) for c in counts]
    sent = {r: set() for r in range(world_size)}
    for src, dst, start, num in plan:
        assert counts[src] > per_rank and counts[dst] < per_rank  # senders never receive
        assert start >= per_rank and start + num <= counts[src]  # never a group src keeps
        assert sent[src].isdisjoint(range(start, start + num))
        sent[src].update(range(start, start + num))
        received[dst] += num
    assert received == [per_rank] * world_size


# --- data parallel (2 gloo ranks) -------------------------------------------------------------


def _dp_worker(scripts, num_groups, max_gen_batches):
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    rank = torch.distributed.get_rank(group)
    gen = ScriptedGenerator(scripts[rank], id_offset=1000 * rank)
    try:
        result = dynamic_sample(gen, num_groups, max_gen_batches, group=group)
    except RuntimeError as error:
        return {"error": str(error), "calls": gen.calls}
    assert_payload_consistent(result.batch)
    return {
        "ids": group_ids_of(result.batch),
        "stats": result.stats,
        "calls": gen.calls,
        "accuracy": result.batch.accuracy,
        "tokens_shape": tuple(result.batch.payload["tokens"].shape),
    }


def test_dp_counts_globally_and_rebalances_whole_groups_across_ranks():
    from tests.harness import run_distributed

    scripts = [
        [("MMM", 3), ("MMM", 3), ("MMM", 3)],  # rank 0: plenty
        [("CW", 5), ("CM", 6), ("MM", 6)],  # rank 1: short
    ]
    rank0, rank1 = run_distributed(_dp_worker, scripts, 4, 0, world_size=2, timeout_s=120)
    # Global count: 3 kept after chunk 1 (< 4), 7 after chunk 2 on both ranks -> stop.
    assert rank0["calls"] == rank1["calls"] == 2
    assert rank0["stats"] == rank1["stats"] == {
        "gen_batches": 2,
        "generated_groups": 10,
        "kept_groups": 7,
        "filtered_all_correct": 2,
        "filtered_all_wrong": 1,
        "trimmed_groups": 3,
        "num_groups": 4,
        # Both ranks' 30 rollouts: 12 correct on rank 0 (MMM MMM), 8 on rank 1 (CW CM).
        "generated_accuracy": pytest.approx(20 / 30),
        "generated_reward": pytest.approx((20 - 10) / 30),
    }
    # Rank 0 keeps its first two groups and sends its third to rank 1, which had one.
    assert rank0["ids"] == [0, 1]
    assert rank1["ids"] == [1003, 2]
    for out in (rank0, rank1):
        accuracy = out["accuracy"].view(-1, G)
        assert torch.all(accuracy.amax(1) != accuracy.amin(1))
    assert rank1["tokens_shape"] == (2 * G, 6)  # rank 0's shorter rows padded on arrival


def test_dp_max_gen_batches_error_is_raised_on_every_rank():
    from tests.harness import run_distributed

    scripts = [[("MC", 4)] * 5, [("CW", 4)] * 5]
    outs = run_distributed(_dp_worker, scripts, 4, 2, world_size=2, timeout_s=120)
    for out in outs:
        assert out["calls"] == 2
        assert "kept 2 of the 4 groups" in out["error"]
        assert "dapo.max_gen_batches=2" in out["error"]


def test_dp_rank_that_keeps_no_mixed_group_receives_its_whole_share():
    """A rank whose chunks hold no mixed group at all (its kept batch is empty, its payload
    widths its own) trains on B / DP groups sent whole by the other rank; the counts are
    global."""
    from tests.harness import run_distributed

    scripts = [[("MMMM", 3)], [("CW", 5)]]
    rank0, rank1 = run_distributed(_dp_worker, scripts, 4, 1, world_size=2, timeout_s=120)
    assert rank0["calls"] == rank1["calls"] == 1
    assert rank0["stats"] == rank1["stats"]
    assert rank0["stats"]["kept_groups"] == 4 and rank0["stats"]["trimmed_groups"] == 0
    assert rank0["stats"]["filtered_all_correct"] == rank0["stats"]["filtered_all_wrong"] == 1
    assert rank0["ids"] == [0, 1] and rank1["ids"] == [2, 3]
    assert rank1["tokens_shape"] == (2 * G, 5)  # its empty chunk's width: rank 0's rows padded
