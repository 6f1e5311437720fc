"""EASE inside a megatron-core model (DESIGN §4): a tiny GPTModel whose token sequence holds a fake
image region, EASE layers chosen by spec, TP/PP/DP layouts against single-process autograd of
``L_main + λ·L_EASE``, recomputation, bf16, and bit-identity with the plain model when off."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from megatron_ease.ease.loss import ease_alignment_loss
from tests.harness import run_distributed
from tests.megatron_utils import assert_close_dicts, gathered_grads, tiny_gpt, tiny_gpt_config
from tests.unit.test_ease_attention import naive_image_attention_mass

VOCAB, SEQ, BATCH, NUM_LAYERS = 64, 16, 4, 4
EASE_LAYERS = (1, 2)  # 0-based global: one on each stage at PP=2 (layers 0-1 | 2-3)
LAMBDA = 0.5  # large, so that a wrong EASE gradient shows above float noise


def _config(recompute=False, bf16=False):
    dtype = torch.bfloat16 if bf16 else torch.float32
    extra = dict(recompute_granularity="full", recompute_method="uniform",
                 recompute_num_layers=1) if recompute else {}
    # As on GPU: stage outputs are freed after the send, so nothing may alias them.
    return tiny_gpt_config(num_layers=NUM_LAYERS, params_dtype=dtype, pipeline_dtype=dtype,
                           bf16=bf16, deallocate_pipeline_outputs=True, **extra)


def _tiny_gpt(ease_layers=EASE_LAYERS, recompute=False, bf16=False, plain_spec=False,
              core_attention=None):
    """The GPT of test_megatron_parallel, built from a per-layer spec list with EASE layers.

    ``plain_spec`` builds it the ordinary way (one layer ModuleSpec), to check that the spec route
    changes nothing; ``core_attention`` replaces the local core attention class in every layer.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ease.ease.specs import ease_block_spec, ease_layer_specs

    config = _config(recompute, bf16)
    layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if core_attention is not None:
        attention = layer_spec.submodules.self_attention
        layer_spec = dataclasses.replace(layer_spec, submodules=dataclasses.replace(
            layer_spec.submodules, self_attention=dataclasses.replace(
                attention, submodules=dataclasses.replace(
                    attention.submodules, core_attention=core_attention))))
    spec = layer_spec if plain_spec else ease_block_spec(
        config, ease_layer_specs(layer_spec, NUM_LAYERS, ease_layers))
    return tiny_gpt(VOCAB, SEQ, config=config, spec=spec)


def _batch():
    """Prompt with a 6-token "image" (different offsets), a response, right padding on sample 1.

    Gates [1, 0, 1, 1] put one gated sample on DP rank 0 and two on rank 1, so only the global
    normaliser makes the DP split agree with the single batch.
    """
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    image = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    evidence = torch.zeros_like(image)
    response = torch.zeros_like(image)  # label-shifted response rows = DAPO loss positions
    valid = torch.ones_like(image)
    for b in range(BATCH):
        start = 1 + b % 2
        image[b, start:start + 6] = True
        evidence[b, start + 1:start + 4] = True
        length = SEQ - 3 if b == 1 else SEQ
        valid[b, length:] = False
        first_response_token = 9 + b % 3
        response[b, first_response_token - 1:length - 1] = True
    p = torch.rand(BATCH, SEQ, generator=gen, dtype=torch.float64) * evidence
    p = p / p.sum(dim=1, keepdim=True)
    target = ((0.9 * p + 0.1 / 6) * image).float()
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)
    attention_mask = (causal[None] | ~valid[:, None, :]).unsqueeze(1)  # [b, 1, s, s], True = masked
    return dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                position_ids=torch.arange(SEQ).expand(BATCH, SEQ), attention_mask=attention_mask,
                image_mask=image, evidence_mask=evidence, response_mask=response,
                key_valid_mask=valid, target=target, weight=torch.tensor([1.0, 0.0, 1.0, 1.0]))


def _select(batch, index):
    return {k: v[index] for k, v in batch.items()}


