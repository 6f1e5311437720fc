"""Run a test function in N real gloo processes, with megatron-core parallel state set up.

Process start-up (torch + transformers + megatron-core imports, ~5 s a process on 2 cores) is the
dominant cost of multi-process tests, so a pool of workers per world size lives for the whole
pytest session: each worker joins one gloo group at start, then for every task builds the requested
TP/PP layout with ``parallel_state``, runs the function, and tears the layout down again.

A task that does not finish within its timeout (a hang in a collective, a deadlock) kills the pool
and fails the test; the next test gets a fresh pool. An exception on any rank fails the test with
that rank's traceback.

    results = run_distributed(fn, x, world_size=2, tensor_model_parallel_size=2)

``fn`` must be a module-level function (it is pickled by reference); it returns a picklable value
(tensors are fine), one per rank, in rank order.
"""

from __future__ import annotations

import atexit
import os
import queue
import time
import traceback

import torch.multiprocessing as mp

_POOLS: dict[int, "GlooPool"] = {}


def _exit_with_parent():
    """Linux: die with the pytest process, so a killed test run leaves no orphaned workers."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(rank, world_size, port, tasks, results):
    _exit_with_parent()
    # The CPU code path (gloo, CPU shims) even on a machine with GPUs; set before anything
    # asks CUDA for its devices.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from megatron_ease.distributed import LaunchEnv, init_process_group, initialize_model_parallel

    init_process_group(LaunchEnv(rank, world_size, rank, "127.0.0.1", port, "test"),
                       backend="gloo", timeout_minutes=5)
    from megatron.core import parallel_state

    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs, layout = task
        try:
            initialize_model_parallel(**layout)
            out = fn(*args, **kwargs)
            results.put((rank, "ok", out))
        except BaseException:  # noqa: BLE001 - reported to the test, with traceback
            results.put((rank, "error", traceback.format_exc()))
        finally:
            parallel_state.destroy_model_parallel()
            _destroy_subgroups()
    torch.distributed.destroy_process_group()


def _destroy_subgroups():
    """Free the process groups a task's layout created (megatron-core makes dozens per layout;
    ``destroy_model_parallel`` only drops its references, and every gloo group keeps its
    threads, so a long-lived worker would pile up thousands of polling threads)."""
    import torch
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        if group is not c10d.GroupMember.WORLD:
            torch.distributed.destroy_process_group(group)


class GlooPool:
    def __init__(self, world_size: int):
        from megatron_ease.distributed import find_free_port

        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = find_free_port()
        self.procs = [
            # Not daemonic: dist_checkpointing's writer starts processes of its own.
            ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results))
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn, args, kwargs, layout, timeout_s: float):
        for q in self.tasks:
            q.put((fn, args, kwargs, layout))
        deadline = time.monotonic() + timeout_s
        out: dict[int, object] = {}
        while len(out) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.alive():
                missing = sorted(set(range(self.world_size)) - set(out))
                self.close(force=True)
                why = "timed out" if remaining <= 0 else "lost a worker process"
                raise TimeoutError(f"{fn.__qualname__} {why} after {timeout_s:.0f}s; "
                                   f"ranks {missing} did not finish")
            try:
                rank, status, value = self.results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if status == "error":
                # Peers of a failed rank may now wait forever in a collective.
                self.close(force=True)
                raise RuntimeError(f"{fn.__qualname__} failed on rank {rank}:\n{value}")
            out[rank] = value
        return [out[r] for r in range(self.world_size)]

    def close(self, force: bool = False):
        if not force:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
        _POOLS.pop(self.world_size, None)


def run_distributed(fn, *args, world_size: int = 2, tensor_model_parallel_size: int = 1,
                    pipeline_model_parallel_size: int = 1,
                    virtual_pipeline_model_parallel_size=None, context_parallel_size: int = 1,
                    seed: int = 1234, timeout_s: float = 300, **kwargs):
    """Run ``fn(*args, **kwargs)`` on every rank of a gloo group; return per-rank results."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        pool = _POOLS[world_size] = GlooPool(world_size)
    layout = dict(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        seed=seed,
    )
    return pool.run(fn, args, kwargs, layout, timeout_s)


@atexit.register
def _shutdown_pools():
    for pool in list(_POOLS.values()):
        pool.close()
