"""Each CPU shim is exercised, so a megatron-core upgrade that moves a CUDA call fails here."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed
from tests.megatron_utils import assert_close_dicts, gathered_grads, tiny_gpt, tiny_gpt_config
from tests.unit.test_megatron_parallel import BATCH, SEQ, VOCAB, _batch, _causal_mask, _tiny_gpt


def _rng_streams():
    """Dropout inside the TP region differs across TP ranks, outside it does not."""
    from megatron.core import parallel_state, tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        tp_draw = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the outer stream"
    with tracker.fork():
        tp_draw2 = torch.rand(4)
    assert not torch.equal(tp_draw, tp_draw2), "a forked stream must advance"
    return {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "tp": tp_draw,
            "default": torch.rand(4)}


def test_rng_tracker_streams_per_tp_rank():
    a, b = run_distributed(_rng_streams, tensor_model_parallel_size=2)
    assert (a["tp_rank"], b["tp_rank"]) == (0, 1)
    assert not torch.equal(a["tp"], b["tp"])
    assert torch.equal(a["default"], b["default"])


def _ddp_step(use_distributed_optimizer: bool):
    """One DDP + megatron optimizer step on half the batch per DP rank, with grad clipping."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dp_rank = parallel_state.get_data_parallel_rank()
    tokens, labels = _batch()
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = _causal_mask(BATCH, SEQ)

    ref = _tiny_gpt()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    ref(tokens, pos, mask, labels=labels).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    ref_opt.step()

    model = _tiny_gpt()
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(
            use_distributed_optimizer=use_distributed_optimizer, grad_reduce_in_fp32=True),
        model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.1,
                        use_distributed_optimizer=use_distributed_optimizer, bf16=False),
        [ddp])
    half = slice(dp_rank * BATCH // 2, (dp_rank + 1) * BATCH // 2)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ddp(tokens[half], pos[half], mask[half], labels=labels[half]).mean().backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = opt.step()
    assert ok
    return {"grad_norm": grad_norm, "ref_norm": norm.item(),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "ref": {n: p.detach().clone() for n, p in ref.named_parameters()}}


@pytest.mark.parametrize("use_distributed_optimizer", [False, True])
def test_ddp_and_optimizer_step_match_single_process_adam(use_distributed_optimizer):
    outs = run_distributed(_ddp_step, use_distributed_optimizer)
    for out in outs:
        assert out["grad_norm"] == pytest.approx(out["ref_norm"], rel=1e-5)
        for name, ref in out["ref"].items():
            # Adam turns float noise in near-zero grads into ~1e-6 moves; a wrong DP average
            # or a missed clip would move parameters by ~lr = 1e-2.
            torch.testing.assert_close(out["params"][name], ref, atol=1e-5, rtol=1e-5)


def _dist_checkpoint_roundtrip(path: str):
    from megatron.core import dist_checkpointing, parallel_state

    model = _tiny_gpt()
    dist_checkpointing.save(model.sharded_state_dict(), path)
    fresh = _tiny_gpt()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), path))
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    return parallel_state.get_tensor_model_parallel_rank()


def _dist_checkpoint_load_other_layout(path: str):
    from megatron.core import dist_checkpointing, parallel_state

    model = _tiny_gpt(pre_process=parallel_state.is_pipeline_first_stage(),
                      post_process=parallel_state.is_pipeline_last_stage())
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))
    return all(torch.equal(p, expected[n]) for n, p in model.named_parameters())


def test_dist_checkpoint_saved_at_tp2_loads_at_tp1(tmp_path):
    path = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    assert run_distributed(_dist_checkpoint_roundtrip, path, tensor_model_parallel_size=2) == [0, 1]
    assert all(run_distributed(_dist_checkpoint_load_other_layout, path,
                               tensor_model_parallel_size=1))
    assert all(run_distributed(_dist_checkpoint_load_other_layout, path,
                               pipeline_model_parallel_size=2))


# --- One test per shim the tests above do not reach (each names its shim and call site). ---
#
# megatron.core.distributed.param_and_grad_buffer needs no shim: its only ``device="cuda"``
# allocation (the NCCL warm-up tensor of ``_ParamAndGradBuffer.__init__``) sits behind
# ``ddp_config.nccl_ub``, after building a CUDA/NCCL allocator extension, so no CPU run reaches it.


