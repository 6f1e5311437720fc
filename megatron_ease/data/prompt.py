"""Qwen chat prompt for an evidence sample, and its token ids.

    <|im_start|>system\\nSYSTEM<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|>×n₀<|vision_end|> ... QUESTION\\nA. ...\\nINSTRUCTION<|im_end|>\\n
    <|im_start|>assistant\\n[ANSWER<|im_end|>]

The text is tokenised with one ``<|image_pad|>`` per image and each is then expanded to the
image's token count, as HF's Qwen2-VL processor does; the result is the same as tokenising the
expanded text because special tokens are never merged with their neighbours, and it avoids
running the tokenizer over thousands of placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from megatron_ease.data.schema import choice_letter

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_INSTRUCTIONS = {
    "choice": "Answer with the option's letter from the given choices directly.",
    "yesno": "Answer with yes or no.",
    "number": "Answer with a single number.",
    "text": "Answer the question using a single word or phrase.",
    "math": "Put the final answer within \\boxed{}.",
}

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class PromptConfig:
    """Prompt wording. ``system_prompt=None`` leaves out the system turn (Qwen3-VL style)."""

    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT
    instructions: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_INSTRUCTIONS))

    @classmethod
    def for_family(cls, family: str) -> "PromptConfig":
        """As each model's own chat template renders a user turn without a system message:
        Qwen2.5-VL's adds "You are a helpful assistant.", Qwen3-VL's adds no system turn."""
        return cls(system_prompt=None) if family == "qwen3_vl" else cls()


@dataclass(frozen=True)
class QwenSpecialTokens:
    """Ids of the chat/vision special tokens, looked up in the tokenizer (never hard-coded)."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    pad: int  # the tokenizer's pad token, else <|endoftext|>

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "QwenSpecialTokens":
        names = dict(im_start=IM_START, im_end=IM_END, vision_start=VISION_START, vision_end=VISION_END, image_pad=IMAGE_PAD)
        ids = {}
        for field_name, token in names.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
                raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no token {token}; a Qwen-VL tokenizer is required")
            ids[field_name] = token_id
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
            if pad is None or pad == tokenizer.unk_token_id:
                raise ValueError("tokenizer has neither a pad token nor <|endoftext|>")
        return cls(pad=pad, **ids)


def user_text(question: str, answer_type: str, choices: Optional[Sequence[str]], cfg: PromptConfig) -> str:
    """Question, lettered choices and the answer-format instruction."""
    lines = [question.strip()]
    if choices:
        lines += [f"{choice_letter(i)}. {c.strip()}" for i, c in enumerate(choices)]
    instruction = cfg.instructions.get(answer_type)
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def chat_prompt(text: str, num_images: int, cfg: PromptConfig) -> str:
    """Chat-formatted prompt with one <|image_pad|> per image, ending with the assistant header."""
    system = f"{IM_START}system\n{cfg.system_prompt}{IM_END}\n" if cfg.system_prompt is not None else ""
    images = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * num_images
    return f"{system}{IM_START}user\n{images}{text}{IM_END}\n{IM_START}assistant\n"


def tokenize_with_images(tokenizer, text: str, image_token_counts: Sequence[int], special: QwenSpecialTokens) -> np.ndarray:
    """Token ids of ``text`` with its i-th <|image_pad|> repeated image_token_counts[i] times.

    Returns int64 [S]. Raises ValueError when the text holds a different number of placeholders
    than there are images (e.g. a question that itself contains ``<|image_pad|>``).
    """
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)  # [S0]
    placeholders = np.flatnonzero(ids == special.image_pad)
    if len(placeholders) != len(image_token_counts):
        raise ValueError(f"prompt has {len(placeholders)} {IMAGE_PAD} tokens for {len(image_token_counts)} images")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[placeholders] = image_token_counts
    return np.repeat(ids, repeats)
