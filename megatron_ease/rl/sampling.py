"""Sampling for rollouts: parameters, next-token sampling with top-p, and stop strings.

Pure functions of logits; the engine (``rollout.py``) calls them on one rank and shares the result.

What the sampler returns as a token's log-probability: ``log softmax(logits / T)[token]`` over the
vocabulary less ``suppress_token_ids`` (their logits are -inf before anything else), where ``T``
is the sampling temperature (``T = 1`` for greedy decoding). Without suppressed tokens this is the
policy the trainer's ``π_old`` forward computes (``vocab_parallel_log_probs(logits, labels,
temperature)``); the top-p filter only restricts which tokens can be drawn, it does not renormalise
the reported log-probability. The rollout log-probs are a diagnostic and a cross-check (they agree
with a teacher-forced forward to float noise); DAPO's ``π_old`` is recomputed by a proper forward
pass (DESIGN §5), so the trainer never depends on the KV-cache numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample rollouts; ``n`` consecutive rollouts per prompt (the DAPO group)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # 1 = no nucleus filter
    n: int = 1
    seed: int = 0
    # A rollout ends with (and includes) the first of these tokens.
    stop_token_ids: tuple[int, ...] = ()
    # ... or with the token that completes one of these strings (needs the engine's detokenizer).
    stop_strings: tuple[str, ...] = ()
    # Never sampled (e.g. the vision placeholders: an image pad in a response would be taken
    # for a visual token by the model's next forward).
    suppress_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got "
                             f"{self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got "
                             f"{self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1 rollouts per prompt, got {self.n}")
        if any(not s for s in self.stop_strings):
            raise ValueError("SamplingParams.stop_strings must not contain an empty string")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        object.__setattr__(self, "suppress_token_ids",
                           tuple(int(t) for t in self.suppress_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dapo_config(cls, dapo, stop_token_ids: Sequence[int], seed: int,
                         stop_strings: Sequence[str] = (),
                         suppress_token_ids: Sequence[int] = ()) -> "SamplingParams":
        """Rollout sampling of a DAPO run: ``group_size`` samples, its temperature/top-p/length."""
        return cls(max_new_tokens=dapo.max_response_length, temperature=dapo.temperature,
                   top_p=dapo.top_p, n=dapo.group_size, seed=seed,
                   stop_token_ids=tuple(stop_token_ids), stop_strings=tuple(stop_strings),
                   suppress_token_ids=tuple(suppress_token_ids))


def top_p_removed(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[b, V]`` bool, True for tokens outside the nucleus (HF ``TopPLogitsWarper`` semantics):
    in ascending order, the least likely tokens whose cumulative mass is ``<= 1 - top_p``; the
    most likely token always stays. Equivalently, a token stays iff the mass of the tokens
    strictly more likely than it is ``< top_p``: the test ``sample_next_tokens`` makes without a
    sort. The two differ only on exact ties at the boundary, which that test keeps together
    (here the sort order decides which of the tied tokens stay, as in HF)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    removed = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    removed[..., -1] = False
    return removed.scatter(-1, order, removed)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)[token]`` in float32; ``T = 0`` (greedy) counts as 1."""
    scaled = logits.float()
    if temperature > 0 and temperature != 1.0:  # x / 1 is x: one kernel less per step
        scaled = scaled / temperature
    return scaled.gather(-1, tokens[:, None].long())[:, 0] - scaled.logsumexp(dim=-1)


Uniforms = Callable[[], torch.Tensor]  # one uniform in [0, 1) per row of the logits, per call


