"""Deterministic, resumable reader of evidence shards.

Why not a streaming webdataset pipeline with a shuffle buffer: resuming one exactly needs the
buffer's contents and every worker's tar position, and a DP split by shard needs as many shards
as ranks × workers. Instead (as Megatron-Energon does) the tar headers are indexed once, which
is cheap (a seek per member, no data read), and the sample order is a pure function:

    rank stream position k  ->  epoch e = k // L, slot j = k % L
                            ->  sample order_e[j · R + rank]       (order_e: seeded permutation)

with R data-parallel ranks and L = N // R samples per rank and epoch (the N mod R left over
differ every epoch when shuffling, so nothing is dropped for good; an in-order pass with
even ranks never reads them). DataLoader worker u of W takes positions
k ≡ u (mod W) and fills batches with the valid samples among them; the DataLoader hands out
batches round-robin over workers. So the loader state is just "which positions have been
delivered", kept in the main process from what each delivered batch reports, never from what
workers have prefetched. Resuming with the same W continues bit-for-bit; with another W it
continues with every sample exactly once, in a different interleaving.
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_ease.data.collate import collate_evidence_batch
from megatron_ease.data.image import normalise_patches
from megatron_ease.data.processing import ProcessedSample, SampleProcessor
from megatron_ease.data.schema import SampleError, decode_sample, split_member_name
from megatron_ease.training.preemption import ignore_preemption_signals

logger = logging.getLogger(__name__)

_OPEN_SHARDS_PER_WORKER = 16


def expand_shards(spec: Union[str, Sequence[str]]) -> list[str]:
    """Shard paths from globs and webdataset brace ranges (``d/shard-{000000..000009}.tar``).

    Sorted and de-duplicated, so every rank derives the same order from the same spec.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths = set()
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
            matches = glob.glob(expanded) if glob.has_magic(expanded) else [expanded]
            if not matches or not all(os.path.isfile(m) for m in matches):
                raise FileNotFoundError(f"no shard file matches {expanded!r} (from {pattern!r})")
            paths.update(matches)
    if not paths:
        raise FileNotFoundError(f"no shards in {spec!r}")
    # One file under two names (``d/a.tar`` and ``./d/a.tar`` or an absolute path, a symlink)
    # is one shard: indexed twice, every sample in it would be read twice per epoch.
    by_file: dict[str, str] = {}
    for path in sorted(paths):
        real = os.path.realpath(path)
        if real in by_file:
            logger.warning("shard %s is %s again (same file): read once", path, by_file[real])
            continue
        by_file[real] = path
    return sorted(by_file.values())


@dataclass(frozen=True)
class IndexEntry:
    shard: int  # index into ShardIndex.shards
    key: str
    members: tuple[tuple[str, int, int], ...]  # (extension, data offset, size) in tar order


@dataclass(frozen=True)
class ShardIndex:
    shards: tuple[str, ...]
    entries: tuple[IndexEntry, ...]
    errors: tuple[str, ...]  # shards that could not be indexed to their end, with the reason


def build_shard_index(shards: Sequence[str]) -> ShardIndex:
    """Group tar members by key (consecutive members, as webdataset does) for random access.

    A truncated or corrupt tar keeps the samples before the damage; its last, possibly
    incomplete sample is dropped and the shard is reported in ``errors``. So is a tar with data
    after its end-of-archive marker (a zeroed block inside it, or tars concatenated), whose
    samples after the marker cannot be found.
    """
    entries, errors = [], []
    for shard_id, path in enumerate(shards):
        groups: list[tuple[str, list[tuple[str, int, int]]]] = []
        size = os.path.getsize(path)
        broken_key = None  # the key of a member cut off by the end of the file
        try:
            with open(path, "rb") as f:
                compression = _compression(f.read(10))
            if compression:
                # tarfile reads its first block as a "truncated header", which says damage.
                raise tarfile.ReadError(
                    f"the shard is {compression}-compressed: this reader seeks to samples in an "
                    f"uncompressed tar (decompress it, or write shards with build_shards.py)")
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = split_member_name(info.name)
                    if key is None or os.path.basename(key).startswith("__"):
                        continue  # webdataset metadata (__index__ etc.) or not a sample member
                    if info.offset_data + info.size > size:
                        broken_key = key
                        raise tarfile.ReadError(f"member {info.name} extends past the end of the file")
                    if not groups or groups[-1][0] != key:
                        groups.append((key, []))
                    groups[-1][1].append((ext, info.offset_data, info.size))
                _check_archive_end(tar.fileobj, tar.offset)
        except (tarfile.TarError, OSError) as e:
            # The last sample may have lost members to the damage -- unless the member cut off
            # opened a new sample, which leaves the one before complete.
            if broken_key is None or (groups and groups[-1][0] == broken_key):
                groups = groups[:-1]
            errors.append(f"{path}: {type(e).__name__}: {e} (after {len(groups)} samples)")
        entries.extend(IndexEntry(shard_id, key, tuple(members)) for key, members in groups)
    return ShardIndex(tuple(shards), tuple(entries), tuple(errors))


