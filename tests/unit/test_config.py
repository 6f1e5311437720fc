"""Config: YAML + dotted overrides, and validation that names the offending field."""

import glob
import os

import pytest

from megatron_ease.config import ConfigError, _load_yaml, load_config, validate_config

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "examples")
SEVEN_B = os.path.join(EXAMPLES, "qwen25vl_7b_ease.yaml")


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_dotted_overrides_are_typed():
    cfg = _cfg("parallel.tensor_model_parallel_size=2", "train.steps=10", "ease.loss_coeff=0.5",
               "ease.layers=[0,1]", "checkpoint.dir=/tmp/x", "model.vision.depth=3",
               "train.lr=1e-6", "ease.enabled=false", "model.hf_config=null")
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.train.steps == 10 and cfg.train.lr == 1e-6
    assert cfg.ease.loss_coeff == 0.5 and cfg.ease.layers == [0, 1] and cfg.ease.enabled is False
    assert cfg.checkpoint.dir == "/tmp/x" and cfg.model.vision.depth == 3
    assert cfg.model.hf_config is None


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 3\nease:\n  layers: [1]\n")
    cfg = load_config(str(path), ["train.steps=7"])
    assert cfg.train.steps == 7 and cfg.ease.layers == [1]


@pytest.mark.parametrize("override, match", [
    ("train.stpes=3", r"unknown config key 'train.stpes' \(did you mean 'steps'\?\)"),
    ("trian.steps=3", r"unknown config key 'trian'"),
    ("train.steps=abc", r"'train.steps' must be an integer"),
    ("ease.enabled=3", r"'ease.enabled' must be true or false"),
    ("ease.layers=5", r"'ease.layers' must be a list"),
    ("trainsteps", r"section.key=value"),
    # A value that is not YAML: a one-line error naming the override, not a traceback.
    ("ease.layers=[1,2", r"override 'ease.layers=\[1,2': the value is not valid YAML"),
])
def test_bad_overrides_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(override)


def test_text_fields_take_the_override_text_as_given():
    """A string field's value is its text even where YAML reads something else: a path glob
    (an alias to YAML), a date, a number, a boolean word."""
    cfg = _cfg("data.train_shards=*.tar", "logging.run_dir=2025-01-01",
               "logging.wandb_project=on", "checkpoint.dir=2025")
    assert cfg.data.train_shards == "*.tar" and cfg.logging.run_dir == "2025-01-01"
    assert cfg.logging.wandb_project == "on" and cfg.checkpoint.dir == "2025"
    assert _cfg("checkpoint.dir=null").checkpoint.dir is None


def test_a_section_override_changes_only_the_keys_it_names():
    """'dapo={group_size: 16}' reset the section's other keys to their defaults (the 7B recipe's
    max_response_length 1024 became 64, and passed validation)."""
    cfg = load_config(SEVEN_B, ["dapo={group_size: 16}", "model.vision={depth: 2}"])
    base = load_config(SEVEN_B)
    assert cfg.dapo.group_size == 16
    assert cfg.dapo.max_response_length == base.dapo.max_response_length == 1024
    assert cfg.model.vision.depth == 2
    assert cfg.model.vision.hidden_size == base.model.vision.hidden_size
    with pytest.raises(ConfigError, match=r"unknown config key 'dapo.gruop_size'"):
        load_config(SEVEN_B, ["dapo={gruop_size: 16}"])


def test_a_section_left_empty_in_yaml_takes_its_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  # interval: 5\ntrain:\n  steps: 3\n")
    cfg = load_config(str(path))
    assert cfg.train.steps == 3 and cfg.eval == load_config(None).eval