def _context(mb, normalizer, gradient_scale, **kwargs):
    from megatron_ease.ease.context import EaseContext

    return EaseContext(mb["image_mask"], mb["response_mask"], mb["target"], mb["weight"],
                       normalizer=normalizer, num_layers=len(EASE_LAYERS),
                       gradient_scale=gradient_scale, key_valid_mask=mb["key_valid_mask"],
                       evidence_mask=mb["evidence_mask"], **kwargs)


def _token_losses(model, mb):
    return model(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])


def _core_attention(model, layer):
    return model.decoder.layers[layer].self_attention.core_attention


def _capture_qk(model, layers):
    """Post-rotary query/key entering each listed layer's core attention, [s, b, heads, d]."""
    captured = {}
    for layer in layers:
        def hook(module, args, layer=layer):
            captured[layer] = (args[0], args[1])

        _core_attention(model, layer).register_forward_pre_hook(hook)
    return captured


def _reference_step(batch):
    """Single process, single micro-batch: autograd of L_main + λ·L_EASE on the plain model.

    L_main is the token mean over the batch's response tokens; L_EASE the gated mean (global Σw)
    averaged over layers, from a naive full-softmax mass on q/k taken by hooks. Needs TP = PP = 1.
    """
    model = _tiny_gpt(ease_layers=())
    qk = _capture_qk(model, EASE_LAYERS)
    token_losses = _token_losses(model, batch)
    loss_mask = batch["response_mask"].float()
    main = (token_losses * loss_mask).sum() / loss_mask.sum()
    layer_losses, in_evidence, in_evidence_gated = {}, {}, {}
    gated = batch["weight"] > 0
    for layer, (q, k) in qk.items():
        # The naive full softmax under plain autograd, not the custom Function the layers use:
        # a bug in its backward must not reach both sides.
        mass = naive_image_attention_mass(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3),
                                          batch["image_mask"], batch["response_mask"],
                                          valid=batch["key_valid_mask"])
        layer_losses[layer] = ease_alignment_loss(mass, batch["target"], batch["image_mask"],
                                                  batch["weight"])
        # Evidence share per sample, written out: image mass on evidence over all image mass.
        image_mass = (mass.detach().double() * batch["image_mask"]).sum(1)
        share = (mass.detach().double() * batch["evidence_mask"]).sum(1) / image_mass
        in_evidence[layer] = float(share.mean())
        in_evidence_gated[layer] = float(share[gated].mean())
    ease = sum(layer_losses.values()) / len(layer_losses)
    (main + LAMBDA * ease).backward()
    return {"main": main.detach(), "ease": ease.detach(),
            "layers": {k: v.detach() for k, v in layer_losses.items()},
            "in_evidence": in_evidence, "in_evidence_gated": in_evidence_gated,
            "gated_fraction": float(gated.double().mean()), "grads": gathered_grads(model)}


# ---------------------------------------------------------------------------------------------
# Tensor parallel: one forward/backward with autograd, EASE term injected by the layers.


def _tp_step(core_attention=None):
    from megatron.core import parallel_state

    from megatron_ease.ease.context import ease_context

    batch = _batch()
    model = _tiny_gpt(core_attention=core_attention)
    qk = _capture_qk(model, EASE_LAYERS)
    context = _context(batch, normalizer=batch["weight"].sum(), gradient_scale=LAMBDA,
                       keep_mass=True)
    with ease_context(model, context):
        token_losses = _token_losses(model, batch)
    loss_mask = batch["response_mask"].float()
    ((token_losses * loss_mask).sum() / loss_mask.sum()).backward()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    core = type(_core_attention(model, EASE_LAYERS[0])).__bases__[-1].__name__
    out = {"tp": tp, "core": core, "grads": gathered_grads(model),
           "layers": {k: r.loss for k, r in context.records.items()},
           "mass": {k: r.mass for k, r in context.records.items()},
           "evidence": {k: r.evidence_attention_sum / r.evidence_samples
                        for k, r in context.records.items()}}
    if tp == 1:
        # The layer's mass is the naive full-softmax slice of the q/k it was given.
        out["naive_mass"] = {
            layer: naive_image_attention_mass(
                q.detach().double().permute(1, 2, 0, 3), k.detach().double().permute(1, 2, 0, 3),
                batch["image_mask"], batch["response_mask"], valid=batch["key_valid_mask"])
            for layer, (q, k) in qk.items()}
        out["reference"] = _reference_step(batch)
    return out


