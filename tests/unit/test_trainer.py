"""The DAPO + EASE trainer end to end on the tiny config: TP=2 / PP=2 steps on gloo, exact resume
after kill -9, and SIGTERM -> checkpoint + exit 75 -> resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_ease.config import load_config
from tests.harness import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "examples", "tiny_cpu_ease.yaml")
COMPARED = ("reward", "accuracy", "kept_groups", "dapo_loss", "ease_loss", "grad_norm",
            "response_length", "clip_frac")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from megatron_ease.data.synthetic import write_synthetic_dataset

    root = str(tmp_path_factory.mktemp("synthetic"))
    write_synthetic_dataset(root, num_train=128, num_eval=32, seed=0, samples_per_shard=64)
    return root


def _overrides(dataset: str, run_dir: str, steps: int, *extra: str) -> list[str]:
    return [f"data.train_shards={dataset}/train/*.tar", f"data.eval_shards={dataset}/eval/*.tar",
            f"data.tokenizer={dataset}/tokenizer", "data.synthetic=false",
            f"logging.run_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt",
            f"train.steps={steps}", "train.prompts_per_step=4", "dapo.group_size=4",
            "train.micro_batch_size=8", "dapo.max_response_length=6",
            "dapo.overlong_buffer_length=2", "dapo.max_gen_batches=16",
            "train.warm_start_steps=30", "train.warm_start_lr=3e-3", *extra]


def _metrics(run_dir: str) -> dict[int, dict]:
    """Last record of every training step (a killed run may have logged a step twice)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["split"] == "train":
                out[record["step"]] = record
    return out


