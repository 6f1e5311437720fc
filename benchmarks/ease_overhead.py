"""Train-step overhead of EASE inside a megatron-core GPTModel: EASE on 4 layers vs off.

One process, TP = PP = 1 (a process group of one), local layer specs. The batch is shaped like
a VL rollout: a prompt holding s/4 "image" tokens, then s/4 response rows at the end; every sample
is gated in, the target is a random distribution over the image tokens. One train step = forward
inside ``ease_context`` + token-mean loss + backward (the EASE term rides the auto-scaler) + an
optimizer step (Adam; ``--optimizer sgd`` keeps no state, for 7B-sized layers on one GPU).

CPU (default): float32, median CPU time of a step over ``--repeats`` rounds that interleave the
variants (CPU time, because the development machine is shared: wall time is also printed), and the
peak memory allocated during a step above the model, gradients and optimizer state (the profiler's
allocation timeline).

GPU (``--device cuda``): wall time with the device synchronised around each step, and
``max_memory_allocated`` during a step above what was allocated before it. ``--core-attention
sdpa`` replaces megatron's unfused local attention (which materialises [b, h, s, s]) by a
``torch.nn.functional.scaled_dot_product_attention`` core attention (flash kernels), standing in
for TransformerEngine's fused attention where TE is not installed: like TE it returns no
probabilities, so the EASE layers compute the slice beside it from q and k, as they do with TE.
``--preset qwen2.5-7b`` gives Qwen2.5-VL-7B's language-model layer sizes.

    OMP_NUM_THREADS=1 python -m benchmarks.ease_overhead [--seq-lens 256 512 1024] [--recompute]
    python -m benchmarks.ease_overhead --device cuda --dtype bf16 --preset qwen2.5-7b \
        --core-attention sdpa --optimizer sgd --seq-lens 2048 4096 8192
"""

import argparse
import dataclasses
import functools
import gc
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

VOCAB = 1024


PRESETS = {
    # Qwen2.5-VL-7B language model: 28 layers, hidden 3584, 28 query heads / 4 KV groups, FFN
    # 18944. EASE on 4 layers, as in examples/qwen25vl_7b_ease.yaml's count.
    "qwen2.5-7b": dict(layers=28, hidden=3584, heads=28, groups=4, ffn_hidden=18944,
                       ease_layers=[8, 12, 16, 20], batch_size=1),
}


class SDPACoreAttention(torch.nn.Module):
    """Core attention through ``F.scaled_dot_product_attention`` (causal, GQA): a fused-attention
    stand-in with megatron's core-attention interface ([s, b, heads, d] in, [s, b, heads * d] out).
    Causal self-attention without padding only, which is what this benchmark feeds it."""

    def __init__(self, config, layer_number, attn_mask_type=None, attention_type=None,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, **kwargs):
        super().__init__()
        self.config, self.softmax_scale = config, softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        # KV heads repeated for the query groups: SDPA's enable_gqa falls back to the math kernel
        # (which materialises [b, h, s, s]) on some builds; the flash kernel needs equal heads.
        groups = query.shape[2] // key.shape[2]
        key, value = (t.repeat_interleave(groups, dim=2) for t in (key, value))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def init_single_process(device):
    from megatron_ease.distributed import (
        LaunchEnv,
        find_free_port,
        init_process_group,
        initialize_model_parallel,
    )

    if not torch.distributed.is_initialized():
        init_process_group(LaunchEnv(0, 1, 0, "127.0.0.1", find_free_port(), "single"),
                           backend="nccl" if device == "cuda" else "gloo", timeout_minutes=5)
    initialize_model_parallel()


def build_model(args, ease_layers, seq_len):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_ease.ease.specs import ease_block_spec, ease_layer_specs

    recompute = dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1) if args.recompute else {}
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, ffn_hidden_size=args.ffn_hidden or args.hidden * 3,
        normalization="RMSNorm", bf16=args.dtype == "bf16",
        add_bias_linear=False, add_qkv_bias=True, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=args.device == "cpu", params_dtype=DTYPES[args.dtype],
        **recompute)
    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    if args.core_attention == "sdpa":
        base = dataclasses.replace(base, submodules=dataclasses.replace(
            base.submodules, self_attention=dataclasses.replace(
                base.submodules.self_attention, submodules=dataclasses.replace(
                    base.submodules.self_attention.submodules,
                    core_attention=ModuleSpec(module=SDPACoreAttention)))))
    layer_specs = ease_layer_specs(base, args.layers, ease_layers)
    torch.manual_seed(0)
    model = GPTModel(config, ease_block_spec(config, layer_specs), VOCAB, seq_len,
                     position_embedding_type="rope")
    return model.cuda() if args.device == "cuda" else model


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_batch(batch_size, seq_len, device):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (batch_size, seq_len + 1), generator=gen)
    image = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    image[:, 8:8 + seq_len // 4] = True
    response = torch.zeros_like(image)
    response[:, seq_len - seq_len // 4 - 1:seq_len - 1] = True  # label-shifted
    target = torch.rand(batch_size, seq_len, generator=gen) * image
    target = target / target.sum(dim=1, keepdim=True)
    causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:],
                 position_ids=torch.arange(seq_len).expand(batch_size, seq_len),
                 attention_mask=causal.expand(batch_size, 1, seq_len, seq_len),
                 image_mask=image, response_mask=response, target=target,
                 weight=torch.ones(batch_size))
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, optimizer, batch, num_ease_layers, chunk_size, slice_impl="torch"):
    from megatron_ease.ease.context import EaseContext, ease_context

    context = None
    if num_ease_layers:
        context = EaseContext(batch["image_mask"], batch["response_mask"], batch["target"],
                              batch["weight"], normalizer=float(batch["weight"].sum()),
                              num_layers=num_ease_layers, gradient_scale=0.1,
                              chunk_size=chunk_size, slice_impl=slice_impl)
    optimizer.zero_grad(set_to_none=False)
    with ease_context(model, context):
        token_losses = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                             labels=batch["labels"])
    mask = batch["response_mask"].float()
    ((token_losses * mask).sum() / mask.sum()).backward()
    optimizer.step()


