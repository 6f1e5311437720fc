"""Rollout engine: KV-cache greedy = full recompute = HF generate; sampling reproducible and equal
on TP ranks; log-probs = a teacher-forced forward; PP=2 = PP=1; EOS / stop strings, finished
rollouts leaving the decode batch without changing the others; the sort-free top-p sampler;
Qwen-VL prompts with images (vision once per prompt, greedy = HF generate), Qwen3-VL at PP=2 with
DeepStack levels crossing the stage boundary."""

from __future__ import annotations

import pytest
import torch

from megatron_ease.rl.rollout import Prompt, PromptBatch, RolloutOutput
from megatron_ease.rl.sampling import SamplingParams, sample_next_tokens, top_p_removed
from tests.harness import run_distributed
from tests.megatron_utils import tiny_gpt

VOCAB, PAD = 96, 0
PROMPT_LENGTHS = (3, 7, 5, 7)


def _gpt(pre_process=True, post_process=True):
    """A tiny Qwen2-like megatron GPTModel (RMSNorm, GQA, qkv bias, SwiGLU, rope), peaked logits."""
    return tiny_gpt(VOCAB, 64, pre_process, post_process, init_scale=0.2)


def _prompts():
    gen = torch.Generator().manual_seed(0)
    return [Prompt(torch.randint(1, VOCAB, (n,), generator=gen)) for n in PROMPT_LENGTHS]


def _engine(model, **kwargs):
    from megatron_ease.rl.rollout import MegatronRolloutEngine

    return MegatronRolloutEngine(model, pad_token_id=PAD, **kwargs)


