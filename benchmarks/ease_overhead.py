"""Train-step overhead of EASE inside a megatron-core GPTModel: EASE on 4 layers vs off.

One process, TP = PP = 1 (gloo group of one), local layer specs, float32. The batch is shaped like
a VL rollout: a prompt holding s/4 "image" tokens, then s/4 response rows at the end; every sample
is gated in, the target is a random distribution over the image tokens. One train step = forward
inside ``ease_context`` + token-mean loss + backward (the EASE term rides the auto-scaler) + Adam.

Reported per sequence length and variant: median CPU time of a step over ``--repeats`` rounds that
interleave the variants (CPU time, because the development machine is shared: wall time is also
printed), its ratio to EASE off, and the peak memory allocated during a step above the model,
gradients and optimizer state (the profiler's allocation timeline).

    OMP_NUM_THREADS=1 python -m benchmarks.ease_overhead [--seq-lens 256 512 1024] [--recompute]
"""

import argparse
import functools
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

VOCAB = 1024


def init_single_process():
    from megatron_ease.distributed import (
        LaunchEnv,
        find_free_port,
        init_process_group,
        initialize_model_parallel,
    )

    if not torch.distributed.is_initialized():
        init_process_group(LaunchEnv(0, 1, 0, "127.0.0.1", find_free_port(), "single"),
                           backend="gloo", timeout_minutes=5)
    initialize_model_parallel()


def build_model(args, ease_layers, seq_len):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_ease.ease.specs import ease_block_spec, ease_layer_specs

    recompute = dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1) if args.recompute else {}
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, ffn_hidden_size=args.hidden * 3, normalization="RMSNorm",
        add_bias_linear=False, add_qkv_bias=True, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, **recompute)
    layer_specs = ease_layer_specs(get_gpt_layer_local_spec(normalization="RMSNorm"),
                                   args.layers, ease_layers)
    torch.manual_seed(0)
    return GPTModel(config, ease_block_spec(config, layer_specs), VOCAB, seq_len,
                    position_embedding_type="rope")


def make_batch(batch_size, seq_len):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (batch_size, seq_len + 1), generator=gen)
    image = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    image[:, 8:8 + seq_len // 4] = True
    response = torch.zeros_like(image)
    response[:, seq_len - seq_len // 4 - 1:seq_len - 1] = True  # label-shifted
    target = torch.rand(batch_size, seq_len, generator=gen) * image
    target = target / target.sum(dim=1, keepdim=True)
    causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:],
                position_ids=torch.arange(seq_len).expand(batch_size, seq_len),
                attention_mask=causal.expand(batch_size, 1, seq_len, seq_len),
                image_mask=image, response_mask=response, target=target,
                weight=torch.ones(batch_size))


def train_step(model, optimizer, batch, num_ease_layers, chunk_size):
    from megatron_ease.ease.context import EaseContext, ease_context

    context = None
    if num_ease_layers:
        context = EaseContext(batch["image_mask"], batch["response_mask"], batch["target"],
                              batch["weight"], normalizer=float(batch["weight"].sum()),
                              num_layers=num_ease_layers, gradient_scale=0.1,
                              chunk_size=chunk_size)
    optimizer.zero_grad(set_to_none=False)
    with ease_context(model, context):
        token_losses = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                             labels=batch["labels"])
    mask = batch["response_mask"].float()
    ((token_losses * mask).sum() / mask.sum()).backward()
    optimizer.step()


def peak_bytes(step):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--ease-layers", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--recompute", action="store_true", help="full recompute, every layer")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    init_single_process()

    num = len(args.ease_layers)
    variants = {"off": ((), None), f"ease {num} layers": (args.ease_layers, None),
                f"ease {num} layers, chunk {args.chunk_size}": (args.ease_layers, args.chunk_size)}
    print(f"GPT {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.groups}, "
          f"b={args.batch_size}, image = response rows = s/4, float32, cpu, "
          f"threads={torch.get_num_threads()}, recompute={'full' if args.recompute else 'off'}, "
          f"torch {torch.__version__}\n")
    print("| s | variant | step CPU ms | vs off | step wall ms | peak extra MiB |")
    print("|---|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        batch = make_batch(args.batch_size, seq_len)
        steps = {}
        for name, (ease_layers, chunk_size) in variants.items():
            model = build_model(args, ease_layers, seq_len)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
            steps[name] = functools.partial(train_step, model, optimizer, batch,
                                            len(ease_layers), chunk_size)
            steps[name]()  # warm-up: allocates gradients and optimizer state
        # Rounds interleave the variants, so that load drift on a shared machine hits all alike.
        cpu = {name: [] for name in steps}
        wall = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                step()
                cpu[name].append((time.process_time() - start_cpu) * 1e3)
                wall[name].append((time.perf_counter() - start_wall) * 1e3)
        base = statistics.median(cpu["off"])
        for name, step in steps.items():
            ms = statistics.median(cpu[name])
            peak = peak_bytes(step) / 2**20
            print(f"| {seq_len} | {name} | {ms:.0f} | {ms / base:.2f}× | "
                  f"{statistics.median(wall[name]):.0f} | {peak:.1f} |", flush=True)


if __name__ == "__main__":
    main()
