"""The CPU demo (README main job): DAPO + EASE against DAPO alone on a synthetic evidence task.

    python -m megatron_ease.demo --out DIR

1. Writes the synthetic evidence dataset and its tiny tokenizer under ``DIR/data``: by default
   (``--data object_colour``) one coloured shape per image and "What color is the object?",
   colours uniform, the object's box as evidence; ``--data mixed`` is the harder set of colour /
   count / existence questions about one shape kind with a 60% language prior.
2. Builds the tiny Qwen2.5-VL-architecture model of ``examples/tiny_cpu_ease.yaml`` (vision tower
   included), gives it one supervised warm start, saved and shared by both arms.
3. Trains DAPO + EASE and, with the same seed, data order and warm start, DAPO alone (the same
   EASE-capturing layers record attention, with λ = 0).
4. Evaluates both on held-out samples: accuracy, anti-prior accuracy (samples whose answer is not
   the language-prior one) and the share of response→image attention inside the evidence.
5. Writes ``DIR/summary.json``, the metrics files, ``DIR/plots/curves.png`` and attention
   overlays ``DIR/plots/attention_*.png``, and prints a comparison table.

The arguments that determine the results are recorded in ``DIR/demo_args.json``: a rerun into
``DIR`` with the same ones continues it (a killed demo resumes its warm start and arms), one with
other ones is refused (use another ``--out``, or delete ``DIR``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from megatron_ease.config import load_config
from megatron_ease.eval.evaluator import attention_maps, json_safe
from megatron_ease.eval.plots import plot_attention_overlays
from megatron_ease.train import int_at_least

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "examples", "tiny_cpu_ease.yaml")
# The demo's recipe on top of the config, for both arms (command-line overrides come after it).
# Measured on 2 CPU cores (README, "The demo"): at the config's lr 1e-4 nothing moves in the
# demo's budget; at 1e-3 arms often stopped early (a policy near-deterministic on most prompts
# leaves dynamic sampling too few mixed groups); at 3e-4 EASE takes attention onto the evidence
# within ~25 steps. dapo.max_gen_batches 16, not the config's 8: at 8, two arms of 12 stopped at
# step 146 of 150 from success (most prompts answered right by all 8 rollouts leave few mixed
# groups); an arm that never needs more than 8 generation batches a step runs unchanged.
RECIPE = ["train.lr=3e-4", "dapo.max_gen_batches=16"]
# The datasets of --data (README, "The demo"). object_colour: the tiny model must find the one
# visual token that holds the object and read its colour; the object fills its 28 px slot, so
# that token is the colour (with 14-28 px objects, measured until 2026-12-04, EASE moved the
# attention in every run but the colour was read in 2 of 9 runs only). From a blind warm start
# (60 steps of supervised answers leave it guessing), EASE takes the attention onto the object
# within ~30 RL steps and the policy reads the colour; DAPO alone finds it later, or not.
DATASETS = {"object_colour": dict(task_weights=(0.0, 0.0, 0.0, 1.0), prior_bias=0.2,
                                  min_object_size=28),
            "mixed": {}}


# The file under --out that records the arguments its results were made with (bug: a rerun with
# other ones used to resume the old warm start and arms, train nothing, and report the new ones).
RUN_ARGS = "demo_args.json"
# The arguments that determine the results, as their command-line flags.
RESULT_ARGS = {"data": "--data", "train_samples": "--train-samples",
               "eval_samples": "--eval-samples", "warm_start_steps": "--warm-start-steps",
               "rl_steps": "--rl-steps", "seed": "--seed", "overrides": "overrides"}


def run_args(args) -> dict:
    """The arguments that determine the demo's results (the recipe included, with the overrides)."""
    values = {key: getattr(args, key) for key in RESULT_ARGS if key != "overrides"}
    values["overrides"] = [*RECIPE, *args.overrides]
    return json.loads(json.dumps(values))


