"""Model weights in megatron-core distributed checkpoints (torch_dist): save at one TP/PP, load at
any other.

Layout accepted by ``load_model_checkpoint`` / ``resolve_checkpoint_dir``:

- ``CKPT/`` is itself a distributed checkpoint (has ``metadata.json``), e.g. what
  ``tools/convert_hf_checkpoint.py hf-to-megatron`` writes; or
- ``CKPT/`` holds ``latest_checkpointed_iteration.txt`` (Megatron-LM) or ``latest`` naming an
  iteration ``N`` (-> ``CKPT/iter_000000N/``), ``release``, or a subdirectory name.

Model tensors may sit under any key prefix (``model.`` is what this package writes: the trainer
puts the model's sharded state dict under ``"model."`` next to optimizer and RNG state); the
prefix is detected from the checkpoint's tensor metadata. Only model tensors are read.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from megatron_ease.models.qwen_vl.hf_weights import WeightMismatchError

MODEL_PREFIX = "model."
LATEST_FILES = ("latest_checkpointed_iteration.txt", "latest")
# A tensor every complete checkpoint of the model holds (first stage), used to find the prefix.
_ANCHOR_KEY = "language_model.embedding.word_embeddings.weight"
# The model's top-level modules: with an empty prefix, other state (optimizer, ...) sits beside.
_MODEL_MODULES = ("language_model.", "vision_model.")


class AmbiguousCheckpointError(ValueError):
    """A directory is a distributed checkpoint and also points to a step directory: which one
    is meant cannot be guessed."""


def is_dist_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json"))


def resolve_checkpoint_dir(path: str) -> str:
    """The distributed-checkpoint directory that ``path`` is or points to (see module doc)."""
    if is_dist_checkpoint(path):
        markers = [name for name in LATEST_FILES if os.path.isfile(os.path.join(path, name))]
        if markers:
            # E.g. a converted checkpoint also used as a run's checkpoint.dir: which one is
            # meant cannot be guessed, and taking the top level would export the untrained one.
            raise AmbiguousCheckpointError(
                f"{path} is a distributed checkpoint and also has {markers[0]} pointing to a "
                f"step directory; pass one of them explicitly")
        return path
    for name in LATEST_FILES:
        marker = os.path.join(path, name)
        if not os.path.isfile(marker):
            continue
        with open(marker) as f:
            value = f.read().strip()
        candidates = [os.path.join(path, value)]
        if value.isdigit():
            candidates.insert(0, os.path.join(path, f"iter_{int(value):07d}"))
        for candidate in candidates:
            if is_dist_checkpoint(candidate):
                return candidate
        raise FileNotFoundError(f"{marker} says {value!r} but none of {candidates} is a "
                                f"distributed checkpoint")
    if os.path.isfile(os.path.join(path, "config.json")) and any(
            n.endswith(".safetensors") for n in os.listdir(path)):
        raise FileNotFoundError(
            f"{path} is a Hugging Face model directory; convert it first (python "
            f"tools/convert_hf_checkpoint.py hf-to-megatron --hf-dir {path} --out CKPT) and give "
            f"CKPT, with model.hf_config={path}")
    raise FileNotFoundError(
        f"{path} is not a megatron distributed checkpoint (no metadata.json) and has no "
        f"{' or '.join(LATEST_FILES)} file pointing to one")


def checkpoint_tensors(ckpt_dir: str) -> dict:
    """Key -> ShardedTensor metadata (global shape, dtype) of every tensor in the checkpoint."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(ckpt_dir)


def model_key_prefix(tensors: dict, ckpt_dir: str = "the checkpoint") -> str:
    # The shortest: optimizer state keys of a trainer checkpoint end with model keys too.
    prefixes = sorted((key[: -len(_ANCHOR_KEY)] for key in tensors if key.endswith(_ANCHOR_KEY)),
                      key=len)
    if prefixes:
        return prefixes[0]
    raise WeightMismatchError(f"{ckpt_dir} holds no '{_ANCHOR_KEY}' under any prefix: not a "
                              f"Qwen-VL model checkpoint")


def model_sharded_state_dict(model: torch.nn.Module, prefix: str = MODEL_PREFIX) -> dict:
    """The model's sharded state dict with its checkpoint keys under ``prefix``."""
    return model.sharded_state_dict(prefix=prefix)


def save_model_checkpoint(model: torch.nn.Module, ckpt_dir: str,
                          prefix: str = MODEL_PREFIX) -> None:
    """Write this rank's part of the model (call on every rank; collective)."""
    from megatron.core import dist_checkpointing

    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(model, prefix), ckpt_dir,
                            sharded_strategy=("torch_dist", 1))