_COMPRESSION_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


def _compression(head: bytes) -> Optional[str]:
    """The compression whose magic number ``head`` (a file's first 10 bytes) starts with, if
    any. A tar's first bytes are a member name, which never starts with these non-text bytes;
    bzip2's "BZh" could start one, so its block magic is matched too."""
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return "bzip2"
    return next((name for magic, name in _COMPRESSION_MAGIC if head.startswith(magic)), None)


def _check_archive_end(f, end: int) -> None:
    """Raise unless the tar iteration stopped at a real end of the archive.

    tarfile ends its iteration silently at the first zero block, an invalid header or a header
    cut by the end of the file, and reads a file cut at a member boundary as complete. So the
    block at ``end`` must be the end-of-archive zero block, and everything after it zeros too
    (the padding up to the record size, normally under 10 KiB): data there means a zeroed block
    inside the shard (crash damage, a sparse hole) or tars concatenated (``cat a.tar b.tar``),
    and without this check every sample after it would vanish without being counted.
    """
    f.seek(end)
    block = f.read(512)
    if len(block) < 512:
        raise tarfile.ReadError("no end-of-archive marker: the file was cut short")
    if block != bytes(512):
        raise tarfile.ReadError(f"invalid tar header at byte {end}: the file is corrupt")
    position = end + 512
    while True:  # reads only what follows the marker, and stops at its first non-zero byte
        chunk = f.read(1 << 20)
        if not chunk:
            return
        rest = chunk.lstrip(b"\0")
        if rest:
            raise tarfile.ReadError(
                f"data at byte {position + len(chunk) - len(rest)} after the end-of-archive marker "
                f"at byte {end} (a zeroed block inside the shard, or tar files concatenated): "
                "the rest of the shard is unreadable")
        position += len(chunk)


@dataclass(frozen=True)
class StreamStart:
    """Where a rank's stream starts: every position < base and every one in skip was delivered."""

    base: int = 0
    skip: frozenset = frozenset()
    first_worker: int = 0  # logical worker whose batch comes first (round-robin continuity)
    num_workers: Optional[int] = None  # W the start was saved with; another W resets first_worker


