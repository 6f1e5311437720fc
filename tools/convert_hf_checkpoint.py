#!/usr/bin/env python
"""Convert Qwen-VL weights between Hugging Face safetensors and megatron-core distributed
checkpoints.

    python tools/convert_hf_checkpoint.py hf-to-megatron --hf-dir Qwen2.5-VL-7B-Instruct \\
        --out ckpt/qwen25vl_7b [--verify]
    python tools/convert_hf_checkpoint.py megatron-to-hf --ckpt runs/x/checkpoints \\
        --hf-config Qwen2.5-VL-7B-Instruct --out hf_out
    python tools/convert_hf_checkpoint.py verify --hf-dir Qwen2.5-VL-7B-Instruct --ckpt ckpt/qwen25vl_7b

Qwen2.5-VL (``model_type: qwen2_5_vl``) and Qwen3-VL (``qwen3_vl``: 4B, 8B, ...) take the same
commands; the family comes from ``config.json``.

hf-to-megatron builds the model at TP=1/PP=1 in the checkpoint's widest dtype (bf16 for the
published models: ~16.6 GB for Qwen2.5-VL-7B's 8.3B parameters), copies the HF tensors in one at
a time (``safe_open``; only one HF tensor in memory beyond the model) and writes a torch_dist
checkpoint that loads at any TP/PP, model keys under ``model.``. Next to the tensors it writes
``hf_conversion.json``: the HF naming convention, every tensor's dtype and any copies a tied
checkpoint stores (an ``lm_head.weight`` equal to the embeddings; a tied checkpoint whose
``lm_head.weight`` differs is refused), so megatron-to-hf writes the same names and dtypes back
(a bit-exact round trip). Both go to ``OUT.tmp-<pid>`` next to OUT, renamed to OUT when complete:
a conversion that fails or is killed leaves no OUT (a kill may leave the temporary directory).

megatron-to-hf builds no model: it streams the checkpoint's tensors a few keys at a time (a
layer-stacked key whole: at most ~7.6 GB for 7B's fc1, plus one <= 5 GB output shard) through the
same table. It accepts a converted checkpoint or one written by the trainer: CKPT is a
distributed checkpoint, or a directory whose ``latest_checkpointed_iteration.txt`` / ``latest``
names ``iter_NNNNNNN`` (see ``megatron_ease/models/qwen_vl/checkpoint.py``). Without
``hf_conversion.json`` it writes transformers' default names in the HF config's dtype.
``--hf-config`` may hold only ``config.json``; every non-weight file in it (config, generation
config, tokenizer) is copied to the output. It may also name the config file itself (as
``model.hf_config`` may): a ``config.json`` stands for its directory, a file of another name is
written as ``config.json`` alone. Shards are written under temporary names and renamed
when all are written, the index last, so an export cut off part way leaves no shard under its
own name, also in an existing directory (``--out`` = ``--hf-config``). Without
``--hf-config``, a checkpoint the trainer wrote is exported with its run's config
(``trainer_state.json``): the run's ``model.hf_config`` when that directory exists, else a
``config.json`` made from the run's model section and the files of its ``data.tokenizer``
directory.

Memory, measured on a 1.4B-parameter model (2.9 GB bf16): hf-to-megatron peaks at the model
+ 1.0 GB of anonymous memory (plus reclaimable page cache of the mapped safetensors),
megatron-to-hf at 4.4 GB. On top of that, megatron-core's checkpoint writer clones every
non-contiguous view before it writes, and each layer's FC1 is saved as two views (gate, up):
a copy of all FC1 weights is alive during the save (measured on tiny models: exactly their
size). For Qwen2.5-VL-7B that gives ~25 GB for hf-to-megatron and ~14 GB for megatron-to-hf,
for Qwen3-VL-8B (8.8B parameters, 17.5 GB bf16) ~25 GB and ~14 GB: use a node with 32 GiB.

``--verify`` (or the ``verify`` command, for any megatron checkpoint against an HF dir) runs HF
and the converted checkpoint in fp32 on a probe (text + one image, built
from the config's special token ids; no tokenizer needed) and prints ``max_abs_logit_diff=<x>``
as the last line of stdout; the exit status is 1 above 1e-4 x the probe's largest |logit| (at
least 1): fp32 rounding grows with the logits' scale (a trained 7B's reach tens), a wrong mapping
moves logits by their own order of magnitude. It needs memory for the fp32 model,
one at a time (4 bytes x parameters), plus an fp32 copy of the FC1 weights while the converted
checkpoint loads (~1.45x the fp32 model: ~48 GB for 7B, ~50 GB for 8B). Progress bars and logs
go to stderr.

The model family comes from ``config.json``'s ``model_type``; an unsupported one is refused. A
malformed input file (invalid JSON, a truncated safetensors file, an index without
``weight_map``, a tensor stored in two shards) is an error naming it (exit status 2).
Runs on CPU in one process (GPUs are hidden: the work is I/O, and it keeps one code path).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("convert_hf_checkpoint")

CONVERSION_RECORD = "hf_conversion.json"
VERIFY_TOLERANCE = 1e-4  # relative to max(1, the largest |HF logit|); see verify_passes
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_megatron = sub.add_parser("hf-to-megatron", help="HF safetensors -> megatron checkpoint")
    to_megatron.add_argument("--hf-dir", required=True, help="HF model dir (config + safetensors)")
    to_megatron.add_argument("--out", required=True, help="new megatron checkpoint directory")
    to_megatron.add_argument("--verify", action="store_true",
                             help="compare HF and converted logits in fp32 (needs fp32 memory)")
    to_hf = sub.add_parser("megatron-to-hf", help="megatron checkpoint -> HF safetensors")
    to_hf.add_argument("--ckpt", required=True, help="megatron checkpoint (dir or its parent)")
    to_hf.add_argument("--hf-config", default=None,
                       help="dir holding the HF config.json, or the config file itself "
                            "(default: for a checkpoint the trainer wrote, its run's "
                            "model.hf_config, else a config.json made "
                            "from the run's model section, with its data.tokenizer's files)")
    to_hf.add_argument("--out", required=True, help="output HF model directory")
    check = sub.add_parser("verify", help="compare an HF model's and a megatron checkpoint's "
                                          "logits in fp32")
    check.add_argument("--hf-dir", required=True, help="HF model dir (config + safetensors)")
    check.add_argument("--ckpt", required=True, help="megatron checkpoint (dir or its parent)")
    return parser.parse_args(argv)


def _start_single_process():
    from megatron_ease.distributed import (
        init_process_group,
        initialize_model_parallel,
        read_launch_env,
    )

    launch = read_launch_env()
    if launch.world_size != 1:
        raise SystemExit("convert_hf_checkpoint runs in a single process; do not launch it with "
                         "torchrun/srun across several ranks")
    init_process_group(launch, backend="gloo")
    initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)


def _widest_dtype(dtypes):
    import torch

    floats = {d for d in dtypes if d.is_floating_point}
    if not floats:
        raise ValueError("the HF checkpoint holds no floating-point tensors")
    if len(floats) == 1:
        return floats.pop()
    if torch.float64 in floats:
        return torch.float64
    return torch.float32  # bf16 + fp16, or any mix with fp32: fp32 holds each exactly


def _build(model_cfg, dtype):
    from megatron_ease.config import ParallelConfig
    from megatron_ease.models.qwen_vl import build_qwen_vl_model

    # Local layer spec whatever is installed: TransformerEngine's layers need CUDA, which this
    # tool hides; the checkpoint names are the same for both specs.
    return build_qwen_vl_model(model_cfg, ParallelConfig(), params_dtype=dtype,
                               perform_initialization=False, use_te=False)


def _require_empty(path: str, what: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{what} {path} exists and is not a directory; pass a new one")
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{what} {path} exists and is not empty; pass a new directory")


def _write_record(ckpt_dir: str, record: dict) -> None:
    from megatron_ease.training.checkpointing import write_atomic

    write_atomic(os.path.join(ckpt_dir, CONVERSION_RECORD),
                 json.dumps(record, indent=1, sort_keys=True))


def _publish(staging: str, out: str) -> None:
    """Move the finished ``staging`` directory to ``out`` (absent, or an empty directory) in one
    rename: until then nothing at ``out`` looks like a checkpoint."""
    try:
        os.replace(staging, out)  # replaces an empty directory too (rename(2))
    except OSError as e:
        if os.path.isdir(out) and os.listdir(out):
            raise FileExistsError(f"--out {out} was filled by something else during the "
                                  f"conversion; the checkpoint is left in {staging}") from e
        raise
    from megatron_ease.training.checkpointing import fsync_dir

    fsync_dir(os.path.dirname(os.path.abspath(out)))


def hf_to_megatron(hf_dir: str, out: str) -> None:
    """Writes into ``<out>.tmp-<pid>`` next to ``out`` (the checkpoint, then its conversion
    record) and renames it to ``out`` when complete: a conversion that fails or is killed leaves
    no ``out`` that looks like a checkpoint (a kill may leave the temporary directory)."""
    from megatron_ease.models.qwen_vl import (
        HFCheckpoint,
        load_hf_config,
        load_hf_weights,
        model_config_from_hf,
        save_model_checkpoint,
        weight_table,
    )

    hf_config = load_hf_config(hf_dir)
    table = weight_table(hf_config.model_type)
    model_cfg = model_config_from_hf(hf_config)
    hf = HFCheckpoint(hf_dir)
    dtype = _widest_dtype({hf.dtype(name) for name in hf.names})
    _require_empty(out, "--out")
    logger.info("building %s (%d layers) in %s", hf_config.model_type, model_cfg.num_layers, dtype)
    model = _build(model_cfg, dtype)
    record = load_hf_weights(model, hf, table, progress=True)
    # Same filesystem as --out (a rename, not a copy); this process is the only writer.
    staging = f"{os.path.abspath(out).rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("writing megatron checkpoint to %s (then renamed to %s)", staging, out)
    try:
        save_model_checkpoint(model, staging)
        _write_record(staging, {"model_type": hf_config.model_type, **record})
        _publish(staging, os.path.abspath(out))
    except BaseException:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _conversion_record(ckpt_dir: str, ckpt_arg: str) -> dict:
    from megatron_ease.models.qwen_vl.hf_config import read_json_file

    for where in (ckpt_dir, ckpt_arg):
        path = os.path.join(where, CONVERSION_RECORD)
        if os.path.isfile(path):
            return read_json_file(path, "conversion record")
    return {}


def _copy_file(src: str, dst: str) -> None:
    if os.path.exists(dst) and os.path.samefile(src, dst):  # --out = --hf-config
        return
    temp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    try:
        shutil.copy2(src, temp)
        os.replace(temp, dst)  # never a cut-off config or tokenizer file under its name
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def _copy_config_files(hf_config_dir: str, out: str, skip: tuple = ()) -> None:
    for entry in sorted(os.listdir(hf_config_dir)):
        src = os.path.join(hf_config_dir, entry)
        if os.path.isfile(src) and not entry.endswith(_WEIGHT_SUFFIXES) and entry not in skip:
            _copy_file(src, os.path.join(out, entry))


def _config_source(path: str):
    """``(hf config, directory whose non-weight files go to the output or None, config file to
    write as config.json or None)`` of ``--hf-config`` / a run's ``model.hf_config``: a
    directory holding config.json, or a config file (``model.hf_config`` may name one). A
    ``config.json`` stands for its directory (an HF model's: generation config, tokenizer);
    a file of another name is the config alone."""
    from megatron_ease.models.qwen_vl import load_hf_config

    hf_config = load_hf_config(path)  # a missing or unreadable one is an error naming it
    if os.path.isdir(path):
        return hf_config, path, None
    if os.path.basename(path) == "config.json":
        return hf_config, os.path.dirname(os.path.abspath(path)), None
    return hf_config, None, path


def _run_config_of(ckpt: str):
    """The config a trainer checkpoint was saved with (its trainer_state.json), or None."""
    from megatron_ease.config import config_from_dict
    from megatron_ease.models.qwen_vl.checkpoint import resolve_checkpoint_dir, saved_run_config

    saved = saved_run_config(resolve_checkpoint_dir(ckpt))
    return config_from_dict(saved) if saved else None


def megatron_to_hf(ckpt: str, hf_config_dir: Optional[str], out: str) -> None:
    """``hf_config_dir`` None: the HF config of the run that wrote ``ckpt`` (its
    ``model.hf_config``, or one made from its model section; its tokenizer files when
    ``data.tokenizer`` is a directory)."""
    import torch

    from megatron_ease.models.qwen_vl import (
        CheckpointModelTensors,
        attention_layout,
        canonical_parameters,
        hf_config_from_model_config,
        hf_tensors,
        model_config_from_hf,
        save_hf_weights,
        weight_table,
    )

    extra_files = None  # a directory whose non-weight files go to --out too
    config_file = None  # a config file of another name, written as config.json
    made_config = False  # the config comes from the run's model section, not from a directory
    if hf_config_dir is not None:
        hf_config, extra_files, config_file = _config_source(hf_config_dir)
    else:
        run = _run_config_of(ckpt)
        if run is None:
            raise FileNotFoundError(f"{ckpt} has no trainer_state.json with its run's config "
                                    f"(a converted checkpoint?): give --hf-config, the HF model "
                                    f"directory it was converted from")
        if run.model.hf_config and os.path.exists(run.model.hf_config):
            hf_config, extra_files, config_file = _config_source(run.model.hf_config)
            logger.info("HF config: the run's model.hf_config, %s", run.model.hf_config)
        else:
            hf_config, made_config = hf_config_from_model_config(run.model), True
            logger.info("HF config: made from the run's model section (model.hf_config %r is "
                        "not here)", run.model.hf_config)
            if run.data.tokenizer and os.path.isdir(run.data.tokenizer):
                extra_files = run.data.tokenizer
    table = weight_table(hf_config.model_type)
    model_cfg = model_config_from_hf(hf_config)
    reader = CheckpointModelTensors(ckpt)
    record = _conversion_record(reader.ckpt_dir, ckpt)
    if any(name.endswith(_WEIGHT_SUFFIXES) for name in
           (os.listdir(out) if os.path.isdir(out) else [])):
        raise FileExistsError(f"--out {out} already holds weights; pass a new directory")
    # The model on the meta device says which tensors, in which shapes, the config implies.
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in
                    canonical_parameters(_build(model_cfg, torch.float32)).items()}
    reader.check_fits(expected)
    names = reader.ordered(expected)
    # Qwen3-VL's published configs give the dtype in text_config only.
    config_dtype = getattr(hf_config, "dtype", None) or getattr(
        getattr(hf_config, "text_config", None), "dtype", None)
    export = dict(table=table, layout=attention_layout(model_cfg),
                  naming=record.get("naming", table.default_naming), dtypes=record.get("dtypes"),
                  default_dtype=config_dtype if isinstance(config_dtype, torch.dtype) else None,
                  tied_copies=record.get("tied_copies"))
    shapes = ((name, torch.empty(reader.shape(name), dtype=reader.dtype(name), device="meta"))
              for name in names)
    plan = [(name, tuple(t.shape), t.dtype) for name, t in hf_tensors(shapes, **export)]
    logger.info("streaming %d tensors from %s", len(plan), reader.ckpt_dir)
    os.makedirs(out, exist_ok=True)
    save_hf_weights(hf_tensors(reader.iter_tensors(names), **export), out, plan, progress=True)
    if extra_files is not None:
        # The tokenizer directory's own config files (a full HF model's) are not this model's.
        _copy_config_files(extra_files, out, skip=("config.json", "generation_config.json")
                           if made_config else ())
    if config_file is not None:
        _copy_file(config_file, os.path.join(out, "config.json"))
    if made_config:
        # The weights' dtype (the most elements), as a published config gives it: what
        # from_pretrained(dtype="auto") and serving engines load the model in.
        sizes: dict = {}
        for _, shape, dtype in plan:
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
        weights_dtype = max(sizes, key=sizes.get)
        for config in (hf_config, getattr(hf_config, "text_config", None)):
            if config is not None:
                config.dtype = weights_dtype
    if made_config or not os.path.isfile(os.path.join(out, "config.json")):
        hf_config.save_pretrained(out)
    logger.info("wrote %s", out)


def verification_probe(model_cfg, seed: int = 0) -> dict:
    """One sample: text, an image of 4x4 merged tokens, text; ids from the config only."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    special = {model_cfg.image_token_id, model_cfg.video_token_id,
               model_cfg.vision_start_token_id, model_cfg.vision_end_token_id}

    def text(n):
        ids = []
        while len(ids) < n:
            token = int(torch.randint(0, model_cfg.vocab_size, (1,), generator=gen))
            if token not in special:
                ids.append(token)
        return ids

    v = model_cfg.vision
    grid = (1, 4 * v.spatial_merge_size, 4 * v.spatial_merge_size)
    num_image_tokens = grid[1] * grid[2] // v.spatial_merge_size ** 2
    ids = (text(8) + [model_cfg.vision_start_token_id] + [model_cfg.image_token_id] *
           num_image_tokens + [model_cfg.vision_end_token_id] + text(8))
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    return {"input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.bool),
            "pixel_values": torch.randn(grid[0] * grid[1] * grid[2], patch_dim, generator=gen),
            "image_grid_thw": torch.tensor([grid])}