def check_run_args(args) -> None:
    """Record the result-determining arguments in ``--out/demo_args.json`` on first use; on a
    rerun with the same ones the warm start and arms resume (a killed demo continues), with other
    ones it is an error: the old checkpoints would be resumed and nothing trained."""
    path = os.path.join(args.out, RUN_ARGS)
    current = run_args(args)
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
        keys = [*RESULT_ARGS, *sorted(set(recorded) - set(RESULT_ARGS))]
        differing = [f"{RESULT_ARGS.get(key, key)} (was {recorded.get(key)!r}, now "
                     f"{current.get(key)!r})"
                     for key in keys if recorded.get(key) != current.get(key)]
        if differing:
            raise SystemExit(
                f"[demo] {args.out} holds the results of a demo run with other arguments: "
                f"{'; '.join(differing)}. Rerunning would resume its warm start and arms instead "
                f"of training with the new arguments: use another --out, or delete {args.out}.")
        return
    earlier = [sub for sub in ("warm_start", "runs", "summary.json")
               if os.path.exists(os.path.join(args.out, sub))]
    if earlier:
        raise SystemExit(
            f"[demo] {args.out} holds the results of an earlier demo run ({', '.join(earlier)}) "
            f"whose arguments were not recorded ({RUN_ARGS} is missing), so a rerun could resume "
            f"them with other arguments: use another --out, or delete {args.out}.")
    os.makedirs(args.out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(current, f, indent=1)
    os.replace(path + ".tmp", path)


def arm_overrides(args, data_dir: str, name: str, ease: bool, init_from: str) -> list[str]:
    run_dir = os.path.join(args.out, "runs", name)
    return [f"data.train_shards={data_dir}/train/*.tar", f"data.eval_shards={data_dir}/eval/*.tar",
            f"data.tokenizer={data_dir}/tokenizer", "data.synthetic=false",
            f"logging.run_dir={run_dir}", f"checkpoint.dir={run_dir}/checkpoints",
            "checkpoint.interval=0", f"train.steps={args.rl_steps}", f"train.seed={args.seed}",
            f"ease.enabled={'true' if ease else 'false'}", f"model.init_from={init_from}",
            f"train.warm_start_steps={args.warm_start_steps}", *RECIPE, *args.overrides]


def check_configs(args, data_dir: str) -> None:
    """Validate both arms' configs before anything is written or trained, as the training CLI
    does (a bad override, e.g. train.micro_batch_size=3, ran or failed deep inside)."""
    from megatron_ease.config import ConfigError, validate_config

    for name, ease in (("dapo_ease", True), ("dapo", False)):
        try:
            validate_config(load_config(CONFIG, arm_overrides(args, data_dir, name, ease, "null")),
                            world_size=1)
        except ConfigError as e:
            raise SystemExit(f"[demo] config error: {e}") from None


def warm_start(args, data_dir: str) -> str:
    """The shared supervised warm start; returns its checkpoint directory (reused when done:
    ``check_run_args`` has made sure it was made with the same arguments)."""
    from megatron_ease.training.checkpointing import CheckpointManager, latest_checkpoint
    from megatron_ease.training.trainer import Trainer

    ckpt = os.path.join(args.out, "warm_start")
    if latest_checkpoint(ckpt):
        return ckpt
    overrides = arm_overrides(args, data_dir, "warm_start", True, "null")
    trainer = Trainer(load_config(CONFIG, overrides + ["checkpoint.resume=false"]))
    _seed(args.seed)
    trainer.warm_start()
    CheckpointManager(ckpt, keep_last=1).save(0, trainer.model_chunks)
    trainer.metrics.close()
    return ckpt


def run_arm(args, data_dir: str, name: str, ease: bool, init_from: str) -> dict:
    from megatron_ease.rl.dynamic_sampling import DynamicSamplingError
    from megatron_ease.training.trainer import Trainer

    cfg = load_config(CONFIG, arm_overrides(args, data_dir, name, ease, init_from))
    _seed(args.seed)
    trainer = Trainer(cfg)
    stopped_at = None
    try:
        status = trainer.train()
    except DynamicSamplingError as e:
        # An arm whose dynamic sampling found too few mixed groups (prompts whose rollouts are
        # neither all right nor all wrong) within dapo.max_gen_batches cannot go on; the
        # comparison still stands at the step it reached, and the summary says so.
        stopped_at = trainer.step
        print(f"[demo] RL arm {name} stopped at step {trainer.step}: {e}", file=sys.stderr)
        status = 0
    if status != 0:
        raise SystemExit(status)
    result = trainer.evaluate(max_samples=args.eval_samples)
    if stopped_at is not None:
        result["stopped_early_at_step"] = stopped_at
    if not trainer.metrics.has_record(trainer.step, "eval"):  # a re-run of a finished arm
        trainer.metrics.log(trainer.step, result, prefix="eval")
    overlays = attention_maps(trainer, args.overlay_samples)
    trainer.metrics.close()
    return {"eval": result, "overlays": overlays, "run_dir": cfg.logging.run_dir}


def _seed(seed: int) -> None:
    from megatron_ease.distributed import model_parallel_seed

    model_parallel_seed(seed)


@torch.no_grad()
def plot(args, arms: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = os.path.join(args.out, "plots")
    os.makedirs(plots, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for name, arm in arms.items():
        records = [json.loads(line) for line in open(os.path.join(arm["run_dir"], "metrics.jsonl"))]
        train = [r for r in records if r["split"] == "train"]
        steps = [r["step"] for r in train]
        # Reward and accuracy over every generated rollout: the training batch's own (mixed
        # groups only) stay within [1/G, 1 - 1/G] whatever the policy does.
        for ax, (key, title) in zip(axes, (
                ("generated_reward", "reward (all generated rollouts)"),
                ("generated_accuracy", "accuracy (all generated rollouts)"),
                ("attn_in_evidence", "attention in evidence"),
                ("entropy", "policy entropy (nats / response token)"))):
            ax.plot(steps, [r.get(key, np.nan) for r in train], label=name)
            ax.set_title(title)
            ax.set_xlabel("RL step")
    axes[0].legend()
    fig.tight_layout()
    path = os.path.join(plots, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    written += plot_attention_overlays({name: arm["overlays"] for name, arm in arms.items()},
                                       plots)
    return written


def verdict(summary: dict, rl_steps: int, eval_samples: int) -> str:
    """One plain sentence on what EASE changed, attention in evidence and held-out accuracy.

    Differences within ±0.01 of attention mass, or within two binomial standard errors of
    accuracy on the held-out samples, are called no change."""
    ease, dapo = summary["ease"], summary["dapo"]

    def word(delta: float, noise: float) -> str:
        return "raised" if delta > noise else "lowered" if delta < -noise else "did not change"

    d_attention = (ease.get("evidence_attention_mass", 0.0)
                   - dapo.get("evidence_attention_mass", 0.0))
    d_accuracy = ease.get("accuracy", 0.0) - dapo.get("accuracy", 0.0)
    p = (ease.get("accuracy", 0.0) + dapo.get("accuracy", 0.0)) / 2
    noise = 2 * (2 * p * (1 - p) / max(1, eval_samples)) ** 0.5
    text = (f"EASE {word(d_attention, 0.01)} attention in evidence ({d_attention:+.3f}) and "
            f"{word(d_accuracy, noise)} held-out accuracy ({d_accuracy:+.3f}) relative to DAPO "
            f"alone after {rl_steps} RL steps")
    for name, arm in (("DAPO+EASE", ease), ("DAPO", dapo)):
        if "stopped_early_at_step" in arm:
            text += (f"; the {name} arm stopped at step {arm['stopped_early_at_step']} (dynamic "
                     f"sampling found too few mixed groups within dapo.max_gen_batches)")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True,
                        help="output directory; an existing one is continued only when it was "
                             f"made with the same arguments ({RUN_ARGS})")
    # At least 1: with 0 held-out samples the demo trained both arms (minutes) and then failed
    # to evaluate them (no eval shard); 0 also meant eval.samples (64) to the evaluator.
    parser.add_argument("--train-samples", type=int_at_least(1), default=2000)
    parser.add_argument("--eval-samples", type=int_at_least(1), default=500)
    parser.add_argument("--warm-start-steps", type=int, default=60)
    parser.add_argument("--rl-steps", type=int, default=150)
    parser.add_argument("--data", choices=list(DATASETS), default="object_colour",
                        help="synthetic task set (see the module doc)")
    parser.add_argument("--overlay-samples", type=int_at_least(0), default=4,
                        help="held-out samples drawn as attention overlays (0: none)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides for both arms")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from megatron_ease.data.synthetic import SyntheticConfig, write_synthetic_dataset
    from megatron_ease.distributed import (
        LaunchEnv,
        destroy_distributed,
        find_free_port,
        init_process_group,
        initialize_model_parallel,
    )

    data_dir = os.path.join(args.out, "data")
    check_configs(args, data_dir)
    os.makedirs(args.out, exist_ok=True)
    check_run_args(args)
    print(f"[demo] synthetic evidence dataset ({args.data}) -> {data_dir}", file=sys.stderr)
    write_synthetic_dataset(data_dir, args.train_samples, args.eval_samples, seed=0,
                            config=SyntheticConfig(**DATASETS[args.data]))
    init_process_group(LaunchEnv(0, 1, 0, "127.0.0.1", find_free_port(), "single"), "gloo")
    initialize_model_parallel(seed=args.seed)
    try:
        print(f"[demo] supervised warm start ({args.warm_start_steps} steps)", file=sys.stderr)
        init = warm_start(args, data_dir)
        arms = {}
        for name, ease in (("dapo_ease", True), ("dapo", False)):
            print(f"[demo] RL arm {name}: {args.rl_steps} steps", file=sys.stderr)
            arms[name] = run_arm(args, data_dir, name, ease, init)
    finally:
        destroy_distributed()
    plots = plot(args, arms)
    summary = {"ease": arms["dapo_ease"]["eval"], "dapo": arms["dapo"]["eval"],
               "rl_steps": args.rl_steps, "warm_start_steps": args.warm_start_steps,
               "seed": args.seed, "data": args.data, "overrides": [*RECIPE, *args.overrides],
               "plots": plots}
    summary["verdict"] = verdict(summary, args.rl_steps, args.eval_samples)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        # Standard JSON: a metric without samples (NaN) is null, not NaN.
        json.dump(json_safe(summary), f, indent=1, allow_nan=False)
    print(f"\n{'metric':<28}{'DAPO+EASE':>12}{'DAPO':>12}")
    for key in ("accuracy", "anti_prior_accuracy", "evidence_attention_mass", "eval_samples"):
        a, b = summary["ease"].get(key, float("nan")), summary["dapo"].get(key, float("nan"))
        print(f"{key:<28}{a:>12.4f}{b:>12.4f}" if key != "eval_samples"
              else f"{key:<28}{a:>12d}{b:>12d}")
    print(f"\n{summary['verdict']}\nsummary: {os.path.join(args.out, 'summary.json')}; "
          f"plots: {os.path.join(args.out, 'plots')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