def _draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row of non-negative ``weights`` ``[b, V]`` (unnormalised; zeros are never
    drawn), by inverse CDF of ``uniform`` ``[b]``: one cumulative sum, no sort.

    The sum runs in float64: past a running sum of 0.5, float32 steps by 6e-8, so the tokens of
    a 150k vocabulary's tail (p < 3e-8, some 1e-3 of the mass together) could never be drawn and
    others up to 1e-6 were drawn at up to twice or none of their probability."""
    cdf = weights.double().cumsum(dim=-1)
    # uniform < 1, so draw < cdf[-1] and the first cdf entry above it has positive weight.
    draw = uniform.double()[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).clamp_(max=cdf.shape[-1] - 1)[:, 0]


def _sample_nucleus(probs: torch.Tensor, top_p: float, uniforms: Uniforms) -> torch.Tensor:
    """One token per row of ``probs`` ``[b, V]`` from its top-p nucleus, renormalised, without
    sorting the vocabulary (a sort of 150k logits per row per step costs more than the model's
    last layers at small batch).

    Draw from the candidates (at first all tokens); a token is in the nucleus iff the mass of
    the tokens more likely than it is ``< top_p``. If it is not, neither is any token at most as
    likely, so those leave the candidates and the row draws again. Conditioned on acceptance the
    draw is the candidates' distribution restricted to the nucleus, i.e. the nucleus
    distribution; each round accepts with probability ``mass(nucleus) / mass(candidates) >=
    top_p``, so the rounds are few (at most ``1 / top_p`` per row in expectation), each one pass
    over the vocabulary. This is FlashInfer's pivot rejection sampling.
    """
    tokens = _draw(probs, uniforms())
    pending = None  # rows whose draw is unchecked; None: all of them (the first round)
    candidates = probs
    while True:
        row_probs = probs if pending is None else probs[pending]
        chosen = row_probs.gather(-1, (tokens if pending is None else tokens[pending])[:, None])
        rejected = row_probs.masked_fill(row_probs <= chosen, 0.0).sum(dim=-1) >= top_p
        pending = rejected.nonzero()[:, 0] if pending is None else pending[rejected]
        if not pending.numel():
            return tokens
        at_most_as_likely = row_probs[rejected] <= chosen[rejected]
        remaining = candidates[pending].masked_fill(at_most_as_likely, 0.0)
        candidates = candidates.index_put((pending,), remaining)
        tokens = tokens.index_put((pending,), _draw(remaining, uniforms()[pending]))


def sample_next_tokens(logits: torch.Tensor, params: SamplingParams,
                       generator: Optional[torch.Generator] = None,
                       rows: Optional[torch.Tensor] = None, num_rows: Optional[int] = None,
                       suppressed: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` ``[b, V]`` and its log-probability (see the module doc).

    Sampling is by inverse CDF (``_draw``), with top-p by rejection (``_sample_nucleus``): no
    multinomial, no sort of the vocabulary. Returns ``tokens`` ``[b]`` int64 and ``log_probs``
    ``[b]`` float32. Suppressed tokens are removed before anything else, so log-probs are those
    of the distribution actually sampled.

    ``rows`` ``[b]`` / ``num_rows``: the logits are those rows of a batch of ``num_rows``; every
    uniform is then drawn for all ``num_rows`` rows and the ``rows`` kept, so with the generator
    seeded alike, a row's token does not depend on which other rows are being sampled.

    ``suppressed``: ``params.suppress_token_ids`` as a tensor on the logits' device, made once by
    a caller that samples many steps (making it is a host-to-device copy, which synchronises).
    """
    logits = logits.float()
    if params.suppress_token_ids:
        if suppressed is None:
            suppressed = torch.tensor(params.suppress_token_ids, device=logits.device)
        logits = logits.index_fill(-1, suppressed, float("-inf"))
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        return tokens, token_log_probs(logits, tokens)

    def uniforms() -> torch.Tensor:
        u = torch.rand(logits.shape[0] if rows is None else num_rows, generator=generator,
                       device=logits.device)
        return u if rows is None else u[rows]

    scaled = logits if params.temperature == 1.0 else logits / params.temperature
    probs = scaled.softmax(dim=-1)
    if params.top_p < 1.0:
        tokens = _sample_nucleus(probs, params.top_p, uniforms)
    else:
        tokens = _draw(probs, uniforms())
    return tokens, token_log_probs(scaled, tokens)


class StopStringMatcher:
    """Which rollouts have just completed a stop string.

    Detokenising every rollout in full at every step costs O(length²); only the last ``window``
    generated tokens are decoded instead. A token holds at least one byte of text (byte-level
    BPE), so a stop string of ``n`` UTF-8 bytes spans at most ``n`` tokens: ``window`` defaults to
    the longest stop string's byte length plus a margin for the partial UTF-8 sequence before
    it (a stop string "答案：" is 3 characters but 9 bytes, and up to 9 tokens).
    """

    def __init__(self, stop_strings: Sequence[str], detokenize: Callable[[list[int]], str],
                 window: Optional[int] = None):
        self.stop_strings = tuple(stop_strings)
        self.detokenize = detokenize
        self.window = window or max(len(s.encode("utf-8")) for s in self.stop_strings) + 4

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[b, t]`` generated so far, ``lengths`` ``[b]`` valid tokens per row,
        ``rows`` ``[b]`` bool: the rows to check. Returns ``[b]`` bool."""
        hit = torch.zeros_like(rows)
        for i in rows.nonzero()[:, 0].tolist():
            end = int(lengths[i])
            text = self.detokenize(tokens[i, max(0, end - self.window):end].tolist())
            hit[i] = any(s in text for s in self.stop_strings)
        return hit