def _per_token_loss_schedule():
    """Loss, token count and gradients of one step of the pipeline schedule for this layout."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = tiny_gpt(VOCAB, SEQ, config=tiny_gpt_config(calculate_per_token_loss=True))
    seen_tokens = []
    model.config.finalize_model_grads_func = (
        lambda chunks, num_tokens, **kw: seen_tokens.append(num_tokens.clone()))
    tokens, labels = _batch()
    micro = iter([(tokens[:2], labels[:2]), (tokens[2:], labels[2:])])

    def loss_func(output_tensor):
        loss = output_tensor.float().sum()
        n = torch.tensor(output_tensor.numel(), dtype=torch.int)
        return loss, n, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        pos = torch.arange(SEQ).expand(tok.shape[0], SEQ)
        return model(tok, pos, _causal_mask(tok.shape[0], SEQ), labels=lab), loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=micro, model=[model], num_microbatches=2,
        seq_length=SEQ, micro_batch_size=2, forward_only=False)
    return {"last": parallel_state.is_pipeline_last_stage(), "tokens": seen_tokens,
            "loss": sum(d["loss"] for d in losses) if losses else None,
            "grads": gathered_grads(model)}


def test_pipeline_schedule_counts_tokens_in_its_cuda_literal_counter():
    """Shim: literal "cuda" in ``megatron.core.pipeline_parallel.schedules``. Both schedules
    allocate their token counter ``total_num_tokens`` with ``device="cuda"``
    (``forward_backward_no_pipelining`` at PP=1, ``forward_backward_pipelining_without_
    interleaving`` at PP=2, here with 2 micro-batches and per-token loss, which hands that
    counter to ``finalize_model_grads_func``)."""
    first, last = run_distributed(_per_token_loss_schedule, pipeline_model_parallel_size=2)
    ref = run_distributed(_per_token_loss_schedule, pipeline_model_parallel_size=1)[0]
    assert ref["tokens"] == [torch.tensor(BATCH * SEQ, dtype=torch.int)]
    assert (first["last"], last["last"]) == (False, True)
    assert last["tokens"] == ref["tokens"]  # the last stage counted every micro-batch's tokens
    assert first["tokens"] == [torch.tensor(0, dtype=torch.int)] and first["loss"] is None
    torch.testing.assert_close(last["loss"], ref["loss"], atol=1e-4, rtol=1e-6)
    assert_close_dicts({**first["grads"], **last["grads"]}, ref["grads"], atol=1e-5)


def _low_precision_ddp(dtype):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = tiny_gpt_config(params_dtype=dtype, fp16=dtype == torch.float16,
                             bf16=dtype == torch.bfloat16)
    model = tiny_gpt(VOCAB, SEQ, config=config)
    with torch.no_grad():  # as megatron_ease.models does: local-spec norms are built float32
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model, DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)


def _backward(ddp, scale: float):
    tokens, labels = _batch()
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    ddp.zero_grad_buffer()
    (ddp(tokens, pos, _causal_mask(BATCH, SEQ), labels=labels).float().mean() * scale).backward()
    ddp.finish_grad_sync()


def _fp16_dynamic_loss_scale():
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    model, ddp = _low_precision_ddp(torch.float16)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.0, fp16=True,
                        params_dtype=torch.float16, initial_loss_scale=2.0 ** 40,
                        min_loss_scale=1.0, hysteresis=1, use_distributed_optimizer=False),
        [ddp])
    (inner,) = opt.chained_optimizers
    assert isinstance(inner, Float16OptimizerWithFloat16Params)
    assert isinstance(inner.grad_scaler, DynamicGradScaler)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # 2**40 overflows the fp16 gradients: the step is skipped and the scale backs off by half.
    _backward(ddp, opt.get_loss_scale().item())
    overflow_step = opt.step()
    overflow_scale = opt.get_loss_scale().item()
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # A loaded scaler state (``load_state_dict`` moves it with ``.cuda(current_device())``).
    inner.grad_scaler.load_state_dict(
        {"scale": torch.tensor([1024.0]), "growth_tracker": 0, "hysteresis_tracker": 1})
    _backward(ddp, opt.get_loss_scale().item())
    ok, grad_norm, _ = opt.step()
    moved = max((p.float() - before[n].float()).abs().max().item()
                for n, p in model.named_parameters())
    return {"overflow_step": overflow_step[0], "overflow_scale": overflow_scale,
            "unchanged": unchanged, "ok": ok, "grad_norm": grad_norm, "moved": moved,
            "scale": opt.get_loss_scale().item()}


def test_fp16_optimizer_dynamic_loss_scale_skips_an_overflowing_step():
    """Shims: literal "cuda" in ``megatron.core.optimizer.grad_scaler`` (``MegatronGradScaler``
    / ``DynamicGradScaler.__init__`` build the scale, min-scale, growth and backoff tensors with
    ``device='cuda'``), the CUDA type names inside ``Float16OptimizerWithFloat16Params.__init__``
    (``param.type() in ['torch.cuda.HalfTensor', ...]``), and ``Tensor.cuda`` for
    ``DynamicGradScaler.load_state_dict``. fp16 model, megatron optimizer, one overflowing step,
    one good one."""
    for out in run_distributed(_fp16_dynamic_loss_scale):
        assert out["overflow_step"] is False and out["unchanged"]
        assert out["overflow_scale"] == 2.0 ** 39
        assert out["ok"] and 0 < out["grad_norm"] < float("inf")
        assert out["scale"] == 1024.0
        assert 1e-3 < out["moved"] < 0.05  # an Adam step of lr 1e-2 on fp16 weights


def _bf16_mixed_precision_step():
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    lr = 1e-2
    model, ddp = _low_precision_ddp(torch.bfloat16)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=0.0, bf16=True,
                        params_dtype=torch.bfloat16, use_distributed_optimizer=False),
        [ddp])
    (inner,) = opt.chained_optimizers
    assert isinstance(inner, Float16OptimizerWithFloat16Params) and inner.grad_scaler is None
    main = [p.main_param for p in model.parameters()]
    before = [m.detach().clone() for m in main]
    _backward(ddp, 1.0)
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0
    for p, m, b in zip(model.parameters(), main, before):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert torch.equal(p, m.to(torch.bfloat16))  # the step was copied back to the model
        # Adam's first step is lr * sign(grad) wherever the gradient is not tiny.
        big = m.grad.abs() > 1e-4
        torch.testing.assert_close((m - b)[big], -lr * m.grad.sign()[big], atol=1e-5, rtol=0)
    return True


def test_bf16_float16_optimizer_builds_fp32_main_params_and_steps():
    """Shim: CUDA type names inside ``Float16OptimizerWithFloat16Params.__init__``, which sorts
    parameters by ``param.type() == 'torch.cuda.BFloat16Tensor'`` (CPU tensors are
    ``torch.BFloat16Tensor`` and would be rejected with a TypeError). The bf16 path
    megatron_ease trains with: bf16 model, fp32 main params, non-distributed optimizer."""
    assert all(run_distributed(_bf16_mixed_precision_step))


def _broadcast_batch():
    from megatron.core import parallel_state, tensor_parallel

    tokens, labels = _batch()
    first = parallel_state.get_tensor_model_parallel_rank() == 0
    data = {"tokens": tokens, "labels": labels} if first else None
    return tensor_parallel.broadcast_data(["tokens", "labels"], data, torch.int64)


def test_tensor_parallel_broadcast_data():
    """Shims: literal "cuda" in ``megatron.core.tensor_parallel.data`` (the size table of
    ``_build_key_size_numel_dictionaries`` is ``torch.tensor(sizes, device='cuda')``) and
    ``Tensor.cuda`` (``broadcast_data`` packs with ``data[key].cuda()``). TP=2: rank 1 gets
    the batch only rank 0 holds."""
    tokens, labels = _batch()
    for out in run_distributed(_broadcast_batch, tensor_model_parallel_size=2):
        assert torch.equal(out["tokens"], tokens) and torch.equal(out["labels"], labels)


def _tied_embedding_stages():
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = GPTModel(tiny_gpt_config(), get_gpt_layer_local_spec(normalization="RMSNorm"),
                     VOCAB, SEQ, pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=True, position_embedding_type="rope")
    return model.shared_embedding_or_output_weight().detach().clone()


def test_tied_embeddings_are_copied_to_the_last_pipeline_stage():
    """Shim: ``Tensor.cuda``. With tied word embeddings at PP=2,
    ``LanguageModule.setup_embeddings_and_output_layer`` zeroes the last stage's output weight,
    moves it with ``weight.data = weight.data.cuda()`` and all-reduces it over the embedding
    group, so both stages start from the first stage's embedding (Qwen's tie_word_embeddings)."""
    first, last = run_distributed(_tied_embedding_stages, pipeline_model_parallel_size=2)
    assert first.abs().sum() > 0
    assert torch.equal(first, last)


def _implicit_causal_masks():
    tokens, _ = _batch()
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    model = tiny_gpt(VOCAB, SEQ)
    window = tiny_gpt(VOCAB, SEQ, config=tiny_gpt_config(window_size=(3, 0)))
    i = torch.arange(SEQ)
    band = ((i[None, :] > i[:, None]) | (i[None, :] < i[:, None] - 3)).expand(BATCH, 1, SEQ, SEQ)
    with torch.no_grad():
        return {"implicit": model(tokens, pos, None),
                "explicit": model(tokens, pos, _causal_mask(BATCH, SEQ)),
                "window": window(tokens, pos, None),
                "band": model(tokens, pos, band)}


def test_attention_without_mask_builds_the_causal_and_sliding_window_masks():
    """Shim: literal "cuda" in ``megatron.core.transformer.utils``. Given no attention mask,
    ``FusedScaleMaskSoftmax.forward_torch_softmax`` builds it with ``get_default_causal_mask``
    (``torch.ones(sq, sq, device="cuda")``), and with ``window_size`` set with
    ``get_sliding_window_causal_mask`` (``device="cuda"``). Each must equal the explicit mask."""
    for out in run_distributed(_implicit_causal_masks):
        torch.testing.assert_close(out["implicit"], out["explicit"], atol=0, rtol=0)
        torch.testing.assert_close(out["window"], out["band"], atol=1e-6, rtol=0)
        assert not torch.allclose(out["window"], out["explicit"], atol=1e-3)


def _fully_parallel_roundtrip(path: str):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistLoadShardedStrategy,
        TorchDistSaveShardedStrategy,
    )

    dp = parallel_state.get_data_parallel_group()
    model = _tiny_gpt()
    dist_checkpointing.save(model.sharded_state_dict(), path, FullyParallelSaveStrategyWrapper(
        TorchDistSaveShardedStrategy("torch_dist", 1), dp))
    fresh = _tiny_gpt()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(dist_checkpointing.load(
        fresh.sharded_state_dict(), path,
        FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(), dp)))
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_fully_parallel_dist_checkpoint_save_and_load(tmp_path):
    """Shims: literal "cuda" in ``megatron.core.dist_checkpointing.exchange_utils`` and
    ``Tensor.cuda``. At DP=2 ``FullyParallelLoadStrategyWrapper`` reads each replicated tensor on
    one rank and broadcasts it (``exchange_loaded_tensors_broadcast``: the loader sends
    ``all_loaded_tensors[shard_id].cuda()``, the others receive into
    ``_get_empty_tensor_for_exchange``'s ``torch.empty_like(tensor, device="cuda")``);
    ``FullyParallelSaveStrategyWrapper`` splits the writing the same way."""
    assert all(run_distributed(_fully_parallel_roundtrip, str(tmp_path)))


def _reuse_loaded_global_metadata(first: str, second: str):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistLoadShardedStrategy,
        TorchDistSaveShardedStrategy,
    )

    model = _tiny_gpt()
    save = TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True)
    dist_checkpointing.save(model.sharded_state_dict(), first, save)
    load = TorchDistLoadShardedStrategy()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), first, load))
    # Megatron-LM's --ckpt-assume-constant-structure: the next save reuses the loaded metadata.
    save.cached_global_metadata = load.cached_global_metadata
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    dist_checkpointing.save(model.sharded_state_dict(), second, save)
    fresh = _tiny_gpt()
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), second))
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    return {"reused": save.validated_loaded_metadata_reuse, "same": same}


def test_torch_dist_save_reuses_loaded_global_metadata(tmp_path):
    """Shim: literal "cuda" in ``megatron.core.dist_checkpointing.strategies.state_dict_saver``.
    A ``torch_dist`` save with ``cached_metadata=True`` after a load checks, on every rank, that
    its plan matches the loaded one (``verify_global_md_reuse``:
    ``torch.tensor([local_verify_reuse], dtype=torch.int, device='cuda')`` all-reduced)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    outs = run_distributed(_reuse_loaded_global_metadata, str(tmp_path / "a"),
                           str(tmp_path / "b"))
    assert outs == [{"reused": True, "same": True}] * 2


def _recompute_grads(recompute: bool, tracker_states: dict):
    from megatron.core import tensor_parallel

    extra = dict(recompute_granularity="full", recompute_method="uniform",
                 recompute_num_layers=1) if recompute else {}
    model = tiny_gpt(VOCAB, SEQ, config=tiny_gpt_config(hidden_dropout=0.2, attention_dropout=0.2,
                                                        **extra))
    tokens, labels = _batch()
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.set_states(tracker_states)
    torch.manual_seed(7)
    loss = model(tokens, pos, _causal_mask(BATCH, SEQ), labels=labels).mean()
    # Draws between forward and backward move the generators the recompute must rewind.
    torch.rand(100)
    with tracker.fork():
        torch.rand(100)
    loss.backward()
    return {"loss": loss.detach(), "grads": gathered_grads(model)}


def _recompute_vs_stored():
    from megatron.core import tensor_parallel

    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    return _recompute_grads(False, states), _recompute_grads(True, states)


def test_full_activation_recompute_replays_dropout():
    """Shim: ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``.
    ``recompute_granularity="full"`` runs each layer under ``tensor_parallel.checkpoint``
    (``CheckpointFunction``), which saves "the CUDA RNG state" (with the CPU one and the rng
    tracker's) in forward and restores it to recompute in backward. With dropout on, the
    recomputed gradients equal the stored-activation ones only if the dropout masks replay."""
    for stored, recomputed in run_distributed(_recompute_vs_stored):
        torch.testing.assert_close(recomputed["loss"], stored["loss"], atol=0, rtol=0)
        assert_close_dicts(recomputed["grads"], stored["grads"], atol=1e-6)
