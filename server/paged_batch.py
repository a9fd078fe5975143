"""`PagedBatch`: the decoding state of a batch whose KV cache is a pool of fixed-size blocks.

The OpenVINO engine (server/openvino_engine.py) runs OpenVINO's paged-attention graph: every
layer's cache is one tensor of `BLOCK_TOKENS`-token blocks, set on the infer request once and
written in place by each pass, and each row names the blocks holding its tokens (its block
table). The tables live here, on the host, so the scheduler's cache moves copy no cache:
  - filter: the leaving rows' blocks go back to the pool;
  - join (concatenate): the tables are appended;
  - fork, the prefix cache (`frozen`, `renamed`): the rows share the parent's blocks.
A shared block is never written: before a pass writes into a row's partly filled last block
that another row also holds, that block is copied (copy-on-write). Full blocks are never
written again, so they stay shared for good.

Every batch holds one reference to each block of its tables and gives them back when it is
spent (`consume`) or garbage collected. The pool is shared by the engine's thread and the
event loop (where batches are dropped), so it takes a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

BLOCK_TOKENS = 32  # OpenVINO's CPU plugin stores the paged cache in blocks of 32 tokens


class BlockPool:
    """Reference-counted blocks of the cache tensors. `grow(blocks)` (the engine's) replaces the
    tensors by larger ones holding the same blocks; it is called when no block is free."""

    def __init__(self, blocks: int, grow: Callable[[int], None], copy: Callable[[int, int], None]):
        self.size = blocks
        self.refs = np.zeros(blocks, dtype=np.int32)
        self.free = list(range(blocks - 1, -1, -1))
        self._grow = grow
        self._copy = copy
        self.lock = threading.Lock()

    @property
    def used(self) -> int:
        return self.size - len(self.free)

    def take(self) -> int:
        with self.lock:
            if not self.free:
                self._enlarge()
            block = self.free.pop()
            self.refs[block] = 1
            return block

    def _enlarge(self) -> None:
        new_size = self.size * 2
        self._grow(new_size)
        self.refs = np.concatenate([self.refs, np.zeros(new_size - self.size, dtype=np.int32)])
        self.free = list(range(new_size - 1, self.size - 1, -1))
        self.size = new_size

    def share(self, blocks: list[int]) -> None:
        with self.lock:
            for block in blocks:
                self.refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        with self.lock:
            for block in blocks:
                self.refs[block] -= 1
                if self.refs[block] == 0:
                    self.free.append(block)

    def writable(self, block: int) -> int:
        """`block` itself when only its caller holds it, else a private copy (the caller's one
        reference moves to the copy)."""
        with self.lock:
            if self.refs[block] == 1:
                return block
        copy = self.take()
        self._copy(block, copy)
        self.release([block])
        return copy


class PagedBatch:
    """Rows of sequences: per row the tokens cached (`lengths`), their block table (`tables`)
    and the tokens to feed next (`pending`). Offers the interface the scheduler and the engines
    use of `Batch` (server/batch.py)."""

    append_only = False
    moves = None  # the cache never leaves the pool

    def __init__(self, pool: BlockPool, seq_ids: list[int], lengths: list[int], tables: list[list[int]], pending):
        self.pool = pool
        self.seq_ids = list(seq_ids)
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(len(self.seq_ids))
        self.tables = tables  # this batch holds one reference to each block in them
        self.pending: list[list[int]] = [list(p) for p in pending]

    def __del__(self) -> None:
        self._give_back()

    def _give_back(self) -> None:
        tables, self.tables = getattr(self, "tables", []), []
        for table in tables:
            self.pool.release(table)

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def past_len(self) -> int:
        """The longest row's cached tokens."""
        return int(self.lengths.max()) if len(self) else 0

    def on_host(self) -> bool:
        return True

    @classmethod
    def for_prompts(cls, pool: BlockPool, seq_ids: list[int], prompts: list[list[int]]) -> PagedBatch:
        """A batch ready to prefill the prompts, with nothing cached."""
        return cls(pool, seq_ids, [0] * len(prompts), [[] for _ in prompts], prompts)

    # ---- passes ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Before a pass: every row gets the blocks its pending tokens will be written into; a
        partly filled last block that is shared is copied first."""
        for row, table in enumerate(self.tables):
            length, new = int(self.lengths[row]), len(self.pending[row])
            if not new:
                continue
            if length % BLOCK_TOKENS:
                last = length // BLOCK_TOKENS
                table[last] = self.pool.writable(table[last])
            while len(table) * BLOCK_TOKENS < length + new:
                table.append(self.pool.take())

    def advance(self, present=None) -> None:
        """The pass wrote the pending tokens' entries: they become cache."""
        self.lengths = self.lengths + np.array([len(p) for p in self.pending], dtype=np.int64)
        self.pending = [[] for _ in self.seq_ids]

    def set_next(self, tokens) -> None:
        """Tokens (one per row) to feed at the next step."""
        self.pending = [[int(t)] for t in tokens]

    def set_next_rows(self, rows: list[list[int]]) -> None:
        """Several tokens per row to feed next."""
        self.pending = [list(map(int, tokens)) for tokens in rows]

    # ---- rows in and out ------------------------------------------------------------------
    def _rows(self, rows: list[int], seq_ids: list[int] | None = None, transfer: bool = False) -> PagedBatch:
        """A batch of `rows`: it takes over this batch's references (`transfer`, this batch is
        spent) or holds new ones."""
        tables = [list(self.tables[i]) for i in rows]
        if transfer:
            keep = set(rows)
            for row, table in enumerate(self.tables):
                if row not in keep:
                    self.pool.release(table)
            self.tables = []
        else:
            for table in tables:
                self.pool.share(table)
        return PagedBatch(
            self.pool,
            [self.seq_ids[i] for i in rows] if seq_ids is None else seq_ids,
            [int(self.lengths[i]) for i in rows],
            tables,
            [self.pending[i] for i in rows],
        )

    def filter(self, keep_ids: list[int], consume: bool = False) -> PagedBatch:
        """The rows whose sequence id is in `keep_ids` (in batch order). `consume`: this batch is
        spent and the leaving rows' blocks go back to the pool; else the rows share them."""
        keep_set = set(keep_ids)
        rows = [i for i, seq in enumerate(self.seq_ids) if seq in keep_set]
        if len(rows) == len(self):
            return self
        return self._rows(rows, transfer=consume)

    def fork(self, seq_ids: list[int]) -> PagedBatch:
        """Rows that share this one-row batch's blocks, one per new sequence id."""
        if len(self) != 1:
            raise ValueError("only a one-row batch can be forked")
        for _ in seq_ids:
            self.pool.share(self.tables[0])
        return PagedBatch(
            self.pool,
            seq_ids,
            [int(self.lengths[0])] * len(seq_ids),
            [list(self.tables[0]) for _ in seq_ids],
            [self.pending[0] for _ in seq_ids],
        )

    def frozen(self) -> PagedBatch:
        """This one-row batch for the prefix cache: it shares the blocks, which copy-on-write
        keeps as they are."""
        return self._rows([0])

    def renamed(self, seq_id: int) -> PagedBatch:
        """This one-row batch under another sequence id, sharing its blocks."""
        return self._rows([0], seq_ids=[seq_id])

    @classmethod
    def concatenate(cls, batches: list[PagedBatch], consume: bool = False) -> PagedBatch:
        """One batch holding all rows. `consume`: the given batches are spent, their references
        move; else the new batch holds references of its own."""
        batches = [b for b in batches if len(b)]
        if not batches:
            raise ValueError("nothing to concatenate")
        if len(batches) == 1:
            return batches[0]
        tables = [list(t) for b in batches for t in b.tables]
        if consume:
            for batch in batches:
                batch.tables = []
        else:
            for table in tables:
                batches[0].pool.share(table)
        return PagedBatch(
            batches[0].pool,
            [s for b in batches for s in b.seq_ids],
            [int(n) for b in batches for n in b.lengths],
            tables,
            [p for b in batches for p in b.pending],
        )
