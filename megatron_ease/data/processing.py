"""Decoded sample -> model inputs: pixels, token ids, evidence target (one sample, CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_ease.data.image import ImageProcessingConfig, patchify_image, preprocess_image
from megatron_ease.data.prompt import (
    IMAGE_PAD,
    PromptConfig,
    QwenSpecialTokens,
    chat_prompt,
    tokenize_with_images,
    user_text,
)
from megatron_ease.data.schema import EvidenceSample, SampleError
from megatron_ease.ease.targets import evidence_token_targets


@dataclass
class ProcessedSample:
    key: str
    shard: str
    input_ids: torch.Tensor  # [S] int64: prompt, then the answer when the processor appends it
    prompt_length: int  # tokens before the appended answer (= S without one)
    # [Σ t·h·w, C·tp·p·p] float32; with ``raw_pixels`` the uint8 [Σ t·h·w, C·p·p] patches
    # before rescale + normalise (``image.normalise_patches`` turns them into the former).
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # [n_img, 3] int64, patch units
    image_token_counts: list[int]  # per image: t·h·w / merge²
    image_sizes: list[tuple[int, int]]  # (W, H) original
    resized_sizes: list[tuple[int, int]]  # (W', H')
    evidence_target: Optional[torch.Tensor]  # [Σ image tokens] float32 summing to 1, or None
    # [Σ image tokens] bool, raw coverage E > 0 (before smoothing and mixing), or None: the
    # "attention inside evidence" metric counts these tokens.
    evidence_mask: Optional[torch.Tensor]
    answer: str
    answer_type: str
    choices: Optional[list[str]]
    record: dict[str, Any]
    source: Optional[EvidenceSample] = None  # kept only when asked (overlays); never collated


class SampleProcessor:
    """Everything the reader does to a validated sample, configured once per run.

    append_answer: also tokenise ``answer<|im_end|>`` after the prompt (SFT warm start); the
    collated batch then carries a response mask over those tokens.
    max_prompt_tokens: prompts longer than this are skipped (reason ``prompt_too_long``).
    """

    def __init__(
        self,
        tokenizer,
        image_config: ImageProcessingConfig,
        prompt_config: PromptConfig = PromptConfig(),
        sigma: float = 1.0,
        alpha: float = 0.05,
        append_answer: bool = False,
        max_prompt_tokens: Optional[int] = None,
        keep_source: bool = False,
    ):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.prompt_config = prompt_config
        self.sigma, self.alpha = sigma, alpha
        self.append_answer = append_answer
        self.max_prompt_tokens = max_prompt_tokens
        self.keep_source = keep_source
        self.special = QwenSpecialTokens.from_tokenizer(tokenizer)

    def __call__(self, sample: EvidenceSample, raw_pixels: bool = False) -> ProcessedSample:
        """``raw_pixels``: ``pixel_values`` as uint8 patches (an eighth of the bytes to move
        between processes; ``EvidenceDataLoader`` normalises them when they arrive)."""
        cfg = self.image_config
        pixel_values, grids, sizes, resized = [], [], [], []
        for image in sample.images:
            patches, grid = (patchify_image if raw_pixels else preprocess_image)(image, cfg)
            pixel_values.append(patches)
            grids.append(grid)
            sizes.append(image.size)
            resized.append((grid[2] * cfg.patch_size, grid[1] * cfg.patch_size))
        counts = [t * h * w // cfg.merge_size**2 for t, h, w in grids]

        text = chat_prompt(user_text(sample.question, sample.answer_type, sample.choices, self.prompt_config), len(sample.images), self.prompt_config)
        try:
            prompt_ids = tokenize_with_images(self.tokenizer, text, counts, self.special)
        except ValueError as e:
            raise SampleError("special_token_in_text", str(e), sample.shard, sample.key) from None
        if self.max_prompt_tokens is not None and len(prompt_ids) > self.max_prompt_tokens:
            raise SampleError("prompt_too_long", f"{len(prompt_ids)} tokens > max_prompt_tokens={self.max_prompt_tokens}", sample.shard, sample.key)
        input_ids = torch.from_numpy(prompt_ids)
        if self.append_answer:
            answer_ids = self.tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
            # Special tokens are live here as in the prompt: an <|image_pad|> in the answer would
            # be one more image position than the sample has image tokens (collate and the
            # model's image scatter both depend on the count), so it gets the question's rule.
            placeholders = answer_ids.count(self.special.image_pad)
            if placeholders:
                raise SampleError("special_token_in_text",
                                  f"answer has {placeholders} {IMAGE_PAD} token(s); an appended "
                                  "answer must hold no image placeholder", sample.shard, sample.key)
            answer_ids = answer_ids + [self.special.im_end]
            input_ids = torch.cat([input_ids, torch.tensor(answer_ids, dtype=torch.int64)])

        images = [(size, rsize, cfg.cell, boxes, mask)
                  for size, rsize, boxes, mask in zip(sizes, resized, sample.boxes, sample.masks)]
        target = evidence_token_targets(images, sigma=self.sigma, alpha=self.alpha)
        raw = evidence_token_targets(images, sigma=0.0, alpha=0.0) if target is not None else None
        return ProcessedSample(
            key=sample.key,
            shard=sample.shard,
            input_ids=input_ids,
            prompt_length=len(prompt_ids),
            pixel_values=torch.cat(pixel_values),
            image_grid_thw=torch.tensor(grids, dtype=torch.int64),
            image_token_counts=counts,
            image_sizes=sizes,
            resized_sizes=resized,
            evidence_target=target,
            evidence_mask=raw > 0 if raw is not None else None,
            answer=sample.answer,
            answer_type=sample.answer_type,
            choices=sample.choices,
            record=sample.record,
            source=sample if self.keep_source else None,
        )
