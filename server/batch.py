"""`Batch`: all decoding state of the sequences that run together.

Between two forward passes a batch holds, for each row (one sequence):
  - `next_ids`  (batch, new_len)  tokens to feed next (the prompt at prefill, 1 token after)
  - `past_mask` (batch, past_len) 1 where the cached position is a real token, 0 = padding
  - `past`      name -> (batch, kv_heads, past_len, head_dim) cached keys/values, named
                after the ONNX graph's `past_key_values.*` inputs.
Rows of different lengths are left-padded, so every row's newest token is in the last
column. Several prompts can be prefilled in one pass (`for_prompts`): they are left-padded
too, with `next_mask` marking the padding until the pass has run. The scheduler only moves
rows in and out with `filter`, `concatenate` and `fork`.
With IO binding the cache may live on the device as ONNX Runtime `OrtValue`s between
steps; rows then join and leave through `moves` (server/device_cache.py: small graphs run on
the device), so the cache stays there.

With an append-only graph (`append_only`, see training/graph.py) the pass returns only the new
entries, and `advance` writes them into the batch's own buffers in place. Those buffers keep
spare slots at their end (`capacity` > `past_len`), fed with a 0 mask, so that a step copies
no cache at all; a full buffer grows with headroom (one copy every `headroom` steps).
A batch built by a consuming join or leave also keeps spare rows (`storage`), so that the
next rounds join by writing their rows into them instead of copying the whole batch.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Batch:
    seq_ids: list[int]
    next_ids: np.ndarray
    past_mask: np.ndarray
    past: dict[str, np.ndarray]
    next_mask: np.ndarray | None = None  # (batch, new_len): 0 = padding of a batched prefill
    append_only: bool = False  # the pass returns only new cache entries (written in place)
    # Append-only batches this batch owns alone: name -> (rows + spare rows, heads, capacity, dim)
    # buffers whose first len(self) rows are `past` (views). Joins write new rows into the rest.
    storage: dict[str, np.ndarray] | None = field(default=None, repr=False)
    # Device-side row moves (`CacheMoves`) for a cache held as OrtValues; None: moves on the host.
    moves: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def past_len(self) -> int:
        return self.past_mask.shape[1]

    @property
    def capacity(self) -> int:
        """Cache slots per row: `past_len`, plus the spare slots of an append-only cache."""
        value = next(iter(self.past.values()), None)
        return value.shape[2] if isinstance(value, np.ndarray) else self.past_len

    @classmethod
    def for_prompts(
        cls,
        seq_ids: list[int],
        prompts: list[list[int]],
        past_names: list[str],
        kv_heads: int,
        head_dim: int,
        dtype=np.float32,
        append_only: bool = False,
        moves: Any = None,
    ) -> Batch:
        """A batch ready to prefill the prompts (left-padded to the longest) with an empty cache."""
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        empty = np.zeros((n, kv_heads, 0, head_dim), dtype=dtype)  # (batch, heads, past_len=0, head_dim)
        return cls(
            list(seq_ids),
            ids,
            np.zeros((n, 0), dtype=np.int64),
            {name: empty for name in past_names},
            None if mask.all() else mask,
            append_only,
            moves=moves,
        )

    def _new_mask(self) -> np.ndarray:
        if self.next_mask is not None:
            return self.next_mask
        return np.ones(self.next_ids.shape, dtype=np.int64)

    def feed(self) -> dict[str, np.ndarray]:
        """Inputs for the next forward pass."""
        new_len = self.next_ids.shape[1]
        spare = np.zeros((len(self), self.capacity - self.past_len), dtype=np.int64)  # (batch, unused slots)
        mask = np.concatenate([self.past_mask, spare, self._new_mask()], axis=1)
        # Position of a token = number of real tokens before it in its row (padding: 0).
        positions = np.maximum(np.cumsum(mask, axis=1)[:, -new_len:] - 1, 0)  # (batch, new_len)
        return {"input_ids": self.next_ids, "attention_mask": mask, "position_ids": positions, **self.past}

    def advance(self, present: dict[str, np.ndarray]) -> None:
        """Take the forward pass's `present` cache (the whole cache, or with `append_only` the
        new entries, written into the spare slots); the fed tokens become past."""
        if self.append_only:
            self._append(present)
        else:
            self.past = present
        self.past_mask = np.concatenate([self.past_mask, self._new_mask()], axis=1)
        self.next_ids = self.next_ids[:, :0]
        self.next_mask = None

    def _append(self, present: dict[str, np.ndarray]) -> None:
        """Write the new entries at slot `past_len` of every buffer, regrowing full ones first."""
        new_len = next(iter(present.values())).shape[2]
        if self.past_len + new_len > self.capacity:
            self._regrow(new_len)
        length = self.past_len
        for name, new in present.items():
            self.past[name][:, :, length : length + new_len] = new

    def _regrow(self, new_len: int) -> None:
        """New buffers with headroom for `new_len` more entries. The copy leaves out the leading
        columns that are padding in every row (rows that set them have left), at no extra cost.
        Spare rows are kept (their untouched pages cost nothing)."""
        rows, length = len(self), self.past_len
        start = _shared_padding(self.past_mask)
        kept = length - start
        for name in self.past:
            old = self.storage[name] if self.storage is not None else self.past[name]
            grown = cache_zeros(old.shape[:2] + (_with_headroom(kept + new_len), old.shape[3]), old.dtype)
            grown[:rows, :, :kept] = old[:rows, :, start:length]
            if self.storage is not None:
                self.storage[name] = grown
            self.past[name] = grown[:rows]
        self.past_mask = self.past_mask[:, start:]

    def set_next(self, tokens: np.ndarray) -> None:
        """Tokens (one per row) to feed at the next step."""
        self.next_ids = np.asarray(tokens, dtype=np.int64).reshape(len(self), 1)

    def set_next_rows(self, rows: list[list[int]]) -> None:
        """Several tokens per row to feed next, left-padded to the longest (`next_mask` marks
        the padding; positions count real tokens only, so a gap after the cache is harmless)."""
        width = max(len(tokens) for tokens in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, tokens in enumerate(rows):
            ids[row, width - len(tokens) :] = tokens
            mask[row, width - len(tokens) :] = 1
        self.next_ids = ids
        self.next_mask = None if mask.all() else mask

    def host_past(self) -> dict[str, np.ndarray]:
        """The cache as numpy arrays (copied from the device when it lives there)."""
        return {name: to_host(value) for name, value in self.past.items()}

    def filter(self, keep_ids: list[int], consume: bool = False) -> Batch:
        """The rows whose sequence id is in `keep_ids` (in batch order). Padding columns shared
        by every kept row are dropped when they are at least a quarter of the cache; fewer cost
        less to compute over than to copy the cache for. When the kept rows are one contiguous
        run and nothing is trimmed, the new batch holds views of this one's cache (no copy).
        `consume`: the caller drops this batch: its buffers are compacted in place where nothing
        is trimmed (`_compacted`), else released layer by layer as they are copied (`_copy_layers`)."""
        keep_set = set(keep_ids)
        rows = [i for i, seq in enumerate(self.seq_ids) if seq in keep_set]
        if len(rows) == len(self):
            return self
        seq_ids = [self.seq_ids[i] for i in rows]
        start = _shared_padding(self.past_mask[rows]) if rows else self.past_len
        start = start if 4 * start >= self.past_len else 0
        on_host = self.on_host()
        if not on_host and self.moves is not None:
            index = np.array(rows, dtype=np.int64)
            return Batch(
                seq_ids,
                self.next_ids[index],
                self.past_mask[index][:, start:],
                self.moves.keep(self.past, rows, start),
                moves=self.moves,
            )
        if rows and start == 0 and consume and self.storage is not None:
            return self._compacted(rows)  # keeps the spare rows for the next join
        if rows and start == 0 and on_host and rows[-1] - rows[0] + 1 == len(rows):
            run = slice(rows[0], rows[-1] + 1)  # first-axis slices of C-contiguous arrays stay contiguous
            return Batch(
                seq_ids,
                self.next_ids[run],
                self.past_mask[run],
                {name: value[run] for name, value in self.past.items()},
                append_only=self.append_only,
                moves=self.moves,
            )
        if rows and start == 0 and on_host and consume:
            return self._compacted(rows)
        index = np.array(rows, dtype=np.int64)
        kept = Batch(
            seq_ids,
            self.next_ids[index],
            self.past_mask[index][:, start:],
            {},
            append_only=self.append_only,
            moves=self.moves,
        )
        kept.past = kept._copy_layers([self], lambda source, value: value[index, :, start : source.past_len], consume)
        return kept

    def _compacted(self, rows: list[int]) -> Batch:
        """The kept `rows` (indices) in the first len(rows) rows of this batch's own buffers: each
        kept row beyond them moves into the slot of a leaving row, so only the moved rows are
        copied, and the new batch holds first-axis views. Rows change order; this batch is spent."""
        holes, movers, order = compaction(rows)
        for value in self.past.values():
            value[holes] = value[movers]  # (moved rows, heads, capacity, dim)
        return Batch(
            [self.seq_ids[i] for i in order],
            self.next_ids[order],
            self.past_mask[order],
            {name: value[: len(rows)] for name, value in self.past.items()},
            append_only=self.append_only,
            storage=self.storage,
            moves=self.moves,
        )

    def _copy_layers(self, sources: list[Batch], block_of, consume: bool) -> dict:
        """New cache tensors for this batch, one per name, each built by `_buffer` from
        `block_of(source, host tensor)` of every source. With `consume` each source tensor is
        dropped once copied, so a join or a leave holds one layer more than the cache at its
        peak, not two caches."""
        past = {}
        spare_rows = _spare_rows(len(self)) if consume and self.append_only else 0
        storage: dict[str, np.ndarray] = {}
        if spare_rows:
            self.storage = storage
        for name in list(sources[0].past):
            past[name] = self._buffer([block_of(source, to_host(source.past[name])) for source in sources], spare_rows)
            if spare_rows:
                storage[name], past[name] = past[name], past[name][: len(self)]
            if consume:
                for source in sources:
                    del source.past[name]
                    if source.storage is not None:
                        del source.storage[name]  # the buffer the view was of
        return past

    def _buffer(self, blocks: list[np.ndarray], spare_rows: int = 0) -> np.ndarray:
        """Cache blocks (rows, heads, length, dim) stacked on the row axis, each right-aligned to
        the longest (left padding), with spare slots under `append_only` and `spare_rows` zero
        rows after them (`cache_zeros`: untouched spare pages take no memory)."""
        length = max(b.shape[2] for b in blocks)
        rows, (heads, dim) = sum(b.shape[0] for b in blocks), blocks[0].shape[1::2]
        width = _with_headroom(length) if self.append_only else length
        out = cache_zeros((rows + spare_rows, heads, width, dim), blocks[0].dtype)
        row = 0
        for block in blocks:
            out[row : row + block.shape[0], :, length - block.shape[2] : length] = block
            row += block.shape[0]
        return out

    def fork(self, seq_ids: list[int]) -> Batch:
        """Copies of this one-row batch, one per new sequence id (shared prompt prefill)."""
        if len(self) != 1:
            raise ValueError("only a one-row batch can be forked")
        n, length = len(seq_ids), self.past_len
        if self.moves is not None and not self.on_host():
            past = self.moves.repeat(self.past, n)
        else:
            past = {
                name: self._buffer(
                    [np.broadcast_to(value[:, :, :length], (n, *value.shape[1:2], length, *value.shape[3:]))]
                )
                for name, value in self.host_past().items()
            }
        return Batch(
            list(seq_ids),
            np.repeat(self.next_ids, n, axis=0),
            np.repeat(self.past_mask, n, axis=0),
            past,
            append_only=self.append_only,
            moves=self.moves,
        )

    def frozen(self) -> Batch:
        """This freshly prefilled one-row batch with a cache of its own, trimmed to `past_len`
        (host buffers may be written in place later); a cache on the device is shared as it is
        (each step's outputs are new OrtValues)."""
        if self.on_host():
            past = {name: np.array(value[:, :, : self.past_len]) for name, value in self.past.items()}
        else:
            past = dict(self.past)
        return Batch(
            list(self.seq_ids),
            self.next_ids[:, :0],
            self.past_mask.copy(),
            past,
            append_only=self.append_only,
            moves=self.moves,
        )

    def renamed(self, seq_id: int) -> Batch:
        """This one-row batch under another sequence id, sharing its cache (never written)."""
        return Batch(
            [seq_id],
            np.zeros((1, 0), dtype=np.int64),
            self.past_mask.copy(),
            dict(self.past),
            append_only=self.append_only,
            moves=self.moves,
        )

    def on_host(self) -> bool:
        """Whether the cache is numpy arrays (not OrtValues held on a device)."""
        return all(isinstance(value, np.ndarray) for value in self.past.values())

    @classmethod
    def concatenate(cls, batches: list[Batch], consume: bool = False) -> Batch:
        """One batch holding all rows; shorter caches are left-padded to the longest.
        `consume`: the caller drops the given batches (see `filter`)."""
        batches = [b for b in batches if len(b)]
        if len(batches) == 1:
            return batches[0]
        if not batches:
            raise ValueError("nothing to concatenate")
        widths = {b.next_ids.shape[1] for b in batches}
        if len(widths) != 1:
            raise ValueError("batches to concatenate must feed the same number of tokens")
        if consume and batches[0]._has_room_for(batches[1:]):
            return batches[0]._joined_in_place(batches[1:])
        moves = next((b.moves for b in batches if b.moves is not None), None)
        if moves is not None and not all(b.on_host() for b in batches):
            return cls._joined_on_device(batches, moves)
        past_len = max(b.past_len for b in batches)
        seq_ids = [s for b in batches for s in b.seq_ids]
        next_ids = np.concatenate([b.next_ids for b in batches], axis=0)
        mask = np.concatenate([_left_pad(b.past_mask, past_len, axis=1) for b in batches], axis=0)
        merged = cls(seq_ids, next_ids, mask, {}, append_only=batches[0].append_only, moves=batches[0].moves)
        merged.past = merged._copy_layers(batches, lambda source, value: value[:, :, : source.past_len], consume)
        return merged

    @classmethod
    def _joined_on_device(cls, batches: list[Batch], moves) -> Batch:
        """All rows, the cache joined on the device in one pass."""
        length = max(b.past_len for b in batches)
        past = moves.join([(b.past, b.past_len) for b in batches])
        return cls(
            [s for b in batches for s in b.seq_ids],
            np.concatenate([b.next_ids for b in batches], axis=0),
            np.concatenate([_left_pad(b.past_mask, length, axis=1) for b in batches], axis=0),
            past,
            moves=moves,
        )

    def _has_room_for(self, newcomers: list[Batch]) -> bool:
        """Whether the newcomers' rows fit this batch's spare rows and cache slots as they are."""
        if self.storage is None:
            return False
        spare = next(iter(self.storage.values())).shape[0] - len(self)
        return (
            sum(len(b) for b in newcomers) <= spare
            and all(b.past_len <= self.past_len for b in newcomers)
            and all(b.next_mask is None for b in [self, *newcomers])
        )

    def _joined_in_place(self, newcomers: list[Batch]) -> Batch:
        """This batch with the newcomers' rows written into its spare rows, each right-aligned to
        `past_len` (the columns before it are padding, masked out); this batch is spent."""
        rows, length = len(self), self.past_len
        assert self.storage is not None  # `_can_join_in_place` checked it
        for name, buffer in self.storage.items():
            row = rows
            for batch in newcomers:
                block = to_host(batch.past[name])[:, :, : batch.past_len]
                buffer[row : row + len(batch), :, length - batch.past_len : length] = block
                row += len(batch)
            for batch in newcomers:
                del batch.past[name]
        total = rows + sum(len(b) for b in newcomers)
        return Batch(
            self.seq_ids + [s for b in newcomers for s in b.seq_ids],
            np.concatenate([self.next_ids] + [b.next_ids for b in newcomers], axis=0),
            np.concatenate([self.past_mask] + [_left_pad(b.past_mask, length, axis=1) for b in newcomers]),
            {name: buffer[:total] for name, buffer in self.storage.items()},
            append_only=True,
            storage=self.storage,
        )


def compaction(rows: list[int]) -> tuple[list[int], list[int], list[int]]:
    """How the kept `rows` (ascending indices) fill the first len(rows) rows of their buffers:
    (holes: the leaving rows' places among them, movers: the kept rows beyond them, one per hole,
    order: the old index of each new row)."""
    n, kept = len(rows), set(rows)
    holes = [i for i in range(n) if i not in kept]
    movers = [i for i in rows if i >= n]
    order = list(range(n))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    return holes, movers, order


def cache_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed cache buffer in its own anonymous memory map: pages are mapped only once
    written (spare rows and slots cost nothing until used) and go back to the system as soon as
    the last view of the buffer is dropped. (np.zeros may take a recycled heap block that calloc
    clears page by page, and a freed heap block may stay with the process.)"""
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    # Private: a page that is only read (a spare slot fed masked) maps the system's zero page.
    memory = mmap.mmap(-1, count * np.dtype(dtype).itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)


def to_host(value) -> np.ndarray:
    """numpy view of a cache tensor: numpy arrays as they are, OrtValues copied to the host."""
    return value if isinstance(value, np.ndarray) else value.numpy()


def _with_headroom(length: int) -> int:
    """Slots to allocate for a cache of `length`: an eighth more (at least 16), so that a buffer
    grows (and is copied) once every ~length/8 steps."""
    return length + max(16, length // 8)


def _shared_padding(mask: np.ndarray) -> int:
    """Leading columns of a (rows, length) mask that are padding in every row."""
    real = np.flatnonzero(mask.any(axis=0))
    return int(real[0]) if real.size else mask.shape[1]


def _spare_rows(rows: int) -> int:
    """Spare rows a joined batch keeps for the next rounds: a quarter more, at least 4."""
    return max(4, rows // 4)


def _left_pad(array: np.ndarray, length: int, axis: int) -> np.ndarray:
    missing = length - array.shape[axis]
    if missing == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (missing, 0)
    return np.pad(array, widths)