def verify_passes(diff: float, logit_scale: float) -> bool:
    return diff <= VERIFY_TOLERANCE * max(1.0, logit_scale)


def _check_hf_weights(hf_dir: str) -> None:
    """An HF directory ``verify`` can load: safetensors (readable headers, every indexed shard
    there) or PyTorch ``.bin`` weights; else an error naming it (exit status 2, not the 1 of a
    logit mismatch)."""
    from megatron_ease.models.qwen_vl import HFCheckpoint

    if any(os.path.isfile(os.path.join(hf_dir, name)) for name in
           ("model.safetensors", "model.safetensors.index.json")):
        HFCheckpoint(hf_dir)
    elif not any(os.path.isfile(os.path.join(hf_dir, name)) for name in
                 ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise FileNotFoundError(f"{hf_dir}: no model weights (model.safetensors, "
                                f"model.safetensors.index.json or pytorch_model.bin)")


def verify(hf_dir: str, ckpt: str) -> tuple[float, float]:
    """(max |logit difference| between HF and the converted checkpoint, both fp32, and the
    largest |HF logit|) on the probe."""
    import gc

    import torch
    from transformers import AutoModelForImageTextToText

    from megatron_ease.models.qwen_vl import (
        load_hf_config,
        load_model_checkpoint,
        model_config_from_hf,
        resolve_checkpoint_dir,
    )

    model_cfg = model_config_from_hf(load_hf_config(hf_dir))
    _check_hf_weights(hf_dir)
    resolve_checkpoint_dir(ckpt)  # before the HF model loads: a wrong --ckpt fails at once
    probe = verification_probe(model_cfg)
    hf_model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf_model(input_ids=probe["input_ids"],
                        attention_mask=probe["attention_mask"].long(),
                        pixel_values=probe["pixel_values"],
                        image_grid_thw=probe["image_grid_thw"],
                        mm_token_type_ids=(probe["input_ids"] == model_cfg.image_token_id).int(),
                        ).logits
    del hf_model
    gc.collect()
    ours = _build(model_cfg, torch.float32)
    load_model_checkpoint(ours, ckpt)
    ours.eval()
    with torch.no_grad():
        got = ours(probe["input_ids"], attention_mask=probe["attention_mask"],
                   pixel_values=probe["pixel_values"], image_grid_thw=probe["image_grid_thw"])
    return float((got.float() - want.float()).abs().max()), float(want.float().abs().max())


def _report_verify(hf_dir: str, ckpt: str) -> int:
    diff, scale = verify(hf_dir, ckpt)
    ok = verify_passes(diff, scale)
    logger.info("verify: %s (max |logit| %.3g, tolerance %.3g)", "ok" if ok else "FAILED", scale,
                VERIFY_TOLERANCE * max(1.0, scale))
    print(f"max_abs_logit_diff={diff:.3e}", flush=True)
    return 0 if ok else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before torch is imported: the conversion runs on CPU whatever the node has.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    from megatron_ease.distributed import destroy_distributed
    from megatron_ease.models.qwen_vl import UnsupportedModelError, WeightMismatchError
    from megatron_ease.models.qwen_vl.checkpoint import AmbiguousCheckpointError
    from megatron_ease.models.qwen_vl.hf_config import UnreadableFileError

    _start_single_process()
    try:
        if args.command == "hf-to-megatron":
            hf_to_megatron(args.hf_dir, args.out)
            return _report_verify(args.hf_dir, args.out) if args.verify else 0
        if args.command == "verify":
            return _report_verify(args.hf_dir, args.ckpt)
        megatron_to_hf(args.ckpt, args.hf_config, args.out)
        return 0
    except (UnsupportedModelError, WeightMismatchError, UnreadableFileError, FileNotFoundError,
            FileExistsError, AmbiguousCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
