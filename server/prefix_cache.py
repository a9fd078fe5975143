"""An LRU of prompt prefills, keyed by the prompt's token ids.

A round whose prompt was prefilled recently (the same seed and round, or an intent with
no more examples than the prompt takes) skips the prefill: the cached one-row cache and
last-position logits are forked instead. The cache is bounded by cached tokens, not entries.
A prefill held on the device (IO binding) stays there: its OrtValues are never written to.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from condgen.server.batch import Batch


@dataclass
class CachedPrefill:
    past: dict[str, Any]  # name -> (1, kv_heads, prompt_len, head_dim) array or OrtValue, never mutated
    logits: np.ndarray  # (vocab,) at the prompt's last position
    mask: np.ndarray  # (1, tokens): 1 = real token, 0 = left padding (a prefill shared with longer prompts)
    append_only: bool = False  # the engine's cache mode (see Batch)
    moves: Any = None  # the batch's device moves, where the cache is on the device

    @property
    def tokens(self) -> int:
        return self.mask.shape[1]


class PrefixCache:
    """Least-recently-used prefills, holding at most `max_tokens` prompt tokens in all."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], CachedPrefill] = OrderedDict()
        self.tokens = 0
        self.hits = 0
        self.misses = 0

    def lookup(self, token_ids: list[int], seq_id: int) -> tuple[Batch, np.ndarray] | None:
        """A one-row batch holding the cached prefill of `token_ids`, and its logits."""
        entry = self._entries.get(tuple(token_ids))
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(tuple(token_ids))
        self.hits += 1
        batch = Batch(
            [seq_id],
            np.zeros((1, 0), dtype=np.int64),
            entry.mask.copy(),
            dict(entry.past),
            append_only=entry.append_only,
            moves=entry.moves,
        )
        return batch, entry.logits

    def store(self, token_ids: list[int], batch: Batch, logits: np.ndarray) -> None:
        """Remember a freshly prefilled one-row batch (before anything else is fed to it)."""
        if self.max_tokens <= 0 or len(token_ids) > self.max_tokens:
            return
        key = tuple(token_ids)
        if key in self._entries:
            return
        if batch.on_host():  # own copy: host buffers may be written in place later
            past = {name: np.array(value[:, :, : batch.past_len]) for name, value in batch.past.items()}
        else:  # OrtValues: each step's outputs are new ones, so these stay as they are
            past = dict(batch.past)
        self._entries[key] = CachedPrefill(
            past, np.array(logits, copy=True), batch.past_mask.copy(), batch.append_only, batch.moves
        )
        self.tokens += self._entries[key].tokens
        while self.tokens > self.max_tokens:
            _, evicted = self._entries.popitem(last=False)
            self.tokens -= evicted.tokens

    def stats(self) -> dict:
        return {"entries": len(self._entries), "tokens": self.tokens, "hits": self.hits, "misses": self.misses}
