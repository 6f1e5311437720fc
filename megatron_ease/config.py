"""Run configuration: one dataclass per concern, YAML files, dotted CLI overrides, validation.

    cfg = load_config("examples/tiny_cpu_ease.yaml", ["parallel.tensor_model_parallel_size=2"])
    validate_config(cfg, world_size=2)

Everything is validated before any process group starts; errors are one line naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: PyYAML keeps the last
    silently, so a second ``train:`` section would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": later keys override
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it below
                break
            if first is not None:
                raise ConfigError(f"duplicate key {key!r} (lines {first} and {line}): the later "
                                  f"one would silently replace the earlier; merge them")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text):
    """YAML as ``yaml.safe_load`` reads it, but a duplicate key is a ``ConfigError``."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


@dataclass
class VisionConfig:
    """Vision tower sizes (HF ``vision_config`` names)."""

    depth: int = 2
    hidden_size: int = 32
    intermediate_size: int = 64
    num_heads: int = 2
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 64
    hidden_act: str = "silu"
    rope_theta: float = 10_000.0  # base of the tower's 2D rotary embedding
    # Qwen2.5-VL: windowed attention except at these blocks.
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=list)
    # Qwen3-VL: learned position embeddings and DeepStack feature taps.
    num_position_embeddings: int = 0
    deepstack_visual_indexes: list[int] = field(default_factory=list)


@dataclass
class ModelConfig:
    """Language-model sizes (HF ``text_config`` names) plus the vision tower and token ids."""

    family: str = "qwen2_5_vl"  # qwen2_5_vl | qwen3_vl
    hf_config: Optional[str] = None  # a dir/config.json; when set, its sizes replace the ones below
    init_from: Optional[str] = None  # a converted (or trained) megatron checkpoint to start from
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: Optional[int] = None  # head_dim; None = hidden_size / num_attention_heads
    vocab_size: int = 256
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])
    mrope_interleaved: bool = False
    rms_norm_eps: float = 1e-6
    add_qkv_bias: bool = True
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    image_token_id: int = 251
    video_token_id: int = 252
    vision_start_token_id: int = 249
    vision_end_token_id: int = 250
    eos_token_id: int = 248
    # More ids that end a rollout (HF generation_config's other eos ids: Qwen-VL Instruct also
    # stops at <|endoftext|>, 151643, which is its pad token too).
    stop_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    vision: VisionConfig = field(default_factory=VisionConfig)
    freeze_vision: bool = False
    # Full activation recomputation of the language-model layers and the vision tower's blocks.
    recompute_layers: bool = False
    bf16: bool = False


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    # Language-model layers on the first pipeline stage (it also holds the vision tower);
    # None = an even split.
    first_pipeline_stage_layers: Optional[int] = None
    # The vision tower is replicated over TP: each TP rank encodes a share of the batch's images
    # (balanced by patches) and the features are all-gathered, instead of every rank encoding
    # every image. Same features and (after finalize_model_grads) the same gradients.
    split_images_over_tp: bool = True
    use_distributed_optimizer: bool = False
    backend: Optional[str] = None  # None = nccl when CUDA is available, else gloo
    timeout_minutes: float = 10.0


@dataclass
class EaseConfig:
    enabled: bool = True
    layers: list[int] = field(default_factory=list)  # 0-based language-model layer indices
    loss_coeff: float = 0.1
    sigma: float = 1.0
    alpha: float = 0.05
    divergence: str = "kl"  # kl | ce | reverse_kl | mass
    # Also feed EASE the correct rollouts of groups filtered out as all-correct (at most as many
    # groups as the step trains on: train.prompts_per_step).
    use_filtered_correct: bool = False
    chunk_size: Optional[int] = None
    # image_attention_mass's implementation: torch (chunked PyTorch), triton (fused kernels;
    # verified in Triton's CPU interpreter, not yet run compiled on a GPU) or auto (triton on
    # CUDA when installed).
    slice_impl: str = "torch"