def test_ease_in_model_matches_reference_and_tensor_parallel_2_matches_single_rank():
    single = run_distributed(_tp_step, tensor_model_parallel_size=1)[0]
    ref = single["reference"]
    assert sorted(single["layers"]) == list(EASE_LAYERS)
    for layer in EASE_LAYERS:
        torch.testing.assert_close(single["mass"][layer].double(), single["naive_mass"][layer],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single["layers"][layer], ref["layers"][layer],
                                   atol=1e-6, rtol=1e-6)
        assert 0 < single["evidence"][layer] < 1
    assert ref["ease"] > 0.1, "the test needs a sizeable EASE term"
    assert_close_dicts(single["grads"], ref["grads"], atol=2e-6)

    for out in run_distributed(_tp_step, tensor_model_parallel_size=2):
        assert out["tp"] == 2
        for layer in EASE_LAYERS:
            torch.testing.assert_close(out["mass"][layer], single["mass"][layer],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out["layers"][layer], single["layers"][layer],
                                       atol=1e-6, rtol=1e-6)
        assert_close_dicts(out["grads"], single["grads"], atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Pipeline parallel through megatron-core's schedule, with and without full recomputation.


def _schedule_step(num_microbatches, recompute=False, ddp=False):
    """One step through get_forward_backward_func on this rank's share of the batch.

    Main loss: token sum over the global token count, times what undoes the schedule's
    /num_microbatches and DDP's DP average; EASE: global Σw and ``ease_gradient_scale``.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ease.ease.context import (
        ease_attention_modules,
        ease_context,
        ease_gradient_scale,
        global_gated_count,
        reduce_ease_metrics,
    )

    batch = _batch()
    model = _tiny_gpt(recompute=recompute)
    ease_modules = sorted(m.ease_layer_index for m in ease_attention_modules(model))
    dp = parallel_state.get_data_parallel_world_size() if ddp else 1
    if ddp:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        model = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        rank = parallel_state.get_data_parallel_rank()
        batch = _select(batch, slice(rank * BATCH // dp, (rank + 1) * BATCH // dp))
    mbs = batch["tokens"].shape[0] // num_microbatches
    micro = [_select(batch, slice(i * mbs, (i + 1) * mbs)) for i in range(num_microbatches)]

    # Without DDP every rank runs its own copy of the step: nothing to reduce over DP.
    group = parallel_state.get_data_parallel_group() if ddp else _own_group()
    normalizer = global_gated_count([mb["weight"] for mb in micro], group=group)
    num_tokens = torch.tensor(float(batch["response_mask"].sum()))
    if ddp:
        torch.distributed.all_reduce(num_tokens, group=group)
    scale = ease_gradient_scale(LAMBDA, data_parallel_size=dp)
    contexts = []

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        context = _context(mb, normalizer, scale)
        contexts.append(context)
        with ease_context(model, context):
            output = _token_losses(model, mb)
        mask = mb["response_mask"].float()

        def loss_func(token_losses):
            loss = (token_losses * mask).sum() / num_tokens
            return loss * num_microbatches * dp, {"loss": loss.detach()}

        return output, loss_func

    with _counting_aux_backward() as aux_backward_calls:
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
            num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=mbs,
            forward_only=False)
    if ddp:
        model.finish_grad_sync()
        model = model.module
    metrics = reduce_ease_metrics(contexts, EASE_LAYERS, data_parallel_group=group)
    out = {"stage": parallel_state.get_pipeline_model_parallel_rank(),
           "grads": gathered_grads(model), "ease_modules": ease_modules, "metrics": metrics,
           "aux_backward_calls": aux_backward_calls[0],
           "main": sum(d["loss"] for d in losses) if losses else None,
           "records": [{k: r.loss for k, r in c.records.items()} for c in contexts]}
    if parallel_state.get_tensor_model_parallel_world_size() == 1 and \
            parallel_state.get_pipeline_model_parallel_world_size() == 1:
        out["reference"] = _reference_step(_batch())
    return out


@contextlib.contextmanager
def _counting_aux_backward():
    """Count the auto-scaler's backward calls: the EASE gradient injections."""
    from megatron_ease.ease.loss import EaseLossAutoScaler

    calls = [0]
    original = EaseLossAutoScaler.backward

    def backward(ctx, grad):
        calls[0] += 1
        return original(ctx, grad)

    EaseLossAutoScaler.backward = staticmethod(backward)
    try:
        yield calls
    finally:
        EaseLossAutoScaler.backward = staticmethod(original)


def _own_group():
    """A process group of this rank alone (new_group is collective: every rank makes them all)."""
    world = torch.distributed.get_world_size()
    return [torch.distributed.new_group([r]) for r in range(world)][torch.distributed.get_rank()]


def test_ease_pipeline_parallel_2_with_and_without_recompute_matches_single_stage():
    ref = run_distributed(_schedule_step, 2, pipeline_model_parallel_size=1)[0]
    torch.testing.assert_close(ref["main"], ref["reference"]["main"], atol=1e-6, rtol=0)
    assert ref["metrics"]["ease/loss"] == pytest.approx(float(ref["reference"]["ease"]), rel=1e-5)
    assert_close_dicts(ref["grads"], ref["reference"]["grads"], atol=2e-6)
    assert ref["aux_backward_calls"] == 4  # 2 layers x 2 micro-batches

    for recompute in (False, True):
        stages = run_distributed(_schedule_step, 2, recompute, pipeline_model_parallel_size=2)
        assert [s["stage"] for s in stages] == [0, 1]
        # Layer 1 lives on stage 0 and layer 2 on stage 1: global indices, not local ones.
        assert [s["ease_modules"] for s in stages] == [[1], [2]]
        # Every micro-batch's context was filled exactly by its own stage's layer.
        assert [list(r) for r in stages[0]["records"]] == [[1], [1]]
        assert [list(r) for r in stages[1]["records"]] == [[2], [2]]
        # One injection per layer and micro-batch: a recomputed layer does not inject twice.
        assert [s["aux_backward_calls"] for s in stages] == [2, 2]
        torch.testing.assert_close(stages[1]["main"], ref["main"], atol=1e-6, rtol=0)
        for stage in stages:
            assert stage["metrics"] == pytest.approx(ref["metrics"], rel=1e-5)
        merged = {**stages[0]["grads"], **stages[1]["grads"]}
        assert_close_dicts(merged, ref["grads"], atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Scaling invariant: DP=2 × 2 micro-batches after DDP's reduction == one batch, one process.


def test_ease_data_parallel_micro_batches_match_single_batch_step():
    for out in run_distributed(_schedule_step, 2, False, True):
        ref = out["reference"]
        assert out["metrics"]["ease/loss"] == pytest.approx(float(ref["ease"]), rel=1e-5)
        for layer in EASE_LAYERS:
            assert out["metrics"][f"ease/loss/layer_{layer}"] == pytest.approx(
                float(ref["layers"][layer]), rel=1e-5)
        # Metrics over both ranks' micro-batches: evidence share of all and of gated samples
        # (sample 1, ungated, on rank 0 only), and the gated fraction.
        assert out["metrics"]["ease/gated_fraction"] == pytest.approx(ref["gated_fraction"])
        for name, key in (("ease/attention_in_evidence", "in_evidence"),
                          ("ease/attention_in_evidence_gated", "in_evidence_gated")):
            for layer in EASE_LAYERS:
                assert out["metrics"][f"{name}/layer_{layer}"] == pytest.approx(
                    ref[key][layer], rel=1e-5)
            assert out["metrics"][name] == pytest.approx(
                sum(ref[key].values()) / len(EASE_LAYERS), rel=1e-5)
        assert ref["in_evidence_gated"] != pytest.approx(ref["in_evidence"], rel=1e-3)
        assert_close_dicts(out["grads"], ref["grads"], atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Off means off: no context, or λ = 0, is the plain model bit for bit.


def _outputs_and_grads(model, mb, context=None):
    from megatron_ease.ease.context import ease_context

    with ease_context(model, context):
        token_losses = _token_losses(model, mb)
    token_losses.sum().backward()
    return token_losses.detach(), gathered_grads(model)


def _off_equals_plain(recompute):
    batch = _batch()
    plain = _outputs_and_grads(_tiny_gpt(plain_spec=True, recompute=recompute), batch)
    no_context = _outputs_and_grads(_tiny_gpt(recompute=recompute), batch)
    zero = _context(batch, normalizer=3.0, gradient_scale=0.0)
    zero_coeff = _outputs_and_grads(_tiny_gpt(recompute=recompute), batch, zero)
    return plain, no_context, zero_coeff, {k: r.loss for k, r in zero.records.items()}


@pytest.mark.parametrize("recompute", [False, True])
def test_ease_layers_without_context_or_with_zero_coeff_are_bit_identical(recompute):
    for plain, no_context, zero_coeff, zero_records in run_distributed(
            _off_equals_plain, recompute, tensor_model_parallel_size=2):
        for other in (no_context, zero_coeff):
            assert torch.equal(other[0], plain[0])
            assert other[1].keys() == plain[1].keys()
            assert all(torch.equal(other[1][k], plain[1][k]) for k in plain[1])
        # λ = 0 still measures: the loss is recorded for logging.
        assert sorted(zero_records) == list(EASE_LAYERS)
        assert all(v > 0 for v in zero_records.values())


# ---------------------------------------------------------------------------------------------
# A fused core attention (TransformerEngine's kind): no probabilities come out of it, so the EASE
# layer computes the slice beside it from the q and k it is given.


class FusedStandIn(torch.nn.Module):
    """Megatron's core-attention interface over one ``scaled_dot_product_attention`` call, not a
    ``DotProductAttention``: a black box like ``TEDotProductAttention``."""

    def __init__(self, config, layer_number, attn_mask_type=None, attention_type=None,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, **kwargs):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        groups = query.shape[2] // key.shape[2]
        key, value = (t.repeat_interleave(groups, dim=2) for t in (key, value))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale)  # mask: True = masked
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def test_ease_beside_a_fused_core_attention_matches_the_local_one_at_tp2():
    local = run_distributed(_tp_step, tensor_model_parallel_size=2)[0]
    fused = run_distributed(_tp_step, FusedStandIn, tensor_model_parallel_size=2)[0]
    assert (local["core"], fused["core"]) == ("DotProductAttention", "FusedStandIn")
    for layer in EASE_LAYERS:
        torch.testing.assert_close(fused["mass"][layer], local["mass"][layer],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused["layers"][layer], local["layers"][layer],
                                   atol=1e-6, rtol=1e-5)
    assert fused["grads"].keys() == local["grads"].keys()
    for name in local["grads"]:
        torch.testing.assert_close(fused["grads"][name], local["grads"][name],
                                   atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------
# bf16: mass and loss in fp32, gradients close to the fp32 model's.


def _bf16_step(bf16, scale=LAMBDA):
    from megatron_ease.ease.context import ease_context

    batch = _batch()
    model = _tiny_gpt(bf16=bf16)
    context = _context(batch, normalizer=3.0, gradient_scale=scale, keep_mass=True)
    with ease_context(model, context):
        token_losses = _token_losses(model, batch)
    loss_mask = batch["response_mask"].float()
    ((token_losses.float() * loss_mask).sum() / loss_mask.sum()).backward()
    grads = {k: v.float() for k, v in gathered_grads(model).items()}
    return {"mass": {k: r.mass for k, r in context.records.items()},
            "layers": {k: r.loss for k, r in context.records.items()}, "grads": grads}


def test_ease_in_bf16_computes_mass_in_fp32():
    fp32 = run_distributed(_bf16_step, False, tensor_model_parallel_size=2)[0]
    bf16 = run_distributed(_bf16_step, True, tensor_model_parallel_size=2)[0]
    for layer in EASE_LAYERS:
        assert bf16["mass"][layer].dtype == torch.float32
        assert bf16["layers"][layer].dtype == torch.float32
        torch.testing.assert_close(bf16["mass"][layer], fp32["mass"][layer], atol=0.05, rtol=0.02)
        torch.testing.assert_close(bf16["layers"][layer], fp32["layers"][layer],
                                   atol=0.01, rtol=0.02)
    for name, grad in bf16["grads"].items():
        assert torch.isfinite(grad).all(), name
        scale = fp32["grads"][name].abs().max().clamp(min=1e-3)
        assert (grad - fp32["grads"][name]).abs().max() <= 0.05 * scale, name
    # At λ = 0.5 EASE's share of a gradient is a few percent, below bf16's noise on the total:
    # the EASE part on its own, grads(λ) - grads(0) at λ = 20, matches fp32's within 8 % (2.4 %
    # seen; an EASE gradient off by a factor 0.5 in bf16 would be 50 %).
    ease_part = {}
    for bf16_run in (False, True):
        on, off = (run_distributed(_bf16_step, bf16_run, lam, tensor_model_parallel_size=2)[0]
                   for lam in (20.0, 0.0))
        ease_part[bf16_run] = {k: on["grads"][k] - off["grads"][k] for k in on["grads"]}
    reached = [name for name, want in ease_part[False].items() if want.abs().max() > 0]
    assert len(reached) >= 10, reached  # the layers up to the last EASE layer's attention
    for name, want in ease_part[False].items():
        got = ease_part[True][name]
        if name not in reached:  # after the last EASE layer's attention: no EASE gradient
            assert got.abs().max() == 0, name
            continue
        err = (got - want).abs().max() / want.abs().max()
        assert err <= 0.08, (name, float(err))


def _slice_impl_step():
    """The EASE layers with ``slice_impl`` torch and triton (Triton's CPU interpreter)."""
    from megatron_ease.ease import triton_attention
    from megatron_ease.ease.context import ease_context

    batch = _batch()
    out = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = _tiny_gpt()
        context = _context(batch, normalizer=3.0, gradient_scale=LAMBDA, keep_mass=True,
                           slice_impl=impl)
        calls = []
        launcher = triton_attention.triton_image_attention_mass
        triton_attention.triton_image_attention_mass = (
            lambda *a, **k: calls.append(1) or launcher(*a, **k))
        try:
            with ease_context(model, context):
                token_losses = _token_losses(model, batch)
        finally:
            triton_attention.triton_image_attention_mass = launcher
        token_losses.sum().backward()
        out[impl] = {"calls": len(calls), "grads": gathered_grads(model),
                     "mass": {k: r.mass for k, r in context.records.items()}}
    return out


_SLICE_IMPL_WORKER = """
import sys

import torch

from megatron_ease.distributed import (LaunchEnv, find_free_port, init_process_group,
                                       initialize_model_parallel)
from tests.unit.test_ease_model import _slice_impl_step

init_process_group(LaunchEnv(0, 1, 0, "127.0.0.1", find_free_port(), "test"), "gloo")
initialize_model_parallel(seed=1234)
torch.save(_slice_impl_step(), sys.argv[1])
"""


def test_ease_layers_run_the_configured_slice_impl(tmp_path):
    pytest.importorskip("triton")
    # Triton's interpreter runs the kernels on CPU tensors only if TRITON_INTERPRET is set before
    # triton is first imported (megatron-core imports it at start-up): a fresh process.
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    out_file = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, "-c", _SLICE_IMPL_WORKER, str(out_file)], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out_file, weights_only=True)
    assert result["torch"]["calls"] == 0 and result["triton"]["calls"] == len(EASE_LAYERS)
    for layer in EASE_LAYERS:
        torch.testing.assert_close(result["triton"]["mass"][layer], result["torch"]["mass"][layer],
                                   rtol=1e-5, atol=1e-6)
    for name, grad in result["torch"]["grads"].items():
        torch.testing.assert_close(result["triton"]["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                   msg=name)


# ---------------------------------------------------------------------------------------------
# Specs and refusals (no process group needed).


def test_ease_layer_specs_swap_only_the_selected_layers_core_attention():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_ease.ease.layer import EaseDotProductAttention, ease_core_attention
    from megatron_ease.ease.specs import ease_attention_spec, ease_layer_specs

    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    specs = ease_layer_specs(base, 4, [0, 3])
    assert [s is base for s in specs] == [False, True, True, False]
    core = specs[0].submodules.self_attention.submodules.core_attention
    assert core is EaseDotProductAttention and issubclass(core, DotProductAttention)
    assert base.submodules.self_attention.submodules.core_attention is DotProductAttention
    assert ease_layer_specs(base, 4, []) == [base] * 4
    assert ease_core_attention(EaseDotProductAttention) is EaseDotProductAttention
    # A core attention given as a ModuleSpec (as TE specs may) keeps its params.
    attention = base.submodules.self_attention
    as_spec = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules,
        core_attention=ModuleSpec(module=DotProductAttention, params={"attention_dropout": 0.0})))
    swapped = ease_attention_spec(as_spec).submodules.core_attention
    assert swapped.module is EaseDotProductAttention
    assert swapped.params == {"attention_dropout": 0.0}
    with pytest.raises(ValueError, match=r"ease.layers \[4\] out of range"):
        ease_layer_specs(base, 4, [4])


def test_ease_layer_refuses_context_parallelism():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ease.ease.layer import EaseDotProductAttention

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                               context_parallel_size=2, use_cpu_initialization=True)
    with pytest.raises(ValueError, match="context parallelism .* not supported with EASE"):
        EaseDotProductAttention(config=config, layer_number=2, attn_mask_type=AttnMaskType.causal,
                                attention_type="self")


