"""Launcher environment -> rank/world/master, for torchrun, Slurm and a lone process."""

import pytest

from megatron_ease.distributed import expand_hostlist, port_from_job_id, read_launch_env


@pytest.mark.parametrize("hostlist, expected", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("login1,node[1-2]", ["login1", "node1", "node2"]),
    ("gpu-a[1-2]-b[3,5]", ["gpu-a1-b3", "gpu-a1-b5", "gpu-a2-b3", "gpu-a2-b5"]),
    ("a[009-011],b", ["a009", "a010", "a011", "b"]),
    ("dgx-[001-002],dgx-100", ["dgx-001", "dgx-002", "dgx-100"]),
])
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("bad", ["node[01-03", "node01]", "node[3-1]", "node[a-b]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(bad)


def test_torchrun_env_mapping():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
           "MASTER_PORT": "29511", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (5, 16, 1)
    assert (launch.master_addr, launch.master_port, launch.launcher) == ("10.0.0.2", 29511,
                                                                          "torchrun")


def test_slurm_env_mapping_first_host_is_master_and_port_from_job_id():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (9, 16, 1)
    assert launch.master_addr == "gpu07"
    assert launch.master_port == port_from_job_id("123456")
    assert launch.launcher == "slurm"
    # Every task of the job derives the same port; another job gets another.
    assert port_from_job_id("123456") == port_from_job_id(123456) != port_from_job_id("123457")
    # never in Linux's default ephemeral range (32768-60999), whatever the job id
    assert all(1024 < port_from_job_id(j) < 32768 for j in (0, 19999, 20000, 12345678))
    assert 1024 < launch.master_port < 65536


def test_slurm_env_explicit_master_wins():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_JOB_ID": "7", "MASTER_ADDR": "head", "MASTER_PORT": "30000", "SLURM_STEP_ID": "0"}
    launch = read_launch_env(env)
    assert (launch.master_addr, launch.master_port) == ("head", 30000)


def test_an_srun_step_on_some_of_the_allocations_nodes_meets_on_its_own_first_node():
    """``salloc -N4`` then ``srun -w n[3-4]``: rank 0 runs on n3, and the rendezvous waited on
    n1 (the allocation's first node) until the timeout; the step's task count is the world."""
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n[3-4]",
           "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "2"}
    launch = read_launch_env(env)
    assert (launch.master_addr, launch.world_size, launch.rank) == ("n3", 2, 1)


@pytest.mark.parametrize("port", ["", "abc", "70000", "0"])
def test_a_master_port_that_is_no_port_is_named(port):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": port}
    if port == "":  # unset in effect: torchrun's default
        assert read_launch_env(env).master_port == 29500
        assert read_launch_env({"MASTER_PORT": ""}).master_port > 0
        return
    for environ in (env, {"MASTER_PORT": port}):
        with pytest.raises(RuntimeError, match=f"MASTER_PORT='{port}' is not a TCP port"):
            read_launch_env(environ)


def test_slurm_env_without_nodelist_is_a_clear_error():
    with pytest.raises(RuntimeError, match="SLURM_JOB_NODELIST"):
        read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1",
                         "SLURM_STEP_ID": "3"})


def test_a_slurm_batch_scripts_own_shell_is_one_process():
    """sbatch --ntasks=16's batch shell has SLURM_PROCID=0 and SLURM_NTASKS=16 but no step id
    (measured on Slurm here): a tool run there directly (the converter) was refused as a
    16-rank launch, a trainer would have waited for 15 ranks that never come."""
    launch = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0",
                              "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "5"})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")


def test_single_process_env():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")
    assert launch.master_port > 0


def test_model_parallel_seed_seeds_the_cpu_generators_on_gpu_nodes_too(monkeypatch):
    """On a GPU node megatron-core's seeding touches CUDA generators only; the CPU ones (the HF
    vision tower's init, Python's and numpy's) follow ``train.seed`` too."""
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    from megatron_ease.distributed import model_parallel_seed

    seeded = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", seeded.append)
    draws = []
    for _ in range(2):
        model_parallel_seed(7)
        draws.append((torch.rand(3), random.random(), np.random.rand()))
    assert seeded == [7, 7]
    assert torch.equal(draws[0][0], torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1:] == draws[1][1:]


def test_gloo_with_gpus_visible_is_refused_before_anything_starts(monkeypatch):
    """gloo on a GPU node: the model is built on the GPU and megatron-core's CUDA-tensor
    collectives (gradient reduce-scatter, pipeline p2p) fail deep inside the first step."""
    import torch

    from megatron_ease.distributed import LaunchEnv, init_process_group

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    started = []
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: started.append(k))
    with pytest.raises(ValueError, match="parallel.backend=gloo with GPUs visible"):
        init_process_group(LaunchEnv(0, 2, 0, "127.0.0.1", 1234, "torchrun"), backend="gloo")
    assert not started


def test_a_gpu_node_with_a_torch_that_cannot_use_its_gpus_is_refused(monkeypatch):
    """A CPU-only torch (or a too-old driver) on a GPU node picked gloo and trained on the CPU
    without a word; hiding the GPUs or asking for gloo still runs on the CPU."""
    import os

    import torch

    from megatron_ease import distributed

    real_exists = os.path.exists
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.os.path, "exists",
                        lambda p: p == "/dev/nvidiactl" or real_exists(p))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(RuntimeError, match="has NVIDIA GPUs but torch .* cannot use them"):
        distributed.default_backend()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES="):
        distributed.default_backend()
    for hidden in ("", "-1", "none", "NoDevFiles"):  # the usual ways of hiding every GPU
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert distributed.default_backend() == "gloo"
    monkeypatch.setattr(distributed.os.path, "exists", lambda p: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert distributed.default_backend() == "gloo"  # a CPU machine


def test_nccl_process_group_is_bound_to_the_local_gpu(monkeypatch):
    import torch

    from megatron_ease.distributed import LaunchEnv, init_process_group

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    started = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: started.append(k))
    init_process_group(LaunchEnv(6, 8, 6, "127.0.0.1", 1234, "torchrun"), backend="nccl")
    assert current == [torch.device("cuda", 2)]
    assert started[0]["device_id"] == torch.device("cuda", 2) and started[0]["backend"] == "nccl"


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_logs_info_and_library_warnings(rank, monkeypatch):
    import logging
    import warnings

    from megatron_ease.train import configure_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # basicConfig configures an unconfigured root
    monkeypatch.setattr(root, "level", root.level)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_logging(rank)
        for module in ("megatron.core.optimizer", "torch.distributed.checkpoint",
                       "megatron_ease.data.reader"):
            warnings.warn_explicit(f"Apex is not installed ({module})", UserWarning, "x.py", 1,
                                   module=module)
    assert root.level == (logging.INFO if rank == 0 else logging.WARNING)
    # Our own warnings on every rank; the libraries' on rank 0 only.
    want = ["megatron.core.optimizer", "torch.distributed.checkpoint"] if rank == 0 else []
    assert sorted(str(w.message) for w in caught) == sorted(
        f"Apex is not installed ({module})" for module in want + ["megatron_ease.data.reader"])
