"""An LRU of prompt prefills, keyed by the prompt's token ids.

A round whose prompt was prefilled recently (the same seed and round, or an intent with
no more examples than the prompt takes) skips the prefill: the cached one-row cache and
last-position logits are forked instead. The cache is bounded by cached tokens, not entries.
A prefill held on the device (IO binding) stays there: its OrtValues are never written to.
Entries are one-row batches (`Batch` or `RaggedBatch`) made with their `frozen` method.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class CachedPrefill:
    batch: Any  # a one-row `Batch` or `RaggedBatch` with its own cache, never written to
    logits: np.ndarray  # (vocab,) at the prompt's last position

    @property
    def tokens(self) -> int:
        return self.batch.past_len


class PrefixCache:
    """Least-recently-used prefills, holding at most `max_tokens` prompt tokens in all."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], CachedPrefill] = OrderedDict()
        self.tokens = 0
        self.hits = 0
        self.misses = 0

    def lookup(self, token_ids: list[int], seq_id: int) -> tuple[Any, np.ndarray] | None:
        """A one-row batch holding the cached prefill of `token_ids`, and its logits."""
        entry = self._entries.get(tuple(token_ids))
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(tuple(token_ids))
        self.hits += 1
        return entry.batch.renamed(seq_id), entry.logits

    def store(self, token_ids: list[int], batch, logits: np.ndarray) -> None:
        """Remember a freshly prefilled one-row batch (before anything else is fed to it)."""
        if self.max_tokens <= 0 or len(token_ids) > self.max_tokens:
            return
        key = tuple(token_ids)
        if key in self._entries:
            return
        self._entries[key] = CachedPrefill(batch.frozen(), np.array(logits, copy=True))
        self.tokens += self._entries[key].tokens
        while self.tokens > self.max_tokens:
            _, evicted = self._entries.popitem(last=False)
            self.tokens -= evicted.tokens

    def stats(self) -> dict:
        return {"entries": len(self._entries), "tokens": self.tokens, "hits": self.hits, "misses": self.misses}
