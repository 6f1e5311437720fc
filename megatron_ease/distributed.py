"""Process-group runtime: launcher env (torchrun / Slurm / single process) -> torch.distributed
(nccl on GPUs, gloo on CPU) -> megatron-core ``parallel_state``.

One code path for every launcher and backend; the layout (TP, PP, VPP, CP, DP derived) is built
once here from the ``parallel`` config and then read through ``parallel_state``.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


_HOST_RANGE = re.compile(r"\[([^\]]*)\]")


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets: ``a[1,2],b`` -> ``["a[1,2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm hostlist {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm hostlist {text!r}")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_range_list(spec: str, hostlist: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]``, keeping zero padding as Slurm does."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {item!r} in Slurm hostlist {hostlist!r}")
            width = len(lo)
            out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
        elif item.isdigit():
            out.append(item)
        else:
            raise ValueError(f"bad range item {item!r} in Slurm hostlist {hostlist!r}")
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist (``SLURM_JOB_NODELIST``) into host names, in order.

    Supports comma-separated hosts, bracketed ranges with zero padding and several bracket groups
    in one name (expanded as a product, leftmost slowest): ``node[01-03,07]``,
    ``gpu-a[1-2]-b[3,5]``, ``login1,node[1-2]``.
    """
    hosts: list[str] = []
    for token in _split_top_level(hostlist):
        expansions = [""]
        pos = 0
        for m in _HOST_RANGE.finditer(token):
            prefix = token[pos:m.start()]
            choices = _expand_range_list(m.group(1), hostlist)
            expansions = [e + prefix + c for e in expansions for c in choices]
            pos = m.end()
        hosts.extend(e + token[pos:] for e in expansions)
    return hosts


def port_from_job_id(job_id: str | int, base: int = 12000, span: int = 20000) -> int:
    """A master port every task of a Slurm job derives alike, different for concurrent jobs.

    12000-31999: below Linux's default ephemeral range (32768-60999), where outgoing
    connections of any process on the master node could already hold the port."""
    return base + int(job_id) % span


def find_free_port() -> int:
    """A free TCP port on this host (``--master_port 0`` does not work for torchrun rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """torchrun's variables win; else Slurm's (a task of ``srun``, one per GPU); else one process
    (also a Slurm batch script's shell, e.g. running tools/convert_hf_checkpoint.py)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_port(env.get("MASTER_PORT") or "29500"),
            launcher="torchrun",
        )
    # A task of an srun step only: a batch script's own shell also has SLURM_PROCID=0 and
    # SLURM_NTASKS (the job's task count), but no step id, and runs as one process (measured).
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # The step's nodes: rank 0 runs on the first of them, which is not the allocation's
        # first node when srun runs on some of them (srun -w / -r).
        nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST")
                    or env.get("SLURM_JOB_NODELIST"))
        if not nodelist:
            raise RuntimeError("Slurm task without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: "
                               "cannot find the master host")
        if env.get("MASTER_PORT"):
            port = _port(env["MASTER_PORT"])
        elif "SLURM_JOB_ID" in env:
            port = port_from_job_id(env["SLURM_JOB_ID"])
        else:
            raise RuntimeError("Slurm task without SLURM_JOB_ID or MASTER_PORT: cannot pick a port")
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            # The step's task count (SLURM_NTASKS may be the allocation's, kept by --preserve-env).
            world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
            master_port=port,
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1",
                     _port(env["MASTER_PORT"]) if env.get("MASTER_PORT") else find_free_port(),
                     "single")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise RuntimeError(f"MASTER_PORT={text!r} is not a TCP port (1-65535)")
    return port


def _tcp_init_method(master_addr: str, master_port: int) -> str:
    """``tcp://host:port`` for torch.distributed, an IPv6 literal in brackets (``tcp://[::1]:29500``):
    unbracketed, torch split ``::1:29500`` at its first colon and failed on the "port"."""
    host = master_addr.strip()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{master_port}"