@dataclass
class DapoConfig:
    group_size: int = 8
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float = 10.0
    max_response_length: int = 64
    overlong_buffer_length: int = 16  # soft overlong punishment ramp (DESIGN §5); 0 = off
    overlong_penalty_factor: float = 1.0
    max_gen_batches: int = 4  # dynamic-sampling chunks before giving up; 0 = no limit
    # Rollouts (prompts x group_size) a rank decodes together; the KV cache holds this many rows
    # of (longest prompt + max_response_length) per layer. 0 = a whole chunk at once.
    max_rollouts_per_batch: int = 0
    # Under pipeline parallelism, decode a batch as one prompt group per stage with the stages
    # busy at once (a wavefront); false: every step through the stages one after the other.
    # Same rollouts either way (benchmarks/rollout_pipeline.py).
    pipelined_rollouts: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    format_reward: float = 0.0


@dataclass
class DataConfig:
    train_shards: str = ""
    eval_shards: str = ""
    tokenizer: str = ""
    # Image resize budget; None = the model family's processor default (HF's: Qwen2.5-VL
    # 3136 .. 12845056, Qwen3-VL 65536 .. 16777216 pixels).
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    num_workers: int = 0
    # Batches each loader worker keeps ready (torch's DataLoader prefetch_factor); None = its
    # default, 2. Every rank holds num_workers × this many batches (their pixels as uint8).
    prefetch_factor: Optional[int] = None
    # Samples whose prompt (text + image tokens) is longer are skipped and counted
    # (``prompt_too_long``), in training and validation; None = no limit. The rollout KV cache
    # and the training activations scale with the longest prompt of a batch.
    max_prompt_tokens: Optional[int] = None
    shuffle_seed: int = 1234
    strict: bool = False
    synthetic: bool = False  # write the synthetic evidence dataset when the shards are missing
    synthetic_train_samples: int = 2000
    synthetic_eval_samples: int = 500


@dataclass
class TrainConfig:
    steps: int = 10
    seed: int = 1234
    prompts_per_step: int = 8  # B: prompt groups per optimizer step (global)
    micro_batch_size: int = 4  # rollouts per micro-batch
    ppo_epochs: int = 1
    ppo_mini_batches: int = 1
    # π_old by a separate forward pass for every mini-batch. Off: the first mini-batch takes its
    # own first forward's log-probs (same weights), saving that pass (all of it when on-policy).
    recompute_old_log_probs: bool = False
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0  # RL steps (the schedule steps once per RL step, as verl)
    lr_decay_style: str = "constant"  # constant | linear | cosine
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    warm_start_steps: int = 0  # supervised steps before RL (the demo's shared warm start)
    warm_start_lr: float = 1e-3


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    interval: int = 0  # 0 = only at the end / on preemption
    keep_last: int = 2
    resume: bool = True


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 1  # console line every N steps (metrics.jsonl/wandb/TensorBoard: every step)
    wandb: bool = True
    wandb_project: str = "megatron_ease"
    wandb_mode: Optional[str] = None  # None = offline unless WANDB_MODE / a key says otherwise
    tensorboard: bool = False
    progress: bool = True  # tqdm bars (stderr, logging rank) for rollouts and validation
    # torch.profiler trace of RL steps [first, last] (1-based, inclusive; [] = off) on these
    # ranks, into <run_dir>/profile (training/profiling.py).
    profile_steps: list[int] = field(default_factory=list)
    profile_ranks: list[int] = field(default_factory=lambda: [0])


