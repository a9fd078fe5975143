"""`RaggedBatch`: the decoding state of a batch for a graph with ragged attention.

A bundle exported with `--cache ragged` (training/graph.py `ragged_attention`) runs every layer's
attention as one GroupQueryAttention that reads, for row r, only the first `lengths[r]` cached
positions of that row, and writes the pass's new keys/values right after them, into the very
buffers it was given (the engine binds each buffer as both `past_key_values.*` and `present.*`).
So the cache is right-padded: row r's tokens sit at slots 0..lengths[r] - 1 of its row, whatever
the other rows' lengths, and a step costs attention over each row's own tokens, not over the
longest row's. Between two passes a batch holds, for each row (one sequence):
  - `next_ids`     (batch, new_len) tokens to feed next, right-padded (`next_lengths` real ones)
  - `lengths`      (batch,) tokens in the row's cache
  - `storage`      name -> (rows + spare rows, kv_heads, capacity, head_dim) buffers; the first
                   len(batch) rows are the batch's (`past`, views), the rest wait for joining rows
It offers the interface the scheduler and the engine use of `Batch` (server/batch.py): `feed`,
`advance`, `filter`, `concatenate`, `fork`, `set_next`. Buffers are `cache_zeros` maps: slots
and rows that were never written take no memory. The attention accepts several new tokens per
row after a cache only for a single row, which is the one case the engine asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from condgen.server.batch import _spare_rows, cache_zeros, compaction


@dataclass
class RaggedBatch:
    seq_ids: list[int]
    next_ids: np.ndarray
    next_lengths: np.ndarray
    lengths: np.ndarray
    storage: dict[str, np.ndarray]

    append_only = False  # the pass writes into the buffers itself (see the module docstring)
    moves = None  # the cache never leaves the host

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def past(self) -> dict[str, np.ndarray]:
        return {name: buffer[: len(self)] for name, buffer in self.storage.items()}

    @property
    def past_len(self) -> int:
        """The longest row's cached tokens."""
        return int(self.lengths.max()) if len(self) else 0

    @property
    def capacity(self) -> int:
        return next(iter(self.storage.values())).shape[2]

    @property
    def spare_rows(self) -> int:
        return next(iter(self.storage.values())).shape[0] - len(self)

    def on_host(self) -> bool:
        return True

    @classmethod
    def for_prompts(
        cls, seq_ids: list[int], prompts: list[list[int]], past_names: list[str], kv_heads: int, head_dim: int, dtype
    ) -> RaggedBatch:
        """A batch ready to prefill the prompts (right-padded to the longest) with an empty cache."""
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = np.zeros((n, width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        shape = (n, kv_heads, _with_room(width), head_dim)
        return cls(
            list(seq_ids),
            ids,
            np.array([len(p) for p in prompts], dtype=np.int64),
            np.zeros(n, dtype=np.int64),
            {name: cache_zeros(shape, dtype) for name in past_names},
        )

    # ---- passes ---------------------------------------------------------------------------
    def feed(self) -> dict[str, np.ndarray]:
        """Inputs for the next pass: token ids, the right-padded mask whose row sums are each
        row's length after the pass, and the cache buffers (grown first where they lack room)."""
        if self.next_ids.shape[1] > 1 and len(self) > 1 and self.lengths.any():
            raise ValueError("ragged attention feeds several tokens per row after a cache only to one row")
        total = self.lengths + self.next_lengths
        width = int(total.max())
        if width > self.capacity:
            self._regrow(width)
        mask = (np.arange(width)[None, :] < total[:, None]).astype(np.int64)  # (batch, width)
        positions = self.lengths[:, None] + np.arange(self.next_ids.shape[1])[None, :]
        return {"input_ids": self.next_ids, "attention_mask": mask, "position_ids": positions, **self.past}

    def advance(self, present: dict[str, np.ndarray] | None = None) -> None:
        """The pass wrote its entries into the buffers: the fed tokens become cache."""
        self.lengths = self.lengths + self.next_lengths
        self.next_ids = self.next_ids[:, :0]
        self.next_lengths = np.zeros(len(self), dtype=np.int64)

    def set_next(self, tokens) -> None:
        """Tokens (one per row) to feed at the next step."""
        self.next_ids = np.asarray(tokens, dtype=np.int64).reshape(len(self), 1)
        self.next_lengths = np.ones(len(self), dtype=np.int64)

    def set_next_rows(self, rows: list[list[int]]) -> None:
        """Several tokens per row to feed next, right-padded to the longest."""
        width = max(len(tokens) for tokens in rows)
        self.next_ids = np.zeros((len(rows), width), dtype=np.int64)
        for row, tokens in enumerate(rows):
            self.next_ids[row, : len(tokens)] = tokens
        self.next_lengths = np.array([len(tokens) for tokens in rows], dtype=np.int64)

    def _regrow(self, width: int) -> None:
        """Buffers with headroom beyond `width` slots, holding the rows' cached tokens."""
        kept = self.past_len
        for name, old in self.storage.items():
            grown = cache_zeros((old.shape[0], old.shape[1], _with_room(width), old.shape[3]), old.dtype)
            grown[: len(self), :, :kept] = old[: len(self), :, :kept]
            self.storage[name] = grown

    # ---- rows in and out ------------------------------------------------------------------
    def _rows(self, rows, seq_ids: list[int] | None = None, storage=None) -> RaggedBatch:
        index = np.asarray(rows, dtype=np.int64)
        return RaggedBatch(
            [self.seq_ids[i] for i in rows] if seq_ids is None else seq_ids,
            self.next_ids[index],
            self.next_lengths[index],
            self.lengths[index],
            self.storage if storage is None else storage,
        )

    def filter(self, keep_ids: list[int], consume: bool = False) -> RaggedBatch:
        """The rows whose sequence id is in `keep_ids` (in batch order). `consume`: this batch
        is spent, so kept rows move into the leaving rows' places in its own buffers (only moved
        rows are copied, their cached slots only); else the kept rows are copied out."""
        keep_set = set(keep_ids)
        rows = [i for i, seq in enumerate(self.seq_ids) if seq in keep_set]
        if len(rows) == len(self):
            return self
        if consume:
            return self._compacted(rows)
        width = int(self.lengths[rows].max()) if rows else 0
        storage = {
            name: _copied(buffer[rows, :, :width], _with_room(max(width, 1))) for name, buffer in self.storage.items()
        }
        return self._rows(rows, storage=storage)

    def _compacted(self, rows: list[int]) -> RaggedBatch:
        holes, movers, order = compaction(rows)
        if movers:  # their cached slots only
            width = int(self.lengths[movers].max())
            for buffer in self.storage.values():
                buffer[holes, :, :width] = buffer[movers, :, :width]
        return self._rows(order)

    def fork(self, seq_ids: list[int]) -> RaggedBatch:
        """Copies of this one-row batch, one per new sequence id (shared prompt prefill)."""
        if len(self) != 1:
            raise ValueError("only a one-row batch can be forked")
        n, width = len(seq_ids), int(self.lengths[0])
        storage = {}
        for name, buffer in self.storage.items():
            block = np.broadcast_to(buffer[:1, :, :width], (n, *buffer.shape[1:2], width, buffer.shape[3]))
            storage[name] = _copied(block, _with_room(width))
        return RaggedBatch(
            list(seq_ids),
            np.repeat(self.next_ids, n, axis=0),
            np.repeat(self.next_lengths, n),
            np.repeat(self.lengths, n),
            storage,
        )

    def frozen(self) -> RaggedBatch:
        """An own copy of this one-row batch's cache, trimmed to its tokens (the prefix cache)."""
        width = self.past_len
        return self._rows([0], storage={name: np.array(b[:1, :, :width]) for name, b in self.storage.items()})

    def renamed(self, seq_id: int) -> RaggedBatch:
        """This one-row batch under another sequence id, sharing its (never written) cache."""
        return self._rows([0], seq_ids=[seq_id])

    @classmethod
    def concatenate(cls, batches: list[RaggedBatch], consume: bool = False) -> RaggedBatch:
        """One batch holding all rows. `consume`: the given batches are spent; the newcomers'
        rows go into the first batch's spare rows where they fit, else into new buffers that keep
        spare rows for the next joins."""
        batches = [b for b in batches if len(b)]
        if not batches:
            raise ValueError("nothing to concatenate")
        if len(batches) == 1:
            return batches[0]
        if len({b.next_ids.shape[1] for b in batches}) != 1:
            raise ValueError("batches to concatenate must feed the same number of tokens")
        first, newcomers = batches[0], batches[1:]
        count = sum(len(b) for b in newcomers)
        width = max(b.past_len for b in batches)
        in_place = consume and count <= first.spare_rows and width <= first.capacity
        if in_place:
            storage, start = first.storage, len(first)
        else:
            storage, start, newcomers = {}, 0, batches
            rows = len(first) + count + (_spare_rows(len(first) + count) if consume else 0)
        for name in list(first.storage):
            if not in_place:
                old = first.storage[name]
                storage[name] = cache_zeros((rows, old.shape[1], _with_room(width), old.shape[3]), old.dtype)
            row = start
            for batch in newcomers:
                length = batch.past_len
                storage[name][row : row + len(batch), :, :length] = batch.storage[name][: len(batch), :, :length]
                row += len(batch)
            if consume:  # layer by layer: a join holds one layer more than the caches, not two copies
                for batch in batches:
                    if batch.storage is not storage:
                        del batch.storage[name]
        return RaggedBatch(
            [s for b in batches for s in b.seq_ids],
            np.concatenate([b.next_ids for b in batches], axis=0),
            np.concatenate([b.next_lengths for b in batches]),
            np.concatenate([b.lengths for b in batches]),
            storage,
        )


def _with_room(length: int) -> int:
    """Slots to allocate for rows of up to `length` tokens: half as many again (at least 64).
    A regrow copies every row's cache (the bench's 16 rows: ~0.3 s, a tenth of their 64-token
    decode), and room is cheap: the attention reads only each row's own tokens, and slots never
    written map no memory (`cache_zeros`), so spare slots cost address space, not RSS."""
    return length + max(64, length // 2)


def _copied(block: np.ndarray, capacity: int) -> np.ndarray:
    """`block` (rows, heads, width, dim) in a new buffer of `capacity` slots."""
    out = cache_zeros((block.shape[0], block.shape[1], capacity, block.shape[3]), block.dtype)
    out[:, :, : block.shape[2]] = block
    return out