def _expected_tensors(sharded: dict):
    """(key, global_shape) of every tensor the sharded state dict will read."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in nested_values(sharded):
        if isinstance(value, ShardedTensorFactory):
            yield from _expected_tensors(value.build())
        elif isinstance(value, ShardedTensor):
            yield value.key, tuple(value.global_shape)


def checkpoint_problems(sharded: dict, tensors: dict) -> list[str]:
    """What keeps this rank's part of the model from loading: missing tensors, other shapes."""
    problems = []
    for key, shape in _expected_tensors(sharded):
        if key not in tensors:
            problems.append(f"missing tensor '{key}'")
        elif tuple(tensors[key].global_shape) != shape:
            problems.append(f"tensor '{key}' has shape {list(tensors[key].global_shape)}, the "
                            f"model expects {list(shape)}")
    return list(dict.fromkeys(problems))


def _all_ranks_problems(problems: list[str]) -> list[str]:
    # Every rank must agree to refuse: a rank that went on into the collective load alone
    # would wait for the others forever.
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return problems
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, problems)
    return list(dict.fromkeys(p for rank_problems in gathered for p in rank_problems))


def drop_absent_extra_state(sharded: dict, ckpt_dir: str) -> dict:
    """``sharded`` without the ``_extra_state`` objects ``ckpt_dir`` does not hold.

    TransformerEngine modules carry an ``_extra_state`` (FP8 scaling metadata) that megatron
    saves as a ShardedObject. A checkpoint written without them -- by the converter, which
    builds the local spec, or by a run without TE -- then lacks keys a TE model asks for, and
    torch.distributed.checkpoint's planner refuses the whole load ("Missing key in checkpoint
    state_dict"). Those modules keep their initial extra state, as in a fresh TE model. Every
    rank reads the same metadata, so every rank drops the same keys.
    """
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    def is_extra_state(value) -> bool:
        return isinstance(value, ShardedObject) and value.key.endswith("_extra_state")

    if not any(is_extra_state(v) for v in nested_values(sharded)):
        return sharded
    saved = load_sharded_metadata(ckpt_dir)
    _, kept = extract_matching_values(
        sharded, lambda v: is_extra_state(v) and v.unique_key not in saved)
    return kept