def _full_forward_logits(model, input_ids, valid):
    """No-cache forward of ``[b, s]`` tokens with a causal ∧ valid-key mask; TP-gathered logits."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    s = input_ids.shape[1]
    mask = ~(torch.ones(s, s, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :])
    with torch.no_grad():
        logits = model(input_ids, torch.arange(s).expand_as(input_ids), mask)
    return gather_from_tensor_model_parallel_region(logits)  # [b, s, V]


def _teacher_forced_log_probs(logits_fn, batch: PromptBatch, out: RolloutOutput, n: int,
                              temperature: float):
    """``log softmax(logits / T)`` of the rollout tokens from one forward over prompt + response."""
    rows = torch.arange(batch.input_ids.shape[0]).repeat_interleave(n)
    input_ids = torch.cat([batch.input_ids[rows], out.tokens], dim=1)
    valid = torch.cat([batch.attention_mask[rows], out.response_mask], dim=1)
    logits = logits_fn(input_ids, valid)
    p = batch.input_ids.shape[1]
    pred = logits[:, p - 1:-1].float() / (temperature or 1.0)  # position t predicts token t + 1
    return torch.log_softmax(pred, dim=-1).gather(-1, out.tokens[..., None])[..., 0]


# -- workers (every gloo rank) ---------------------------------------------------------------------

def _greedy_worker(max_new_tokens: int):
    """Greedy rollouts with the KV cache, the same by full recompute, and the model's weights;
    sampled rollouts with the rollout attention path and with megatron-core's own."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_ease.models.qwen_vl.hf_weights import canonical_parameters
    from megatron_ease.rl.inference_adapters import GPTRolloutAdapter
    from megatron_ease.rl.rollout_attention import SdpaCoreAttention

    model = _gpt()
    prompts = _prompts()
    out = _engine(model).generate(prompts, SamplingParams(max_new_tokens=max_new_tokens,
                                                          temperature=0))
    # Stop tokens (1 in 12 ids) end rollouts at different steps: both paths drop finished rows
    # from their KV cache layout (batch-first for SDPA, megatron-core's sequence-first).
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=2, seed=1,
                              stop_token_ids=tuple(range(5, VOCAB, 12)))
    paths, direct = {}, {}
    for name, options in {"rollout": {},
                          "megatron": dict(cache_rotated_keys=False, attention_backend="model"),
                          "autograd_linears": dict(direct_linears=False),
                          }.items():
        adapter = GPTRolloutAdapter(model, **options)
        paths[name] = _engine(model, adapter=adapter).generate(prompts, sampling)
        direct[name] = len(adapter._linears.linears)
    attentions = [layer.self_attention for layer in model.decoder.layers]
    restored = all(isinstance(a.core_attention, DotProductAttention)
                   and "_adjust_key_value_for_inference" not in a.__dict__ for a in attentions)
    restored &= not any("forward" in m.__dict__ for m in model.modules())
    def refusal(batch_prompts):
        """The error of the model's own attention backend on these prompts, None if it ran."""
        try:
            _engine(model, adapter=GPTRolloutAdapter(model, attention_backend="model")).generate(
                batch_prompts, sampling)
        except NotImplementedError as e:
            return str(e)
        return None

    attentions[0].core_attention = SdpaCoreAttention(model.config)  # not the local attention
    refused = refusal(prompts)
    # TransformerEngine's core attention takes a padding mask: refused even without padding.
    attentions[0].core_attention = type("TEDotProductAttention", (SdpaCoreAttention,), {})(
        model.config)
    refused_te = refusal([Prompt(p.input_ids[:2]) for p in prompts])
    attentions[0].core_attention = SdpaCoreAttention(model.config)
    batch = PromptBatch.left_padded(prompts, PAD)
    ids, valid, ref, ref_logp = batch.input_ids, batch.attention_mask, [], []
    for _ in range(max_new_tokens):
        logits = _full_forward_logits(model, ids, valid)[:, -1]
        token = logits.argmax(-1)
        ref.append(token)
        ref_logp.append(torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0])
        ids = torch.cat([ids, token[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
    params = {n: p.detach().clone() for n, p in canonical_parameters(model).items()}
    return {"out": out, "ref": torch.stack(ref, 1), "ref_log_probs": torch.stack(ref_logp, 1),
            "params": params, "training": model.training, "paths": paths, "restored": restored,
            "refused": refused, "refused_te": refused_te, "direct": direct}


def _sampling_worker(seed: int, temperature: float, top_p: float, n: int):
    """Sampled rollouts (twice with one seed, once with another), their teacher-forced log-probs,
    and the same rollouts with EOS tokens and with a stop string taken from the first run (with
    the decode batch size of every step of the EOS run)."""
    model = _gpt()
    engine = _engine(model, detokenize=_detokenize)
    prompts = _prompts()
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=top_p, n=n,
                            seed=seed)
    out = engine.generate(prompts, params)
    again = engine.generate(prompts, params)
    other = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": seed + 1}))
    forced = _teacher_forced_log_probs(lambda i, v: _full_forward_logits(model, i, v),
                                       PromptBatch.left_padded(prompts, PAD), out, n, temperature)
    # Every other rollout's third token is an EOS: half the batch ends within three steps.
    eos = tuple(sorted(set(out.tokens[::2, 2].tolist())))
    stop_string = _detokenize(out.tokens[1, 4:6].tolist())
    decode_rows = []
    decode = engine.adapter.decode
    engine.adapter.decode = lambda tokens: decode_rows.append(len(tokens)) or decode(tokens)
    with_eos = engine.generate(prompts, SamplingParams(**{**params.__dict__,
                                                          "stop_token_ids": eos}))
    engine.adapter.decode = decode
    with_stop = engine.generate(prompts, SamplingParams(**{**params.__dict__,
                                                           "stop_strings": (stop_string,)}))
    return {"out": out, "again": again, "other": other, "forced": forced, "eos": eos,
            "with_eos": with_eos, "decode_rows": decode_rows, "stop_string": stop_string,
            "with_stop": with_stop}


def _detokenize(ids):
    """A toy tokenizer: one letter per token id."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


def _pipeline_worker():
    from megatron.core import parallel_state as ps

    model = _gpt(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    engine = _engine(model, max_rollouts_per_batch=6)  # 3 prompts x 2 samples, then 1 x 2
    prompts = _prompts()
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))
    sampled = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, n=2,
                                                      top_p=0.95, seed=3))
    return {"greedy": greedy, "sampled": sampled}


# -- sampler ---------------------------------------------------------------------------------------


def test_rotary_tables_rotate_bit_for_bit_as_megatron_core_and_once_per_step():
    """The step's cos / sin are computed once for all layers; the rotation with them, of queries
    and keys apart or together, is megatron-core's unfused ``apply_rotary_pos_emb``, bit for bit
    (a rope table sliced by cache rows, and an mrope-like table holding the step's rows)."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from megatron_ease.rl.rollout_attention import RotaryTables, _rotate_query_key

    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False,
                             multi_latent_attention=False, mrope_section=None)
    attention = SimpleNamespace(config=config, pg_collection=SimpleNamespace(cp=None))
    gen = torch.Generator().manual_seed(0)
    rope = torch.rand(40, 1, 1, 16, generator=gen) * 40  # [max_seq, 1, 1, d]
    tables = RotaryTables()
    for start, end, b in [(0, 7, 3), (7, 8, 3), (8, 9, 5)]:
        mrope = torch.rand(end - start, b, 1, 16, generator=gen) * 40
        for freqs, rows in ((rope, rope[start:end]), (mrope, mrope)):
            q = torch.randn(end - start, b, 4, 16, generator=gen)
            k = torch.randn(end - start, b, 2, 16, generator=gen)
            want = [apply_rotary_pos_emb(t, rows, config, cp_group=object()) for t in (q, k)]
            for together in (False, True):
                got = _rotate_query_key(attention, q, k, (freqs, freqs), start, end, tables,
                                        together=together)
                assert all(torch.equal(g, w) for g, w in zip(got, want))
            cos = tables.cos_sin(freqs, start, end, 1.0, q.dtype)[0]
            assert tables.cos_sin(freqs, start, end, 1.0, q.dtype)[0] is cos  # computed once
    tables.clear()

def test_top_p_filter_matches_hf_top_p_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.05, 0.5, 0.9, 0.999):
        want = TopPLogitsWarper(top_p)(None, logits.clone()) == float("-inf")
        assert torch.equal(top_p_removed(logits, top_p), want)


def test_sampler_log_probs_are_temperature_softmax_without_top_p():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(1)) * 2
    params = SamplingParams(temperature=0.7, top_p=0.6)
    tokens, log_probs = sample_next_tokens(logits, params, torch.Generator().manual_seed(2))
    assert not top_p_removed(logits / 0.7, 0.6).gather(-1, tokens[:, None]).any()
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(log_probs, want, atol=1e-6, rtol=0)
    greedy, greedy_lp = sample_next_tokens(logits, SamplingParams(temperature=0))
    assert torch.equal(greedy, logits.argmax(-1))
    torch.testing.assert_close(greedy_lp, torch.log_softmax(logits, -1).amax(-1))


