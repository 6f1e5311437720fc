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
from typing import Optional, Union

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


def int_at_least(minimum: int):
    """An argparse ``type``: an int of at least ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its error: "invalid int value: 'x'"
    return parse


def start_up(config: str, overrides: list[str], check_paths) -> Union[int, tuple]:
    """The CLIs' start, before the process group: the launch environment, logging, the config
    (loaded and validated: the same on every rank, so an error ends them all at once) and this
    rank's ``check_paths(cfg)`` (which may differ between nodes: a path mounted, or written, on
    some of them only). Returns ``(launch, cfg, path_error)``, or exit status 2 after a one-line
    ``config error`` (a single process refuses a path error here too)."""
    from megatron_ease.distributed import read_launch_env

    launch = read_launch_env()
    configure_logging(launch.rank)
    try:
        cfg = load_config(config, overrides)
        validate_config(cfg, world_size=launch.world_size)
    except (ConfigError, OSError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        check_paths(cfg)
        path_error = None
    except (OSError, ValueError) as e:
        path_error = str(e)
    if path_error is not None and launch.world_size == 1:
        print(f"config error: {path_error}", file=sys.stderr)
        return 2
    return launch, cfg, path_error


def refused_by_any_rank(launch, path_error: Optional[str]) -> bool:
    """Once the process group is up: whether any rank's path check failed (rank 0 prints the
    errors with the ranks and hosts that had them; ``distributed.errors_of_all_ranks``)."""
    from megatron_ease.distributed import errors_of_all_ranks

    refused = errors_of_all_ranks(path_error, "see their paths")
    if refused and launch.rank == 0:
        print(refused, file=sys.stderr)
    return refused is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)

    from megatron_ease.distributed import destroy_distributed, initialize_distributed
    from megatron_ease.training.builders import check_paths

    started = start_up(args.config, args.overrides, check_paths)
    if isinstance(started, int):
        return started
    launch, cfg, path_error = started
    from megatron_ease.training.preemption import PreemptionHandler

    # Before the process group starts (NCCL set-up can take minutes on a large job): a USR1 or
    # TERM then is kept for the first step boundary, not the default action (death, no requeue).
    preemption = PreemptionHandler()
    try:
        try:
            # Inside: a start that fails after the default group is up (megatron-core's groups,
            # NCCL) still tears it down.
            initialize_distributed(cfg.parallel, seed=cfg.train.seed,
                                   backend=cfg.parallel.backend)
            if refused_by_any_rank(launch, path_error):
                return 2
            from megatron_ease.training.trainer import run

            return run(cfg, preemption)
        finally:
            destroy_distributed()
    finally:
        preemption.restore()


if __name__ == "__main__":
    raise SystemExit(main())
