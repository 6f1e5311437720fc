"""Synthetic evidence dataset: drawn shapes, questions that need one look, exact boxes.

Every question is answerable only by looking at specific objects (their colour, their count,
whether a colour-shape pair exists), and the evidence boxes are those objects. A configurable
language prior makes the data answerable above chance *without* looking:

- colour: each shape has a prior colour (triangle→red, circle→blue, square→green) that it
  takes with probability ``prior_bias``;
- count: the answer is 1 with probability ``prior_bias``;
- exists ("Is there a red triangle?"): the answer is "yes" for the shape's prior colour and
  "no" otherwise, with probability ``prior_bias``;
- object colour ("What color is the object?", one object in the image; off by default): red with
  probability ``prior_bias``, else one of the other colours. The choices are always the five
  colours in one order, so the answer letter names the colour; ``prior_bias = 0.2`` makes the
  colours uniform (a blind policy is right 1 time in 5). The demo's task (README, with
  ``min_object_size`` = the slot, so the object fills one visual token): the tiny model has to
  find and read that token, which it does sooner and more fully with EASE than without.

Each record stores ``prior_answer`` (what a blind model exploiting the prior says) and
``answer_is_prior``, so evaluation can report accuracy on the anti-prior subset, where only a
model that looks at the evidence succeeds. ``write_synthetic_dataset`` writes train and
held-out shards in the real format plus a tiny tokenizer, all offline.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from megatron_ease.data.prompt import (
    DEFAULT_INSTRUCTIONS,
    DEFAULT_SYSTEM_PROMPT,
    PromptConfig,
    chat_prompt,
    user_text,
)
from megatron_ease.data.schema import choice_letter
from megatron_ease.data.tokenizer import build_tiny_qwen_tokenizer
from megatron_ease.data.writer import EvidenceShardWriter, sample_members

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
}
PRIOR_COLOUR = {"circle": "blue", "square": "green", "triangle": "red"}
PRIOR_COUNT = 1
PRIOR_OBJECT_COLOUR = "red"
TASKS = ("colour", "count", "exists", "object_colour")
_MANIFEST = "manifest.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SyntheticConfig:
    """image_size: square side in pixels; 112 gives 4×4 visual tokens at f = 28 (and 32).

    The image is cut into a grid × grid of slots, one object per slot at most, so objects never
    overlap and each lies inside one slot (one visual token when slot = cell).
    """

    image_size: int = 112
    grid: int = 4
    min_objects: int = 2
    max_objects: int = 4
    min_object_size: int = 14
    prior_bias: float = 0.6
    task_weights: tuple[float, ...] = (0.4, 0.3, 0.3, 0.0)  # colour, count, exists, object_colour
    num_choices: int = 4
    max_count: int = 3

    def __post_init__(self):
        slot = self.image_size // self.grid
        if not self.min_object_size <= slot:
            raise ValueError(f"image_size/grid = {slot} px slots cannot hold objects of {self.min_object_size} px")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= grid² ({self.grid * self.grid})")
        if self.max_count > self.max_objects:
            raise ValueError("max_count must not exceed max_objects")
        if not 0.0 <= self.prior_bias <= 1.0:
            raise ValueError(f"prior_bias must be in [0, 1], got {self.prior_bias}")
        if len(self.task_weights) != len(TASKS) or min(self.task_weights) < 0 or sum(self.task_weights) <= 0:
            raise ValueError(f"task_weights must be {len(TASKS)} non-negative weights for {TASKS}, not all 0; got {self.task_weights}")
        if not 2 <= self.num_choices <= len(COLOURS):
            raise ValueError(f"num_choices must be in [2, {len(COLOURS)}]")


def _other(rng: np.random.Generator, options, exclude) -> str:
    pool = [o for o in options if o not in exclude]
    return pool[rng.integers(len(pool))]


def _scene(rng: np.random.Generator, cfg: SyntheticConfig, required: list[tuple[str, str]], forbid) -> list[dict]:
    """Objects: the required (shape, colour) pairs plus random fillers for which forbid() is False."""
    count = max(len(required), int(rng.integers(cfg.min_objects, cfg.max_objects + 1)))
    objects = list(required)
    while len(objects) < count:
        candidate = (SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))])
        if not forbid(*candidate):
            objects.append(candidate)
    order = rng.permutation(len(objects))
    slots = rng.choice(cfg.grid * cfg.grid, size=len(objects), replace=False)
    slot = cfg.image_size // cfg.grid
    scene = []
    for index, slot_index in zip(order, slots):
        shape, colour = objects[index]
        size = int(rng.integers(cfg.min_object_size, slot + 1))
        row, col = divmod(int(slot_index), cfg.grid)
        x0 = col * slot + int(rng.integers(0, slot - size + 1))
        y0 = row * slot + int(rng.integers(0, slot - size + 1))
        scene.append({"shape": shape, "colour": colour, "box": [x0, y0, x0 + size, y0 + size]})
    return scene


def _draw(scene: list[dict], cfg: SyntheticConfig, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (cfg.image_size, cfg.image_size), background)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        x0, y0, x1, y1 = obj["box"]
        fill = COLOURS[obj["colour"]]
        # PIL's shape coordinates are inclusive; x1 - 1 keeps the drawing inside the box.
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return image


def make_synthetic_sample(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[Image.Image, dict[str, Any]]:
    """One image and its JSON record (DESIGN §6 fields plus task/prior/object metadata)."""
    task = TASKS[rng.choice(len(TASKS), p=np.asarray(cfg.task_weights) / sum(cfg.task_weights))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    follows_prior = bool(rng.random() < cfg.prior_bias)
    record: dict[str, Any] = {"source": "synthetic", "task": task, "shape": shape}

    if task == "colour":
        prior = PRIOR_COLOUR[shape]
        colour = prior if follows_prior else _other(rng, COLOURS, {prior})
        scene = _scene(rng, cfg, [(shape, colour)], forbid=lambda s, c: s == shape)
        distractors = [c for c in COLOURS if c not in (colour, prior)]
        picked = rng.choice(len(distractors), size=cfg.num_choices - len({colour, prior}), replace=False)
        options = sorted({colour, prior}) + [distractors[i] for i in picked]
        choices = [options[i] for i in rng.permutation(len(options))]
        record.update(
            question=f"What color is the {shape}?",
            answer_type="choice",
            choices=choices,
            answer=choice_letter(choices.index(colour)),
            prior_answer=choice_letter(choices.index(prior)),
        )
        targets = [o for o in scene if o["shape"] == shape]
    elif task == "count":
        others = [n for n in range(cfg.max_count + 1) if n != PRIOR_COUNT]
        count = PRIOR_COUNT if follows_prior else others[rng.integers(len(others))]
        colours = list(COLOURS)
        required = [(shape, colours[rng.integers(len(colours))]) for _ in range(count)]
        scene = _scene(rng, cfg, required, forbid=lambda s, c: s == shape)
        record.update(
            question=f"How many {shape}s are there?", answer_type="number", answer=str(count), prior_answer=str(PRIOR_COUNT)
        )
        targets = [o for o in scene if o["shape"] == shape]
    elif task == "object_colour":
        colour = PRIOR_OBJECT_COLOUR if follows_prior else _other(rng, COLOURS, {PRIOR_OBJECT_COLOUR})
        one = dataclasses.replace(cfg, min_objects=1, max_objects=1, max_count=1)
        scene = _scene(rng, one, [(shape, colour)], forbid=lambda s, c: True)
        choices = list(COLOURS)
        record.update(
            question="What color is the object?",
            answer_type="choice",
            choices=choices,
            answer=choice_letter(choices.index(colour)),
            prior_answer=choice_letter(choices.index(PRIOR_OBJECT_COLOUR)),
        )
        targets = scene
    else:
        asks_prior_pair = bool(rng.random() < 0.5)
        colour = PRIOR_COLOUR[shape] if asks_prior_pair else _other(rng, COLOURS, {PRIOR_COLOUR[shape]})
        prior_answer = "yes" if asks_prior_pair else "no"
        answer = prior_answer if follows_prior else ("no" if prior_answer == "yes" else "yes")
        if answer == "yes":
            required = [(shape, colour)]
        else:
            # A same-shape distractor in another colour half of the time: the hallucination case.
            required = [(shape, _other(rng, COLOURS, {colour}))] if rng.random() < 0.5 else []
        scene = _scene(rng, cfg, required, forbid=lambda s, c: (s, c) == (shape, colour) or (s == shape and required))
        record.update(
            question=f"Is there a {colour} {shape}?", colour=colour, answer_type="yesno", answer=answer, prior_answer=prior_answer
        )
        targets = [o for o in scene if o["shape"] == shape]

    record["answer_is_prior"] = record["answer"] == record["prior_answer"]
    record["evidence"] = [{"image": 0, "box": o["box"]} for o in targets]
    record["objects"] = scene
    return _draw(scene, cfg, rng), record


def synthetic_corpus(cfg: SyntheticConfig, prompt_config: PromptConfig = PromptConfig()) -> list[str]:
    """Every string the synthetic prompts and answers can contain, for training the tokenizer."""
    questions = [f"What color is the {s}?" for s in SHAPES] + [f"How many {s}s are there?" for s in SHAPES]
    questions += [f"Is there a {c} {s}?" for c in COLOURS for s in SHAPES]
    colour_names = list(COLOURS)
    texts = []
    for q in questions:
        for answer_type in DEFAULT_INSTRUCTIONS:
            choices = colour_names[: cfg.num_choices] if answer_type == "choice" else None
            texts.append(chat_prompt(user_text(q, answer_type, choices, prompt_config), 1, prompt_config))
    answers = [choice_letter(i) for i in range(26)] + [str(i) for i in range(10)] + ["yes", "no", "Yes", "No"]
    # Answers weigh most, so that every synthetic answer becomes a single token.
    texts += [f"{a}<|im_end|>" for a in answers] * 25 + [DEFAULT_SYSTEM_PROMPT, " ".join(colour_names), " ".join(SHAPES)]
    texts += [f"{i}. {c}" for i in "ABCDE" for c in colour_names]
    # Digits, letters and punctuation in isolation keep every byte of real answers encodable.
    texts += [" ".join("0123456789"), " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"), ".,:;!?()[]{}+-*/=<>'\"_\\%$#@&|^~"]
    return texts * 4  # repetition weights real prompt text over the isolated-character lines


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _write_split(out_dir: str, split: str, num_samples: int, seed: int, cfg: SyntheticConfig, samples_per_shard: int) -> dict:
    rng = np.random.default_rng([seed, {"train": 0, "eval": 1}[split]])
    with EvidenceShardWriter(os.path.join(out_dir, split), prefix=split, samples_per_shard=samples_per_shard, strict=True) as writer:
        for i in range(num_samples):
            image, record = make_synthetic_sample(rng, cfg)
            writer.write(f"{split}-{i:07d}", sample_members(record, [("png", _encode_png(image))]))
    return {"samples": num_samples, "shards": [os.path.basename(s) for s in writer.shards]}


def write_synthetic_dataset(
    out_dir: str,
    num_train: int,
    num_eval: int,
    seed: int = 0,
    config: SyntheticConfig = SyntheticConfig(),
    samples_per_shard: int = 500,
) -> dict[str, Any]:
    """Write ``out_dir/{train,eval}/*.tar`` and ``out_dir/tokenizer``; idempotent.

    ``out_dir/manifest.json`` is written last and marks a complete dataset: when it exists
    with the same parameters nothing is done; a partial directory (no manifest) is rebuilt; a
    complete one with other parameters is an error rather than silently replaced. Not safe to
    call from several processes at once: call it on one rank and barrier.
    Returns the manifest: {"train": {"samples", "shards"}, "eval": ..., "tokenizer": dir, ...}.
    """
    params = {"version": _FORMAT_VERSION, "num_train": num_train, "num_eval": num_eval, "seed": seed,
              "samples_per_shard": samples_per_shard, "config": asdict(config)}
    params = json.loads(json.dumps(params))  # tuples -> lists, so it compares equal to the file
    manifest_path = os.path.join(out_dir, _MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        stored = manifest.get("params") or {}
        weights = stored.get("config", {}).get("task_weights")
        if weights is not None and len(weights) == len(TASKS) - 1:
            # Written before the object_colour task existed: the same data as its weight 0.
            stored["config"]["task_weights"] = [*weights, 0.0]
        if stored != params:
            raise ValueError(
                f"{out_dir} holds a synthetic dataset with other parameters ({manifest.get('params')}); "
                f"remove it or choose another directory for {params}"
            )
        return manifest
    for sub in ("train", "eval", "tokenizer"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    build_tiny_qwen_tokenizer(synthetic_corpus(config), os.path.join(out_dir, "tokenizer"))
    manifest = {
        "params": params,
        "train": _write_split(out_dir, "train", num_train, seed, config, samples_per_shard),
        "eval": _write_split(out_dir, "eval", num_eval, seed, config, samples_per_shard),
        "tokenizer": "tokenizer",
    }
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, manifest_path)
    logger.info("wrote synthetic dataset to %s: %d train, %d eval samples", out_dir, num_train, num_eval)
    return manifest
