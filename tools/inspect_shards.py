#!/usr/bin/env python
"""Read evidence shards through the training reader and report what it would skip.

    python tools/inspect_shards.py 'shards/train-*.tar' [--strict] [--overlays DIR N]

Every sample goes through the same code as training (index, decode, validate, smart-resize,
prompt, tokenise, evidence target). stdout: counts per skip reason, then as the last line
``valid=<n> skipped=<m>``; each skipped sample is logged with shard and key on stderr.
Exit status 0, or 1 under --strict when anything was skipped.

The tokenizer is --tokenizer, else a ``tokenizer/`` directory beside the shards (the synthetic
dataset's layout), else the built-in tiny Qwen-style tokenizer (enough to check placeholders
and prompt structure; pass the real one to check --max-prompt-tokens).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections import Counter
from typing import Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import numpy as np  # noqa: E402

from megatron_ease.data.image import ImageProcessingConfig, to_rgb  # noqa: E402
from megatron_ease.data.processing import ProcessedSample, SampleProcessor  # noqa: E402
from megatron_ease.data.prompt import PromptConfig  # noqa: E402
from megatron_ease.data.reader import EvidenceShardDataset, build_shard_index, expand_shards  # noqa: E402
from megatron_ease.ease.targets import _mask_weights  # noqa: E402

logger = logging.getLogger("inspect_shards")


def find_tokenizer(shards: list[str]) -> Optional[str]:
    directory = os.path.dirname(os.path.abspath(shards[0]))
    for _ in range(3):
        candidate = os.path.join(directory, "tokenizer")
        if os.path.isfile(os.path.join(candidate, "tokenizer.json")):
            return candidate
        directory = os.path.dirname(directory)
    return None


def load_tokenizer(path: Optional[str], shards: list[str]):
    from transformers import AutoTokenizer

    path = path or find_tokenizer(shards)
    if path is not None:
        return AutoTokenizer.from_pretrained(path)
    from megatron_ease.data.synthetic import SyntheticConfig, synthetic_corpus
    from megatron_ease.data.tokenizer import build_tiny_qwen_tokenizer

    logger.info("no tokenizer given or found beside the shards: using the built-in tiny Qwen-style tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        return build_tiny_qwen_tokenizer(synthetic_corpus(SyntheticConfig()), tmp)


def write_overlay(sample: ProcessedSample, cell: int, path: str) -> None:
    """Original image(s), evidence boxes, and the target heat map over the token grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    source = sample.source
    n = len(source.images)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 5.6), squeeze=False)
    offset = 0
    for i, (ax, image) in enumerate(zip(axes[0], source.images)):
        width, height = image.size
        r_width, r_height = sample.resized_sizes[i]
        h, w = r_height // cell, r_width // cell
        ax.imshow(to_rgb(image), extent=(0, width, height, 0))
        if sample.evidence_target is not None:
            heat = sample.evidence_target[offset : offset + h * w].view(h, w).numpy()
            ax.imshow(heat, extent=(0, width, height, 0), cmap="inferno", alpha=0.5, interpolation="nearest", vmin=0)
        if source.masks[i] is not None:
            # On weights, so 8-bit, 16-bit and float masks all get their contour at weight 0.5.
            mask = np.asarray(source.masks[i])
            weights = _mask_weights(mask, mask.shape[1], mask.shape[0])  # the targets' own rule
            ax.contour(weights, levels=[0.5], colors="cyan", linewidths=1)
        for x0, y0, x1, y1 in source.boxes[i]:
            ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=2))
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(f"image {i}: {width}x{height} -> {h}x{w} tokens", fontsize=8)
        offset += h * w
    fig.suptitle(f"{sample.key}: {source.question[:120]}\nanswer: {sample.answer} ({sample.answer_type})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="glob or brace pattern, e.g. 'dir/shard-{000000..000009}.tar'")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any sample was skipped")
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"])
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer directory")
    parser.add_argument("--min-pixels", type=int, default=None)
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument("--max-prompt-tokens", type=int, default=None)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--overlays", nargs=2, metavar=("DIR", "N"), default=None, help="PNG overlays of the first N samples with evidence")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    shards = expand_shards(args.shards)
    image_config = ImageProcessingConfig.for_family(args.family, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    overlay_dir, overlay_count = (args.overlays[0], int(args.overlays[1])) if args.overlays else (None, 0)
    processor = SampleProcessor(
        load_tokenizer(args.tokenizer, shards),
        image_config,
        prompt_config=PromptConfig.for_family(args.family),  # the prompt training builds (builders.build_reader)
        sigma=args.sigma,
        alpha=args.alpha,
        max_prompt_tokens=args.max_prompt_tokens,
        keep_source=overlay_count > 0,
    )
    try:
        dataset = EvidenceShardDataset(shards, processor, batch_size=1, shuffle=False, num_epochs=1, even_ranks=False)
        index = dataset.index
    except ValueError:
        # The reader refuses shards without a sample (every one damaged, compressed or empty);
        # that is a finding to report here, not a traceback.
        index = build_shard_index(shards)
        if index.entries:
            raise
        dataset = None
    if overlay_dir:
        os.makedirs(overlay_dir, exist_ok=True)

    skipped = Counter({"unreadable_shard": len(index.errors)}) if index.errors else Counter()
    valid = with_target = overlays = 0
    for _, sample, error in dataset.iter_samples() if dataset is not None else ():
        if error is not None:
            skipped[error.reason] += 1
            continue
        valid += 1
        with_target += sample.evidence_target is not None
        if overlays < overlay_count and sample.source.has_evidence:
            write_overlay(sample, image_config.cell, os.path.join(overlay_dir, f"{overlays:04d}_{sample.key.replace('/', '_')}.png"))
            overlays += 1

    print(f"shards={len(shards)} samples_indexed={len(index.entries)}")
    for error in index.errors:
        print(f"unreadable: {error}")
    for reason, n in sorted(skipped.items()):
        print(f"skipped[{reason}]={n}")
    print(f"with_target={with_target} without_target={valid - with_target}")
    if overlay_dir:
        print(f"overlays={overlays} dir={overlay_dir}")
    total_skipped = sum(skipped.values())
    print(f"valid={valid} skipped={total_skipped}")
    return 1 if args.strict and total_skipped else 0


if __name__ == "__main__":
    sys.exit(main())
