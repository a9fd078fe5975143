"""RaggedBatch bookkeeping: right-padded rows, written in place, joined, left, forked."""

import numpy as np
import pytest

from condgen.server.ragged_batch import RaggedBatch

pytestmark = pytest.mark.fast

NAMES = ["past_key_values.0.key", "past_key_values.0.value"]


def fake_forward(batch: RaggedBatch) -> None:
    """What the ragged graph does: each row's fed tokens (as markers) written into its buffer
    right after its own cached tokens, in place."""
    feed = batch.feed()
    ids, mask = feed["input_ids"], feed["attention_mask"]
    for row in range(len(batch)):
        start = int(batch.lengths[row])
        for name in NAMES:
            feed[name][row, :, start : start + ids.shape[1]] = ids[row, None, :, None]
        assert mask[row].sum() == start + batch.next_lengths[row]  # the graph's lengths
    batch.advance()


def prompts(seq_ids, rows) -> RaggedBatch:
    batch = RaggedBatch.for_prompts(seq_ids, rows, NAMES, kv_heads=2, head_dim=3, dtype=np.float32)
    fake_forward(batch)
    return batch


def tokens(batch: RaggedBatch) -> list[list[int]]:
    """Each row's cached markers, from its first `lengths[row]` slots."""
    key = batch.past[NAMES[0]]
    return [[int(v) for v in key[row, 0, : batch.lengths[row], 0]] for row in range(len(batch))]


def test_prompts_are_right_padded_and_the_mask_counts_each_rows_tokens():
    batch = RaggedBatch.for_prompts([1, 2], [[5, 6, 7], [8]], NAMES, 2, 3, np.float32)
    feed = batch.feed()
    assert feed["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert feed["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    fake_forward(batch)
    assert tokens(batch) == [[5, 6, 7], [8]] and batch.past_len == 3
    batch.set_next([9, 10])
    feed = batch.feed()
    assert feed["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert feed["position_ids"].tolist() == [[3], [1]]
    fake_forward(batch)
    assert tokens(batch) == [[5, 6, 7, 9], [8, 10]]


def test_a_full_buffer_grows_and_keeps_every_rows_tokens():
    batch = prompts([1, 2], [[5, 6], [7]])
    start = batch.capacity
    for step in range(start):
        batch.set_next([20 + step, 40 + step])
        fake_forward(batch)
    assert batch.capacity > start
    assert tokens(batch) == [[5, 6, *range(20, 20 + start)], [7, *range(40, 40 + start)]]


def test_consuming_join_and_leave_reuse_the_buffers():
    sources = [prompts([1], [[5, 6, 7]]), prompts([2], [[8]])]
    running = RaggedBatch.concatenate(sources, consume=True)
    assert running.spare_rows >= 4 and tokens(running) == [[5, 6, 7], [8]]
    assert all(source.storage == {} for source in sources)  # released layer by layer as copied
    buffer = running.storage[NAMES[0]]
    newcomer = prompts([3], [[9, 9]])
    joined = RaggedBatch.concatenate([running, newcomer], consume=True)
    assert joined.storage[NAMES[0]] is buffer and newcomer.storage == {}  # written into a spare row
    assert joined.seq_ids == [1, 2, 3] and tokens(joined) == [[5, 6, 7], [8], [9, 9]]
    left = joined.filter([3, 2], consume=True)  # row 3 moves into the place of row 1
    assert left.storage[NAMES[0]] is buffer and sorted(left.seq_ids) == [2, 3]
    assert dict(zip(left.seq_ids, tokens(left))) == {2: [8], 3: [9, 9]}
    left.set_next([10 * seq for seq in left.seq_ids])
    fake_forward(left)
    assert dict(zip(left.seq_ids, tokens(left))) == {2: [8, 20], 3: [9, 9, 30]}


def test_a_copying_filter_and_a_fork_own_their_buffers():
    batch = prompts([1, 2], [[5, 6], [7, 8, 9]])
    kept = batch.filter([2])
    assert kept.seq_ids == [2] and tokens(kept) == [[7, 8, 9]]
    assert not np.shares_memory(kept.storage[NAMES[0]], batch.storage[NAMES[0]])
    forked = kept.fork([4, 5, 6])
    assert tokens(forked) == [[7, 8, 9]] * 3
    forked.set_next([1, 2, 3])
    fake_forward(forked)
    assert tokens(forked) == [[7, 8, 9, 1], [7, 8, 9, 2], [7, 8, 9, 3]] and tokens(kept) == [[7, 8, 9]]


def test_frozen_copies_are_never_written_through_their_renamed_batches():
    prefill = prompts([1], [[5, 6]])
    frozen = prefill.frozen()
    looked_up = frozen.renamed(7)
    assert looked_up.seq_ids == [7] and tokens(looked_up) == [[5, 6]]
    forked = looked_up.fork([8, 9])
    forked.set_next([1, 2])
    fake_forward(forked)
    assert tokens(frozen) == [[5, 6]]


def test_several_tokens_after_a_cache_go_to_one_row_only():
    batch = prompts([1, 2], [[5], [6]])
    batch.set_next_rows([[1, 2], [3]])
    with pytest.raises(ValueError, match="one row"):
        batch.feed()
    alone = prompts([3], [[5]])
    alone.set_next_rows([[1, 2]])
    fake_forward(alone)
    assert tokens(alone) == [[5, 1, 2]]