def test_sampling_params_from_dapo_config_and_validation():
    from megatron_ease.config import DapoConfig

    dapo = DapoConfig(group_size=4, max_response_length=32, temperature=0.9, top_p=0.95)
    params = SamplingParams.from_dapo_config(dapo, stop_token_ids=[7], seed=3)
    assert (params.n, params.max_new_tokens, params.temperature, params.top_p, params.seed,
            params.stop_token_ids) == (4, 32, 0.9, 0.95, 3, (7,))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_suppressed_tokens_are_never_sampled_and_leave_the_softmax():
    logits = torch.zeros(2000, 6)
    logits[:, 2] = 5.0  # the suppressed token would win almost always
    params = SamplingParams(temperature=1.0, top_p=0.9, suppress_token_ids=(2, 4))
    tokens, log_probs = sample_next_tokens(logits, params, torch.Generator().manual_seed(0))
    assert not torch.isin(tokens, torch.tensor([2, 4])).any()
    torch.testing.assert_close(log_probs, torch.full_like(log_probs, -torch.log(torch.tensor(4.0))))
    greedy, _ = sample_next_tokens(logits, SamplingParams(temperature=0, suppress_token_ids=(2,)))
    assert not (greedy == 2).any()


@pytest.mark.parametrize("top_p", [1.0, 0.8, 0.5])
def test_sampler_draws_from_the_tempered_nucleus(top_p):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(40000, -1)
    tokens, _ = sample_next_tokens(logits, SamplingParams(temperature=1.5, top_p=top_p),
                                   torch.Generator().manual_seed(0))
    want = (logits[0] / 1.5).masked_fill(top_p_removed(logits[:1] / 1.5, top_p)[0],
                                         float("-inf")).softmax(-1)
    freq = torch.bincount(tokens, minlength=6).double() / tokens.numel()
    torch.testing.assert_close(freq, want.double(), atol=0.01, rtol=0)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_nucleus_sampler_draws_only_inside_top_p_from_flat_to_peaked_rows(top_p):
    gen = torch.Generator().manual_seed(3)
    sharpness = torch.linspace(0.1, 6.0, 400)[:, None]  # near-uniform rows ... near one-hot rows
    logits = torch.randn(400, 300, generator=gen) * sharpness
    tokens, _ = sample_next_tokens(logits, SamplingParams(temperature=1.0, top_p=top_p), gen)
    assert not top_p_removed(logits, top_p).gather(-1, tokens[:, None]).any()


