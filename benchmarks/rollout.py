"""Rollout throughput: generated tokens/s of ``MegatronRolloutEngine`` against HF ``generate``.

Both generate from the same weights: a megatron-core GPTModel (Qwen2 layout: RMSNorm, GQA with
qkv bias, SwiGLU, rope; local layer spec) and the HF ``Qwen2ForCausalLM`` it maps to through the
Qwen2.5-VL weight table. A workload ``BxG:lo-hi`` is B prompts of random length in [lo, hi]
(left-padded) with G samples each, sampled at temperature 1 and top-p 0.9 for a fixed number of
new tokens (no stop token, so every engine produces exactly B·G·new tokens). ``BxG:lo-hi:eos``
makes every 32nd vocabulary id a stop token, so rollouts end at different steps as RL rollouts
do (about 1/32 per step on these random-weight models: a mean near 28 of 64 tokens); each engine
is then credited with the tokens it generated up to and including each stop. HF gets
``num_return_sequences=G`` (it prefills each prompt G times; our engine prefills it once and
replicates the KV cache). Greedy outputs of ours and HF are checked to be equal first (a
difference stops the run on CPU; on a GPU, where the kernels round differently and can flip
a near-tie, it prints a WARNING and the timing goes on).

Engines: ``hf`` (``generate``, SDPA attention, dynamic cache), ``ours`` (the rollout engine with
its default attention path: rotated-key cache + SDPA core attention) and ``mcore static``
(the same engine on megatron-core's own static path: keys re-rotated every step, local
``DotProductAttention``).

    OMP_NUM_THREADS=1 python -m benchmarks.rollout          # ~12 min on the CPU dev box
    python -m benchmarks.rollout --device cuda --models small --workloads 64x1:32-64 16x8:512-1024

Reported: generated tokens per second of the best of ``--repeats`` interleaved runs (after one
warm-up each), in process CPU time on CPU (the development machine is shared with other jobs;
with one thread CPU time is what a dedicated core would take) and wall time on GPU, and ours'
speed-up over HF.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch

MODELS = {
    # name: (layers, hidden, heads, query groups, ffn, vocab)
    "tiny": (4, 32, 4, 2, 64, 96),
    "small": (8, 512, 8, 2, 1408, 8192),
}


def transformer_config(name: str, **extra):
    """The megatron-core config of model ``name`` (Qwen2 layout), with ``extra`` fields."""
    from megatron.core.transformer import TransformerConfig

    layers, hidden, heads, groups, ffn, _ = MODELS[name]
    return TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, ffn_hidden_size=ffn, normalization="RMSNorm",
        add_bias_linear=False, add_qkv_bias=True, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, init_method_std=0.05, **extra)


def build_models(name: str, device: str):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_ease.models.qwen_vl.hf_tables import QWEN2_5_VL
    from megatron_ease.models.qwen_vl.hf_weights import canonical_parameters, hf_tensors
    from megatron_ease.models.qwen_vl.param_mapping import AttentionLayout

    layers, hidden, heads, groups, ffn, vocab = MODELS[name]
    config = transformer_config(
        name, tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size())
    torch.manual_seed(0)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab, 4096,
                     position_embedding_type="rope").to(device)
    hf_config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=groups, rms_norm_eps=config.layernorm_epsilon,
                            tie_word_embeddings=False, pad_token_id=0, bos_token_id=None,
                            eos_token_id=None)
    hf = Qwen2ForCausalLM(hf_config).to(device).eval()
    named = [(f"language_model.{n}", p) for n, p in canonical_parameters(model).items()]
    state = dict(hf_tensors(named, QWEN2_5_VL, AttentionLayout(heads, groups, hidden // heads),
                            naming="legacy"))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any("rotary" not in k for k in missing):
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return model, hf


def make_prompts(num_prompts: int, vocab: int, min_len: int, max_len: int):
    from megatron_ease.rl.rollout import Prompt

    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(min_len, max_len + 1, (num_prompts,), generator=gen).tolist()
    return [Prompt(torch.randint(1, vocab, (n,), generator=gen)) for n in lengths]


STOP_EVERY = 32  # ":eos" workloads: ids 7, 7 + 32, ... end a rollout


def stop_token_ids(vocab: int) -> tuple[int, ...]:
    return tuple(range(7, vocab, STOP_EVERY))


def ours(engine, prompts, new_tokens, n, temperature, top_p, stop_ids=()):
    """Generated tokens (with the stop token) and the ``[rows, new_tokens]`` ids."""
    from megatron_ease.rl.sampling import SamplingParams

    out = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, n=n, seed=0,
                                                  temperature=temperature, top_p=top_p,
                                                  stop_token_ids=stop_ids))
    return int(out.lengths.sum()), out.tokens


def hf_generate(hf, batch, new_tokens, n, temperature, top_p, stop_ids=()):
    """As ``ours``; HF pads after a rollout's stop token, which is not counted."""
    kwargs = dict(do_sample=False) if temperature == 0 else dict(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n)
    if stop_ids:
        kwargs["eos_token_id"] = list(stop_ids)
    else:
        kwargs["min_new_tokens"] = new_tokens
    out = hf.generate(batch.input_ids, attention_mask=batch.attention_mask.long(),
                      max_new_tokens=new_tokens, pad_token_id=0, **kwargs)
    tokens = out[:, batch.input_ids.shape[1]:]
    stops = torch.isin(tokens, torch.tensor(stop_ids, dtype=torch.long, device=tokens.device))
    ended = stops.any(dim=1)
    lengths = torch.where(ended, stops.int().argmax(dim=1) + 1, tokens.shape[1])
    return int(lengths.sum()), tokens