class EvidenceShardDataset(IterableDataset):
    """Batches of processed samples for one data-parallel rank (use via EvidenceDataLoader).

    num_epochs=None streams forever (training); a finite count with even_ranks=False and
    shuffle=False gives each rank a disjoint part of one in-order pass (evaluation, inspection).
    even_ranks=True gives every rank L = N // R samples per epoch, so ranks step in lockstep.
    """

    def __init__(
        self,
        shards: Union[str, Sequence[str]],
        processor: SampleProcessor,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: Optional[int] = None,
        even_ranks: bool = True,
        drop_last: bool = False,
        strict: bool = False,
        padding_side: str = "right",
        max_samples: Optional[int] = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if shuffle and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            # numpy's generator refused it only at the first batch, inside a loader worker.
            raise ValueError(f"seed (data.shuffle_seed) must be a non-negative integer, got {seed!r}")
        self.index = build_shard_index(expand_shards(shards))
        for error in self.index.errors:
            if strict:
                raise ValueError(f"unreadable shard: {error}")
            logger.error("unreadable shard (samples after the damage are lost): %s", error)
        # Skips found while indexing: one per unreadable shard (how many samples the damage cost
        # cannot be known). Every rank indexes every shard, so only rank 0 counts them: summed
        # over ranks, each shard counts once. The loader starts its ``skipped`` from these.
        self.index_skipped: Counter = Counter()
        if self.index.errors and rank == 0:
            self.index_skipped["unreadable_shard"] = len(self.index.errors)
        num_samples = len(self.index.entries)
        if max_samples is not None:
            # The pass covers the first ``max_samples`` samples of the (shuffled) order, split over
            # the ranks: which samples an evaluation scores depends on nothing else (not on the
            # loader's workers or batch size, which only order them).
            if num_epochs is None:
                raise ValueError("max_samples limits a finite pass (num_epochs)")
            num_samples = min(num_samples, max_samples)
        self.epoch_length = num_samples // world_size if even_ranks else len(range(rank, num_samples, world_size))
        # Every rank sees the same num_samples, so every rank raises alike (a rank raising alone
        # would leave the others waiting in a collective). A finite uneven pass (evaluation)
        # may leave a rank without samples: it reads nothing and joins the others' reductions.
        some_rank_empty = num_samples < world_size  # the last rank's share is the smallest
        if some_rank_empty and (num_samples == 0 or even_ranks or num_epochs is None):
            raise ValueError(f"{num_samples} samples in {len(self.index.shards)} shards: too few for {world_size} ranks")
        self.processor = processor
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.num_epochs, self.even_ranks = shuffle, num_epochs, even_ranks
        self.drop_last, self.strict, self.padding_side = drop_last, strict, padding_side
        self.start = StreamStart()
        # Samples carry uint8 patches (``SampleProcessor(raw_pixels=True)``): set by a loader
        # with workers, which normalises them in the main process.
        self.raw_pixels = False
        self._order_cache: tuple[int, Optional[np.ndarray]] = (-1, None)

    # ------------------------------------------------------------ positions -> samples

    @property
    def total_positions(self) -> Optional[int]:
        return None if self.num_epochs is None else self.num_epochs * self.epoch_length

    def entry_index(self, position: int) -> int:
        """Rank stream position -> index into ``self.index.entries``."""
        epoch, slot = divmod(position, self.epoch_length)
        global_slot = slot * self.world_size + self.rank
        if not self.shuffle:
            return global_slot
        if self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order_cache = (epoch, rng.permutation(len(self.index.entries)))
        return int(self._order_cache[1][global_slot])

    def worker_positions(self, worker: int, num_workers: int, start: StreamStart) -> Iterator[int]:
        """Positions of logical worker ``worker``: ≡ worker (mod W), from start.base, minus start.skip."""
        position = start.base + (worker - start.base) % num_workers
        total = self.total_positions
        while total is None or position < total:
            if position not in start.skip:
                yield position
            position += num_workers

    def read_files(self, entry: IndexEntry, handles: OrderedDict) -> dict[str, bytes]:
        """Member bytes of one sample by seek + read, through a small LRU of open shards."""
        shard = self.index.shards[entry.shard]
        handle = handles.pop(entry.shard, None) or open(shard, "rb")
        handles[entry.shard] = handle
        if len(handles) > _OPEN_SHARDS_PER_WORKER:
            handles.popitem(last=False)[1].close()
        files = {}
        for ext, offset, size in entry.members:
            if ext in files:
                raise SampleError("duplicate_member", f"member .{ext} appears twice", shard, entry.key)
            handle.seek(offset)
            files[ext] = handle.read(size)
        return files

    def iter_samples(
        self, worker: int = 0, num_workers: int = 1, start: Optional[StreamStart] = None
    ) -> Iterator[tuple[int, Optional[ProcessedSample], Optional[SampleError]]]:
        """(position, processed sample or None, error or None) for each position of a worker.

        The one place samples are read, decoded, validated and processed. Errors are yielded,
        not raised (callers decide; under ``strict`` the loader raises them in the main process),
        and logged unless ``strict``.
        """
        handles: OrderedDict = OrderedDict()
        try:
            for position in self.worker_positions(worker, num_workers, start or StreamStart()):
                entry = self.index.entries[self.entry_index(position)]
                shard = self.index.shards[entry.shard]
                try:
                    files = self.read_files(entry, handles)
                    sample = self.processor(decode_sample(files, entry.key, shard),
                                            raw_pixels=self.raw_pixels)
                except SampleError as error:
                    if not self.strict:
                        logger.warning("skipping %s", error)
                    yield position, None, error
                    continue
                except Exception as e:
                    # Validation turns every data problem into a SampleError; anything else is
                    # a bug (or an I/O failure) and is raised, never skipped, naming the sample
                    # so it can be reproduced from that one sample.
                    where = f"{shard}: sample {entry.key!r} (stream position {position})"
                    logger.error("error that is not a data error while reading %s: %s: %s",
                                 where, type(e).__name__, e)
                    if hasattr(e, "add_note"):  # Python >= 3.11
                        e.add_note(f"while reading {where}")
                    raise
                yield position, sample, None
        finally:
            for handle in handles.values():
                handle.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        start = self.start
        first = start.first_worker if start.num_workers == num_workers else 0
        worker = (physical + first) % num_workers
        special = self.processor.special
        batch: list[ProcessedSample] = []
        skipped: Counter = Counter()
        position = reported = -1  # last position read; last one reported to the loader
        consecutive_errors = 0  # an infinite stream over data with no valid sample must not spin

        def emit() -> dict[str, Any]:
            out = collate_evidence_batch(batch, special.pad, special.image_pad, self.padding_side)
            out["_stream"] = {"worker": worker, "last_position": position, "skipped": dict(skipped)}
            return out

        for position, sample, error in self.iter_samples(worker, num_workers, start):
            if error is not None and self.strict:
                # Raised by the loader in the main process: a worker that raises is torn down
                # through DataLoader's error path and the error arrives as a re-typed copy.
                yield {"_stream": {"error": dict(reason=error.reason, detail=error.detail, shard=error.shard, key=error.key)}}
                return
            if error is not None:
                skipped[error.reason] += 1
                consecutive_errors += 1
                # A worker reads every num_workers-th position and a valid sample may sit at
                # either end of two epochs' orders: only a run this long proves there is none
                # (one epoch's worth tripped on data with a few valid samples).
                if consecutive_errors > 2 * self.epoch_length * num_workers:
                    raise ValueError(
                        f"no valid sample in {consecutive_errors} consecutive stream positions "
                        f"(2 epochs x {num_workers} loader workers) of "
                        f"{len(self.index.shards)} shards (first: {self.index.shards[0]}); "
                        f"skipped: {dict(skipped)}"
                    )
                continue
            consecutive_errors = 0
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield emit()
                batch, skipped, reported = [], Counter(), position
        # The end of a finite pass. Its tail (a partial batch under drop_last, or samples that
        # were all skipped) must still reach the loader as delivered, with its skip counts:
        # otherwise the pass never counts as finished and the next iter() resumes in the tail.
        if batch and not self.drop_last:
            yield emit()
        elif position > reported:
            tail = {"worker": worker, "last_position": position, "skipped": dict(skipped)}
            yield {"_stream": {**tail, "end_of_pass": True}}


class EvidenceDataLoader:
    """Iterates an EvidenceShardDataset through torch DataLoader workers, with exact resume.

    state_dict() describes the batches this iterator has *returned*; prefetched batches are
    not counted, so loading it into a fresh loader continues exactly after the last batch the
    trainer saw. Samples skipped as invalid are counted in ``skipped`` (also part of the state),
    each time they are read; unreadable shards once, on rank 0 (``dataset.index_skipped``).
    A finite pass (``num_epochs``) that was iterated to its end is iterated again from the top
    by the next iter(), with the same batches (under ``drop_last`` too).
    """

    def __init__(self, dataset: EvidenceShardDataset, num_workers: int = 0, prefetch_factor: Optional[int] = None, pin_memory: bool = False):
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.skipped: Counter = Counter(dataset.index_skipped)
        self._start = StreamStart()
        self._delivered: dict[int, int] = {}  # logical worker -> first position not yet delivered
        self._last_worker: Optional[int] = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._start = self._current_start()
        if self._finished(self._start):
            self._start = StreamStart()  # a finished finite pass: iterate it again from the top
        self._delivered, self._last_worker = {}, None
        self.dataset.start = self._start  # read by workers when the DataLoader forks them
        # Workers ship uint8 patches: batches waiting in shared memory (num_workers ×
        # prefetch_factor of them) take an eighth of the float32 pixels' bytes (~19 MB per
        # 1024-token image), and the copy into shared memory shrinks with them.
        self.dataset.raw_pixels = self.num_workers > 0
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            pin_memory=self.pin_memory,
            worker_init_fn=ignore_preemption_signals,  # the trainer saves on them
        )
        batches = iter(loader)
        try:
            for batch in batches:
                stream = batch.pop("_stream")
                if "error" in stream:
                    raise SampleError(**stream["error"])
                self._delivered[stream["worker"]] = stream["last_position"] + 1
                self._last_worker = stream["worker"]
                self.skipped.update(stream["skipped"])
                if stream.get("end_of_pass"):
                    continue  # a worker's tail was consumed without a batch to hand out
                if batch["pixel_values"].dtype == torch.uint8:
                    batch["pixel_values"] = normalise_patches(
                        batch["pixel_values"], self.dataset.processor.image_config)
                yield batch
        finally:
            # Stop the workers now, not whenever the iterator is garbage collected: an error or
            # an early break otherwise leaves them (and their prefetched batches) alive. An
            # exception raised through the iterator keeps it referenced from its traceback, so
            # dropping our reference is not enough; and the workers ignore SIGTERM (preemption),
            # so multiprocessing's exit handler could not terminate them either: the process
            # would hang at exit instead of dying with the error.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del batches

    def _current_start(self) -> StreamStart:
        """Fold the positions delivered since the last start into a new (base, skip) start."""
        workers = max(self.num_workers, 1)
        start = self._start
        if self._last_worker is None:
            return start
        nxt = [self._delivered.get(u, start.base) for u in range(workers)]
        total = self.dataset.total_positions
        # A worker that delivered nothing yet still starts at its first position >= start.base.
        base = min(nxt)
        skip = {k for k in start.skip if k >= base}
        for u in range(workers):
            first = base + (u - base) % workers
            skip.update(range(first, nxt[u], workers))
        if total is not None:
            skip = {k for k in skip if k < total}
        return StreamStart(base, frozenset(skip), (self._last_worker + 1) % workers, workers)

    def _finished(self, start: StreamStart) -> bool:
        total = self.dataset.total_positions
        if total is None:
            return False
        remaining = total - start.base
        return remaining <= 0 or (len(start.skip) >= remaining and all(k in start.skip for k in range(start.base, total)))

    def state_dict(self) -> dict[str, Any]:
        start = self._current_start()
        return {
            "base": start.base,
            "skip": sorted(start.skip),
            "first_worker": start.first_worker,
            "num_workers": start.num_workers,
            "skipped": dict(self.skipped),
            **self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._require_same(state, self._identity())
        self._start = StreamStart(state["base"], frozenset(state["skip"]), state["first_worker"], state["num_workers"])
        self._delivered, self._last_worker = {}, None
        self.skipped = Counter(state["skipped"])

    def state_matches(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` was saved by a reader of this data, rank and layout."""
        return all(state.get(k) == v for k, v in self._identity().items())

    def load_resharded_state_dict(self, states: Sequence[dict[str, Any]]) -> bool:
        """Continue a stream that another data-parallel layout saved: ``states`` are the readers'
        ``state_dict()`` of all ranks of that run. Returns True when the continuation is exact.

        A state of this very rank and layout (only tensor/pipeline sizes changed) is loaded as
        it is. Otherwise (another DP size) this rank starts where the old ranks together stopped
        in the same epoch order: every sample any old rank delivered lies before the new start,
        so none is read twice; up to about workers × batch per old rank that were prefetched
        but not delivered are passed over, and the per-rank skip bookkeeping starts afresh."""
        for state in states:
            if self.state_matches(state):
                self.load_state_dict(state)
                return True
        mine = self._identity()
        order = {name: mine[name] for name in ("num_samples", "seed", "shuffle", "even_ranks")}
        for state in states:  # the epoch order must be the same; rank and world size may not
            self._require_same(state, order)
        if not states or not mine["even_ranks"]:
            raise ValueError("no reader state of this layout to continue from")
        old_world = states[0]["world_size"]
        ranks = {s.get("rank") for s in states}
        if {s["world_size"] for s in states} != {old_world} or ranks != set(range(old_world)):
            # The new start lies past what the given ranks delivered: a rank left out would
            # have its delivered samples read again.
            raise ValueError(f"reader states of ranks {sorted(ranks, key=str)} of data-parallel "
                             f"size(s) {sorted({s['world_size'] for s in states})}: need the "
                             f"states of every rank of one data-parallel layout to continue it")
        old_length = mine["num_samples"] // old_world
        # First position past every sample the rank delivered (skip holds delivered ones > base).
        end = max(max([s["base"] - 1, *s["skip"]]) + 1 for s in states)
        epoch, slot = divmod(end, old_length)
        new_slot = min(self.dataset.epoch_length, -(-slot * old_world // self.dataset.world_size))
        self._start = StreamStart(epoch * self.dataset.epoch_length + new_slot)
        self._delivered, self._last_worker = {}, None
        self.skipped = Counter()
        return False

    @staticmethod
    def _require_same(state: dict[str, Any], expected: dict[str, Any]) -> None:
        for name, value in expected.items():
            if state.get(name) != value:
                raise ValueError(
                    f"data loader state was saved with {name}={state.get(name)!r}, this run has {value!r}; "
                    "the sample order would differ, so it cannot resume exactly (keep the shards and data settings)"
                )

    def _identity(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "num_samples": len(d.index.entries),
            "seed": d.seed,
            "shuffle": d.shuffle,
            "rank": d.rank,
            "world_size": d.world_size,
            "even_ranks": d.even_ranks,
        }