def test_draw_reaches_tokens_far_below_float32_resolution_of_the_running_sum():
    """Past a running sum of 0.5, float32 steps by 6e-8: a 1e-8 token after a 1.0 one had no
    interval of its own (cumsum [1, 1, 2]), so no uniform could ever draw it."""
    from megatron_ease.rl.sampling import _draw

    weights = torch.tensor([[1.0, 1e-8, 1.0]]).expand(3, -1)
    # Total 2 + 1e-8: the uniform 0.5 lands at 1 + 5e-9, inside token 1's interval (1, 1 + 1e-8].
    assert _draw(weights, torch.tensor([0.25, 0.5, 0.75])).tolist() == [0, 1, 2]


def test_stop_string_of_multibyte_characters_is_found_with_byte_level_tokens():
    """The matcher decodes a window of the last tokens; sized in characters, it missed a stop
    string of CJK characters (3 characters, 9 bytes: 9 byte-level tokens)."""
    from megatron_ease.rl.sampling import StopStringMatcher

    data = "推理完毕。答案：".encode()
    matcher = StopStringMatcher(["答案："], lambda ids: bytes(ids).decode(errors="ignore"))
    tokens = torch.tensor([list(data)])
    assert matcher(tokens, torch.tensor([len(data)]), torch.tensor([True])).tolist() == [True]
    assert matcher(tokens, torch.tensor([len(data) - 1]), torch.tensor([True])).tolist() == [False]


def test_nucleus_sampler_keeps_tokens_tied_at_the_boundary_together():
    # Mass 0.5 + five tokens of 0.1: the boundary of top-p 0.7 falls inside the tie, so all five
    # stay (a sort-based filter keeps two of them, chosen by its sort order).
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])).expand(50000, -1)
    tokens, _ = sample_next_tokens(logits, SamplingParams(temperature=1.0, top_p=0.7),
                                   torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=6).double() / tokens.numel()
    torch.testing.assert_close(freq, logits[0].exp().double(), atol=0.01, rtol=0)


# -- GPT engine ------------------------------------------------------------------------------------

