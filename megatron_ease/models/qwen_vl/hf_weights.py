"""HF safetensors <-> our model's parameters, through a weight table, one tensor at a time.

    hf = HFCheckpoint("Qwen2.5-VL-7B-Instruct/")            # lazy: safe_open per file
    load_hf_weights(model, hf)                              # any TP rank / PP stage: its slices
    save_hf_weights(hf_tensors(named_full_tensors, table, layout), out_dir, plan)

Loading checks every tensor before it is used: a missing HF tensor, a shape that disagrees with
the config, or (for a whole model) an HF tensor nothing consumed is an error naming the tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Optional

import torch

from megatron_ease.config import ModelConfig
from megatron_ease.models.qwen_vl.hf_config import UnreadableFileError, read_json_file
from megatron_ease.models.qwen_vl.hf_tables import HFWeightTable, weight_table
from megatron_ease.models.qwen_vl.param_mapping import AttentionLayout
from megatron_ease.training.checkpointing import fsync_dir, write_atomic

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
           "BOOL": torch.bool}


class WeightMismatchError(ValueError):
    """A checkpoint does not fit the model: the message names the tensor(s)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class HFCheckpoint:
    """Tensor names, shapes and dtypes of an HF safetensors checkpoint; tensors read on demand."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, SAFETENSORS_INDEX)
        single = os.path.join(hf_dir, SAFETENSORS_SINGLE)
        if os.path.isfile(index):
            weight_map = read_json_file(index, "safetensors index", required=("weight_map",))[
                "weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise UnreadableFileError(f"safetensors index {index}: 'weight_map' is not a "
                                          f"mapping of tensor names to file names")
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise FileNotFoundError(f"{hf_dir}: no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE}")
        self._handles = {}
        self._file_of: dict[str, str] = {}
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        files = sorted(set(weight_map.values())) if weight_map else [SAFETENSORS_SINGLE]
        for file in files:
            handle = self._open(file)
            for name in handle.keys():
                if name in self._file_of:
                    raise WeightMismatchError(
                        f"HF checkpoint {hf_dir}: tensor {name!r} is stored in both "
                        f"{self._file_of[name]} and {file}")
                piece = handle.get_slice(name)
                self._file_of[name] = file
                dtype = _DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise WeightMismatchError(
                        f"{os.path.join(hf_dir, file)}: tensor {name!r} is stored as "
                        f"{piece.get_dtype()}, which is not supported (quantized checkpoints such "
                        f"as FP8 ones are not); convert the bf16 release of the model")
                self._info[name] = (tuple(piece.get_shape()), dtype)
        if weight_map:
            missing = sorted(set(weight_map) - set(self._file_of))
            if missing:
                raise WeightMismatchError(f"{index} lists tensors that are in no shard: "
                                          f"{missing[:5]}")
            elsewhere = sorted(name for name, file in weight_map.items()
                               if self._file_of[name] != file)
            if elsewhere:
                name = elsewhere[0]
                raise WeightMismatchError(f"{index} puts tensor {name!r} in {weight_map[name]} "
                                          f"but it is in {self._file_of[name]}")

    def _open(self, file: str):
        from safetensors import SafetensorError, safe_open

        if file not in self._handles:
            path = os.path.join(self.hf_dir, file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: shard listed in {SAFETENSORS_INDEX} is missing")
            try:
                self._handles[file] = safe_open(path, framework="pt")
            except SafetensorError as e:
                raise UnreadableFileError(f"{path} is not a readable safetensors file ({e}): a "
                                          f"truncated or corrupted download?") from e
        return self._handles[file]

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._info[name][1]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._info:
            raise WeightMismatchError(f"HF checkpoint {self.hf_dir} has no tensor '{name}'")
        return self._open(self._file_of[name]).get_tensor(name)

    def equal(self, name: str, other: str, max_chunk_bytes: int = 256 * 1024 ** 2) -> bool:
        """Whether tensor ``name`` equals ``other`` cast to ``name``'s dtype (what an export
        writing ``other`` as ``name`` gives), compared a block of rows at a time."""
        shape = self.shape(name)
        if shape != self.shape(other):
            return False
        if not shape:
            return torch.equal(self.get(name), self.get(other).to(self.dtype(name)))
        row_bytes = max(1, torch.Size(shape[1:]).numel() * 8)
        step = max(1, max_chunk_bytes // row_bytes)
        a = self._open(self._file_of[name]).get_slice(name)
        b = self._open(self._file_of[other]).get_slice(other)
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            if not torch.equal(a[start:stop], b[start:stop].to(self.dtype(name))):
                return False
        return True


def attention_layout(model_cfg: ModelConfig) -> AttentionLayout:
    return AttentionLayout(model_cfg.num_attention_heads, model_cfg.num_query_groups,
                           model_cfg.kv_channels
                           or model_cfg.hidden_size // model_cfg.num_attention_heads)


def canonical_parameters(model: torch.nn.Module) -> OrderedDict[str, torch.nn.Parameter]:
    """Parameters by checkpoint name: global layer index, the spec's checkpoint key map applied
    (the local spec's ``input_layernorm.weight`` is named
    ``self_attention.linear_qkv.layer_norm_weight``, as in TE's spec and in checkpoints)."""
    modules = dict(model.named_modules())
    out = OrderedDict()
    for name, param in model.named_parameters():
        m = re.match(r"(.*decoder\.layers\.)(\d+)\.(.*)", name)
        if m:
            layer = modules[m.group(1) + m.group(2)]
            rest = m.group(3)
            for old, new in layer.submodules_config.sharded_state_dict_keys_map.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            name = f"{m.group(1)}{layer.layer_number - 1}.{rest}"
        out[name] = param
    return out


def _full_shape(param: torch.nn.Parameter, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def _check_tp_layout(name: str, mapping, param) -> None:
    declared = mapping.tp_dim
    actual = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    if declared != actual:
        raise WeightMismatchError(f"weight table: '{name}' is declared with TP dim {declared} "
                                  f"but the model shards it along {actual}")


def load_hf_weights(model: torch.nn.Module, hf: HFCheckpoint, table: Optional[HFWeightTable] = None,
                    naming: Optional[str] = None, tp_rank: Optional[int] = None,
                    tp_size: Optional[int] = None, strict_unused: Optional[bool] = None,
                    progress: bool = False) -> dict:
    """Copy HF weights into this rank's parameters (its TP slices, its PP stage's layers).

    Returns ``{"naming": ..., "dtypes": {hf_name: dtype name}, "tied_copies": {hf_name: source}}``
    of what was read; ``tied_copies`` lists tensors of a tied checkpoint that merely repeat
    another (an ``lm_head.weight`` next to tied embeddings: HF ignores it, and so does this), so
    that an export can write them back. ``strict_unused`` (default: when the model holds every
    layer, i.e. PP=1) also refuses HF tensors that no parameter consumed.
    """
    from megatron.core import parallel_state

    table = table or weight_table(model.model_cfg.family)
    naming = naming or table.detect_naming(hf.names)
    if tp_size is None:
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    layout = attention_layout(model.model_cfg)
    params = canonical_parameters(model)
    if strict_unused is None:
        strict_unused = model.pre_process and model.post_process
    tied = model.share_embeddings_and_output_weights
    used: dict[str, torch.dtype] = {}
    items = params.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(params), desc="hf -> megatron", unit="param")
    for name, param in items:
        mapping, hf_names = table.resolve(name, naming, tie_word_embeddings=tied)
        _check_tp_layout(name, mapping, param)
        full_shape = _full_shape(param, tp_size)
        expected = mapping.to_hf(torch.empty(full_shape, device="meta"), layout)
        tensors = {}
        for role, hf_name in hf_names.items():
            if hf_name not in hf:
                raise WeightMismatchError(
                    f"HF checkpoint {hf.hf_dir} is missing tensor '{hf_name}' (for megatron "
                    f"parameter '{name}')")
            if hf.shape(hf_name) != tuple(expected[role].shape):
                raise WeightMismatchError(
                    f"HF tensor '{hf_name}' has shape {list(hf.shape(hf_name))} but the config "
                    f"implies {list(expected[role].shape)} (megatron parameter '{name}')")
            tensors[role] = hf.get(hf_name)
            used[hf_name] = hf.dtype(hf_name)
        shard = mapping.shard(mapping.to_megatron(tensors, layout), tp_rank, tp_size)
        with torch.no_grad():
            param.copy_(shard)
    tied_copies = {}
    if tied:
        tied_copies = {copy: source for copy, source in table.tied_hf_names(naming).items()
                       if copy in hf and copy not in used}
        for copy, source in tied_copies.items():
            # Only an exact copy may be dropped here and written back from its source.
            if not hf.equal(copy, source):
                how = (f"has shape {list(hf.shape(copy))}, '{source}' {list(hf.shape(source))}"
                       if hf.shape(copy) != hf.shape(source) else f"differs from '{source}'")
                raise WeightMismatchError(
                    f"HF checkpoint {hf.hf_dir}: the config says tie_word_embeddings=true but "
                    f"tensor '{copy}' {how}: the config and the weights disagree (an untied "
                    f"model's config should say tie_word_embeddings=false)")
        used.update({copy: hf.dtype(copy) for copy in tied_copies})
    if strict_unused:
        unused = sorted(set(hf.names) - set(used))
        if unused:
            raise WeightMismatchError(
                f"HF checkpoint {hf.hf_dir} has {len(unused)} tensor(s) the model does not use, "
                f"e.g. {unused[:5]}: the config and the weights disagree")
    return {"naming": naming, "dtypes": {k: dtype_name(v) for k, v in used.items()},
            "tied_copies": tied_copies}


def hf_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], table: HFWeightTable,
               layout: AttentionLayout, naming: Optional[str] = None,
               dtypes: Optional[Mapping[str, str]] = None,
               default_dtype: Optional[torch.dtype] = None,
               tied_copies: Optional[Mapping[str, str]] = None,
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` of full (TP=1-layout) megatron tensors given by checkpoint name.

    Sources: ``CheckpointModelTensors.iter_tensors`` (a checkpoint, streamed) or
    ``canonical_parameters(model).items()`` (a TP=1, PP=1 model). Each output is a fresh
    contiguous tensor (meta stays meta), cast to ``dtypes[hf_name]`` (a dtype name) when given,
    else ``default_dtype``, else kept. ``tied_copies`` (copy -> source HF name, as
    ``load_hf_weights`` reports them) are written again after their source.
    """
    naming = naming or table.default_naming

    def cast(hf_name, tensor):
        dtype = (dtype_from_name(dtypes[hf_name]) if dtypes and hf_name in dtypes
                 else default_dtype or tensor.dtype)
        return tensor.to(dtype, copy=True).contiguous()

    for name, tensor in named_tensors:
        mapping, hf_names = table.resolve(name, naming)
        outputs, part = [], None
        for role, part in mapping.to_hf(tensor.detach(), layout).items():
            hf_name = hf_names[role]
            outputs.append((hf_name, cast(hf_name, part)))
            outputs += [(copy, cast(copy, part)) for copy, source in (tied_copies or {}).items()
                        if source == hf_name]
        # The input (and its parts) may be views into a streamed batch of stacked layers: drop
        # them before the source loads its next batch, so that two batches are never alive.
        del tensor, part
        yield from outputs
        del outputs


def save_hf_weights(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str,
                    plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                    max_shard_bytes: int = 5 * 1024 ** 3, progress: bool = False) -> list[str]:
    """Write safetensors shards (HF layout: ``model.safetensors`` or ``model-0000i-of-0000n``
    + index). ``plan`` (``(name, shape, dtype)``, e.g. ``hf_tensors`` of meta tensors)
    fixes the shard split before any tensor exists, so only one shard is in memory at a time.
    Shards are written under temporary names and renamed once all exist, the index (written
    atomically) last: an export that fails or is killed leaves no shard under its own name.
    Returns the files written."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for name, shape, dtype in plan:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    file_names = ([SAFETENSORS_SINGLE] if n == 1 else
                  [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    shard_of = {name: i for i, names in enumerate(shards) for name in names}
    os.makedirs(out_dir, exist_ok=True)
    # Shards go to hidden temporary names and get their own names only once all are written,
    # the index last: an export cut off part way leaves nothing that looks like a model.
    temp_names = [f".{name}.tmp-{os.getpid()}" for name in file_names]
    pending: dict[int, dict[str, torch.Tensor]] = {}
    written = []
    total_bytes = 0
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, total=len(plan), desc="megatron -> hf", unit="tensor")
    try:
        for name, tensor in tensors:
            if name not in shard_of:
                raise ValueError(f"tensor '{name}' is not in the export plan")
            i = shard_of[name]
            pending.setdefault(i, {})[name] = tensor
            total_bytes += tensor.numel() * tensor.element_size()
            if len(pending[i]) == len(shards[i]):
                path = os.path.join(out_dir, temp_names[i])
                save_file(pending.pop(i), path, metadata={"format": "pt"})
                fsync_dir(path)  # (a file's data too)
                written.append(i)
        if pending or len(written) != n:
            missing = [name for i in range(n) if i not in written for name in shards[i]
                       if name not in pending.get(i, {})]
            raise ValueError(f"export produced no tensor for {missing[:5]}")
        for i in range(n):
            os.replace(os.path.join(out_dir, temp_names[i]), os.path.join(out_dir, file_names[i]))
        if n > 1:
            index = {"metadata": {"total_size": total_bytes},
                     "weight_map": {name: file_names[i] for name, i in sorted(shard_of.items())}}
            write_atomic(os.path.join(out_dir, SAFETENSORS_INDEX), json.dumps(index, indent=2))
        fsync_dir(out_dir)
    finally:
        for temp in temp_names:
            try:
                os.remove(os.path.join(out_dir, temp))
            except FileNotFoundError:
                pass
    return file_names + ([SAFETENSORS_INDEX] if n > 1 else [])
