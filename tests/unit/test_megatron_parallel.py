"""megatron-core on CPU/gloo (through our shims): TP=2 and PP=2 equal the single-rank model."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.harness import run_distributed
from tests.megatron_utils import assert_close_dicts, gathered_grads, tiny_gpt

VOCAB, SEQ, BATCH = 64, 16, 4


def _tiny_gpt(pre_process=True, post_process=True):
    return tiny_gpt(VOCAB, SEQ, pre_process, post_process)


def _batch():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _causal_mask(b, s):
    return torch.triu(torch.ones(b, 1, s, s, dtype=torch.bool), diagonal=1)  # True = masked


def _tp_forward_backward():
    """Logits (gathered over TP), mean token loss and full gradients of one fwd/bwd."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = _tiny_gpt()
    tokens, labels = _batch()
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = _causal_mask(BATCH, SEQ)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, pos, mask))
    loss = model(tokens, pos, mask, labels=labels).mean()
    loss.backward()
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(), "logits": logits,
            "loss": loss.detach(), "grads": gathered_grads(model)}


def test_gpt_tensor_parallel_2_matches_single_rank():
    ref = run_distributed(_tp_forward_backward, tensor_model_parallel_size=1)[0]
    tp2 = run_distributed(_tp_forward_backward, tensor_model_parallel_size=2)
    assert ref["tp"] == 1 and tp2[0]["tp"] == 2
    for out in tp2:
        torch.testing.assert_close(out["logits"], ref["logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-6, rtol=0)
        assert_close_dicts(out["grads"], ref["grads"], atol=1e-5)


def _pp_forward_backward(num_microbatches: int):
    """Loss and full gradients of one step through megatron-core's pipeline schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = _tiny_gpt(pre_process=parallel_state.is_pipeline_first_stage(),
                      post_process=parallel_state.is_pipeline_last_stage())
    tokens, labels = _batch()
    mbs = BATCH // num_microbatches
    micro = iter([(tokens[i * mbs:(i + 1) * mbs], labels[i * mbs:(i + 1) * mbs])
                  for i in range(num_microbatches)])

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        pos = torch.arange(SEQ).expand(tok.shape[0], SEQ)
        return model(tok, pos, _causal_mask(tok.shape[0], SEQ), labels=lab), loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=micro, model=[model],
        num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=mbs,
        forward_only=False)
    loss = sum(d["loss"] for d in losses) / num_microbatches if losses else None
    return {"stage": parallel_state.get_pipeline_model_parallel_rank(), "loss": loss,
            "grads": gathered_grads(model)}


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_gpt_pipeline_parallel_2_matches_single_stage(num_microbatches):
    run = functools.partial(run_distributed, _pp_forward_backward, num_microbatches)
    ref = run(pipeline_model_parallel_size=1)[0]
    stages = run(pipeline_model_parallel_size=2)
    assert [s["stage"] for s in stages] == [0, 1]
    assert stages[0]["loss"] is None
    torch.testing.assert_close(stages[1]["loss"], ref["loss"], atol=1e-6, rtol=0)
    merged = {**stages[0]["grads"], **stages[1]["grads"]}
    assert not stages[0]["grads"].keys() & stages[1]["grads"].keys()
    assert_close_dicts(merged, ref["grads"], atol=1e-5)
