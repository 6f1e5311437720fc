"""tools/convert_hf_checkpoint.py: bit-exact round trip, --verify, trainer-layout input, refusal of
corrupted checkpoints, and converted checkpoints loading at TP=2 / PP=2 with HF's logits."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ease.config import ParallelConfig
from megatron_ease.models.qwen_vl import QWEN2_5_VL, model_config_from_hf
from tests.harness import run_distributed
from tests.qwen_fixtures import (
    assert_layout_logits_match,
    assert_megatron_to_hf_is_bit_exact,
    convert,
    converted_checkpoint_logits,
    hf_logits,
    hf_round_trip,
    read_safetensors,
    save_tiny_hf,
    tiny_batch,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny bf16 HF model and its conversion with --verify."""
    root = tmp_path_factory.mktemp("convert")
    hf_dir, ckpt = root / "hf", root / "ckpt"
    save_tiny_hf(hf_dir, dtype=torch.bfloat16)
    result = convert("hf-to-megatron", "--hf-dir", str(hf_dir), "--out", str(ckpt), "--verify")
    batch = tiny_batch()
    return {"root": root, "hf_dir": str(hf_dir), "ckpt": str(ckpt), "result": result,
            "batch": batch, "logits": hf_logits(_from_pretrained_fp32(hf_dir), batch)}