def default_backend() -> str:
    """nccl when torch can use a GPU, else gloo on the CPU. A node that has NVIDIA GPUs that
    this torch cannot use (a CPU-only wheel, a driver too old for its CUDA) is refused: gloo
    would "train" an 8B model on the CPU without a word. Hiding the GPUs
    (``CUDA_VISIBLE_DEVICES=``) or ``parallel.backend=gloo`` asks for the CPU explicitly."""
    if torch.cuda.is_available():
        return "nccl"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = visible is not None and (visible.strip() in ("", "none", "void", "NoDevFiles")
                                      or visible.strip().startswith("-"))
    if not hidden and os.path.exists("/dev/nvidiactl"):
        raise RuntimeError(
            f"this node has NVIDIA GPUs but torch {torch.__version__} cannot use them "
            f"(built for CUDA {torch.version.cuda}; a CPU-only wheel says None, else the "
            f"driver may be too old for it): install a CUDA build of torch, or hide the GPUs "
            f"(CUDA_VISIBLE_DEVICES=) / set parallel.backend=gloo to run on the CPU")
    return "gloo"


def init_process_group(launch: Optional[LaunchEnv] = None, backend: Optional[str] = None,
                       timeout_minutes: float = 10.0) -> LaunchEnv:
    """Start torch.distributed for this process. A dead peer ends the job after the timeout."""
    launch = launch or read_launch_env()
    backend = backend or default_backend()
    if backend == "gloo" and launch.world_size > 1 and torch.cuda.is_available():
        raise ValueError(
            "parallel.backend=gloo with GPUs visible: the model is built on the GPU, and "
            "megatron-core's gradient and pipeline collectives on CUDA tensors need NCCL. Use "
            "parallel.backend=nccl (the default with GPUs), or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=) to run on the CPU")
    device_id = None
    if backend == "nccl" and not torch.cuda.is_available():
        # Else a modulo by a device count of 0 ended the start with a bare ZeroDivisionError.
        raise RuntimeError(
            f"parallel.backend=nccl but torch sees no usable GPU (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, torch {torch.__version__} "
            f"built for CUDA {torch.version.cuda}): NCCL needs one GPU per rank. Run on GPUs, or "
            f"leave parallel.backend unset / set parallel.backend=gloo for the CPU")
    if backend == "nccl":
        device_id = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device_id)
    else:
        from megatron_ease.cpu_shims import apply_cpu_shims

        apply_cpu_shims()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            init_method=_tcp_init_method(launch.master_addr, launch.master_port),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            # Bound to its GPU: NCCL connects at start (a bad NIC or topology fails here, not in
            # the first collective) and barriers need not guess the device.
            **({"device_id": device_id} if device_id is not None else {}),
        )
    return launch


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: Optional[int] = None,
                              context_parallel_size: int = 1,
                              seed: int = 1234,
                              timeout_minutes: Optional[float] = None) -> None:
    """megatron-core's process groups for TP/PP/VPP/CP (DP derived), and seeded RNG streams.

    ``timeout_minutes``: how long a collective on those groups waits for a dead peer (the
    default group's ``parallel.timeout_minutes``; None: megatron-core's own default, 30).
    Training's collectives run on these groups, not on the default one."""
    from megatron.core import parallel_state

    world = torch.distributed.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) x pipeline_model_parallel_size "
            f"({pipeline_model_parallel_size}) x context_parallel_size ({context_parallel_size})")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        **({"distributed_timeout_minutes": timeout_minutes} if timeout_minutes is not None else {}),
    )
    model_parallel_seed(seed)


def model_parallel_seed(seed: int) -> None:
    """Seed the default and per-TP-rank RNG streams the way megatron-core does, and Python's,
    numpy's and torch's CPU generators as Megatron-LM's ``_set_random_seed`` does (the HF vision
    tower is initialised on the CPU, also on GPU nodes, and its TP replicas must agree)."""
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    from megatron_ease.cpu_shims import install_cpu_rng_tracker

    install_cpu_rng_tracker(seed, tp_rank=parallel_state.get_tensor_model_parallel_rank())