def _hf_qwen2(params):
    """HF Qwen2ForCausalLM holding the megatron GPT's weights (the Qwen2.5-VL weight table's
    language-model mappings: QKV per-group interleave, [gate; up] split)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_ease.models.qwen_vl.hf_tables import QWEN2_5_VL
    from megatron_ease.models.qwen_vl.hf_weights import hf_tensors
    from megatron_ease.models.qwen_vl.param_mapping import AttentionLayout

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=PAD,
                         bos_token_id=None, eos_token_id=None)
    hf = Qwen2ForCausalLM(config).eval()
    named = [(f"language_model.{name}", t) for name, t in params.items()]
    state = dict(hf_tensors(named, QWEN2_5_VL, AttentionLayout(4, 2, 8), naming="legacy"))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def test_greedy_with_kv_cache_equals_full_recompute_and_hf_generate():
    steps = 10
    res = run_distributed(_greedy_worker, steps)[0]
    out = res["out"]
    assert torch.equal(out.tokens, res["ref"])
    torch.testing.assert_close(out.log_probs, res["ref_log_probs"], atol=1e-5, rtol=0)
    assert out.lengths.tolist() == [steps] * len(PROMPT_LENGTHS)
    assert not out.finished.any() and res["training"], "model must be back in train mode"

    # The rollout attention path (rotated-key cache, SDPA) = megatron-core's static path, and the
    # model gets its own modules back; with the model's attention, padding needs the local one.
    paths = res["paths"]
    assert paths["rollout"].finished.sum() >= 2, "some rollouts end early"
    assert torch.equal(paths["rollout"].tokens, paths["megatron"].tokens)
    assert torch.equal(paths["rollout"].lengths, paths["megatron"].lengths)
    torch.testing.assert_close(paths["rollout"].log_probs, paths["megatron"].log_probs,
                               atol=1e-5, rtol=0)
    assert res["restored"]
    # TP = 1 linears (and the embedding) without the autograd Function: bit-identical rollouts.
    # qkv, proj, fc1, fc2 of 4 layers, the embedding and the output layer
    assert res["direct"]["rollout"] == 4 * 4 + 2 and res["direct"]["autograd_linears"] == 0
    for key in ("tokens", "log_probs", "lengths"):
        assert torch.equal(getattr(paths["rollout"], key),
                           getattr(paths["autograd_linears"], key))
    assert res["refused"] and "key-padding mask" in res["refused"]
    assert res["refused_te"] and "TransformerEngine" in res["refused_te"]

    hf = _hf_qwen2(res["params"])
    batch = PromptBatch.left_padded(_prompts(), PAD)
    with torch.no_grad():
        want = hf.generate(batch.input_ids, attention_mask=batch.attention_mask.long(),
                           max_new_tokens=steps, do_sample=False, pad_token_id=PAD)
    assert torch.equal(out.tokens, want[:, batch.input_ids.shape[1]:])


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_sampled_rollouts_reproducible_equal_on_tp_ranks_and_log_probs_match_forward(tp):
    n, temperature = 3, 0.8
    ranks = run_distributed(_sampling_worker, 11, temperature, 0.9, n,
                            tensor_model_parallel_size=tp)
    res = ranks[0]
    out = res["out"]
    for other in ranks[1:]:  # TP ranks (tp=2) or DP replicas (tp=1) return the same rollouts
        for key in ("out", "with_eos", "with_stop"):
            assert torch.equal(other[key].tokens, res[key].tokens)
            assert torch.equal(other[key].log_probs, res[key].log_probs)
    assert out.tokens.shape == (len(PROMPT_LENGTHS) * n, 12)
    assert out.prompt_index.tolist() == [i for i in range(len(PROMPT_LENGTHS)) for _ in range(n)]
    assert torch.equal(out.tokens, res["again"].tokens), "same seed, same rollouts"
    assert not torch.equal(out.tokens, res["other"].tokens), "another seed, other rollouts"
    groups = out.tokens.view(len(PROMPT_LENGTHS), n, -1)
    assert not torch.equal(groups[:, 0], groups[:, 1]), "the G samples of a prompt differ"
    mask = out.response_mask
    torch.testing.assert_close(out.log_probs[mask], res["forced"][mask], atol=1e-5, rtol=0)

    # EOS: each rollout ends at its first EOS (included), padded after; the prefix is unchanged,
    # also for the rollouts decoded on after the finished ones left the batch.
    eos, stopped = torch.tensor(res["eos"]), res["with_eos"]
    for row in range(out.tokens.shape[0]):
        hits = torch.isin(out.tokens[row], eos).nonzero()
        length = int(hits[0]) + 1 if len(hits) else out.tokens.shape[1]
        assert int(stopped.lengths[row]) == length
        assert bool(stopped.finished[row]) == bool(len(hits))
        assert torch.equal(stopped.tokens[row, :length], out.tokens[row, :length])
        torch.testing.assert_close(stopped.log_probs[row, :length], out.log_probs[row, :length],
                                   atol=1e-6, rtol=0)
        assert (stopped.tokens[row, length:] == PAD).all()
        assert (stopped.log_probs[row, length:] == 0).all()
    assert int(stopped.lengths[::2].max()) <= 3
    # Decode step k feeds token k: the rollouts longer than k + 1 must be in its batch, and the
    # finished half leaves it.
    rows, decode_rows = out.tokens.shape[0], res["decode_rows"]
    assert decode_rows[0] == rows and min(decode_rows) <= rows // 2
    assert all(int((stopped.lengths > k + 1).sum()) <= size for k, size in enumerate(decode_rows))

    # Stop string: ends with the token that completes the string.
    text_stop = res["with_stop"]
    for row in range(out.tokens.shape[0]):
        ids = out.tokens[row].tolist()
        ends = [k for k in range(1, len(ids) + 1) if res["stop_string"] in _detokenize(ids[:k])]
        length = ends[0] if ends else len(ids)
        assert int(text_stop.lengths[row]) == length
        assert torch.equal(text_stop.tokens[row, :length], out.tokens[row, :length])
    assert int(text_stop.lengths[1]) <= 6


def test_pipeline_parallel_2_generates_what_a_single_stage_generates():
    ref = run_distributed(_pipeline_worker)[0]
    stages = run_distributed(_pipeline_worker, pipeline_model_parallel_size=2)
    for stage in stages:  # every stage returns the rollouts
        for key in ("greedy", "sampled"):
            assert torch.equal(stage[key].tokens, ref[key].tokens), key
            assert torch.equal(stage[key].lengths, ref[key].lengths), key
            torch.testing.assert_close(stage[key].log_probs, ref[key].log_probs, atol=1e-5,
                                       rtol=0)
    assert ref["sampled"].tokens.shape[0] == 2 * len(PROMPT_LENGTHS)


def _pipelined_worker(pipelined: bool):
    """Five prompts (groups of 2 and 3 at PP=2) sampled with stop tokens (rollouts end at
    different steps and leave their group's cache), with a stop string, and greedily; and, at PP
    > 1, which (tick, group, step) each stage ran in the pipelined decode."""
    from megatron.core import parallel_state as ps

    from megatron_ease.rl import rollout

    model = _gpt(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    engine = _engine(model, detokenize=_detokenize, pipelined=pipelined)
    prompts = _prompts() + [Prompt(torch.arange(10, 19))]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, top_p=0.95, seed=7,
                            stop_token_ids=tuple(range(5, VOCAB, 4)))
    items = []
    work = rollout._PipelinedDecode._work

    def recording(self, tick, inputs, received):
        item = self._item(self.stage, tick)
        if item is not None:
            items.append((tick, *item))
        return work(self, tick, inputs, received)

    rollout._PipelinedDecode._work = recording
    try:
        sampled = engine.generate(prompts, params)
        sampled_items = list(items)
        items.clear()
        stop_string = _detokenize(sampled.tokens[1, 3:5].tolist())
        with_stop = engine.generate(prompts, SamplingParams(**{**params.__dict__,
                                                               "stop_strings": (stop_string,)}))
        items.clear()
        greedy = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    finally:
        rollout._PipelinedDecode._work = work
    return {"sampled": sampled, "with_stop": with_stop, "greedy": greedy,
            "sampled_items": sampled_items, "greedy_items": items,
            "training": model.training}


def test_pipelined_decode_generates_what_one_stage_does_with_both_stages_busy():
    ref = run_distributed(_pipelined_worker, True)[0]
    assert ref["greedy_items"] == [], "one stage: no pipelined decode"
    assert ref["sampled"].finished.sum() >= 4 and (ref["sampled"].lengths < 10).sum() >= 4
    assert (ref["with_stop"].lengths < ref["sampled"].lengths).any()
    runs = {name: run_distributed(_pipelined_worker, pipelined, pipeline_model_parallel_size=2)
            for name, pipelined in (("pipelined", True), ("sequential", False))}
    for name, stages in runs.items():
        for stage in stages:
            for key in ("sampled", "with_stop", "greedy"):
                out, want = stage[key], ref[key]
                assert torch.equal(out.tokens, want.tokens), (name, key)
                assert torch.equal(out.lengths, want.lengths), (name, key)
                assert torch.equal(out.finished, want.finished), (name, key)
                assert torch.equal(out.prompt_index, want.prompt_index), (name, key)
                torch.testing.assert_close(out.log_probs, want.log_probs, atol=1e-5, rtol=0)
            assert stage["training"], "model must be back in train mode"
    assert runs["sequential"][0]["greedy_items"] == []
    first, last = runs["pipelined"]
    for key in ("sampled_items", "greedy_items"):
        # Stage 1 runs each (group, step) one tick after stage 0, and step k of group g at tick
        # 2k + g + stage.
        assert [(t + 1, g, k) for t, g, k in first[key]] == last[key], key
        assert all(t == 2 * k + g for t, g, k in first[key]), key
    # Greedy, no stop: 2 groups x 10 steps; both stages work at every tick but the first and
    # last of the 21.
    busy = [{t for t, _, _ in stage["greedy_items"]} for stage in (first, last)]
    assert len(busy[0] & busy[1]) == 19 and len(busy[0] | busy[1]) == 21
    # With stop tokens a group's last step makes its longest rollout's last token (prompts 0-1
    # are group 0, rows 0-3; prompts 2-4 group 1).
    lengths = ref["sampled"].lengths
    for g, rows in ((0, slice(0, 4)), (1, slice(4, 10))):
        steps = [k for _, gg, k in first["sampled_items"] if gg == g]
        assert steps == list(range(int(lengths[rows].max()))), (g, steps)
    assert int(lengths[:4].max()) < 10 or int(lengths[4:].max()) < 10, lengths


# -- Qwen-VL ---------------------------------------------------------------------------------------

def _vl_prompts(patch_size: int = 14):
    """The fixture batch's two samples as prompts: [text, image, text, image, text], [text, image,
    text], unpadded, each with its own images' patches (patch 14: Qwen2.5-VL, 16: Qwen3-VL)."""
    from tests.qwen_fixtures import tiny_batch

    batch = tiny_batch(patch_size=patch_size)
    patches = [int(t * h * w) for t, h, w in batch["image_grid_thw"].tolist()]
    pixels = batch["pixel_values"].split(patches)
    grids = batch["image_grid_thw"]
    valid = batch["attention_mask"]
    return [Prompt(batch["input_ids"][0][valid[0]], torch.cat(pixels[:2]), grids[:2]),
            Prompt(batch["input_ids"][1][valid[1]], pixels[2], grids[2:])]


