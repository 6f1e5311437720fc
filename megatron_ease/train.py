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
            refused = path_errors_of_all_ranks(path_error)
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


def path_errors_of_all_ranks(error: str | None) -> str | None:
    """Every rank's ``check_paths`` verdict, agreed over the process group: None when all ranks
    see their paths, else the ``config error`` lines for rank 0 to print, each naming the ranks
    and hosts that reported it unless all did. A rank that exited on its own error would leave
    the others waiting in the first collective until the process group's timeout."""
    import socket

    import torch.distributed as dist

    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (error, socket.gethostname()))
    failing: dict[str, list[tuple[int, str]]] = {}
    for rank, (message, host) in enumerate(reports):
        if message is not None:
            failing.setdefault(message, []).append((rank, host))
    lines = []
    for message, where in failing.items():
        if len(where) == len(reports):
            lines.append(f"config error: {message}")
            continue
        ranks = ", ".join(str(rank) for rank, _ in where)
        hosts = ", ".join(sorted({host for _, host in where}))
        lines.append(f"config error on rank{'s' if len(where) > 1 else ''} {ranks} "
                     f"(host {hosts}; the other ranks see their paths): {message}")
    return "\n".join(lines) or None


if __name__ == "__main__":
    raise SystemExit(main())
