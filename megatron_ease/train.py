"""Training entry point: ``python -m megatron_ease.train --config X.yaml [section.key=value ...]``.

The same command runs on one CPU, under torchrun, or under srun (slurm/train_*.sh): the launcher's
environment decides the rank layout, CUDA decides nccl vs gloo. Exit status 75 means "preempted,
checkpoint saved: requeue me".
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from megatron_ease.config import ConfigError, load_config, validate_config


def configure_logging(rank: int) -> None:
    """Rank 0 logs at INFO; the other ranks only warnings and errors (a skipped sample, a
    signal), and not the library warnings every rank repeats (TE/apex missing, deprecations)
    nor megatron-core's INFO listings of every parameter: on 16 ranks each came 16 times."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if rank != 0:
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category,
                                    module=r"(megatron|torch\.distributed|transformers)\.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)

    from megatron_ease.distributed import (
        destroy_distributed,
        errors_of_all_ranks,
        initialize_distributed,
        read_launch_env,
    )

    launch = read_launch_env()
    configure_logging(launch.rank)

    from megatron_ease.training.builders import check_paths

    try:  # the same on every rank: a config error ends them all at once
        cfg = load_config(args.config, args.overrides)
        validate_config(cfg, world_size=launch.world_size)
    except (ConfigError, OSError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:  # may differ between nodes (a path mounted, or written, on some of them only)
        check_paths(cfg)
        path_error = None
    except (OSError, ValueError) as e:
        path_error = str(e)
    if path_error is not None and launch.world_size == 1:
        print(f"config error: {path_error}", file=sys.stderr)
        return 2
    from megatron_ease.training.preemption import PreemptionHandler

    # Before the process group starts (NCCL set-up can take minutes on a large job): a USR1 or
    # TERM then is kept for the first step boundary, not the default action (death, no requeue).
    preemption = PreemptionHandler()
    try:
        initialize_distributed(cfg.parallel, seed=cfg.train.seed, backend=cfg.parallel.backend)
        try:
            refused = errors_of_all_ranks(path_error, "see their paths")
            if refused:
                if launch.rank == 0:
                    print(refused, file=sys.stderr)
                return 2
            from megatron_ease.training.trainer import run

            return run(cfg, preemption)
        finally:
            destroy_distributed()
    finally:
        preemption.restore()


if __name__ == "__main__":
    raise SystemExit(main())
