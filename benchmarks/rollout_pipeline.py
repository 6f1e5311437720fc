"""Rollouts under pipeline parallelism: the pipelined decode against step-by-step stages.

``MegatronRolloutEngine`` at PP = 2 (two gloo processes, one CPU core each) decodes a batch
either step by step through the stages (``pipelined=False``: a step's forward runs on stage 0,
then on stage 1, so each stage idles half of the time) or as a wavefront of one prompt group per
stage (``pipelined=True``, the default: while stage 1 runs a step of group 0, stage 0 runs the
same step of group 1). The same model at PP = 1 (one process) is the reference: its rollouts
must equal both PP = 2 ones, and its tokens/s is what one core does alone.

Model and workloads as ``benchmarks/rollout.py`` (a megatron-core GPTModel in the Qwen2 layout,
local layer spec; ``BxG:lo-hi[:eos]``). Reported: generated tokens per second of wall time,
best of ``--repeats`` interleaved runs after a warm-up (wall time: the point is that both
processes are busy; the development machine is shared, so compare within a run).

    OMP_NUM_THREADS=1 python -m benchmarks.rollout_pipeline      # ~3 min on the CPU dev box
"""

from __future__ import annotations

import argparse
import os
import time
import zlib

import torch
import torch.multiprocessing as mp

from benchmarks.rollout import MODELS, make_prompts, stop_token_ids, transformer_config


def build_stage(name: str):
    """This pipeline stage's part of ``benchmarks.rollout``'s model, with the same weights at any
    PP: each parameter drawn from a generator seeded by its checkpoint name (global layer)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ease.models.qwen_vl.hf_weights import canonical_parameters

    vocab = MODELS[name][-1]
    config = transformer_config(
        name, pipeline_dtype=torch.float32,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size())
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab, 4096,
                     position_embedding_type="rope", pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage())
    with torch.no_grad():
        for key, param in canonical_parameters(model).items():
            if param.dim() == 1 and "norm" in key:
                param.fill_(1.0)
            else:
                generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def _worker(rank: int, world: int, port: int, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from megatron_ease.distributed import (
        destroy_distributed,
        init_process_group,
        initialize_model_parallel,
    )
    from megatron_ease.rl.rollout import MegatronRolloutEngine
    from megatron_ease.rl.sampling import SamplingParams

    init_process_group(backend="gloo")
    initialize_model_parallel(pipeline_model_parallel_size=world)
    vocab = MODELS[args.model][-1]
    model = build_stage(args.model)
    engines = {"pp1": MegatronRolloutEngine(model, pad_token_id=0)} if world == 1 else {
        "pp2 step-by-step": MegatronRolloutEngine(model, pad_token_id=0, pipelined=False),
        "pp2 pipelined": MegatronRolloutEngine(model, pad_token_id=0)}
    for workload in args.workloads:
        shape, span, *eos = workload.split(":")
        b, g = map(int, shape.split("x"))
        lo, hi = map(int, span.split("-"))
        prompts = make_prompts(b, vocab, lo, hi)
        params = SamplingParams(max_new_tokens=args.new_tokens, n=g, seed=0, temperature=1.0,
                                top_p=0.9, stop_token_ids=stop_token_ids(vocab) if eos else ())
        best, outputs = {}, {}
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            for name, engine in engines.items():
                torch.distributed.barrier()
                start = time.perf_counter()
                out = engine.generate(prompts, params)
                seconds = time.perf_counter() - start
                outputs[name] = out
                if repeat:
                    best[name] = min(best.get(name, float("inf")), seconds)
        if rank == 0:
            results.put((workload, {name: int(outputs[name].lengths.sum()) / best[name]
                                    for name in engines},
                         {name: outputs[name].tokens.tolist() for name in engines}))
    destroy_distributed()


def run(world: int, args) -> list:
    from megatron_ease.distributed import find_free_port

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = mp.start_processes(_worker, args=(world, find_free_port(), args, results),
                                   nprocs=world, start_method="spawn", join=False)
    out = [results.get() for _ in args.workloads]  # before joining: the pipe holds little
    while not processes.join():
        pass
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", choices=list(MODELS))
    parser.add_argument("--workloads", nargs="+", default=["16x4:32-64", "16x4:32-64:eos"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    single = run(1, args)
    pipeline = run(2, args)
    print(f"model {args.model} {MODELS[args.model]}, {args.new_tokens} new tokens, "
          f"torch {torch.__version__}, tokens/s (wall), best of {args.repeats}")
    print("| workload | PP 1 (1 process) | PP 2 step by step | PP 2 pipelined | pipelined / "
          "step by step |")
    print("|---|---|---|---|---|")
    for (workload, ref, ref_tokens), (_, speeds, tokens) in zip(single, pipeline):
        for name, t in tokens.items():
            if t != ref_tokens["pp1"]:
                raise RuntimeError(f"{workload}: {name} rollouts differ from PP 1's")
        a, b = speeds["pp2 step-by-step"], speeds["pp2 pipelined"]
        print(f"| {workload} | {ref['pp1']:.0f} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