class SGD:
    """Stateless in-place SGD (``--optimizer sgd``): 7B-sized layers leave no room for Adam's
    state on one GPU, and the optimizer step is the same with EASE on or off."""

    def __init__(self, params, lr=1e-5):
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr

    def zero_grad(self, set_to_none=False):
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)


def peak_bytes(step, device="cpu"):
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def run_cuda(args, variants, seq_len, batch):
    """One model at a time (7B-sized layers do not fit twice); the GPU is not shared, so the
    variants run one after the other. Prints a table row per variant."""
    base = None
    for name, (ease_layers, chunk_size) in variants.items():
        model = build_model(args, ease_layers, seq_len)
        optimizer = (SGD(model.parameters()) if args.optimizer == "sgd"
                     else torch.optim.Adam(model.parameters(), lr=1e-5))
        step = functools.partial(train_step, model, optimizer, batch, len(ease_layers),
                                 chunk_size, args.slice_impl)
        for _ in range(2):  # warm-up: gradients, optimizer state, kernels, allocator
            step()
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        ms = statistics.median(times)
        base = base or ms
        peak = peak_bytes(step, "cuda") / 2**20
        print(f"| {seq_len} | {name} | {ms:.1f} | {ms / base:.3f}× | "
              f"{min(times):.1f}–{max(times):.1f} | {peak:.0f} |", flush=True)
        del model, optimizer, step
        gc.collect()
        torch.cuda.empty_cache()


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
    parser.add_argument("--slice-impl", choices=["torch", "triton", "auto"], default="torch",
                        help="image_attention_mass impl (ease.slice_impl); triton: CUDA only")
    parser.add_argument("--recompute", action="store_true", help="full recompute, every layer")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--ffn-hidden", type=int, default=None, help="default 3 × hidden")
    parser.add_argument("--core-attention", choices=["local", "sdpa"], default="local")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="layer sizes (and EASE layers) of a real model; overrides those flags")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="subset of: off ease chunk (default all three)")
    args = parser.parse_args()
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    init_single_process(args.device)
    cuda = args.device == "cuda"

    num = len(args.ease_layers)
    variants = {"off": ((), None), f"ease {num} layers": (args.ease_layers, None),
                f"ease {num} layers, chunk {args.chunk_size}": (args.ease_layers, args.chunk_size)}
    if args.variants:
        keys = dict(zip(["off", "ease", "chunk"], list(variants), strict=True))
        variants = {keys[v]: variants[keys[v]] for v in args.variants}
    where = (f"cuda ({torch.cuda.get_device_name()})" if cuda
             else f"cpu, threads={torch.get_num_threads()}")
    print(f"GPT {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.groups}, "
          f"ffn {args.ffn_hidden or 3 * args.hidden}, b={args.batch_size}, image = response rows "
          f"= s/4, {args.dtype}, {where}, core attention {args.core_attention}, optimizer "
          f"{args.optimizer}, recompute={'full' if args.recompute else 'off'}, "
          f"torch {torch.__version__}\n")
    if cuda:
        print("| s | variant | step ms (median) | vs first | min–max ms | peak extra MiB |")
    else:
        print("| s | variant | step CPU ms | vs off | step wall ms | peak extra MiB |")
    print("|---|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        batch = make_batch(args.batch_size, seq_len, args.device)
        if cuda:
            run_cuda(args, variants, seq_len, batch)
            continue
        steps = {}
        for name, (ease_layers, chunk_size) in variants.items():
            model = build_model(args, ease_layers, seq_len)
            optimizer = (SGD(model.parameters()) if args.optimizer == "sgd"
                         else torch.optim.Adam(model.parameters(), lr=1e-5))
            steps[name] = functools.partial(train_step, model, optimizer, batch,
                                            len(ease_layers), chunk_size, args.slice_impl)
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
        base = statistics.median(cpu[next(iter(cpu))])
        for name, step in steps.items():
            ms = statistics.median(cpu[name])
            peak = peak_bytes(step) / 2**20
            print(f"| {seq_len} | {name} | {ms:.0f} | {ms / base:.2f}× | "
                  f"{statistics.median(wall[name]):.0f} | {peak:.1f} |", flush=True)


if __name__ == "__main__":
    main()