def _from_pretrained_fp32(path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def test_hf_to_megatron_verify_prints_logit_diff_last_on_stdout(converted):
    result = converted["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"max_abs_logit_diff=(\S+)", last)
    assert m and float(m.group(1)) <= 1e-4, result.stdout
    assert "hf -> megatron" in result.stderr  # progress goes to stderr


def test_verify_fails_when_one_weight_differs_from_the_hf_model(converted, tmp_path):
    """``verify`` of the converted checkpoint against its HF model passes; against a copy of the
    HF model with one MLP weight scaled by 1.01 (a far smaller error than any mapping mistake)
    it reports FAILED with exit status 1."""
    ok = convert("verify", "--hf-dir", converted["hf_dir"], "--ckpt", converted["ckpt"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert float(ok.stdout.strip().splitlines()[-1].split("=")[1]) <= 1e-4
    changed = tmp_path / "hf_changed"
    shutil.copytree(converted["hf_dir"], changed)
    [file] = changed.glob("*.safetensors")
    tensors = load_file(file)
    [name] = [n for n in tensors if n.endswith("layers.1.mlp.down_proj.weight")]
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, file, metadata={"format": "pt"})
    bad = convert("verify", "--hf-dir", str(changed), "--ckpt", converted["ckpt"])
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "verify: FAILED" in bad.stderr
    assert float(bad.stdout.strip().splitlines()[-1].split("=")[1]) > 1e-4


def test_round_trip_is_bit_exact_and_loads_with_from_pretrained(converted):
    _, out = assert_megatron_to_hf_is_bit_exact(converted)
    torch.testing.assert_close(hf_logits(_from_pretrained_fp32(out), converted["batch"]),
                               converted["logits"],
                               atol=0, rtol=0)


def test_megatron_to_hf_reads_trainer_layout_with_config_only_dir(converted):
    """CKPT/latest_checkpointed_iteration.txt -> CKPT/iter_0000007/, no conversion record."""
    root = converted["root"]
    trainer = root / "trainer_ckpt"
    shutil.copytree(converted["ckpt"], trainer / "iter_0000007",
                    ignore=shutil.ignore_patterns("hf_conversion.json"))
    (trainer / "latest_checkpointed_iteration.txt").write_text("7\n")
    config_only = root / "config_only"
    config_only.mkdir()
    shutil.copy(Path(converted["hf_dir"]) / "config.json", config_only)
    out = root / "hf_from_trainer"
    result = convert("megatron-to-hf", "--ckpt", str(trainer), "--hf-config", str(config_only),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    original, back = read_safetensors(converted["hf_dir"]), read_safetensors(out)
    assert original.keys() == back.keys()  # transformers' default (legacy) names
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in original.items())
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (config_only / "config.json").read_text())


def test_megatron_to_hf_without_hf_config_takes_the_runs_saved_config(converted, tmp_path):
    """A model trained from the YAML's sizes (no HF directory: the README's tiny flow) could not
    be exported: --hf-config was required. The trainer's checkpoint holds its run's config."""
    import dataclasses

    from megatron_ease.config import Config, DataConfig, config_to_dict

    trainer = tmp_path / "run" / "checkpoints"
    shutil.copytree(converted["ckpt"], trainer / "iter_0000003",
                    ignore=shutil.ignore_patterns("hf_conversion.json"))
    (trainer / "latest_checkpointed_iteration.txt").write_text("3\n")
    assert convert("megatron-to-hf", "--ckpt", str(trainer), "--out", str(tmp_path / "x")
                   ).returncode == 2  # no run config: --hf-config is needed, and said
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text("{}")
    (tokenizer / "config.json").write_text('{"model_type": "another model"}')  # not copied
    model = dataclasses.replace(model_config_from_hf(converted["hf_dir"]), hf_config=None)
    run = Config(model=model, data=DataConfig(tokenizer=str(tokenizer)))
    (trainer / "iter_0000003" / "trainer_state.json").write_text(
        json.dumps({"step": 3, "config": config_to_dict(run)}))
    out = tmp_path / "hf_from_yaml_sizes"
    result = convert("megatron-to-hf", "--ckpt", str(trainer), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "tokenizer_config.json").read_text() == "{}"
    made = json.loads((out / "config.json").read_text())
    assert made["model_type"] == "qwen2_5_vl"
    original, back = read_safetensors(converted["hf_dir"]), read_safetensors(out)
    # what loaders dispatch on (vLLM reads architectures) and load in (dtype="auto")
    assert made["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert made["dtype"] == str(original["lm_head.weight"].dtype).removeprefix("torch.")
    assert original.keys() == back.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())
    torch.testing.assert_close(hf_logits(_from_pretrained_fp32(out), converted["batch"]),
                               converted["logits"], atol=0, rtol=0)
    # With the run's model.hf_config at hand, its config.json is the one written.
    run.model = dataclasses.replace(model, hf_config=converted["hf_dir"])
    (trainer / "iter_0000003" / "trainer_state.json").write_text(
        json.dumps({"step": 3, "config": config_to_dict(run)}))
    result = convert("megatron-to-hf", "--ckpt", str(trainer), "--out", str(tmp_path / "hf2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "hf2" / "config.json").read_text()) == json.loads(
        (Path(converted["hf_dir"]) / "config.json").read_text())


def test_megatron_to_hf_into_the_hf_config_dir_itself(converted):
    """--out = --hf-config (config and tokenizer files already there): weights are added, the
    config files stay (copying them onto themselves used to raise SameFileError)."""
    both = converted["root"] / "config_and_out"
    both.mkdir()
    shutil.copy(Path(converted["hf_dir"]) / "config.json", both)
    result = convert("megatron-to-hf", "--ckpt", converted["ckpt"], "--hf-config", str(both),
                     "--out", str(both))
    assert result.returncode == 0, result.stderr[-3000:]
    original, back = read_safetensors(converted["hf_dir"]), read_safetensors(both)
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_checkpoint_dir_that_is_also_a_run_directory_is_ambiguous(converted, tmp_path):
    """A converted checkpoint later used as a run's checkpoint.dir holds both its own weights
    and 'latest': exporting it must not silently pick the untrained top level."""
    from megatron_ease.models.qwen_vl.checkpoint import resolve_checkpoint_dir

    both = tmp_path / "both"
    shutil.copytree(converted["ckpt"], both)
    (both / "latest").write_text("iter_0000003\n")
    with pytest.raises(ValueError, match="also has latest"):
        resolve_checkpoint_dir(str(both))


def test_hf_tensors_drops_each_input_before_asking_for_the_next():
    """Streamed export: an input (a view into a loaded batch of stacked layers) must be released
    before the next one is produced, or two batches are alive at once."""
    import gc
    import weakref

    from megatron_ease.models.qwen_vl import hf_tensors
    from megatron_ease.models.qwen_vl.param_mapping import AttentionLayout

    name = "language_model.decoder.layers.0.mlp.linear_fc1.weight"
    previous = []

    def source():
        for _ in range(3):
            gc.collect()
            assert all(ref() is None for ref in previous), "the previous input is still alive"
            batch = torch.randn(2, 8, 4)  # a stacked batch; the input is a view into it
            previous.append(weakref.ref(batch))
            yield name, batch[0]
            del batch

    out = list(hf_tensors(source(), QWEN2_5_VL, AttentionLayout(2, 1, 2)))
    assert len(out) == 6 and all(t.shape == (4, 4) for _, t in out)


def _corrupt(src: str, dst: Path, how: str) -> str:
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(path)
    if how == "missing":
        name = "model.layers.1.mlp.up_proj.weight"
        del tensors[name]
    elif how == "fp8":
        name = "model.layers.0.self_attn.q_proj.weight"
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    elif how == "quantized":
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3"}
        (dst / "config.json").write_text(json.dumps(config))
        return "fp8"
    else:
        name = "visual.blocks.0.attn.qkv.weight"
        tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("how", ["missing", "wrong_shape", "fp8", "quantized"])
def test_corrupted_hf_checkpoint_is_refused_naming_the_tensor(converted, how):
    """Also quantized checkpoints (FP8 tensors, a quantization_config): a KeyError before."""
    bad = converted["root"] / f"hf_{how}"
    name = _corrupt(converted["hf_dir"], bad, how)
    result = convert("hf-to-megatron", "--hf-dir", str(bad), "--out",
                     str(converted["root"] / f"ckpt_{how}"))
    assert result.returncode != 0
    assert f"'{name}'" in result.stderr
    assert {"missing": "missing tensor", "wrong_shape": "has shape", "fp8": "stored as F8_E4M3",
            "quantized": "quantized model"}[how] in result.stderr


def test_weight_table_detects_and_writes_the_nested_naming():
    legacy = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "visual.blocks.0.attn.qkv.weight", "lm_head.weight"]
    nested = ["model.language_model.embed_tokens.weight",
              "model.language_model.layers.0.self_attn.q_proj.weight",
              "model.visual.blocks.0.attn.qkv.weight", "lm_head.weight"]
    assert QWEN2_5_VL.detect_naming(legacy) == "legacy"
    assert QWEN2_5_VL.detect_naming(nested) == "nested"
    _, names = QWEN2_5_VL.resolve("language_model.decoder.layers.3.self_attention.linear_qkv.bias",
                                  "nested")
    assert names == {r: f"model.language_model.layers.3.self_attn.{r}_proj.bias" for r in "qkv"}
    _, names = QWEN2_5_VL.resolve("vision_model.merger.mlp.0.weight", "nested")
    assert names == {"weight": "model.visual.merger.mlp.0.weight"}
    _, names = QWEN2_5_VL.resolve("language_model.output_layer.weight", "legacy",
                                  tie_word_embeddings=True)
    assert names == {"weight": "model.embed_tokens.weight"}


# -- converted checkpoints in other layouts (gloo ranks) ------------------------------------------

@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_converted_checkpoint_loads_at_other_parallel_layouts(converted, tp, pp):
    assert converted["result"].returncode == 0
    results = run_distributed(converted_checkpoint_logits, converted["hf_dir"],
                              converted["ckpt"], converted["batch"],
                              tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    assert_layout_logits_match(converted, results)


def _resave_worker(hf_dir, src, dst, drop_key):
    """Load at TP=2, save under another prefix (as a trainer might), optionally without a key."""
    from megatron.core import dist_checkpointing

    from megatron_ease.models.qwen_vl import build_qwen_vl_model, load_model_checkpoint

    model = build_qwen_vl_model(model_config_from_hf(hf_dir),
                                ParallelConfig(tensor_model_parallel_size=2),
                                perform_initialization=False)
    load_model_checkpoint(model, src)
    sharded = model.sharded_state_dict(prefix="policy.")
    sharded = {k: v for k, v in sharded.items() if not k.endswith(drop_key or "\0")}
    os.makedirs(dst, exist_ok=True)
    dist_checkpointing.save(sharded, dst, sharded_strategy=("torch_dist", 1))


class _ExtraState:
    """What TransformerEngine modules add: an ``_extra_state`` (FP8 metadata) in state dicts,
    which megatron checkpoints as a ShardedObject."""

    def get_extra_state(self):
        return torch.tensor([7.0])

    def set_extra_state(self, state):
        self.extra_state_set = state


def _with_extra_state(model):
    """The model's core attentions with an extra state, as TEDotProductAttention has under the
    TE spec (megatron's local linears already save a None one; its local core attention none)."""
    patched = 0
    for name, module in model.named_modules():
        if name.endswith("core_attention") and "decoder" in name:
            module.__class__ = type(f"TE{type(module).__name__}", (_ExtraState, type(module)), {})
            patched += 1
    assert patched
    return model


def _tp2_model(hf_dir):
    """The model of ``hf_dir`` at TP = 2, uninitialised (weights come from a checkpoint)."""
    from megatron_ease.models.qwen_vl import build_qwen_vl_model

    return build_qwen_vl_model(model_config_from_hf(hf_dir),
                               ParallelConfig(tensor_model_parallel_size=2),
                               perform_initialization=False)


def _load_with_extra_state_worker(hf_dir, ckpt, run_dir):
    """init_from (load_model_checkpoint) and a resume (CheckpointManager.load) of checkpoints
    written without extra state, into a model that has some."""
    from megatron_ease.models.qwen_vl import load_model_checkpoint
    from megatron_ease.training.checkpointing import CheckpointManager

    plain = _tp2_model(hf_dir)
    load_model_checkpoint(plain, ckpt)
    manager = CheckpointManager(run_dir, keep_last=2)
    manager.save(1, [plain])
    model = _with_extra_state(_tp2_model(hf_dir))
    assert any(k.endswith("_extra_state") for k in model.sharded_state_dict())
    load_model_checkpoint(model, ckpt)
    resumed = _with_extra_state(_tp2_model(hf_dir))
    manager.load(manager.resolve_latest(), [resumed], restore_rng=False)
    want = {n: p.detach() for n, p in plain.named_parameters()}
    for loaded in (model, resumed):
        got = {n: p.detach() for n, p in loaded.named_parameters()}
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want)
    return True


def test_checkpoints_without_extra_state_load_into_a_transformer_engine_layout(converted,
                                                                              tmp_path):
    """The converter writes the local spec; a TE model's modules carry ``_extra_state``
    objects the checkpoint lacks, and torch.distributed.checkpoint refused the whole load
    ("Missing key in checkpoint state_dict": init_from failed under TE). Also a resume of a run
    saved without TE."""
    assert run_distributed(_load_with_extra_state_worker, converted["hf_dir"], converted["ckpt"],
                           str(tmp_path / "run"), tensor_model_parallel_size=2) == [True, True]


def _init_from_trainer_checkpoint_worker(hf_dir, ckpt, run_dir):
    """A trainer checkpoint (model + distributed optimizer state) as ``model.init_from``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_ease.models.qwen_vl import load_model_checkpoint
    from megatron_ease.training.checkpointing import CheckpointManager

    trained = _tp2_model(hf_dir)
    load_model_checkpoint(trained, ckpt)
    # The plain (not distributed) optimizer: its param groups go to the checkpoint's common.pt.
    ddp = DistributedDataParallel(trained.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), trained)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), [ddp])
    ddp.zero_grad_buffer()
    for param in trained.parameters():
        param.main_grad.fill_(0.01)
    optimizer.step()  # Adam state: the save then holds the optimizer's
    CheckpointManager(run_dir, keep_last=1).save(3, [ddp], optimizer)
    fresh = _tp2_model(hf_dir)
    load_model_checkpoint(fresh, run_dir)  # failed: "unexpected ['zer']" (common 'optimizer')
    want = dict(trained.named_parameters())
    got = dict(fresh.named_parameters())
    return got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_a_trainer_checkpoint_with_optimizer_state_serves_as_init_from(converted, tmp_path):
    assert run_distributed(_init_from_trainer_checkpoint_worker, converted["hf_dir"],
                           converted["ckpt"], str(tmp_path / "run"),
                           tensor_model_parallel_size=2) == [True, True]


def _reload_worker(hf_dir, ckpt, num_layers=None):
    import dataclasses

    from megatron_ease.models.qwen_vl import build_qwen_vl_model, load_model_checkpoint

    model_cfg = model_config_from_hf(hf_dir)
    if num_layers:
        model_cfg = dataclasses.replace(model_cfg, num_layers=num_layers)
    model = build_qwen_vl_model(model_cfg, ParallelConfig(pipeline_model_parallel_size=2),
                                perform_initialization=False)
    try:
        load_model_checkpoint(model, ckpt)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_checkpoint_resaved_at_tp2_loads_at_pp2_and_bad_ones_are_refused(converted, tmp_path):
    hf_dir, src = converted["hf_dir"], converted["ckpt"]
    run_distributed(_resave_worker, hf_dir, src, str(tmp_path / "tp2"), None,
                    tensor_model_parallel_size=2)
    direct = run_distributed(_reload_worker, hf_dir, src, pipeline_model_parallel_size=2)
    resaved = run_distributed(_reload_worker, hf_dir, str(tmp_path / "tp2"),
                              pipeline_model_parallel_size=2)
    for a, b in zip(direct, resaved, strict=True):
        assert isinstance(a, dict) and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)

    run_distributed(_resave_worker, hf_dir, src, str(tmp_path / "missing"),
                    "decoder.final_layernorm.weight", tensor_model_parallel_size=2)
    errors = run_distributed(_reload_worker, hf_dir, str(tmp_path / "missing"),
                             pipeline_model_parallel_size=2)
    assert "missing tensor 'policy.language_model.decoder.final_layernorm.weight'" in errors[1]
    errors = run_distributed(_reload_worker, hf_dir, src, 6, pipeline_model_parallel_size=2)
    for error in errors:
        assert "WeightMismatchError" in error and "has shape [4, " in error, error
        assert "model.language_model.decoder.layers.self_attention.linear_qkv.weight" in error
        # What the checkpoint holds and where the model's sizes come from; a long list cut.
        assert "(it holds a qwen2_5_vl model, by its hf_conversion.json)" in error, error
        assert "sizes come from model.hf_config" in error and "more." in error, error


def test_megatron_to_hf_refuses_a_checkpoint_that_does_not_fit_naming_the_tensor(converted):
    from megatron_ease.models.qwen_vl import CheckpointModelTensors, WeightMismatchError

    reader = CheckpointModelTensors(converted["ckpt"])
    expected = {name: reader.shape(name) for name in reader.names}
    reader.check_fits(expected)
    fc1 = "language_model.decoder.layers.1.mlp.linear_fc1.weight"
    with pytest.raises(WeightMismatchError, match=re.escape(
            f"tensor '{fc1}' (checkpoint key 'model.language_model.decoder.layers.mlp."
            f"linear_fc1.weight'[1]) has shape [256, 64], the model expects [512, 64]")):
        reader.check_fits({**expected, fc1: (512, 64)})
    extra = "language_model.decoder.layers.4.mlp.linear_fc2.weight"
    with pytest.raises(WeightMismatchError, match=f"missing tensor '{extra}'"):
        reader.check_fits({**expected, extra: (64, 128)})
    del expected["vision_model.merger.ln_q.weight"]
    with pytest.raises(WeightMismatchError, match="unexpected tensor 'vision_model.merger.ln_q"):
        reader.check_fits(expected)


def test_nested_hf_names_are_read_and_written_back(converted, tmp_path):
    """transformers also loads (and Qwen3-VL ships) ``model.language_model.*`` names."""
    nested_dir = tmp_path / "nested"
    shutil.copytree(converted["hf_dir"], nested_dir)
    original = load_file(nested_dir / "model.safetensors")
    rename = {"model.": "model.language_model.", "visual.": "model.visual."}
    nested = {next((new + k[len(old):] for old, new in rename.items() if k.startswith(old)), k): v
              for k, v in original.items()}
    save_file(nested, nested_dir / "model.safetensors", metadata={"format": "pt"})
    record, back = run_distributed(hf_round_trip, str(nested_dir), QWEN2_5_VL,
                                   torch.bfloat16)[0]
    naming = record["naming"]
    assert naming == "nested" and back.keys() == nested.keys()
    assert all(torch.equal(back[k], v) for k, v in nested.items())


# -- malformed inputs, tied-but-different lm_head, interrupted writes ----------------------------

def _sharded(src: str, dst: Path) -> tuple[dict, list[str]]:
    """A copy of ``src`` with its weights split over two shards and an index; (weight_map,
    shard names)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for file, part in zip(files, (names[:len(names) // 2], names[len(names) // 2:]), strict=True):
        save_file({n: tensors[n] for n in part}, dst / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map, files


@pytest.mark.parametrize("how", ["truncated", "bad_index", "index_without_weight_map",
                                 "bad_config", "tensor_in_two_shards"])
def test_malformed_input_files_are_refused_naming_the_file(converted, tmp_path, how):
    """Raw tracebacks (SafetensorError, JSONDecodeError, KeyError) without the path before; a
    tensor stored in two shards was taken from the last one, silently."""
    bad = tmp_path / "hf"
    if how == "truncated":
        shutil.copytree(converted["hf_dir"], bad)
        named = bad / "model.safetensors"
        os.truncate(named, named.stat().st_size // 2)
    elif how == "bad_config":
        shutil.copytree(converted["hf_dir"], bad)
        named = bad / "config.json"
        named.write_text(named.read_text()[:40])
    else:
        weight_map, files = _sharded(converted["hf_dir"], bad)
        named = bad / "model.safetensors.index.json"
        if how == "bad_index":
            named.write_text(named.read_text()[:-10])
        elif how == "index_without_weight_map":
            named.write_text(json.dumps({"metadata": {}}))
        else:
            name = "model.embed_tokens.weight"
            second = load_file(bad / files[1])
            assert weight_map[name] == files[0] and name not in second
            second[name] = torch.zeros_like(load_file(bad / files[0])[name])
            save_file(second, bad / files[1], metadata={"format": "pt"})
    out = tmp_path / "ckpt"
    result = convert("hf-to-megatron", "--hf-dir", str(bad), "--out", str(out))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: "), error
    if how == "tensor_in_two_shards":
        assert all(f in error for f in files) and "'model.embed_tokens.weight'" in error, error
    else:
        assert str(named) in error, error
        if how == "index_without_weight_map":
            assert "'weight_map'" in error, error
    assert not out.exists()


def test_tied_checkpoint_whose_lm_head_differs_from_the_embeddings_is_refused(converted,
                                                                              tmp_path):
    """With tie_word_embeddings, a stored lm_head.weight was taken for a copy of the embeddings
    unchecked: exported with the embeddings in its place (exit 0, round trip not exact)."""
    tied = tmp_path / "hf_tied"
    shutil.copytree(converted["hf_dir"], tied)
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    tensors = load_file(tied / "model.safetensors")
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    out = tmp_path / "ckpt"
    result = convert("hf-to-megatron", "--hf-dir", str(tied), "--out", str(out))
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "'lm_head.weight'" in error, error
    assert "tie_word_embeddings" in error, error
    assert not out.exists()


_KILLED_AFTER_THE_SAVE = """
import sys
sys.path.insert(0, "tools")
import convert_hf_checkpoint as tool

def killed(ckpt_dir, record):
    raise KeyboardInterrupt("killed between the checkpoint and its record")

tool._write_record = killed
tool.main(sys.argv[1:])
"""


def test_conversion_killed_before_its_record_leaves_no_checkpoint_at_out(converted, tmp_path):
    """The dist checkpoint went straight into --out, the record after it: a kill in between left
    a directory that passes for a checkpoint, exported later with default names and the
    config's dtype."""
    import subprocess
    import sys

    from megatron_ease.models.qwen_vl.checkpoint import is_dist_checkpoint
    from tests.qwen_fixtures import CONVERTER

    out = tmp_path / "ckpt"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_THE_SAVE, "hf-to-megatron", "--hf-dir",
         converted["hf_dir"], "--out", str(out)], capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=CONVERTER.parents[1], timeout=300)
    assert killed.returncode != 0 and "killed between" in killed.stderr, killed.stderr[-3000:]
    assert not out.exists() and not is_dist_checkpoint(str(out))
    assert os.listdir(tmp_path) == []  # the temporary directory is gone too
    out.mkdir()  # an empty --out is accepted
    retry = convert("hf-to-megatron", "--hf-dir", converted["hf_dir"], "--out", str(out))
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert is_dist_checkpoint(str(out)) and (out / "hf_conversion.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    # A conversion record cut off (by an older version, a full disk) is named, not a traceback.
    record = out / "hf_conversion.json"
    record.write_text(record.read_text()[:50])
    result = convert("megatron-to-hf", "--ckpt", str(out), "--hf-config", converted["hf_dir"],
                     "--out", str(tmp_path / "hf"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: conversion record {record} is not valid JSON" in result.stderr


def test_export_whose_shard_write_fails_leaves_no_shard_under_its_name(tmp_path, monkeypatch):
    """Shards went straight to their names: into an existing directory (--out = --hf-config,
    config.json already there) a cut-off model.safetensors looked complete."""
    import errno

    import safetensors.torch

    from megatron_ease.models.qwen_vl import save_hf_weights

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    tensors = [(f"t{i}", torch.full((4, 4), float(i))) for i in range(3)]
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors]
    real_save = safetensors.torch.save_file
    calls = []

    def disk_full(tensor_dict, filename, metadata=None):
        calls.append(filename)
        if len(calls) < 2:
            return real_save(tensor_dict, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 10)  # a partial file, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_hf_weights(iter(tensors), str(out), plan, max_shard_bytes=64)
    assert len(calls) == 2
    assert sorted(os.listdir(out)) == ["config.json"]  # no shard, no index, no temporary file
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    written = save_hf_weights(iter(tensors), str(out), plan, max_shard_bytes=64)
    assert written == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [
        "model.safetensors.index.json"]
    assert sorted(os.listdir(out)) == sorted(["config.json", *written])
    back = read_safetensors(out)
    assert all(torch.equal(back[name], t) for name, t in tensors)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {f"t{i}": written[i] for i in range(3)}


def test_megatron_to_hf_takes_the_config_file_itself_as_hf_config(converted, tmp_path):
    """``--hf-config DIR/config.json`` (``load_hf_config`` reads a file, and ``model.hf_config``
    may name one): the weights were written, then listing the "directory" raised
    NotADirectoryError, a traceback and an output without config.json; a run whose
    ``model.hf_config`` is a file was exported with a config made from its model section."""
    import dataclasses

    from megatron_ease.config import Config, config_to_dict

    hf_dir = Path(converted["hf_dir"])
    original = read_safetensors(hf_dir)

    def assert_exported(out, config_from=hf_dir / "config.json", files=None):
        back = read_safetensors(out)
        assert original.keys() == back.keys()
        assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in original.items())
        assert (out / "config.json").read_bytes() == config_from.read_bytes()
        if files is not None:
            assert sorted(os.listdir(out)) == files

    out = tmp_path / "from_config_json"
    result = convert("megatron-to-hf", "--ckpt", converted["ckpt"], "--hf-config",
                     str(hf_dir / "config.json"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    # config.json stands for its directory: the generation config comes along
    assert_exported(out, files=sorted(os.listdir(hf_dir)))
    other = tmp_path / "qwen_vl_config.json"
    shutil.copy(hf_dir / "config.json", other)
    out = tmp_path / "from_other_file"
    result = convert("megatron-to-hf", "--ckpt", converted["ckpt"], "--hf-config", str(other),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exported(out, config_from=other, files=["config.json", "model.safetensors"])

    trainer = tmp_path / "run" / "checkpoints"
    shutil.copytree(converted["ckpt"], trainer / "iter_0000002",
                    ignore=shutil.ignore_patterns("hf_conversion.json"))
    (trainer / "latest_checkpointed_iteration.txt").write_text("2\n")
    model = dataclasses.replace(model_config_from_hf(hf_dir), hf_config=str(hf_dir / "config.json"))
    (trainer / "iter_0000002" / "trainer_state.json").write_text(
        json.dumps({"step": 2, "config": config_to_dict(Config(model=model))}))
    out = tmp_path / "from_run"
    result = convert("megatron-to-hf", "--ckpt", str(trainer), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exported(out, files=sorted(os.listdir(hf_dir)))


def test_unusable_inputs_to_verify_and_export_exit_2_naming_them(converted, tmp_path):
    """An HF directory without weights (verify loaded it with transformers: an OSError
    traceback) and a checkpoint that is ambiguous (a ValueError traceback) ended with exit
    status 1, which ``verify`` gives a logit mismatch: scripts read them as a failed check."""
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(Path(converted["hf_dir"]) / "config.json", config_only)
    result = convert("verify", "--hf-dir", str(config_only), "--ckpt", converted["ckpt"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {config_only}: no model weights" in result.stderr
    assert "max_abs_logit_diff" not in result.stdout

    both = tmp_path / "both"
    shutil.copytree(converted["ckpt"], both)
    (both / "latest").write_text("iter_0000003\n")
    for args in (("verify", "--hf-dir", converted["hf_dir"], "--ckpt", str(both)),
                 ("megatron-to-hf", "--ckpt", str(both), "--hf-config", converted["hf_dir"],
                  "--out", str(tmp_path / "x"))):
        result = convert(*args)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "also has latest pointing to a step directory" in result.stderr
        assert "Traceback" not in result.stderr