def load_model_checkpoint(model: torch.nn.Module, path: str) -> str:
    """Load this rank's part of the model from ``path`` (any TP/PP; collective); returns the
    resolved checkpoint directory."""
    from megatron.core import dist_checkpointing

    ckpt_dir = resolve_checkpoint_dir(path)
    tensors = checkpoint_tensors(ckpt_dir)
    prefix = model_key_prefix(tensors, ckpt_dir)
    sharded = model_sharded_state_dict(model, prefix)
    problems = _all_ranks_problems(checkpoint_problems(sharded, tensors))
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more"
                                           if len(problems) > 4 else "")
        raise WeightMismatchError(
            f"{ckpt_dir} does not fit the model{_saved_model_hint(ckpt_dir)}: {shown}. The "
            f"model's sizes come from model.hf_config (the HF model the checkpoint was "
            f"converted from) or, without it, the config's model section")
    loaded = dist_checkpointing.load(drop_absent_extra_state(sharded, ckpt_dir), ckpt_dir)
    # Only the model's keys: a trainer checkpoint's common state also holds the optimizer's.
    state = {key[len(prefix):]: value for key, value in loaded.items()
             if key.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise WeightMismatchError(f"{ckpt_dir}: state dict mismatch after load: missing "
                                  f"{missing[:5]}, unexpected {unexpected[:5]}")
    return ckpt_dir


def saved_run_config(ckpt_dir: str) -> Optional[dict]:
    """The run config a trainer checkpoint was saved with (``trainer_state.json``'s ``config``,
    a ``config_to_dict`` tree), or None: a converted checkpoint, an unreadable file."""
    import json

    try:
        with open(os.path.join(ckpt_dir, "trainer_state.json")) as f:
            config = json.load(f).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


def _saved_model_hint(ckpt_dir: str) -> str:
    """What the checkpoint says it holds, when it says: the converter's record (next to the
    tensors) or the trainer's saved config."""
    import json

    try:
        with open(os.path.join(ckpt_dir, "hf_conversion.json")) as f:
            family, source = json.load(f).get("model_type"), "hf_conversion.json"
    except (OSError, ValueError, AttributeError):
        family, source = None, None
    if not family:
        family = ((saved_run_config(ckpt_dir) or {}).get("model") or {}).get("family")
        source = "trainer_state.json"
    return f" (it holds a {family} model, by its {source})" if family else ""


class CheckpointModelTensors:
    """The model tensors of a distributed checkpoint as whole (TP=1-layout) tensors, read a few
    keys at a time without building the model: what megatron-to-hf streams from.

    A key's global tensor is the TP=1 layout whatever TP wrote it (QKV interleaved per group,
    fc1 as [gate; up]); decoder keys are stacked over layers on dim 0 (megatron-core's default)
    or carry the layer index in the key; both are named per layer here.
    """

    def __init__(self, path: str):
        self.ckpt_dir = resolve_checkpoint_dir(path)
        tensors = checkpoint_tensors(self.ckpt_dir)
        self.prefix = model_key_prefix(tensors, self.ckpt_dir)
        self.keys = {k: v for k, v in tensors.items() if k.startswith(self.prefix)
                     and k[len(self.prefix):].startswith(_MODEL_MODULES)}
        # canonical parameter name -> (checkpoint key, layer index into the stacked key or None)
        self.names: dict[str, tuple[str, Optional[int]]] = {}
        for key, meta in self.keys.items():
            rest = key[len(self.prefix):]
            m = re.match(r"(.*decoder\.layers\.)(\d+\.)?(.*)", rest)
            if m and m.group(2) is None:
                for i in range(meta.global_shape[0]):
                    self.names[f"{m.group(1)}{i}.{m.group(3)}"] = (key, i)
            else:
                self.names[rest] = (key, None)

    def shape(self, name: str) -> tuple[int, ...]:
        key, layer = self.names[name]
        shape = tuple(self.keys[key].global_shape)
        return shape if layer is None else shape[1:]

    def dtype(self, name: str) -> torch.dtype:
        return self.keys[self.names[name][0]].dtype

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Whole global tensors of these checkpoint keys."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        request = {key: ShardedTensor.from_rank_offsets(
            key, torch.empty(self.keys[key].global_shape, dtype=self.keys[key].dtype),
            replica_id=0) for key in keys}
        return dist_checkpointing.load(request, self.ckpt_dir)

    def check_fits(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Refuse, naming the tensors, a checkpoint that lacks a parameter of the model
        (``expected``: checkpoint name -> full shape), holds it in another shape, or holds
        model tensors the model does not have."""
        def where(name):
            key, layer = self.names.get(name, (None, None))
            return f"'{name}'" + (f" (checkpoint key '{key}'[{layer}])" if layer is not None
                                  else "")

        problems = [f"missing tensor '{name}'" for name in expected if name not in self.names]
        problems += [f"tensor {where(name)} has shape {list(self.shape(name))}, the model "
                     f"expects {list(shape)}" for name, shape in expected.items()
                     if name in self.names and self.shape(name) != tuple(shape)]
        problems += [f"unexpected tensor {where(name)}" for name in self.names
                     if name not in expected]
        if problems:
            raise WeightMismatchError(f"{self.ckpt_dir} does not fit the model: "
                                      f"{'; '.join(problems[:10])}")

    def ordered(self, names) -> list[str]:
        """``names`` in reading order: checkpoint key order, then layer."""
        rank = {key: i for i, key in enumerate(self.keys)}
        return sorted(names, key=lambda n: (rank[self.names[n][0]], self.names[n][1] or 0))

    def iter_tensors(self, names, max_bytes: int = 2 * 1024 ** 3):
        """``(name, tensor)`` in ``ordered(names)`` order. Keys are read in batches of about
        ``max_bytes`` (a stacked key whole, once); only one batch is held at a time."""
        names = self.ordered(names)
        batches, size = [[]], 0
        for key in dict.fromkeys(self.names[name][0] for name in names):
            meta = self.keys[key]
            nbytes = torch.Size(meta.global_shape).numel() * meta.dtype.itemsize
            if batches[-1] and size + nbytes > max_bytes:
                batches.append([])
                size = 0
            batches[-1].append(key)
            size += nbytes
        batch_of = {key: i for i, batch in enumerate(batches) for key in batch}
        loaded, current = {}, None
        for name in names:
            key, layer = self.names[name]
            if batch_of[key] != current:
                loaded, current = {}, batch_of[key]
                loaded = self.load(batches[current])
            yield name, loaded[key] if layer is None else loaded[key][layer]
