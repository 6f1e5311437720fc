"""A tiny Qwen-style tokenizer for offline demos and tests.

Byte-level BPE with Qwen2's pre-tokenisation regex (digits split one by one) trained on a small
corpus, plus Qwen's chat/vision special tokens, saved as a ``PreTrainedTokenizerFast``
directory that ``AutoTokenizer.from_pretrained`` loads without network access.

Only the byte symbols seen in the corpus enter the vocabulary, so 256 ids suffice: BPE tokens
take ids [0, 248) and the special tokens follow in a fixed order (``<|im_end|>`` = 248,
``<|vision_start|>`` = 249, ``<|vision_end|>`` = 250, ``<|image_pad|>`` = 251, ...), the ids the
tiny model configs use. Text with characters outside the corpus loses them; this tokenizer is
for the synthetic data, not for real text.
"""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megatron_ease.data.prompt import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    VISION_END,
    VISION_START,
)

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2/2.5/3-VL).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VIDEO_PAD = "<|video_pad|>"
# Appended after the BPE vocabulary in this order; im_end first because it is the EOS.
SPECIAL_TOKENS = (IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, END_OF_TEXT, IM_START)


def build_tiny_qwen_tokenizer(corpus: Iterable[str], out_dir: str, bpe_vocab_size: int = 248) -> PreTrainedTokenizerFast:
    """Train on ``corpus`` and save to ``out_dir``; returns the loaded tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, show_progress=False)
    tokenizer.train_from_iterator(list(corpus), trainer)
    if tokenizer.get_vocab_size() != bpe_vocab_size:
        raise ValueError(
            f"corpus too small: BPE reached {tokenizer.get_vocab_size()} tokens, wanted {bpe_vocab_size}; "
            "pass a larger corpus or a smaller bpe_vocab_size"
        )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, END_OF_TEXT)],
        model_max_length=32768,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