def _first_sft_loss(run_dir: str) -> float:
    """The warm start's step-1 loss: about log(vocab) = 5.5 from the random init, on every rank
    and layout (it was half that at DP = 2 and 0 at PP = 2 before the loss was reduced)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["split"] == "warm_start" and record["step"] == 1:
                return record["sft_loss"]
    raise AssertionError(f"no warm-start step 1 in {run_dir}/metrics.jsonl")


def _train_in_pool(overrides):
    from megatron_ease.training.trainer import Trainer

    cfg = load_config(CONFIG, overrides)
    trainer = Trainer(cfg)
    status = trainer.train()
    return status, trainer.evaluate(max_samples=8)


@pytest.mark.parametrize("layout", [{"tensor_model_parallel_size": 2},
                                    {"pipeline_model_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_training_steps_run_at_tp2_and_pp2(dataset, tmp_path, layout):
    run_dir = str(tmp_path / "run")
    key, size = next(iter(layout.items()))
    overrides = _overrides(dataset, run_dir, 2, f"parallel.{key}={size}", "eval.samples=8")
    results = run_distributed(_train_in_pool, overrides, timeout_s=600, **layout)
    assert [status for status, _ in results] == [0, 0]
    assert results[0][1] == results[1][1]  # eval metrics agree on every rank
    assert results[0][1]["eval_samples"] == 8
    metrics = _metrics(run_dir)
    assert sorted(metrics) == [1, 2]
    for record in metrics.values():
        assert record["kept_groups"] == 4
        for name in ("reward", "dapo_loss", "ease_loss", "grad_norm", "attn_in_evidence"):
            assert math.isfinite(record[name]), (name, record)
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["attn_in_evidence"] <= 1.0
    assert os.path.isfile(os.path.join(run_dir, "ckpt", "latest"))
    assert 4.5 < _first_sft_loss(run_dir) < 6.5


def _launch(overrides, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # Its own session, so "kill -9" takes the whole job (checkpoint writer processes too).
    return subprocess.Popen([sys.executable, "-m", "megatron_ease.train", "--config", CONFIG,
                             *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **kwargs)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def _latest(run_dir):
    path = os.path.join(run_dir, "ckpt", "latest")
    return open(path).read().strip() if os.path.isfile(path) else None


def test_kill_9_then_resume_reproduces_an_uninterrupted_run(dataset, tmp_path):
    steps = 4
    full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
    full = _launch(_overrides(dataset, full_dir, steps, "checkpoint.interval=1"))
    cut = _launch(_overrides(dataset, cut_dir, steps, "checkpoint.interval=1"))
    _wait_for(lambda: _latest(cut_dir) == "iter_0000002", cut)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.wait()
    assert full.wait(timeout=600) == 0, full.stdout.read()
    resumed = _launch(_overrides(dataset, cut_dir, steps, "checkpoint.interval=1"))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "at step 2" in out, out
    a, b = _metrics(full_dir), _metrics(cut_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for name in COMPARED:
            assert a[step][name] == b[step][name], (step, name, a[step][name], b[step][name])


def test_sigterm_saves_exits_75_and_the_next_run_resumes(dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = _launch(_overrides(dataset, run_dir, 50))
    _wait_for(lambda: os.path.isfile(os.path.join(run_dir, "metrics.jsonl"))
              and os.path.getsize(os.path.join(run_dir, "metrics.jsonl")) > 0, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    saved = _latest(run_dir)
    step = int(saved.split("_")[1])
    assert 1 <= step < 50 and f"preempted: saved step {step}" in out
    again = _launch(_overrides(dataset, run_dir, step + 1))
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert f"resumed from {os.path.join(run_dir, 'ckpt', saved)} at step {step}" in out
    assert sorted(_metrics(run_dir))[-1] == step + 1


def _bf16_run(overrides):
    import torch

    from megatron_ease.training.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    dtypes = sorted({str(p.dtype) for p in trainer.model.parameters()})
    snapshots = {}
    warm_start = trainer.warm_start

    def warm_start_with_snapshots():
        snapshots["init"] = [p.detach().clone() for p in trainer.model.parameters()]
        warm_start()
        snapshots["warm"] = [p.detach().clone() for p in trainer.model.parameters()]

    trainer.warm_start = warm_start_with_snapshots
    status = trainer.train()
    trainer.metrics.close()
    final = [p.detach() for p in trainer.model.parameters()]
    warm_changed = any(not torch.equal(a, b) for a, b in zip(snapshots["init"], snapshots["warm"]))
    warm_kept = all(torch.equal(a, b) for a, b in zip(snapshots["warm"], final))
    # The step-1 checkpoint (mixed-precision optimizer state included) loads back.
    resumed = Trainer(load_config(CONFIG, [o for o in overrides if not o.startswith("train.steps")]
                                  + ["train.steps=2"]))
    resumed.metrics.close()
    return status, dtypes, warm_changed, warm_kept, resumed.step


def test_bf16_training_keeps_the_warm_start_and_checkpoints(dataset, tmp_path):
    """bf16 (megatron's mixed-precision optimizer, float32 main weights): every parameter is bf16
    (a float32 norm weight misaligned the optimizer's checkpoint mapping), and weights changed
    outside the RL optimizer (warm start, ``init_from``) reach its main copies: with lr = 0 the
    first RL update must leave the warm-started weights exactly as they were, not write the
    random init back."""
    run_dir = str(tmp_path / "run")
    overrides = _overrides(dataset, run_dir, 1, "model.bf16=true", "train.lr=0.0",
                           "train.min_lr=0.0", "train.warm_start_steps=3",
                           "checkpoint.interval=1", "parallel.tensor_model_parallel_size=2")
    results = run_distributed(_bf16_run, overrides, tensor_model_parallel_size=2, timeout_s=600)
    for status, dtypes, warm_changed, warm_kept, resumed_step in results:
        assert status == 0
        assert dtypes == ["torch.bfloat16"]
        assert warm_changed, "the warm start did not change the weights: the test proves nothing"
        assert warm_kept, "the first RL step overwrote the warm-started weights"
        assert resumed_step == 1


def test_ease_enabled_without_layers_trains_as_dapo(dataset, tmp_path):
    """``ease.enabled: true`` with no ``ease.layers`` (EaseConfig's defaults) is plain DAPO: no
    capture layers, no EASE contexts (this combination used to crash the update)."""
    run_dir = str(tmp_path / "run")
    overrides = _overrides(dataset, run_dir, 1, "ease.enabled=true", "ease.layers=[]",
                           "eval.samples=8")
    results = run_distributed(_train_in_pool, overrides, timeout_s=600)
    assert [status for status, _ in results] == [0, 0]
    assert "evidence_attention_mass" not in results[0][1]
    record = _metrics(run_dir)[1]
    assert "ease_loss" not in record and "attn_in_evidence" not in record
    assert math.isfinite(record["dapo_loss"]) and math.isfinite(record["grad_norm"])
    assert 4.5 < _first_sft_loss(run_dir) < 6.5  # data parallel 2


def _filtered_correct_run(overrides):
    import torch

    from megatron_ease.training.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    seen = []
    build = trainer.micro_batches

    def micro_batches(kept, extra=None):
        out = build(kept, extra)
        kept_only = build(kept)
        flat = [mb for mini in out for mb in mini]
        policy_rows = sum(int(mb.policy_rows.sum()) if mb.policy_rows is not None
                          else mb.input_ids.shape[0] for mb in flat)
        extra_rows = sum(mb.input_ids.shape[0] for mb in flat) - policy_rows
        extra_advantage = max((float(mb.advantages[~mb.policy_rows].abs().max())
                               for mb in flat if mb.policy_rows is not None
                               and not bool(mb.policy_rows.all())), default=0.0)
        seen.append(dict(
            kept=len(kept), extra=0 if extra is None else len(extra),
            policy_rows=policy_rows, extra_rows=extra_rows, extra_advantage=extra_advantage,
            extra_gated=sum(float(mb.ease_weight[~mb.policy_rows].sum()) for mb in flat
                            if mb.policy_rows is not None),
            tokens=sum(mb.num_response_tokens for mb in flat),
            kept_tokens=sum(mb.num_response_tokens for mini in kept_only for mb in mini),
            one_length=len({mb.input_ids.shape[1] for mb in flat}) == 1,
            minis=len(out),
            # Each mini-batch starts with the kept rows' micro-batches, as without extras (the
            # joint assembly may pad them further).
            kept_first=all(torch.equal(a.input_ids, b.input_ids[:, :a.input_ids.shape[1]])
                           for mini_a, mini_b in zip(kept_only, out)
                           for a, b in zip(mini_a, mini_b))))
        return out

    trainer.micro_batches = micro_batches
    status = trainer.train()
    trainer.metrics.close()
    return status, seen


def test_filtered_correct_rollouts_feed_ease_but_not_dapo(dataset, tmp_path):
    """``ease.use_filtered_correct``: the correct rollouts of all-correct groups (which dynamic
    sampling drops) join the step as EASE-only rows: gated in, advantage 0, outside the DAPO
    token count, assembled to the step's one sequence length."""
    run_dir = str(tmp_path / "run")
    # Groups of 2 so that all-correct groups are common after the short warm start.
    overrides = _overrides(dataset, run_dir, 2, "ease.use_filtered_correct=true",
                           "dapo.group_size=2", "train.ppo_mini_batches=2",
                           "train.micro_batch_size=2", "dapo.max_gen_batches=0",
                           "checkpoint.interval=0")
    results = run_distributed(_filtered_correct_run, overrides, timeout_s=600)
    assert [status for status, _ in results] == [0, 0]
    steps = [step for _, seen in results for step in seen]
    assert any(step["extra"] > 0 for step in steps), "no all-correct group: the test proves nothing"
    for step in steps:
        assert step["policy_rows"] == step["kept"] and step["extra_rows"] == step["extra"]
        assert step["extra_advantage"] == 0.0
        assert step["extra_gated"] == step["extra"]  # all correct, all with a target
        assert step["tokens"] == step["kept_tokens"]  # the DAPO normaliser ignores them
        assert step["one_length"] and step["minis"] == 2 and step["kept_first"]
    metrics = _metrics(run_dir)
    assert all("ease_extra_rows" in record for record in metrics.values())


def test_rollouts_and_validation_show_progress_bars(dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = _launch(_overrides(dataset, run_dir, 1, "eval.interval=1", "eval.samples=8",
                              "checkpoint.interval=0"))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "rollouts, step 1" in out and "group" in out, out
    assert "validation" in out and "sample" in out, out