def initialize_distributed(parallel, seed: int = 1234, backend: Optional[str] = None,
                           launch: Optional[LaunchEnv] = None) -> LaunchEnv:
    """Everything a training process needs before building the model, from the ``parallel`` config."""
    launch = init_process_group(launch, backend, parallel.timeout_minutes)
    initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        seed=seed,
        timeout_minutes=parallel.timeout_minutes,
    )
    if launch.rank == 0:
        from megatron.core import parallel_state

        logger.info(
            "distributed: %s backend=%s world=%d tp=%d pp=%d cp=%d dp=%d", launch.launcher,
            torch.distributed.get_backend(), launch.world_size,
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_data_parallel_world_size())
    return launch


def data_parallel_layout():
    """``(rank, size, group, is_logging_rank)`` of this process's data-parallel replica, for the
    trainer and the evaluator: ``group`` is None at DP = 1 (no collective to run), the logging
    rank is global rank 0."""
    from megatron.core import parallel_state as ps

    rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    return (rank, size, ps.get_data_parallel_group() if size > 1 else None,
            torch.distributed.get_rank() == 0)


def collective_device(group=None) -> torch.device:
    """Where a tensor must live for a collective on ``group``: NCCL reduces CUDA tensors only,
    gloo CPU ones (the trainer's bookkeeping tensors are built on the CPU)."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, group=None,
                op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` in place over ``group`` whatever its device (a CPU tensor takes a
    round trip through the GPU under NCCL); returns it."""
    device = collective_device(group)
    if tensor.device == device:
        torch.distributed.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(device)
    torch.distributed.all_reduce(moved, op=op, group=group)
    return tensor.copy_(moved)


def errors_of_all_ranks(error: Optional[str], others: str = "passed") -> Optional[str]:
    """Every rank's verdict of a start-up check that may differ between nodes (a path mounted on
    some only), agreed over the default process group: None when no rank has an ``error``, else
    the ``config error`` lines for rank 0 to print, each naming the ranks and hosts that
    reported it unless all did (``others``: what the other ranks did, for the message). A rank
    that exited on its own error would leave the others waiting in their first collective
    until the process group's timeout."""
    reports = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reports, (error, socket.gethostname()))
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
                     f"(host {hosts}; the other ranks {others}): {message}")
    return "\n".join(lines) or None


def destroy_distributed() -> None:
    """Tear down megatron-core groups and the default group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _self_check(argv=None) -> int:
    """``python -m megatron_ease.distributed [--tensor-model-parallel-size N]
    [--pipeline-model-parallel-size N]``: start the runtime, all-reduce, report.

    A launcher smoke test (torchrun, srun, or one process): every rank prints one line with its
    place in the layout; rank 0 prints ``world=<n> allreduce_ok``.
    """
    import argparse

    from megatron.core import parallel_state

    parser = argparse.ArgumentParser(description=_self_check.__doc__.split("\n\n")[0])
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    args = parser.parse_args(argv)
    launch = init_process_group(timeout_minutes=2)
    initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              timeout_minutes=2)
    total = all_reduce_(torch.tensor([float(launch.rank)]))
    ok = total.item() == launch.world_size * (launch.world_size - 1) / 2
    print(f"rank={launch.rank} local_rank={launch.local_rank} launcher={launch.launcher} "
          f"backend={torch.distributed.get_backend()} master={launch.master_addr}:"
          f"{launch.master_port} tp_rank={parallel_state.get_tensor_model_parallel_rank()} "
          f"pp_rank={parallel_state.get_pipeline_model_parallel_rank()} "
          f"dp_rank={parallel_state.get_data_parallel_rank()}", flush=True)
    if launch.rank == 0:
        print(f"world={launch.world_size} {'allreduce_ok' if ok else 'allreduce_FAILED'}",
              flush=True)
    destroy_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(_self_check())
