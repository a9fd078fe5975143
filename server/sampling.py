"""Token sampling in numpy: temperature, top-k, top-p (nucleus); greedy at temperature 0.

Every sequence samples with its own `numpy.random.Generator`, so a seeded request gives
the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingSettings:
    """How one request picks tokens."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sequence_rng(seed: int, *path: int) -> np.random.Generator:
    """An independent generator for one sequence, derived from the request seed and its place."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *path])))


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities of a 1-D logit row at the given temperature (> 0)."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    return probs / probs.sum()


def softmax_rows(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """`softmax` of every row of a 2-D logit array at its own temperature (all > 0), in a few
    whole-array operations instead of several per row; each row equals `softmax` of that row."""
    scaled = logits.astype(np.float64) / temperatures[:, None]
    scaled -= scaled.max(axis=1, keepdims=True)
    probs = np.exp(scaled, out=scaled)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


def _top_k_candidates(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most likely tokens, most likely first."""
    k = min(k, probs.shape[0])
    part = np.argpartition(probs, -k)[-k:]
    return part[np.argsort(-probs[part], kind="stable")]


def _nucleus(probs: np.ndarray, candidates: np.ndarray | None, top_p: float) -> np.ndarray:
    """The most likely tokens whose (renormalised) probability first reaches top_p.

    `candidates` are the top-k survivors, most likely first, or None for the whole
    vocabulary; then the top 256 tokens are ranked first and the window widens only when
    they hold less than top_p, so a full-vocabulary sort is rare.
    """
    if candidates is not None:
        kept = probs[candidates]
        cumulative = np.cumsum(kept) / kept.sum()
        return candidates[: int(np.searchsorted(cumulative, top_p)) + 1]
    width = 256
    while True:
        ranked = _top_k_candidates(probs, width)
        cumulative = np.cumsum(probs[ranked])
        if cumulative[-1] >= top_p or ranked.shape[0] == probs.shape[0]:
            return ranked[: int(np.searchsorted(cumulative, top_p)) + 1]
        width *= 4


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probabilities `probs` (summing to ~1): the draw `rng.choice(len, p=probs)`
    makes (one uniform number against the normalised cumulative sum), without its checks."""
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def sample_token(
    logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator, probs: np.ndarray | None = None
) -> int:
    """Pick the next token from one row of logits (shape: (vocab,)); `probs`, where given, is
    that row's `softmax` at the settings' temperature, computed beforehand (`softmax_rows`)."""
    if settings.greedy:
        return int(np.argmax(logits))
    if probs is None:
        probs = softmax(logits, settings.temperature)
    candidates = _top_k_candidates(probs, settings.top_k) if settings.top_k > 0 else None
    if settings.top_p < 1.0:
        candidates = _nucleus(probs, candidates, settings.top_p)
    if candidates is None:
        return _draw(probs, rng)
    return int(candidates[_draw(probs[candidates], rng)])