def _qwen_vl_worker(hf_dir: str, temperature: float, n: int, max_new_tokens: int,
                    patch_size: int = 14, first_stage_layers: int = 2):
    """Rollouts of the VL prompts, the tower's calls (patches per call) and, at PP=1, the
    teacher-forced log-probs of the rollouts (``first_stage_layers``: decoder layers of stage 0
    at PP > 1)."""
    from megatron.core import parallel_state as ps

    from tests.unit.test_qwen25vl_model import _build

    model = _build(hf_dir, first_stage_layers=first_stage_layers
                   if ps.get_pipeline_model_parallel_world_size() > 1 else None)
    tower_calls, rotary_rows = [], []
    if model.vision_model is not None:
        model.vision_model.register_forward_hook(
            lambda module, args, output: tower_calls.append(int(args[0].shape[0])))
    model.language_model.rotary_pos_emb.register_forward_hook(
        lambda module, args, output: rotary_rows.append(int(output.shape[0])))
    prompts = _vl_prompts(patch_size)
    engine = _engine(model)
    cache_rows = []  # (rows of the cache, rows kept) at each select_rows
    select = engine.adapter._attention.select_cache_rows

    def recording(context, rows):
        memory = next(iter(context.key_value_memory_dict.values()))[0]
        cache_rows.append((int(memory.shape[0]), len(rows)))
        select(context, rows)

    engine.adapter._attention.select_cache_rows = recording
    out = engine.generate(prompts, SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=5))
    calls = list(tower_calls)

    def logits_fn(input_ids, valid):
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        images = [i for i in range(len(prompts)) for _ in range(n)]
        with torch.no_grad():
            logits = model(input_ids, attention_mask=valid,
                           pixel_values=torch.cat([prompts[i].pixel_values for i in images]),
                           image_grid_thw=torch.cat([prompts[i].image_grid_thw for i in images]))
        return gather_from_tensor_model_parallel_region(logits)

    forced = None
    if ps.get_pipeline_model_parallel_world_size() == 1:
        forced = _teacher_forced_log_probs(logits_fn, PromptBatch.left_padded(prompts, PAD), out,
                                           n, temperature)
    return {"out": out, "forced": forced, "tower_calls": calls, "cache_rows": cache_rows,
            "rotary_rows": rotary_rows[:max_new_tokens]}


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    from tests.qwen_fixtures import save_tiny_hf

    path = tmp_path_factory.mktemp("rollout_qwen25vl")
    return str(path), save_tiny_hf(path)


