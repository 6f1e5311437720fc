"""Each CPU shim is exercised, so a megatron-core upgrade that moves a CUDA call fails here."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed
from tests.unit.test_megatron_parallel import BATCH, SEQ, _batch, _causal_mask, _tiny_gpt


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