@dataclass
class EvalConfig:
    interval: int = 0  # validate every N RL steps and at the last one; 0 = no validation
    # With interval > 0, also validate the starting policy (after the warm start) at step 0, the
    # curve's first point (verl's trainer.val_before_train); once per run, not again on resume.
    before_train: bool = False
    samples: int = 64
    batch_size: int = 16


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ease: EaseConfig = field(default_factory=EaseConfig)
    dapo: DapoConfig = field(default_factory=DapoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(path: str, key: Any, known) -> ConfigError:
    if not isinstance(key, str):  # YAML 1.1 reads on / off / yes / no / 1 as non-strings
        return ConfigError(f"unknown config key '{path}{key}' (YAML read the key as "
                           f"{type(key).__name__} {key!r}; config keys are names: quote it)")
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{path}{key}'{hint}")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert a YAML value to the annotated type, naming the field on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # a section left empty in YAML ("eval:" with its keys commented out)
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{path}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, path + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{path}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{path}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{path}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond float range
                raise ConfigError(f"config field '{path}' is beyond the float range, got "
                                  f"{str(value)[:20]}... ({len(str(value))} digits)") from None
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config field '{path}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config field '{path}' must be a string, got {value!r}")
    return value


def _from_dict(cls, data: dict, path: str = ""):
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types:
            raise _unknown_key(path, key, types)
        kwargs[key] = _coerce(value, types[key], path + key)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    return _from_dict(Config, data or {})


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``section.key: old -> new`` for every leaf that differs between two ``config_to_dict``
    trees (keys present in one only count as changed): what a resumed run changed relative to
    the config its checkpoint was saved with."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML: 2, 1e-6, [1,2], true, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        target, path = cfg, ""
        for key in keys[:-1]:
            types = _field_types(type(target))
            if key not in types or not dataclasses.is_dataclass(types[key]):
                raise _unknown_key(path, key, types)
            target, path = getattr(target, key), path + key + "."
        types = _field_types(type(target))
        leaf = keys[-1]
        if leaf not in types:
            raise _unknown_key(path, leaf, types)
        tp = types[leaf]
        textual = _is_text_field(tp)
        try:
            value = _load_yaml(raw) if raw.strip() else None
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        except yaml.YAMLError as e:
            if not textual:
                raise ConfigError(f"override {item!r}: the value is not valid YAML: "
                                  f"{str(e).splitlines()[0]}") from None
            value = raw.strip()  # "data.train_shards=*.tar": a path, not a YAML alias
        if textual and value is not None and not isinstance(value, str):
            value = raw.strip()  # "logging.run_dir=2025-01-01" is a name, not a date
        if dataclasses.is_dataclass(tp) and value is None:
            raise ConfigError(f"override {item!r}: '{path}{leaf}' is a config section, not a "
                              f"value; set its keys ({path}{leaf}.<key>=...)")
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            # "dapo={group_size: 16}" changes that key: the section's others stay as they are.
            value = _merged(getattr(target, leaf), value, path + leaf + ".")
        setattr(target, leaf, _coerce(value, tp, path + leaf))
    return cfg


def _is_text_field(tp: Any) -> bool:
    """A ``str`` or ``Optional[str]`` field: its override value is the text as given."""
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner == [str]
    return tp is str


def _merged(current, data: dict, path: str):
    """``current`` (a config dataclass) with the keys of ``data`` changed, recursively."""
    types = _field_types(type(current))
    changes = {}
    for key, value in data.items():
        if key not in types:
            raise _unknown_key(path, key, types)
        if dataclasses.is_dataclass(types[key]) and (value is None or isinstance(value, dict)):
            # An empty section ("vision: null", as "vision:" in a YAML file) changes nothing.
            value = _merged(getattr(current, key), value or {}, path + key + ".")
        changes[key] = _coerce(value, types[key], path + key)
    return dataclasses.replace(current, **changes)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config (a missing file is an error naming it), then apply dotted overrides."""
    data = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = _load_yaml(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
            except ConfigError as e:
                raise ConfigError(f"config file {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return resolve_hf_config(apply_overrides(cfg, overrides or []))


def resolve_hf_config(cfg: Config) -> Config:
    """``model.hf_config`` set: its sizes (family, layers, token ids, vision) replace the YAML's
    in ``cfg.model``, so validation, the image processor, stop tokens and the model all see the
    same model. Idempotent. Returns ``cfg``."""
    if cfg.model.hf_config:
        from megatron_ease.models.qwen_vl.hf_config import model_config_from_hf

        try:
            cfg.model = model_config_from_hf(cfg.model.hf_config, base=cfg.model)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.hf_config {cfg.model.hf_config!r}: {e}") from None
    return cfg


def data_parallel_size(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                          * p.context_parallel_size)


def _float_fields(section, prefix: str = ""):
    """``(dotted name, value)`` of every float field of a config tree."""
    types = _field_types(type(section))
    for f in dataclasses.fields(section):
        value, tp = getattr(section, f.name), types[f.name]
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, f"{prefix}{f.name}.")
        elif tp is float or tp == Optional[float]:
            yield f"{prefix}{f.name}", value


def validate_config(cfg: Config, world_size: int = 1) -> None:
    """Fail fast, before any process group starts, with the offending field in the message."""
    m, p, e, d, t = cfg.model, cfg.parallel, cfg.ease, cfg.dapo, cfg.train

    def check(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    # NaN passes every range check below (each comparison is False) and inf some of them.
    for name, value in _float_fields(cfg):
        check(value is None or math.isfinite(value),
              f"{name} must be a finite number, got {value}")

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "context_parallel_size"):
        check(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    # Checked here too (the model refuses it at build time), so a job fails before it starts.
    check(cp == 1, "parallel.context_parallel_size > 1 is not supported yet: the Qwen-VL "
                   "model's mrope positions and image scatter assume the whole sequence on every "
                   "rank, and EASE's softmax row normaliser would have to span CP ranks")
    check(m.family in ("qwen2_5_vl", "qwen3_vl"),
          f"model.family must be qwen2_5_vl or qwen3_vl, got {m.family!r}")
    check(m.num_attention_heads % tp == 0,
          f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
          f"parallel.tensor_model_parallel_size ({tp})")
    check(m.num_attention_heads % m.num_query_groups == 0,
          f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
          f"model.num_query_groups ({m.num_query_groups})")
    check(m.num_query_groups % tp == 0,
          f"model.num_query_groups ({m.num_query_groups}) must be divisible by "
          f"parallel.tensor_model_parallel_size ({tp}): each TP rank needs whole KV heads")
    # megatron-core splits the vocabulary (embedding, output layer) and the FFN over TP ranks
    # and asserts even shares deep in model construction; Qwen's vocabularies (151936, 152064)
    # divide by any TP size up to 128.
    check(m.vocab_size % tp == 0,
          f"model.vocab_size ({m.vocab_size}) must be divisible by "
          f"parallel.tensor_model_parallel_size ({tp}): each TP rank holds an equal vocabulary "
          f"share")
    check(m.ffn_hidden_size % tp == 0,
          f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by "
          f"parallel.tensor_model_parallel_size ({tp})")
    check(m.vision.num_heads >= 1, "model.vision.num_heads must be >= 1")
    v = m.vision
    if m.family == "qwen3_vl":
        # Its tower adds learned position embeddings (a grid of sqrt(n) x sqrt(n)).
        check(v.num_position_embeddings > 0 and math.isqrt(v.num_position_embeddings) ** 2
              == v.num_position_embeddings,
              f"model.vision.num_position_embeddings must be a positive square for "
              f"model.family qwen3_vl, got {v.num_position_embeddings} (a Qwen2.5-VL vision "
              f"config? set model.hf_config to the model's config.json)")
    for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        bad = [i for i in getattr(v, name) if not 0 <= i < v.depth]
        check(not bad, f"model.vision.{name} {bad} out of range: the tower has "
                       f"model.vision.depth {v.depth} blocks")
    if p.first_pipeline_stage_layers is None:
        check(m.num_layers % pp == 0,
              f"model.num_layers ({m.num_layers}) must be divisible by "
              f"parallel.pipeline_model_parallel_size ({pp}); or set "
              f"parallel.first_pipeline_stage_layers")
    else:
        rest = m.num_layers - p.first_pipeline_stage_layers
        check(pp > 1, f"parallel.first_pipeline_stage_layers ({p.first_pipeline_stage_layers}) "
                      f"needs pipeline parallelism: set it to null with "
                      f"parallel.pipeline_model_parallel_size=1")
        # megatron-core puts at least one layer on every stage.
        check(1 <= p.first_pipeline_stage_layers < m.num_layers
              and rest % (pp - 1) == 0,
              f"parallel.first_pipeline_stage_layers ({p.first_pipeline_stage_layers}) must leave "
              f"model.num_layers - it ({rest}) divisible by the other "
              f"{pp - 1} pipeline stages")
    # The trainer builds, updates, generates with and checkpoints one model chunk per stage;
    # megatron-core's interleaved schedule would expect one per virtual stage.
    check(p.virtual_pipeline_model_parallel_size is None,
          "parallel.virtual_pipeline_model_parallel_size (interleaved pipeline) is not supported "
          "by the trainer yet: leave it unset (null)")
    check(world_size % (tp * pp * cp) == 0,
          f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size ({tp})"
          f" x parallel.pipeline_model_parallel_size ({pp}) x parallel.context_parallel_size ({cp})")
    dp = data_parallel_size(cfg, world_size)
    check(d.group_size >= 2, f"dapo.group_size must be >= 2 (group-normalised advantages), "
                             f"got {d.group_size}")
    check(0 <= d.clip_low < 1 and d.clip_high >= 0,
          f"dapo.clip_low must be in [0, 1) and dapo.clip_high >= 0, got {d.clip_low}, {d.clip_high}")
    check(d.clip_c > 1, f"dapo.clip_c must be > 1, got {d.clip_c}")
    check(d.overlong_penalty_factor >= 0,
          f"dapo.overlong_penalty_factor must be >= 0 (0 = no overlong penalty), got "
          f"{d.overlong_penalty_factor}")
    check(0 <= d.overlong_buffer_length < d.max_response_length,
          f"dapo.overlong_buffer_length ({d.overlong_buffer_length}) must be in "
          f"[0, dapo.max_response_length ({d.max_response_length}))")
    check(d.max_gen_batches >= 0, f"dapo.max_gen_batches must be >= 0, got {d.max_gen_batches}")
    check(d.max_rollouts_per_batch == 0 or d.max_rollouts_per_batch >= d.group_size,
          f"dapo.max_rollouts_per_batch ({d.max_rollouts_per_batch}) must be 0 (no bound) or at "
          f"least dapo.group_size ({d.group_size}): a prompt's group decodes together")
    # Greedy rollouts (T = 0) make all G samples of a prompt equal: no group is ever mixed.
    check(d.temperature > 0, f"dapo.temperature must be > 0 (DAPO samples G different "
                             f"rollouts per prompt), got {d.temperature}")
    check(0 < d.top_p <= 1, f"dapo.top_p must be in (0, 1], got {d.top_p}")
    check(t.prompts_per_step % dp == 0,
          f"train.prompts_per_step ({t.prompts_per_step}) must be divisible by the data-parallel "
          f"size ({dp}): a prompt group never straddles ranks")
    rollouts_per_rank = t.prompts_per_step * d.group_size // dp
    check(t.ppo_mini_batches >= 1 and (t.prompts_per_step // dp) % t.ppo_mini_batches == 0,
          f"train.ppo_mini_batches ({t.ppo_mini_batches}) must divide the prompt groups per "
          f"data-parallel rank ({t.prompts_per_step // dp})")
    per_mini = rollouts_per_rank // t.ppo_mini_batches
    check(t.micro_batch_size >= 1 and per_mini % t.micro_batch_size == 0,
          f"global batch: {per_mini} rollouts per mini-batch per data-parallel rank "
          f"(train.prompts_per_step x dapo.group_size / DP / train.ppo_mini_batches) is not "
          f"divisible by train.micro_batch_size ({t.micro_batch_size})")
    check(t.steps >= 0, f"train.steps must be >= 0, got {t.steps}")
    check(t.ppo_epochs >= 1, f"train.ppo_epochs must be >= 1 (0 would never update), got "
                             f"{t.ppo_epochs}")
    check(t.lr >= 0, f"train.lr must be >= 0, got {t.lr}")  # (finite: checked above)
    check(t.lr_warmup_steps >= 0, f"train.lr_warmup_steps must be >= 0, got {t.lr_warmup_steps}")
    check(0 <= t.min_lr <= t.lr, f"train.min_lr must be in [0, train.lr ({t.lr})], got {t.min_lr}")
    check(t.clip_grad >= 0, f"train.clip_grad must be >= 0 (0 = no clipping), got {t.clip_grad}")
    check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        check(0 <= getattr(t, name) < 1, f"train.{name} must be in [0, 1), got {getattr(t, name)}")
    check(t.warm_start_steps >= 0,
          f"train.warm_start_steps must be >= 0 (0 = no warm start), got {t.warm_start_steps}")
    check(t.warm_start_lr >= 0, f"train.warm_start_lr must be >= 0, got {t.warm_start_lr}")
    check(p.timeout_minutes > 0,
          f"parallel.timeout_minutes must be > 0, got {p.timeout_minutes}")
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    check(2 * sum(m.mrope_section) == head_dim,
          f"model.mrope_section {m.mrope_section} must sum to half the head dimension "
          f"({head_dim} = model.kv_channels or hidden_size / num_attention_heads)")
    pixels = cfg.data.min_pixels, cfg.data.max_pixels
    for name, value in zip(("min_pixels", "max_pixels"), pixels):
        check(value is None or value >= 1, f"data.{name} must be >= 1 or null, got {value}")
    check(None in pixels or pixels[0] <= pixels[1],
          f"data.min_pixels ({pixels[0]}) must be <= data.max_pixels ({pixels[1]})")
    check(cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    check(cfg.data.prefetch_factor is None or cfg.data.prefetch_factor >= 1,
          f"data.prefetch_factor must be >= 1 or null, got {cfg.data.prefetch_factor}")
    steps = cfg.logging.profile_steps
    check(not steps or (len(steps) == 2 and 1 <= steps[0] <= steps[1]),
          f"logging.profile_steps must be [] or [first, last] with 1 <= first <= last, got {steps}")
    check(not steps or all(0 <= r < world_size for r in cfg.logging.profile_ranks),
          f"logging.profile_ranks must be ranks in [0, {world_size}), got "
          f"{cfg.logging.profile_ranks}")
    check(cfg.logging.log_interval >= 1,
          f"logging.log_interval must be >= 1, got {cfg.logging.log_interval}")
    check(cfg.data.max_prompt_tokens is None or cfg.data.max_prompt_tokens >= 1,
          f"data.max_prompt_tokens must be >= 1 or null, got {cfg.data.max_prompt_tokens}")
    check(t.lr_decay_style in ("constant", "linear", "cosine"),
          f"train.lr_decay_style must be constant, linear or cosine, got {t.lr_decay_style!r}")
    # The capturing layers exist whenever ease.layers is set (with ease.enabled false too: the
    # DAPO baseline logs its attention in evidence), so their settings are checked then too.
    if e.enabled or e.layers:
        bad = [i for i in e.layers if not 0 <= i < m.num_layers]
        check(not bad, f"ease.layers {bad} out of range: the model has {m.num_layers} layers "
                       f"(0-based indices 0..{m.num_layers - 1})")
        check(len(set(e.layers)) == len(e.layers), f"ease.layers has duplicates: {e.layers}")
        check(e.chunk_size is None or e.chunk_size >= 1,
              f"ease.chunk_size must be >= 1 or null (all response rows at once), got "
              f"{e.chunk_size}")
        check(e.loss_coeff >= 0, f"ease.loss_coeff must be >= 0, got {e.loss_coeff}")
        check(e.sigma >= 0, f"ease.sigma must be >= 0, got {e.sigma}")
        check(0 <= e.alpha <= 1, f"ease.alpha must be in [0, 1], got {e.alpha}")
        check(e.slice_impl in ("torch", "triton", "auto"),
              f"ease.slice_impl must be torch, triton or auto, got {e.slice_impl!r}")
        check(e.divergence in ("kl", "ce", "reverse_kl", "mass"),
              f"ease.divergence must be kl, ce, reverse_kl or mass, got {e.divergence!r}")
    check(cfg.checkpoint.interval >= 0,
          f"checkpoint.interval must be >= 0, got {cfg.checkpoint.interval}")
    check(cfg.checkpoint.keep_last >= 1,
          f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    check(cfg.eval.interval >= 0, f"eval.interval must be >= 0, got {cfg.eval.interval}")
    check(cfg.eval.samples >= dp, f"eval.samples ({cfg.eval.samples}) must be at least the "
                                  f"data-parallel size ({dp}): every rank scores a share")
    check(cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