def _hf_greedy(hf, prompts, steps):
    """HF ``generate``'s greedy continuation of left-padded prompts with images, [n, steps]."""
    from tests.qwen_fixtures import IMAGE

    batch = PromptBatch.left_padded(prompts, PAD)
    with torch.no_grad():
        want = hf.generate(
            batch.input_ids, attention_mask=batch.attention_mask.long(),
            pixel_values=torch.cat([p.pixel_values for p in prompts]),
            image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]),
            mm_token_type_ids=(batch.input_ids == IMAGE).int(),
            max_new_tokens=steps, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    return want[:, batch.input_ids.shape[1]:]


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1_pp1", "tp2", "pp2"])
def test_qwen_vl_greedy_with_images_matches_hf_generate(tiny_vl, tp, pp):

    hf_dir, hf = tiny_vl
    steps = 8
    ranks = run_distributed(_qwen_vl_worker, hf_dir, 0.0, 1, steps,
                            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    for other in ranks[1:]:
        assert torch.equal(other["out"].tokens, ranks[0]["out"].tokens)
    res = ranks[-1]
    out = res["out"]
    assert torch.equal(out.tokens, _hf_greedy(hf, _vl_prompts(), steps))
    if res["forced"] is not None:
        mask = out.response_mask
        torch.testing.assert_close(out.log_probs[mask], res["forced"][mask], atol=1e-5, rtol=0)


def test_qwen_vl_encodes_images_once_per_prompt_for_a_group(tiny_vl):
    n = 3
    res = run_distributed(_qwen_vl_worker, tiny_vl[0], 1.0, n, 6)[0]
    out = res["out"]
    num_patches = sum(p.pixel_values.shape[0] for p in _vl_prompts())
    assert res["tower_calls"] == [num_patches], "one tower call over each prompt's images once"
    # The mrope table of a decode step covers that step's one position, not the whole prefix.
    prompt_len = max(len(p.input_ids) for p in _vl_prompts())
    assert res["rotary_rows"] == [prompt_len] + [1] * 5, res["rotary_rows"]
    # The prefill's cache holds the prompts' rows; the G copies are made after it.
    assert res["cache_rows"][0] == (2, 2 * n), res["cache_rows"]
    assert out.tokens.shape[0] == 2 * n
    groups = out.tokens.view(2, n, -1)
    assert not torch.equal(groups[:, 0], groups[:, 1])
    mask = out.response_mask
    torch.testing.assert_close(out.log_probs[mask], res["forced"][mask], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_qwen3vl(tmp_path_factory):
    from tests.qwen_fixtures import save_tiny_hf, tiny_qwen3vl_config

    path = tmp_path_factory.mktemp("rollout_qwen3vl")
    return str(path), save_tiny_hf(path, tiny_qwen3vl_config())


def _qwen3vl_text_only_worker(hf_dir: str, empty_image_sets: bool):
    """Greedy rollouts of two text-only prompts, their images given as None or as empty sets
    (``[0, D]`` patches, ``[0, 3]`` grids: what ``training.rollouts.split_prompts`` builds)."""
    from megatron.core import parallel_state as ps

    from tests.unit.test_qwen25vl_model import _build

    model = _build(hf_dir, first_stage_layers=1
                   if ps.get_pipeline_model_parallel_world_size() > 1 else None)
    patch_dim = 3 * 2 * 16 * 16  # channels x temporal patch x patch 16 x 16
    prompts = [Prompt(torch.tensor(ids), *((torch.zeros(0, patch_dim),
                                           torch.zeros(0, 3, dtype=torch.long))
                                          if empty_image_sets else (None, None)))
               for ids in ([5, 6, 7, 8, 9], [11, 12, 13])]
    return _engine(model).generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0,
                                                           n=1, seed=0)).tokens


