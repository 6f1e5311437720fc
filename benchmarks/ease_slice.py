"""Speed and memory of the EASE image-column slice, fwd + bwd, against eager captures.

Compared, on one attention layer with b=1, h=8, g=2, d=64, ~25% image tokens, 128 response rows:

- ``naive_full``: full [b, h, s, s] softmax with autograd, then slice (what the tests use as the
  reference, here in the benchmark dtype);
- ``eager_rows``: gather the response rows first, [b, h, R, s] softmax with autograd;
- ``ease``: ``image_attention_mass(impl="torch")`` (chunked, recompute in backward), one chunk and
  32-row chunks;
- ``ease triton``: the fused Triton kernels (``triton_attention``; CUDA only).

``--impl`` picks the EASE variants: ``torch`` (the default on CPU), ``triton`` or ``both`` (the
default on CUDA); ``--triton-blocks`` / ``--triton-num-warps`` set the kernels' tiles.

Reported per method: median fwd+bwd wall time, peak extra memory during fwd+bwd (CPU: the
profiler's allocation timeline; CUDA: ``max_memory_allocated``), and bytes saved for backward
(``saved_tensors_hooks``), all excluding the inputs themselves.

    OMP_NUM_THREADS=2 python -m benchmarks.ease_slice [--seq-lens 256 1024 2048 4096] [--device cpu]
    python -m benchmarks.ease_slice --device cuda --dtype bfloat16 [--impl both]
"""

import argparse
import math
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_ease.ease.attention import image_attention_mass, response_row_index


def naive_full(query, key, image_mask, response_mask):
    b, h, s, d = query.shape
    key = key.repeat_interleave(h // key.shape[1], dim=1)  # [b, h, s, d]
    logits = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(d)  # [b, h, s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return (probs * response_mask[:, None, :, None]).sum(dim=(1, 2)) * image_mask


def eager_rows(query, key, image_mask, response_mask):
    b, h, s, d = query.shape
    rows = response_mask[0].nonzero().squeeze(1)  # one sample: its response positions [R]
    key = key.repeat_interleave(h // key.shape[1], dim=1)  # [b, h, s, d]
    logits = torch.matmul(query[:, :, rows], key.transpose(-1, -2)) / math.sqrt(d)  # [b, h, R, s]
    causal = torch.arange(s, device=query.device) <= rows[:, None]  # [R, s]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return probs.sum(dim=(1, 2)) * image_mask


def ease(chunk_size):
    def run(query, key, image_mask, response_mask):
        return image_attention_mass(query, key, image_mask, response_mask, chunk_size=chunk_size,
                                    impl="torch")

    return run


def ease_triton(block_m, block_n, num_warps):
    from megatron_ease.ease.triton_attention import triton_image_attention_mass

    def run(query, key, image_mask, response_mask):
        return triton_image_attention_mass(
            query, key, image_mask, torch.ones_like(image_mask), query.shape[-1] ** -0.5,
            response_row_index(response_mask), block_m=block_m, block_n=block_n,
            num_warps=num_warps,
        )

    return run


def methods(impl, triton_blocks, triton_num_warps):
    chosen = {"naive_full": naive_full, "eager_rows": eager_rows}
    if impl in ("torch", "both"):
        chosen["ease (1 chunk)"] = ease(None)
        chosen["ease (chunk 32)"] = ease(32)
    if impl in ("triton", "both"):
        chosen["ease triton"] = ease_triton(*triton_blocks, triton_num_warps)
    return chosen


def make_inputs(seq_len, heads, key_heads, head_dim, response_rows, dtype, device):
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, seq_len, head_dim, generator=gen).to(device, dtype)
    key = torch.randn(1, key_heads, seq_len, head_dim, generator=gen).to(device, dtype)
    image_mask = torch.zeros(1, seq_len, dtype=torch.bool, device=device)
    image_mask[:, 16 : 16 + seq_len // 4] = True
    response_mask = torch.zeros_like(image_mask)
    # label-shifted: the row before the first response token through the second-to-last
    response_mask[:, seq_len - response_rows - 1 : seq_len - 1] = True
    return query, key, image_mask, response_mask


def fwd_bwd(method, query, key, image_mask, response_mask):
    q = query.detach().requires_grad_()
    k = key.detach().requires_grad_()
    method(q, k, image_mask, response_mask).sum().backward()


def saved_bytes(method, query, key, image_mask, response_mask):
    """Bytes of the tensors autograd keeps for backward, not counting q, k and the masks."""
    q = query.detach().requires_grad_()
    k = key.detach().requires_grad_()
    inputs = {t.data_ptr() for t in (q, k, image_mask, response_mask)}
    seen = {}

    def pack(t):
        if t.data_ptr() not in inputs:
            seen[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = method(q, k, image_mask, response_mask)
    del out
    return sum(seen.values())


def peak_bytes(method, query, key, image_mask, response_mask):
    """Peak of memory allocated during fwd + bwd above what was allocated before."""
    if query.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(method, query, key, image_mask, response_mask)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fwd_bwd(method, query, key, image_mask, response_mask)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def time_ms(method, inputs, repeats):
    sync = torch.cuda.synchronize if inputs[0].device.type == "cuda" else (lambda: None)
    fwd_bwd(method, *inputs)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fwd_bwd(method, *inputs)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--key-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--response-rows", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impl", choices=["torch", "triton", "both"], default=None,
                        help="EASE variants to run (default: torch on CPU, both on CUDA)")
    parser.add_argument("--triton-blocks", type=int, nargs=2, default=[64, 64],
                        metavar=("BLOCK_M", "BLOCK_N"), help="response rows and keys per tile")
    parser.add_argument("--triton-num-warps", type=int, default=4)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    on_cuda = torch.device(args.device).type == "cuda"
    impl = args.impl or ("both" if on_cuda else "torch")
    if impl != "torch" and not on_cuda:
        parser.error(f"--impl {impl}: the Triton kernels run on CUDA devices only")
    chosen = methods(impl, args.triton_blocks, args.triton_num_warps)

    print(
        f"b=1 h={args.heads} g={args.key_heads} d={args.head_dim} R={args.response_rows} "
        f"image=s/4 {args.dtype} {args.device} threads={torch.get_num_threads()}\n"
    )
    print("| s | method | fwd+bwd ms | peak extra MiB | saved for bwd MiB | max |Δ| vs naive |")
    print("|---|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        inputs = make_inputs(seq_len, args.heads, args.key_heads, args.head_dim,
                             args.response_rows, dtype, args.device)
        reference = naive_full(*inputs).float()
        for name, method in chosen.items():
            error = (method(*inputs).float() - reference).abs().max().item()
            ms = time_ms(method, inputs, args.repeats)
            peak = peak_bytes(method, *inputs) / 2**20
            saved = saved_bytes(method, *inputs) / 2**20
            print(f"| {seq_len} | {name} | {ms:.1f} | {peak:.1f} | {saved:.2f} | {error:.1e} |")


if __name__ == "__main__":
    main()
