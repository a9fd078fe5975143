"""Token sampling: temperature, top-k, top-p (nucleus); greedy at temperature 0.

Sampling reads a window of each row's most likely tokens (`TokenWindows`: ids and logits, most
likely first, and the row's log-normaliser at its temperature), computed on the model's device
by the engine's sampling head (server/graphs.py) or here from host logits. A draw walks the
window in that order; the rare draw that needs more of the vocabulary (a tail token, or a
nucleus wider than the window) takes the row's full logits instead, so the result is the same
sample either way (exact up to float32 rounding of the logits and the normaliser).

Every sequence samples with its own `numpy.random.Generator`, so a seeded request gives
the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

WINDOW = 256  # tokens per row that cross from the device: top-k up to this, and most nuclei


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


def head_temperature(settings: SamplingSettings) -> float:
    """The temperature a row's log-normaliser is computed at (greedy rows: 1, it is not used)."""
    return settings.temperature if settings.temperature > 0 else 1.0


@dataclass
class TokenWindows:
    """One step's sampling input for every row of a batch."""

    ids: np.ndarray  # (rows, width) int64: the most likely tokens, most likely first (ties: lower id)
    logits: np.ndarray  # (rows, width) their logits
    log_norm: np.ndarray  # (rows,) logsumexp over the whole vocabulary of logits / temperature
    temperatures: np.ndarray  # (rows,) the temperatures of `log_norm`
    vocab_size: int
    fetch_logits: Callable[[], np.ndarray]  # (rows, vocab): read only for a draw past the window
    _full: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # The head's top-k comes back in the kernel's order for equal logits (CUDA's is not
        # stable): settle ties by id, as numpy's argmax and the host ranking do.
        order = np.lexsort((self.ids, -self.logits), axis=-1)
        self.ids = np.take_along_axis(self.ids, order, axis=1)
        self.logits = np.take_along_axis(self.logits, order, axis=1)

    def full_logits(self) -> np.ndarray:
        """Every row's logits, fetched once per step (from the device where they live there)."""
        if self._full is None:
            self._full = self.fetch_logits()
        return self._full

    @classmethod
    def from_logits(cls, logits: np.ndarray, temperatures: np.ndarray, width: int = WINDOW) -> TokenWindows:
        """Windows computed on the host from (rows, vocab) logits, as the sampling head does."""
        rows, vocab = logits.shape
        width = min(width, vocab)
        if width < vocab:
            part = np.argpartition(-logits, width - 1, axis=1)[:, :width]
        else:
            part = np.broadcast_to(np.arange(vocab), (rows, vocab))
        scaled = logits.astype(np.float64) / np.asarray(temperatures, dtype=np.float64)[:, None]
        log_norm = log_normalizer(scaled)
        return cls(  # ranked by logit, then by id, in __post_init__
            part.astype(np.int64),
            np.take_along_axis(logits, part, axis=1),
            log_norm,
            np.asarray(temperatures, dtype=np.float64),
            vocab,
            lambda: logits,
        )

    def __len__(self) -> int:
        return self.ids.shape[0]

    def sample(self, row: int, settings: SamplingSettings, rng: np.random.Generator) -> int:
        """The next token of `row` under `settings` (at the temperature of its log-normaliser)."""
        if settings.greedy:
            return int(self.ids[row, 0])
        u = rng.random()
        complete = self.ids.shape[1] == self.vocab_size
        token = _pick(self.ids[row], self._log_probs(row), complete, settings, u)
        if token is None:  # the draw needs tokens beyond the window: rank the whole row
            full = self.full_logits()
            whole = TokenWindows.from_logits(full[row : row + 1], self.temperatures[row : row + 1], full.shape[1])
            token = _pick(whole.ids[0], whole._log_probs(0), True, settings, u)
        assert token is not None
        return token

    def _log_probs(self, row: int) -> np.ndarray:
        return self.logits[row].astype(np.float64) / self.temperatures[row] - float(self.log_norm[row])


def _pick(ids: np.ndarray, log_probs: np.ndarray, complete: bool, settings: SamplingSettings, u: float) -> int | None:
    """The token that the uniform number `u` draws from `ids` (most likely first) under top-k then
    top-p (renormalised within top-k), or None when the window is too short to decide."""
    cumulative = np.cumsum(np.exp(log_probs))
    top_k = settings.top_k
    bounded = complete or 0 < top_k <= len(ids)  # every candidate is in the window
    if top_k > 0 and bounded:
        cumulative = cumulative[:top_k]
    # The candidates' mass: known where they are all in the window, else the whole vocabulary's, 1
    total = cumulative[-1] if (top_k > 0 and bounded) or complete else 1.0
    if top_k > 0 and not bounded:
        return None
    if settings.top_p < 1.0:
        end = int(np.searchsorted(cumulative, settings.top_p * total))
        if end >= len(cumulative):
            if not bounded:
                return None
            end = len(cumulative) - 1
        cumulative = cumulative[: end + 1]
        total, bounded = cumulative[-1], True
    index = int(np.searchsorted(cumulative, u * total, side="right"))
    if index >= len(cumulative):
        if not bounded:
            return None
        index = len(cumulative) - 1  # rounding at the very end of the distribution
    return int(ids[index])


def sample_token(logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits (shape: (vocab,)): `TokenWindows` of one row."""
    windows = TokenWindows.from_logits(logits[None, :], np.array([head_temperature(settings)]))
    return windows.sample(0, settings, rng)


def log_normalizer(values: np.ndarray) -> np.ndarray:
    """log(sum(exp(values))) over the last axis, computed stably (shifted by the maximum)."""
    top = values.max(axis=-1)
    return top + np.log(np.exp(values - top[..., None]).sum(axis=-1))