def test_qwen3vl_text_only_prompts_with_empty_image_sets_at_pipeline_parallel_2(tiny_qwen3vl):
    """Stage 0 sent plain hidden states for an empty image set (no images to embed) while
    stage 1, counting the set as images, received DeepStack-wide buffers: garbage tokens, no
    error. Empty sets are now no images everywhere."""
    reference = run_distributed(_qwen3vl_text_only_worker, tiny_qwen3vl[0], False,
                                world_size=1)[0]
    for empty in (False, True):
        for tokens in run_distributed(_qwen3vl_text_only_worker, tiny_qwen3vl[0], empty,
                                      pipeline_model_parallel_size=2):
            assert torch.equal(tokens, reference), (empty, tokens, reference)


def test_qwen3vl_pipeline_parallel_2_with_deepstack_across_stages_matches_hf_generate(tiny_qwen3vl):
    """Stage 0 holds decoder layer 0 only, so the prefill sends the hidden states with DeepStack
    levels 1 and 2 packed after them (3h wide) to the layers that add them on stage 1; decode
    steps send plain hidden states (h). Greedy = one stage = HF generate; sampled groups too."""

    hf_dir, hf = tiny_qwen3vl
    steps, n = 8, 2
    runs = {}
    for pp in (1, 2):
        runs[pp] = [run_distributed(_qwen_vl_worker, hf_dir, temperature, samples, steps, 16, 1,
                                    pipeline_model_parallel_size=pp)
                    for temperature, samples in ((0.0, 1), (1.0, n))]
    (greedy, sampled), (greedy_pp, sampled_pp) = ([r[-1]["out"] for r in runs[pp]]
                                                  for pp in (1, 2))
    for stage in (0, 1):
        assert torch.equal(runs[2][0][stage]["out"].tokens, greedy.tokens)
        assert torch.equal(runs[2][1][stage]["out"].tokens, sampled.tokens)
    torch.testing.assert_close(greedy_pp.log_probs, greedy.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(sampled_pp.log_probs, sampled.log_probs, atol=1e-5, rtol=0)
    assert sampled.tokens.shape[0] == 2 * n

    assert torch.equal(greedy.tokens, _hf_greedy(hf, _vl_prompts(patch_size=16), steps))
    mask = sampled.response_mask
    torch.testing.assert_close(sampled.log_probs[mask], runs[1][1][-1]["forced"][mask],
                               atol=1e-5, rtol=0)
