"""Evaluation: ``evaluator.Evaluator`` (held-out accuracy, anti-prior accuracy, attention in
evidence; used by the trainer's validation, the demo and ``python -m megatron_ease.evaluate``),
``evaluator.attention_maps`` (per-sample attention grids) and ``plots`` (their overlays)."""