def best_tokens_per_second(fns: dict, repeats: int, device: str) -> dict:
    """Best generated tokens/s of each function (returning its token count) over ``repeats``
    interleaved runs, after a warm-up: process CPU time on CPU (steadier than wall time on a
    shared machine; run with one thread), wall time on GPU."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clock = time.perf_counter if device == "cuda" else time.process_time
    for fn in fns.values():
        fn()
    best = {name: 0.0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = clock()
            tokens, _ = fn()
            sync()
            best[name] = max(best[name], tokens / (clock() - start))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--workloads", nargs="+",
                        default=["16x1:32-64", "64x1:32-64", "2x8:256-512", "8x8:256-512",
                                 "64x1:32-64:eos", "8x8:256-512:eos"],
                        help="BxG:lo-hi[:eos]: B prompts of lo..hi tokens, G samples each; eos: "
                             "every 32nd id is a stop token")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from megatron_ease.distributed import (
        LaunchEnv,
        find_free_port,
        init_process_group,
        initialize_model_parallel,
    )
    from megatron_ease.rl.inference_adapters import GPTRolloutAdapter
    from megatron_ease.rl.rollout import MegatronRolloutEngine, PromptBatch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    backend = "nccl" if args.device == "cuda" else "gloo"
    init_process_group(LaunchEnv(0, 1, 0, "127.0.0.1", find_free_port(), "single"), backend)
    initialize_model_parallel()

    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} new tokens, T=1, top-p {args.top_p}")
    print("| model | B×G | prompt tokens | stop | HF generate tok/s | mcore static tok/s "
          "| ours tok/s | ours / HF |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model, hf = build_models(name, args.device)
        engines = {
            "ours": MegatronRolloutEngine(model, pad_token_id=0),
            "mcore": MegatronRolloutEngine(model, pad_token_id=0, adapter=GPTRolloutAdapter(
                model, cache_rotated_keys=False, attention_backend="model")),
        }
        vocab = MODELS[name][-1]
        with torch.no_grad():
            prompts = make_prompts(4, vocab, 32, 64)
            batch = PromptBatch.left_padded(prompts, 0, args.device)
            _, want = hf_generate(hf, batch, 16, 1, 0.0, 1.0)
            for engine_name, engine in engines.items():
                got = ours(engine, prompts, 16, 1, 0.0, 1.0)[1]
                if torch.equal(got, want):
                    continue
                message = f"{name}: greedy rollouts of {engine_name} differ from HF"
                if args.device == "cpu" or got.shape != want.shape:
                    raise RuntimeError(message)
                # On a GPU the engines' kernels (SDPA, local attention, HF's) round differently,
                # which can flip a near-tie of the argmax; say so and time them all the same.
                differs = (got != want).any(dim=0).nonzero()
                print(f"WARNING {message} from step {int(differs[0])} of {got.shape[1]} "
                      f"({int((got == want).all(dim=1).sum())} of {got.shape[0]} rollouts "
                      f"equal)", flush=True)
            for workload in args.workloads:
                sizes, lengths, *options = workload.split(":")
                b, g = (int(x) for x in sizes.split("x"))
                lo, hi = (int(x) for x in lengths.split("-"))
                stop_ids = stop_token_ids(vocab) if options == ["eos"] else ()
                prompts = make_prompts(b, vocab, lo, hi)
                batch = PromptBatch.left_padded(prompts, 0, args.device)
                run = dict(new_tokens=args.new_tokens, n=g, temperature=1.0, top_p=args.top_p,
                           stop_ids=stop_ids)
                best = best_tokens_per_second({
                    "hf": functools.partial(hf_generate, hf, batch, **run),
                    "mcore": functools.partial(ours, engines["mcore"], prompts, **run),
                    "ours": functools.partial(ours, engines["ours"], prompts, **run),
                }, args.repeats, args.device)
                stop = f"1/{STOP_EVERY} of ids" if stop_ids else "none"
                print(f"| {name} | {b}×{g} | {lo}-{hi} | {stop} | {best['hf']:.0f} | "
                      f"{best['mcore']:.0f} | {best['ours']:.0f} | "
                      f"{best['ours'] / best['hf']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
