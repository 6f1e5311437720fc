"""Evaluate a checkpoint on held-out shards, without training:

    python -m megatron_ease.evaluate --config examples/qwen25vl_7b_ease.yaml \\
        --checkpoint runs/qwen25vl_7b/checkpoints --samples 500 --out eval.json \\
        [--overlays 4 --plots DIR] [section.key=value ...]

The checkpoint is what ``model.init_from`` takes: a converted Hugging Face checkpoint
(``tools/convert_hf_checkpoint.py``), a trainer checkpoint directory (its ``latest``) or one of its
``iter_N``; weights only, loaded into the config's TP/PP layout whatever layout saved it. It runs
as training does, on one process or under torchrun / srun (``slurm/``): data-parallel ranks
share the samples. Greedy answers (up to ``dapo.max_response_length`` tokens) to the first
``--samples`` samples of ``data.eval_shards`` in shard order are scored by the task verifiers;
reported are accuracy, anti-prior accuracy (samples whose answer is not the language-prior one),
the share of response→image attention inside the evidence (with ``ease.layers``), and the
samples evaluated and skipped. Rank 0 prints them as one JSON line (the last line of stdout) and
writes them to ``--out``, standard JSON: a metric without samples (e.g. anti-prior accuracy on a
set that names no language prior) is ``null``, not ``NaN``. ``--overlays N`` draws the first N
samples' attention over the image (averaged over the EASE layers of every pipeline stage).

Exit status: 0, or 2 for a bad config, path or checkpoint (one ``config error`` line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from megatron_ease.config import Config
from megatron_ease.train import int_at_least


def check_eval_paths(cfg: Config, checkpoint: str) -> None:
    """What an evaluation reads, checked before anything is built: shards, tokenizer and the
    checkpoint (each error names its flag or config field)."""
    from megatron_ease.training import builders

    if not cfg.data.synthetic:
        builders.shard_files(cfg.data.eval_shards, "data.eval_shards")
        builders.check_tokenizer_name(cfg.data.tokenizer)
    builders.check_checkpoint(checkpoint, "--checkpoint")


def evaluate_checkpoint(cfg: Config, samples: Optional[int], overlays: int = 0,
                        plots_dir: Optional[str] = None) -> dict:
    """Build the policy of ``cfg`` (TP/PP as configured), load ``cfg.model.init_from`` into it
    and evaluate it; collective over the process group. Returns the metrics, with the
    checkpoint directory read and, on rank 0, the overlay files written."""
    import torch

    from megatron_ease.config import resolve_hf_config
    from megatron_ease.eval.evaluator import Evaluator, attention_maps
    from megatron_ease.models.qwen_vl import load_model_checkpoint
    from megatron_ease.training import builders

    cfg = resolve_hf_config(cfg)
    builders.ensure_synthetic_data(cfg)
    tokenizer = builders.load_tokenizer(cfg.data.tokenizer)
    builders.check_tokenizer_fits(cfg, tokenizer)
    model = builders.build_model(cfg)
    path = load_model_checkpoint(model, cfg.model.init_from)
    engine = builders.build_rollout_engine(cfg, model, tokenizer)
    evaluator = Evaluator(cfg, tokenizer, [model], engine)
    result = {"checkpoint": path, "eval_shards": cfg.data.eval_shards,
              **evaluator.evaluate(samples or cfg.eval.samples)}
    if overlays > 0:
        maps = attention_maps(evaluator, overlays)
        if torch.distributed.get_rank() == 0:
            from megatron_ease.eval.plots import plot_attention_overlays

            name = os.path.basename(os.path.normpath(path))
            result["plots"] = plot_attention_overlays({name: maps}, plots_dir or "eval_plots")
            # The numbers behind the pictures: per sample its grids of target and attention.
            result["attention_maps"] = os.path.join(plots_dir or "eval_plots",
                                                    "attention_maps.json")
            _write_json(result["attention_maps"], {name: maps})
    return result


def _write_json(path: str, payload: dict) -> None:
    from megatron_ease.training.checkpointing import write_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, _dumps(payload, indent=1))


def _dumps(payload, **kwargs) -> str:
    """Standard JSON: NaN (a metric without samples) as null; json.dumps wrote ``NaN``, which
    strict parsers (jq, JavaScript, json.loads(parse_constant=...)) refuse."""
    from megatron_ease.eval.evaluator import json_safe

    return json.dumps(json_safe(payload), allow_nan=False, **kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config (examples/*.yaml)")
    parser.add_argument("--checkpoint", required=True,
                        help="converted HF checkpoint, trainer checkpoint dir or its iter_N")
    parser.add_argument("--samples", type=int_at_least(1), default=None,
                        help="first N held-out samples (default: eval.samples)")
    parser.add_argument("--out", default=None, help="write the results JSON here (rank 0)")
    parser.add_argument("--overlays", type=int_at_least(0), default=0,
                        help="draw the attention of the first N samples (default 0: none)")
    parser.add_argument("--plots", default=None,
                        help="directory of the overlays (default: beside --out, else eval_plots)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.eval_shards=...")
    args = parser.parse_args(argv)

    from megatron_ease.distributed import destroy_distributed, initialize_distributed
    from megatron_ease.train import refused_by_any_rank, start_up

    started = start_up(args.config, [*args.overrides, f"model.init_from={args.checkpoint}"],
                       lambda cfg: check_eval_paths(cfg, args.checkpoint))
    if isinstance(started, int):
        return started
    launch, cfg, path_error = started
    if args.overlays and not cfg.ease.layers:  # refused before the evaluation, not after it
        if launch.rank == 0:
            print("config error: --overlays draws the attention of the EASE layers, and "
                  "ease.layers is empty: set ease.layers (e.g. ease.layers=[0,1]) or drop "
                  "--overlays", file=sys.stderr)
        return 2
    plots_dir = args.plots or (os.path.join(os.path.dirname(os.path.abspath(args.out)), "plots")
                               if args.out else None)
    initialize_distributed(cfg.parallel, seed=cfg.train.seed, backend=cfg.parallel.backend)
    try:
        if refused_by_any_rank(launch, path_error):
            return 2
        try:
            result = evaluate_checkpoint(cfg, args.samples, args.overlays, plots_dir)
        except (FileNotFoundError, ValueError) as e:  # e.g. a checkpoint that does not fit
            if launch.rank == 0:
                print(f"config error: {e}", file=sys.stderr)
            return 2
        if launch.rank == 0:
            if args.out:
                _write_json(args.out, result)
            print(_dumps(result), flush=True)
        return 0
    finally:
        destroy_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