def test_ease_context_checks_shapes():
    batch = _batch()
    with pytest.raises(ValueError, match="weight must have shape"):
        _context({**batch, "weight": batch["weight"][:2]}, 3.0, 1.0)
    with pytest.raises(ValueError, match="response_mask must be a bool tensor"):
        _context({**batch, "response_mask": batch["response_mask"].float()}, 3.0, 1.0)


def test_ease_gradient_scale_cancels_what_megatron_does_to_gradients():
    from megatron_ease.ease.context import ease_gradient_scale

    # DDP averages over DP: multiply back by DP (never by the micro-batch count).
    assert ease_gradient_scale(0.1, data_parallel_size=4) == pytest.approx(0.4)
    # fp16: the optimizer divides every gradient by its loss scale.
    assert ease_gradient_scale(0.1, data_parallel_size=2, loss_scale=1024.0) == \
        pytest.approx(204.8)
    # calculate_per_token_loss: DDP sums, finalize_model_grads divides by the global token count.
    assert ease_gradient_scale(0.1, data_parallel_size=2, global_num_tokens=torch.tensor(500)) == \
        pytest.approx(50.0)


def test_final_norm_is_rmsnorm_capable_where_apex_imports(monkeypatch):
    """Where apex imports (NGC containers) and TE is absent, megatron's default final norm
    (gpt_layer_specs.LNImpl, transformer_block.LayerNormImpl) is apex's FusedLayerNorm, which
    refuses RMSNorm: the converter (local spec) and GPU runs without TE failed to build."""
    import megatron.core.models.backends as backends
    import megatron.core.models.gpt.gpt_layer_specs as gpt_layer_specs
    import megatron.core.transformer.transformer_block as transformer_block
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ease.ease.specs import ease_block_spec
    from megatron_ease.models.qwen_vl.specs import qwen_vl_block_spec

    for module, name in ((gpt_layer_specs, "LNImpl"), (transformer_block, "LayerNormImpl"),
                         (backends, "LNImpl")):
        monkeypatch.setattr(module, name, FusedLayerNorm)  # as when `import apex` succeeds
    config = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=1,
                               normalization="RMSNorm", use_cpu_initialization=True)
    for spec in (qwen_vl_block_spec(config, [None, None], use_te=False, pp_rank=0),
                 ease_block_spec(config, [None, None], pp_rank=0)):
        assert spec.layer_norm is WrappedTorchNorm
        spec.layer_norm(config=config, hidden_size=8, eps=1e-6)  # builds (FusedLayerNorm raises)
