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


def _recorded_starts(monkeypatch) -> list:
    """torch.distributed's process-group start replaced by a record of its keyword arguments
    (nothing is initialised yet); the list fills as ``init_process_group`` starts one."""
    import torch

    started = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: started.append(k))
    return started


def test_gloo_with_gpus_visible_is_refused_before_anything_starts(monkeypatch):
    """gloo on a GPU node: the model is built on the GPU and megatron-core's CUDA-tensor
    collectives (gradient reduce-scatter, pipeline p2p) fail deep inside the first step."""
    import torch

    from megatron_ease.distributed import LaunchEnv, init_process_group

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    started = _recorded_starts(monkeypatch)
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
    started = _recorded_starts(monkeypatch)
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


def test_an_ipv6_master_address_is_bracketed_in_the_rendezvous_url():
    """``MASTER_ADDR=::1`` (torchrun --master-addr, an IPv6-only cluster): torch parsed
    ``tcp://::1:29500`` at its first colon and failed: "Port could not be cast to integer"."""
    from megatron_ease.distributed import _tcp_init_method

    assert _tcp_init_method("::1", 29500) == "tcp://[::1]:29500"
    assert _tcp_init_method("[fd00::2]", 123) == "tcp://[fd00::2]:123"  # already bracketed
    assert _tcp_init_method("10.0.0.2", 29500) == "tcp://10.0.0.2:29500"
    assert _tcp_init_method("node01", 29500) == "tcp://node01:29500"


def test_the_launcher_smoke_test_meets_on_an_ipv6_loopback():
    """The whole path, as torchrun hands it to a worker: env -> rendezvous on ``[::1]``."""
    import os
    import socket
    import subprocess
    import sys

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "::1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "megatron_ease.distributed"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world=1 allreduce_ok" in result.stdout and "master=::1:" in result.stdout


def test_nccl_asked_for_without_a_usable_gpu_is_named(monkeypatch):
    """``parallel.backend=nccl`` on a CPU-only node (or with ``CUDA_VISIBLE_DEVICES=``, as
    slurm/common.sh sets without GPUs): a bare ZeroDivisionError (local rank % 0 GPUs)."""
    import torch

    from megatron_ease.distributed import LaunchEnv, init_process_group

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    started = _recorded_starts(monkeypatch)
    with pytest.raises(RuntimeError, match="parallel.backend=nccl but torch sees no usable GPU"):
        init_process_group(LaunchEnv(0, 2, 0, "127.0.0.1", 1234, "slurm"), backend="nccl")
    assert not started


def test_the_configured_timeout_reaches_megatron_cores_groups(monkeypatch):
    """``parallel.timeout_minutes`` bounded the default group only: megatron-core's TP/PP/DP/CP
    groups (where training's collectives run) kept its own 30 minutes for a dead peer."""
    import types

    import torch
    from megatron.core import parallel_state

    from megatron_ease import distributed

    created = []
    monkeypatch.setattr(parallel_state, "initialize_model_parallel",
                        lambda **k: created.append(k))
    monkeypatch.setattr(distributed, "model_parallel_seed", lambda seed: None)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 4)
    started = _recorded_starts(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parallel = types.SimpleNamespace(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, context_parallel_size=1, timeout_minutes=3.5)
    distributed.initialize_distributed(
        parallel, backend="gloo", launch=distributed.LaunchEnv(1, 4, 1, "h", 1234, "torchrun"))
    assert started[0]["timeout"].total_seconds() == 210
    assert created[0]["distributed_timeout_minutes"] == 3.5
    assert created[0]["tensor_model_parallel_size"] == 2


def test_a_failed_start_still_destroys_the_process_group(monkeypatch):
    """train.main: an error in initialize_distributed after the default group was up (in
    megatron-core's groups, say) left it undestroyed at exit."""
    import types

    from megatron_ease import distributed, train

    destroyed = []

    def failing_start(*a, **k):
        raise RuntimeError("NCCL error in a subgroup")

    cfg = types.SimpleNamespace(parallel=types.SimpleNamespace(backend="gloo"),
                                train=types.SimpleNamespace(seed=1))
    monkeypatch.setattr(train, "start_up", lambda *a, **k: (
        distributed.LaunchEnv(0, 2, 0, "h", 1, "torchrun"), cfg, None))
    monkeypatch.setattr(distributed, "initialize_distributed", failing_start)
    monkeypatch.setattr(distributed, "destroy_distributed", lambda: destroyed.append(True))
    with pytest.raises(RuntimeError, match="NCCL error in a subgroup"):
        train.main(["--config", "x.yaml"])
    assert destroyed == [True]


def test_a_preemption_handler_outside_the_main_thread_installs_nothing():
    """A trainer run from a worker thread: ``signal.signal`` raised ValueError ("signal only
    works in main thread") before anything started."""
    import signal
    import threading

    from megatron_ease.training.preemption import PreemptionHandler

    before = signal.getsignal(signal.SIGUSR1)
    outcome = []

    def build():
        try:
            handler = PreemptionHandler()
            outcome.append(handler.should_stop())
            handler.restore()
        except Exception as e:  # noqa: BLE001 - reported below
            outcome.append(e)

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    assert outcome == [False]
    assert signal.getsignal(signal.SIGUSR1) is before


def test_restoring_a_preemption_handler_twice_keeps_a_later_handler():
    """``run`` restores the CLI's handler and the CLI restores it again: the second call put
    back the handlers of the first construction over whatever was installed since."""
    import signal

    from megatron_ease.training.preemption import PreemptionHandler

    before = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler()
    handler.restore()
    try:
        later = PreemptionHandler()
        handler.restore()
        assert signal.getsignal(signal.SIGUSR1) == later._on_signal
        later.restore()
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert signal.getsignal(signal.SIGUSR1) is before


def test_run_leaves_the_callers_preemption_handler_installed(monkeypatch, tmp_path):
    """train.main installs the handler and restores it after the process group's teardown;
    trainer.run restored it first, so a second signal during the teardown killed a run that had
    saved for a requeue (exit 143 instead of 75)."""
    import signal
    import types

    from megatron_ease.config import Config
    from megatron_ease.training import trainer as trainer_module
    from megatron_ease.training.preemption import PreemptionHandler

    class StubTrainer:
        def __init__(self, cfg):
            self.metrics = types.SimpleNamespace(close=lambda: None)

        def train(self, preemption):
            return 75

    monkeypatch.setattr(trainer_module, "Trainer", StubTrainer)
    cfg = Config()
    cfg.logging.run_dir = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler()
    try:
        assert trainer_module.run(cfg, handler) == 75
        assert signal.getsignal(signal.SIGUSR1) == handler._on_signal
        assert signal.getsignal(signal.SIGTERM) == handler._on_signal
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
    assert trainer_module.run(cfg) == 75  # its own handler: restored when it returns
    assert signal.getsignal(signal.SIGUSR1) == before
