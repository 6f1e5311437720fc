#!/usr/bin/env python
"""Evidence data pipeline throughput: samples/s per dataloader worker.

    OMP_NUM_THREADS=1 python benchmarks/data_loader.py [--samples 200] [--sizes 448 1024]

Writes JPEG shards (square, photo-like content, quality 90) at each size into a temporary directory,
then measures, in one process and one thread (= one dataloader worker):

- the full per-sample path: tar read, JPEG decode, validation, smart-resize + normalise +
  patchify, chat prompt + tokenisation, evidence target (``EvidenceShardDataset.iter_samples``);
- its stages alone, and HF's ``Qwen2VLImageProcessorPil`` for comparison;
- EvidenceDataLoader end to end (collate, worker transport) with 1 and 2 workers.

The tokenizer is the tiny synthetic one (no network); a real Qwen tokenizer costs about the
same on prompts this short.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from megatron_ease.data.image import ImageProcessingConfig, preprocess_image  # noqa: E402
from megatron_ease.data.processing import SampleProcessor  # noqa: E402
from megatron_ease.data.reader import EvidenceDataLoader, EvidenceShardDataset  # noqa: E402
from megatron_ease.data.schema import decode_sample  # noqa: E402
from megatron_ease.data.synthetic import SyntheticConfig, synthetic_corpus  # noqa: E402
from megatron_ease.data.tokenizer import build_tiny_qwen_tokenizer  # noqa: E402
from megatron_ease.data.writer import EvidenceShardWriter, sample_members  # noqa: E402
from megatron_ease.ease.targets import evidence_token_targets  # noqa: E402


def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    """Square image of smooth gradients, shapes and sensor-like noise (JPEG sizes like photos)."""
    h, w = size, size
    yy, xx = np.mgrid[0:h, 0:w] / size
    base = np.stack([np.sin(xx * rng.uniform(2, 8) + c) * 0.5 + 0.5 for c in range(3)], -1) * 160 + 40
    image = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(size / 40, size / 8)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def write_shards(out_dir: str, size: int, count: int) -> str:
    rng = np.random.default_rng(size)
    with EvidenceShardWriter(out_dir, f"bench{size}", samples_per_shard=100, strict=True) as writer:
        for i in range(count):
            image = photo_like(rng, size)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            w, h = image.size
            boxes = [[float(v) for v in (rng.uniform(0, w / 2), rng.uniform(0, h / 2), rng.uniform(w / 2, w), rng.uniform(h / 2, h))] for _ in range(2)]
            record = {"question": "What colour is the largest circle near the top left corner of the picture?",
                      "answer": "B", "answer_type": "choice", "choices": ["red", "green", "blue", "yellow"],
                      "evidence": [{"image": 0, "box": b} for b in boxes], "source": "benchmark"}
            writer.write(f"s{i:06d}", sample_members(record, [("jpg", buffer.getvalue())]))
    return os.path.join(out_dir, f"bench{size}-*.tar")


def rate(fn, items) -> float:
    """Items per second of fn over items (one warm-up call)."""
    fn(items[0])
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 1024])
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = ImageProcessingConfig.for_family(args.family)
    hf = Qwen2VLImageProcessorPil(patch_size=cfg.patch_size, merge_size=cfg.merge_size, temporal_patch_size=cfg.temporal_patch_size,
                                  image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
                                  min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_qwen_tokenizer(synthetic_corpus(SyntheticConfig()), os.path.join(tmp, "tok"))
        processor = SampleProcessor(tokenizer, cfg)
        for size in args.sizes:
            shards = write_shards(os.path.join(tmp, str(size)), size, args.samples)
            dataset = EvidenceShardDataset(shards, processor, args.batch_size, shuffle=True, seed=0, num_epochs=1)
            handles: dict = {}
            entries = [dataset.index.entries[dataset.entry_index(k)] for k in range(len(dataset.index.entries))]
            raw = [(dataset.read_files(e, handles), e.key, dataset.index.shards[e.shard]) for e in entries]
            decoded = [decode_sample(*r) for r in raw]
            images = [d.images[0] for d in decoded]
            r_size = cfg.resized_size(*images[0].size)
            targets = [[(d.images[0].size, cfg.resized_size(*d.images[0].size), cfg.cell, d.boxes[0], None)] for d in decoded]
            text = processor(decoded[0])  # also warms up every stage
            start = time.perf_counter()
            n = sum(1 for _, s, e in dataset.iter_samples() if e is None)
            full = n / (time.perf_counter() - start)
            row = {
                "size": f"{images[0].size[0]}x{images[0].size[1]} -> {r_size[0]}x{r_size[1]}",
                "tokens": text.image_token_counts[0],
                "full": full,
                "decode": rate(lambda r: decode_sample(*r), raw),
                "ours": rate(lambda im: preprocess_image(im, cfg), images),
                "hf": rate(lambda im: hf(images=[im], return_tensors="np"), images[:50]),
                "target": rate(lambda t: evidence_token_targets(t), targets),
                "process": rate(processor, decoded),
            }
            for workers in (1, 2):
                loader = EvidenceDataLoader(dataset, num_workers=workers)
                start = time.perf_counter()
                count = sum(len(b["keys"]) for b in loader)
                row[f"loader{workers}"] = count / (time.perf_counter() - start)
            rows.append(row)

    print(f"family={args.family} samples={args.samples} batch={args.batch_size} torch_threads=1 (samples/s)\n")
    print("| image (W×H → W'×H') | visual tokens | full path / worker | decode+validate | preprocess (ours) | preprocess (HF Pil) | target | prompt+pixels+target | DataLoader 1 worker | 2 workers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['tokens']} | **{r['full']:.0f}** | {r['decode']:.0f} | {r['ours']:.0f} | {r['hf']:.0f} | {r['target']:.0f} | {r['process']:.0f} | {r['loader1']:.0f} | {r['loader2']:.0f} |")


if __name__ == "__main__":
    main()