def test_a_key_given_twice_in_a_yaml_file_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: a second 'train:' section dropped the first's
    steps and lr without a word."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 500\n  lr: 1.0e-5\ncheckpoint:\n  interval: 5\n"
                    "train:\n  seed: 7\n")
    with pytest.raises(ConfigError, match=r"c.yaml: duplicate key 'train' \(lines 1 and 6\)"):
        load_config(str(path))
    path.write_text("ease:\n  layers: [1]\n  sigma: 1.0\n  layers: [2]\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'layers' \(lines 2 and 4\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"override .*: duplicate key 'group_size'"):
        _cfg("dapo={group_size: 4, group_size: 8}")
    # YAML merge keys stay what they are: the keys after '<<' override the merged ones.
    assert _load_yaml("base: &b {steps: 3, seed: 5}\ntrain:\n  <<: *b\n  steps: 4\n") == {
        "base": {"steps": 3, "seed": 5}, "train": {"steps": 4, "seed": 5}}


def test_a_section_set_to_null_by_an_override_is_refused_or_left_as_it_is():
    """'train=null' reset every train key (of the YAML and earlier overrides) to its default."""
    with pytest.raises(ConfigError, match=r"override 'train=null': 'train' is a config "
                                          r"section, not a value; set its keys"):
        _cfg("train.steps=100", "train=null")
    cfg = load_config(SEVEN_B, ["model={vision: null}"])
    assert cfg.model.vision == load_config(SEVEN_B).model.vision


def test_odd_yaml_keys_and_huge_numbers_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  on: 3\n")  # YAML 1.1: 'on' is the boolean true
    with pytest.raises(ConfigError, match=r"unknown config key 'train.True' \(YAML read the "
                                          r"key as bool True; config keys are names: quote it\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"'train.lr' is beyond the float range"):
        _cfg("train.lr=1" + "0" * 400)


def test_invalid_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: [3\n")
    with pytest.raises(ConfigError, match=r"config file .*c.yaml is not valid YAML"):
        load_config(str(path))


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ease:\n  lambda: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'ease.lambda'"):
        load_config(str(path))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


@pytest.mark.parametrize("overrides, world, match", [
    (["model.num_attention_heads=6", "model.num_query_groups=2",
      "parallel.tensor_model_parallel_size=4"], 4, r"model.num_attention_heads \(6\)"),
    (["model.num_attention_heads=8", "model.num_query_groups=2",
      "parallel.tensor_model_parallel_size=4"], 4, r"model.num_query_groups \(2\)"),
    (["model.vocab_size=255", "parallel.tensor_model_parallel_size=2"], 2,
     r"model.vocab_size \(255\) must be divisible by parallel.tensor_model_parallel_size \(2\)"),
    (["model.ffn_hidden_size=130", "parallel.tensor_model_parallel_size=4",
      "model.num_query_groups=4"], 4,
     r"model.ffn_hidden_size \(130\) must be divisible by parallel.tensor_model_parallel_size"),
    (["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"], 2,
     r"model.num_layers \(3\)"),
    (["model.num_layers=5", "parallel.pipeline_model_parallel_size=3",
      "parallel.first_pipeline_stage_layers=2"], 3, r"parallel.first_pipeline_stage_layers"),
    (["model.num_layers=4", "parallel.pipeline_model_parallel_size=2",
      "parallel.first_pipeline_stage_layers=0"], 2, r"parallel.first_pipeline_stage_layers"),
    (["parallel.tensor_model_parallel_size=2"], 3, r"world size 3 is not divisible"),
    (["train.prompts_per_step=3"], 2, r"train.prompts_per_step \(3\)"),
    (["train.micro_batch_size=3"], 1, r"train.micro_batch_size \(3\)"),
    (["dapo.overlong_penalty_factor=-1"], 1, r"dapo.overlong_penalty_factor must be >= 0"),
    (["parallel.first_pipeline_stage_layers=1"], 1,
     r"first_pipeline_stage_layers \(1\) needs pipeline parallelism: set it to null"),
    (["train.ppo_epochs=0"], 1, r"train.ppo_epochs must be >= 1"),
    (["model.family=qwen3_vl"], 1,
     r"model.vision.num_position_embeddings must be a positive square for model.family qwen3_vl"),
    (["model.vision.fullatt_block_indexes=[5]"], 1,
     r"model.vision.fullatt_block_indexes \[5\] out of range"),
    (["train.lr=nan"], 1, r"train.lr must be a finite number, got nan"),
    (["train.lr=.inf"], 1, r"train.lr must be a finite number, got inf"),
    # NaN passes any range check written as a comparison; inf some of them.
    (["train.clip_grad=nan"], 1, r"train.clip_grad must be a finite number, got nan"),
    (["ease.loss_coeff=.inf"], 1, r"ease.loss_coeff must be a finite number, got inf"),
    (["dapo.format_reward=nan"], 1, r"dapo.format_reward must be a finite number"),
    (["train.clip_grad=-1"], 1, r"train.clip_grad must be >= 0 \(0 = no clipping\), got -1"),
    (["train.adam_beta2=1.5"], 1, r"train.adam_beta2 must be in \[0, 1\), got 1.5"),
    (["train.adam_beta1=-0.1"], 1, r"train.adam_beta1 must be in \[0, 1\)"),
    (["train.weight_decay=-0.1"], 1, r"train.weight_decay must be >= 0"),
    (["train.lr=1e-6", "train.min_lr=5"], 1, r"train.min_lr must be in \[0, train.lr"),
    (["train.warm_start_steps=-3"], 1, r"train.warm_start_steps must be >= 0"),
    (["train.warm_start_lr=-1"], 1, r"train.warm_start_lr must be >= 0"),
    (["parallel.timeout_minutes=-1"], 1, r"parallel.timeout_minutes must be > 0"),
    (["data.min_pixels=0"], 1, r"data.min_pixels must be >= 1 or null, got 0"),
    (["data.max_pixels=-1"], 1, r"data.max_pixels must be >= 1 or null, got -1"),
    (["ease.chunk_size=0"], 1, r"ease.chunk_size must be >= 1 or null"),
    # The capturing layers exist with ease.enabled false too (the DAPO arm's metrics): their
    # settings are checked then as well.
    (["ease.enabled=false", "ease.layers=[0,0]"], 1, r"ease.layers has duplicates"),
    (["ease.enabled=false", "ease.layers=[99]"], 1, r"ease.layers \[99\] out of range"),
    (["ease.enabled=false", "ease.layers=[0]", "ease.divergence=klx"], 1, r"ease.divergence"),
    (["ease.enabled=false", "ease.layers=[]", "parallel.context_parallel_size=2"], 2,
     r"context_parallel_size > 1 is not supported yet: the Qwen-VL model"),
    (["train.lr_warmup_steps=-5"], 1, r"train.lr_warmup_steps must be >= 0"),
    (["model.kv_channels=64"], 1, r"model.mrope_section \[2, 3, 3\] must sum to half"),
    (["data.min_pixels=5000", "data.max_pixels=1000"], 1,
     r"data.min_pixels \(5000\) must be <= data.max_pixels \(1000\)"),
    (["ease.layers=[0,2]", "model.num_layers=2"], 1, r"ease.layers \[2\] out of range"),
    (["ease.layers=[-1]"], 1, r"ease.layers \[-1\] out of range"),
    (["dapo.group_size=1"], 1, r"dapo.group_size must be >= 2"),
    (["parallel.context_parallel_size=2"], 2, r"context_parallel_size > 1 is not supported"),
    (["ease.divergence=js"], 1, r"ease.divergence"),
    (["ease.slice_impl=cuda"], 1, r"ease.slice_impl must be torch, triton or auto"),
    (["dapo.temperature=0"], 1, r"dapo.temperature must be > 0"),
    (["parallel.pipeline_model_parallel_size=2",
      "parallel.virtual_pipeline_model_parallel_size=2"], 2,
     r"parallel.virtual_pipeline_model_parallel_size .* not supported"),
    (["dapo.top_p=0"], 1, r"dapo.top_p must be in \(0, 1\]"),
    (["dapo.top_p=1.5"], 1, r"dapo.top_p must be in \(0, 1\]"),
    (["data.num_workers=-1"], 1, r"data.num_workers must be >= 0, got -1"),
    (["data.prefetch_factor=0"], 1, r"data.prefetch_factor must be >= 1 or null, got 0"),
    (["dapo.group_size=8", "dapo.max_rollouts_per_batch=4"], 1,
     r"dapo.max_rollouts_per_batch \(4\) must be 0 \(no bound\) or at least dapo.group_size"),
    (["data.max_prompt_tokens=0"], 1, r"data.max_prompt_tokens must be >= 1 or null, got 0"),
    (["logging.log_interval=0"], 1, r"logging.log_interval must be >= 1, got 0"),
    (["logging.profile_steps=[3]"], 1, r"logging.profile_steps must be \[\] or \[first, last\]"),
    (["logging.profile_steps=[3,2]"], 1, r"logging.profile_steps must be"),
    (["logging.profile_steps=[0,2]"], 1, r"logging.profile_steps must be"),
    (["logging.profile_steps=[1,2]", "logging.profile_ranks=[0,2]"], 2,
     r"logging.profile_ranks must be ranks in \[0, 2\), got \[0, 2\]"),
])
def test_invalid_configs_fail_naming_the_field(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(_cfg(*overrides), world_size=world)


def test_valid_layouts_pass():
    validate_config(_cfg("parallel.tensor_model_parallel_size=2"), world_size=2)
    validate_config(_cfg("parallel.pipeline_model_parallel_size=2", "model.num_layers=4",
                         "ease.layers=[1,3]"), world_size=2)
    validate_config(_cfg("model.num_layers=5", "parallel.pipeline_model_parallel_size=3",
                         "parallel.first_pipeline_stage_layers=1"), world_size=3)


def test_example_configs_load_and_validate():
    paths = sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml")))
    assert len(paths) >= 4, paths  # the tiny CPU config and the three recipes at least
    for path in paths:
        cfg = load_config(path)
        p = cfg.parallel
        validate_config(cfg, world_size=p.tensor_model_parallel_size
                        * p.pipeline_model_parallel_size * p.context_parallel_size)


def test_image_budget_defaults_to_the_model_familys_processor():
    """Without ``data.min_pixels`` / ``data.max_pixels`` a model family gets its HF processor's
    budget (a Qwen3-VL config used to get Qwen2.5-VL's); given values win."""
    from megatron_ease.training.builders import image_config

    qwen3 = ["model.family=qwen3_vl", "model.vision.patch_size=16"]
    got = image_config(load_config(None, qwen3))
    assert (got.patch_size, got.min_pixels, got.max_pixels) == (16, 65536, 16777216)
    got = image_config(load_config(None, ["data.min_pixels=4096"]))
    assert (got.patch_size, got.min_pixels, got.max_pixels) == (14, 4096, 12845056)


def test_hf_config_sizes_reach_every_part_of_the_run(tmp_path):
    """``model.hf_config`` replaced the sizes only where the model was built: validation, the
    image processor and the stop tokens still read the YAML's (a Qwen3-VL config with a
    Qwen2.5-VL YAML got 14-px patches for a 16-px tower)."""
    from megatron_ease.training.builders import image_config
    from tests.qwen_fixtures import tiny_qwen3vl_config

    tiny_qwen3vl_config(num_layers=6).save_pretrained(str(tmp_path / "hf"))
    yaml_cfg = os.path.join(EXAMPLES, "tiny_cpu_ease.yaml")
    cfg = load_config(yaml_cfg, [f"model.hf_config={tmp_path / 'hf'}"])
    assert cfg.model.family == "qwen3_vl" and cfg.model.num_layers == 6
    assert cfg.model.vision.patch_size == 16 and image_config(cfg).patch_size == 16
    assert cfg.model.eos_token_id == 248 and cfg.model.hf_config == str(tmp_path / "hf")
    validate_config(cfg)
    with pytest.raises(ConfigError, match=r"ease.layers \[7\] out of range: the model has 6"):
        validate_config(load_config(yaml_cfg, [f"model.hf_config={tmp_path / 'hf'}",
                                               "ease.layers=[1,7]"]))
    with pytest.raises(ConfigError, match=r"model.hf_config '.*missing'"):
        load_config(yaml_cfg, [f"model.hf_config={tmp_path / 'missing'}"])


def _paths_cfg(tmp_path, *overrides):
    shards = tmp_path / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "train-000000.tar").write_bytes(b"")
    (tmp_path / "tok").mkdir(exist_ok=True)
    return _cfg(f"data.train_shards={shards}/train-{{000000..000000}}.tar",
                f"data.tokenizer={tmp_path / 'tok'}", f"checkpoint.dir={tmp_path / 'ck'}",
                f"logging.run_dir={tmp_path / 'run'}", *overrides)


@pytest.mark.parametrize("override, named", [
    ("data.train_shards={tmp}/nope/train-{{0..3}}.tar", "data.train_shards"),
    ("data.train_shards=''", "data.train_shards"),
    ("eval.interval=5", "data.eval_shards"),
    ("data.tokenizer={tmp}/no_tokenizer", "data.tokenizer"),
    ("model.init_from={tmp}/no_ckpt", "model.init_from"),
    ("checkpoint.dir={tmp}/shards/train-000000.tar/ck", "checkpoint.dir"),
    ("logging.run_dir={tmp}/shards/train-000000.tar", "logging.run_dir"),
])
def test_check_paths_names_the_field(tmp_path, override, named):
    from megatron_ease.training.builders import check_paths

    cfg = _paths_cfg(tmp_path, override.format(tmp=tmp_path))
    with pytest.raises((OSError, ValueError), match=named):
        check_paths(cfg)


def test_check_paths_says_to_convert_a_hugging_face_directory_given_as_init_from(tmp_path):
    from megatron_ease.training.builders import check_paths

    hf = tmp_path / "Qwen2.5-VL-7B-Instruct"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model.init_from: .* is a Hugging Face model directory; "
                                         "convert it first .*hf-to-megatron"):
        check_paths(_paths_cfg(tmp_path, f"model.init_from={hf}"))


def test_an_empty_tokenizer_directory_is_named(tmp_path):
    from megatron_ease.training.builders import load_tokenizer

    (tmp_path / "tok").mkdir()
    with pytest.raises(ValueError, match="data.tokenizer: cannot load a tokenizer from the "
                                         "directory .*tok"):
        load_tokenizer(str(tmp_path / "tok"))


def test_check_paths_accepts_what_a_run_may_create_or_not_need(tmp_path):
    from megatron_ease.training.builders import check_paths

    check_paths(_paths_cfg(tmp_path))  # checkpoint and run dirs do not exist yet
    # Synthetic data is written by rank 0 when missing.
    check_paths(_paths_cfg(tmp_path, f"data.train_shards={tmp_path}/syn/train/*.tar",
                           "data.synthetic=true"))
    # A requeued run resumes from its checkpoint even if init_from was purged meanwhile.
    (tmp_path / "ck" / "iter_0000010").mkdir(parents=True)
    (tmp_path / "ck" / "latest").write_text("iter_0000010\n")
    check_paths(_paths_cfg(tmp_path, f"model.init_from={tmp_path}/purged"))
    with pytest.raises(FileNotFoundError, match="model.init_from"):
        check_paths(_paths_cfg(tmp_path, f"model.init_from={tmp_path}/purged",
                               "checkpoint.resume=false"))


def test_training_cli_refuses_a_wrong_path_before_starting_the_process_group(
        tmp_path, monkeypatch, capsys):
    from megatron_ease import distributed, train

    def never(*args, **kwargs):
        raise AssertionError("the process group was started")

    monkeypatch.setattr(distributed, "initialize_distributed", never)
    status = train.main(["--config", "examples/tiny_cpu_ease.yaml", "data.synthetic=false",
                         f"data.train_shards={tmp_path}/missing-{{0..1}}.tar"])
    err = capsys.readouterr().err
    assert status == 2 and "config error: data.train_shards" in err and "missing-" in err


def test_a_path_only_some_ranks_miss_ends_every_rank_with_one_message(tmp_path):
    """A path visible on some nodes only (node-local scratch, a missing mount): the ranks agree
    over the process group and all exit 2 at once, rank 0 naming the rank, host and path; a
    rank that exited on its own left the others waiting for the process group's timeout."""
    import os
    import subprocess
    import sys

    from megatron_ease.distributed import find_free_port

    port = str(find_free_port())
    (tmp_path / "a_file").write_text("not a directory")
    procs = []
    for rank in (0, 1):
        # Rank 1's run_dir lies under a file; rank 0's is fine. Both would train 1 step.
        run_dir = f"{tmp_path}/run" if rank == 0 else f"{tmp_path}/a_file/run"
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatron_ease.train", "--config",
             "examples/tiny_cpu_ease.yaml", f"logging.run_dir={run_dir}",
             f"data.train_shards={tmp_path}/data/train/*.tar",
             f"data.eval_shards={tmp_path}/data/eval/*.tar",
             f"data.tokenizer={tmp_path}/data/tokenizer", "checkpoint.dir=",
             "train.steps=1", "parallel.timeout_minutes=5"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], outputs
    err0, err1 = outputs[0][1], outputs[1][1]
    assert "config error on rank 1 (host " in err0, err0
    assert "logging.run_dir" in err0 and "a_file" in err0 and "is a file" in err0, err0
    assert "config error" not in err1, err1  # one report, from rank 0
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing ran


def test_config_changes_lists_every_changed_leaf():
    from megatron_ease.config import config_changes, config_to_dict

    old = config_to_dict(_cfg())
    new = config_to_dict(_cfg("train.lr=2e-6", "ease.layers=[1]", "model.vision.depth=3"))
    assert config_changes(old, old) == []
    assert config_changes(old, new) == [
        "ease.layers: [] -> [1]", "model.vision.depth: 2 -> 3", "train.lr: 1e-06 -> 2e-06"]
    assert config_changes({"a": {"b": 1}}, {"a": {}}) == ["a.b: 1 -> '<absent>'"]
