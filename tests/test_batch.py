"""Batch bookkeeping: feed, advance, filter, fork and concatenate keep rows aligned."""

import numpy as np
import pytest

from condgen.server.batch import Batch

pytestmark = pytest.mark.fast

NAMES = ["past_key_values.0.key", "past_key_values.0.value"]


def fake_forward(batch: Batch) -> None:
    """Append one cache column per fed token whose value is the token id (as a marker)."""
    feed = batch.feed()
    ids = feed["input_ids"]
    present = {}
    for name in NAMES:
        new = np.broadcast_to(ids[:, None, :, None], (len(batch), 2, ids.shape[1], 3)).astype(np.float32)
        present[name] = np.concatenate([batch.past[name], new], axis=2)
    batch.advance(present)


def prompt_batch(seq_id, tokens):
    batch = Batch.for_prompts([seq_id], [tokens], NAMES, kv_heads=2, head_dim=3)
    fake_forward(batch)
    return batch


def test_prefill_feed_and_positions():
    batch = Batch.for_prompts([0], [[5, 6, 7]], NAMES, kv_heads=2, head_dim=3)
    feed = batch.feed()
    assert feed["attention_mask"].tolist() == [[1, 1, 1]]
    assert feed["position_ids"].tolist() == [[0, 1, 2]]
    assert feed[NAMES[0]].shape == (1, 2, 0, 3)


def test_concatenate_left_pads_and_keeps_positions():
    short, long = prompt_batch(1, [5, 6]), prompt_batch(2, [7, 8, 9, 10])
    short.set_next([11])
    long.set_next([12])
    merged = Batch.concatenate([short, long])
    assert merged.seq_ids == [1, 2] and merged.past_len == 4
    assert merged.past_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert merged.past[NAMES[0]][0, 0, :, 0].tolist() == [0, 0, 5, 6]
    feed = merged.feed()
    assert feed["position_ids"].tolist() == [[2], [4]]
    assert feed["attention_mask"].shape == (2, 5)


def test_filter_keeps_rows_and_trims_shared_padding():
    short, long = prompt_batch(1, [5, 6]), prompt_batch(2, [7, 8, 9, 10])
    for b, t in ((short, 11), (long, 12)):
        b.set_next([t])
    merged = Batch.concatenate([short, long])
    fake_forward(merged)
    kept = merged.filter([1])
    assert kept.seq_ids == [1]
    assert kept.past_mask.tolist() == [[1, 1, 1]]  # the two padding columns are gone
    assert kept.past[NAMES[1]][0, 0, :, 0].tolist() == [5, 6, 11]
    assert len(merged.filter([])) == 0
    assert merged.filter([1, 2]) is merged


def test_fork_copies_the_prefill():
    forked = prompt_batch(1, [5, 6, 7]).fork([10, 11, 12])
    assert forked.seq_ids == [10, 11, 12]
    assert forked.past[NAMES[0]].shape == (3, 2, 3, 3)
    assert np.array_equal(forked.past[NAMES[0]][0], forked.past[NAMES[0]][2])
    with pytest.raises(ValueError):
        forked.fork([1])


def test_concatenate_refuses_mixed_widths():
    a = Batch.for_prompts([1], [[1, 2]], NAMES, 2, 3)
    b = prompt_batch(2, [3])
    b.set_next([4])
    with pytest.raises(ValueError):
        Batch.concatenate([a, b])


def test_batched_prefill_is_left_padded_and_masked():
    batch = Batch.for_prompts([1, 2], [[5, 6], [7, 8, 9]], NAMES, kv_heads=2, head_dim=3)
    feed = batch.feed()
    assert feed["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert feed["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert feed["position_ids"].tolist() == [[0, 0, 1], [0, 1, 2]]
    fake_forward(batch)
    assert batch.next_mask is None and batch.past_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    alone = batch.filter([1])
    assert alone.past_mask.tolist() == [[1, 1]] and alone.past[NAMES[0]][0, 0, :, 0].tolist() == [5, 6]


def test_filter_of_a_contiguous_run_shares_the_cache():
    rows = [prompt_batch(i, [5, 6, 7]) for i in (1, 2, 3, 4)]
    for b in rows:
        b.set_next([9])
    merged = Batch.concatenate(rows)
    fake_forward(merged)
    middle = merged.filter([2, 3])
    assert middle.seq_ids == [2, 3]
    assert all(np.shares_memory(middle.past[n], merged.past[n]) for n in NAMES)  # a view, not a copy
    assert middle.past[NAMES[0]].flags["C_CONTIGUOUS"]
    assert np.array_equal(middle.feed()["attention_mask"], merged.feed()["attention_mask"][1:3])
    scattered = merged.filter([1, 4])
    assert not np.shares_memory(scattered.past[NAMES[0]], merged.past[NAMES[0]])
    assert scattered.past[NAMES[0]][:, 0, :, 0].tolist() == merged.past[NAMES[0]][[0, 3], 0, :, 0].tolist()


# ---- append-only cache: the pass returns only the new entries, written in place -----------
def fake_forward_append(batch: Batch) -> None:
    """Like fake_forward, for an append-only graph: present holds the fed tokens' entries only."""
    ids = batch.feed()["input_ids"]
    new = np.broadcast_to(ids[:, None, :, None], (len(batch), 2, ids.shape[1], 3)).astype(np.float32)
    batch.advance({name: new for name in NAMES})


def append_prompt(seq_id, tokens):
    batch = Batch.for_prompts([seq_id], [tokens], NAMES, kv_heads=2, head_dim=3, append_only=True)
    fake_forward_append(batch)
    return batch


def markers(batch: Batch, row: int = 0) -> list[float]:
    """The cache's marker values of a row over its valid slots."""
    return batch.past[NAMES[0]][row, 0, : batch.past_len, 0].tolist()


def test_append_only_cache_keeps_spare_slots_masked_and_writes_in_place():
    batch = append_prompt(1, [5, 6, 7])
    assert batch.past_len == 3 and batch.capacity > 3  # spare slots after the prefill
    buffer = batch.past[NAMES[0]]
    batch.set_next([8])
    feed = batch.feed()
    spare = batch.capacity - 3
    assert feed["attention_mask"].tolist() == [[1, 1, 1] + [0] * spare + [1]]
    assert feed["position_ids"].tolist() == [[3]]
    assert feed[NAMES[0]].shape[2] == batch.capacity  # the whole buffer, spare slots included
    fake_forward_append(batch)
    assert batch.past[NAMES[0]] is buffer  # written in place, no copy
    assert markers(batch) == [5, 6, 7, 8]


def test_append_only_cache_grows_when_full():
    batch = append_prompt(1, [5])
    for token in range(10, 10 + batch.capacity):  # more steps than spare slots
        batch.set_next([token])
        fake_forward_append(batch)
    assert batch.capacity > batch.past_len
    assert markers(batch) == [5, *range(10, 10 + batch.past_len - 1)]
    batch.set_next([99])
    assert batch.feed()["position_ids"].tolist() == [[batch.past_len]]


def test_append_only_concatenate_filter_and_fork_keep_the_valid_slots():
    short, long = append_prompt(1, [5, 6]), append_prompt(2, [7, 8, 9, 10])
    short.set_next([11])
    long.set_next([12])
    merged = Batch.concatenate([short, long])
    assert merged.append_only and merged.capacity > merged.past_len == 4
    assert merged.past_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert markers(merged, 0) == [0, 0, 5, 6] and markers(merged, 1) == [7, 8, 9, 10]
    fake_forward_append(merged)
    assert markers(merged, 0) == [0, 0, 5, 6, 11] and markers(merged, 1) == [7, 8, 9, 10, 12]
    kept = merged.filter([1])  # the shared padding is trimmed
    assert kept.append_only and kept.past_mask.tolist() == [[1, 1, 1]] and markers(kept) == [5, 6, 11]
    kept.set_next([13])
    fake_forward_append(kept)
    assert markers(kept) == [5, 6, 11, 13] and markers(merged, 1) == [7, 8, 9, 10, 12]
    forked = append_prompt(3, [5, 6, 7]).fork([10, 11])
    assert forked.append_only and forked.capacity > forked.past_len == 3
    assert markers(forked, 0) == markers(forked, 1) == [5, 6, 7]


def test_consuming_joins_and_leaves_release_the_old_cache():
    short, long = append_prompt(1, [5, 6]), append_prompt(2, [7, 8, 9, 10])
    short.set_next([11])
    long.set_next([12])
    merged = Batch.concatenate([short, long], consume=True)
    assert short.past == {} and long.past == {}  # released as the merged cache was built
    assert markers(merged, 0) == [0, 0, 5, 6] and markers(merged, 1) == [7, 8, 9, 10]
    fake_forward_append(merged)
    kept = merged.filter([1], consume=True)  # a copy (the padding is trimmed): the source is released
    assert merged.past == {} and markers(kept) == [5, 6, 11]


def test_consuming_leave_moves_only_the_rows_past_the_kept_prefix():
    rows = [append_prompt(i, [5 + i, 6 + i, 7 + i]) for i in range(5)]
    for b in rows:
        b.set_next([20 + b.seq_ids[0]])
    merged = Batch.concatenate(rows)
    fake_forward_append(merged)
    buffers = {n: merged.past[n] for n in NAMES}
    kept = merged.filter([0, 2, 4], consume=True)  # rows 1 and 3 leave; row 4 moves into slot 1
    assert sorted(kept.seq_ids) == [0, 2, 4] and len(kept) == 3
    assert all(np.shares_memory(kept.past[n], buffers[n]) for n in NAMES)  # compacted in place
    for row, seq in enumerate(kept.seq_ids):
        assert markers(kept, row) == [5 + seq, 6 + seq, 7 + seq, 20 + seq]
    kept.set_next([9, 9, 9])
    fake_forward_append(kept)
    assert markers(kept, 1)[-1] == 9


def test_consuming_leave_compacts_a_whole_cache_batch_too():
    rows = [prompt_batch(i, [5 + i, 6 + i]) for i in range(4)]
    for b in rows:
        b.set_next([20 + b.seq_ids[0]])
    merged = Batch.concatenate(rows)
    fake_forward(merged)
    kept = merged.filter([1, 3], consume=True)
    assert sorted(kept.seq_ids) == [1, 3] and not kept.append_only
    for row, seq in enumerate(kept.seq_ids):
        assert kept.past[NAMES[0]][row, 0, :, 0].tolist() == [5 + seq, 6 + seq, 20 + seq]
        assert kept.past_mask[row].tolist() == [1, 1, 1]


def valid_markers(batch: Batch) -> list[list[float]]:
    """Each row's markers at its real (unmasked) slots, in batch order."""
    return [[m for m, real in zip(markers(batch, row), batch.past_mask[row]) if real] for row in range(len(batch))]


def test_consuming_join_writes_newcomers_into_spare_rows():
    first, second = append_prompt(1, [5, 6, 7, 8]), append_prompt(2, [9, 10, 11])
    first.set_next([12])
    second.set_next([13])
    merged = Batch.concatenate([first, second], consume=True)
    assert merged.storage is not None and merged.storage[NAMES[0]].shape[0] >= len(merged) + 2  # spare rows
    fake_forward_append(merged)
    merged.set_next([14, 15])
    late, later = append_prompt(3, [20, 21]), append_prompt(4, [30, 31, 32])
    late.set_next([22])
    later.set_next([33])
    expected = Batch.concatenate([merged, late, later])  # the copying join, for comparison
    joined = Batch.concatenate([merged, late, later], consume=True)
    assert all(np.shares_memory(joined.past[n], merged.storage[n]) for n in NAMES)  # no copy of the batch
    assert late.past == {} and later.past == {}
    assert joined.seq_ids == expected.seq_ids == [1, 2, 3, 4]
    assert joined.past_mask.tolist() == expected.past_mask.tolist()
    assert (
        valid_markers(joined) == valid_markers(expected) == [[5, 6, 7, 8, 12], [9, 10, 11, 13], [20, 21], [30, 31, 32]]
    )
    assert joined.feed()["position_ids"].tolist() == expected.feed()["position_ids"].tolist()
    fake_forward_append(joined)
    assert valid_markers(joined)[2] == [20, 21, 22]


def test_consuming_join_copies_when_a_newcomer_is_longer_or_rows_run_out():
    first, second = append_prompt(1, [5]), append_prompt(2, [6])
    first.set_next([7])
    second.set_next([8])
    merged = Batch.concatenate([first, second], consume=True)
    long = append_prompt(3, [9, 10, 11, 12])  # longer than the batch's past: the batch is copied
    long.set_next([13])
    storage = dict(merged.storage)
    joined = Batch.concatenate([merged, long], consume=True)
    assert not np.shares_memory(joined.past[NAMES[0]], storage[NAMES[0]])
    assert merged.storage == {} and merged.past == {}  # the old buffers are released as they are copied
    assert valid_markers(joined) == [[5], [6], [9, 10, 11, 12]]
    many = [append_prompt(10 + i, [40 + i]) for i in range(joined.storage[NAMES[0]].shape[0])]
    for b in many:
        b.set_next([0])
    crowded = Batch.concatenate([joined] + many, consume=True)  # more rows than spare ones
    assert len(crowded) == 3 + len(many) and valid_markers(crowded)[3:] == [[40 + i] for i in range(len(many))]


def test_consuming_leave_keeps_the_spare_rows_for_the_next_join():
    rows = [append_prompt(i, [5 + i, 6 + i]) for i in range(4)]
    for b in rows:
        b.set_next([20 + b.seq_ids[0]])
    merged = Batch.concatenate(rows, consume=True)
    fake_forward_append(merged)
    storage = merged.storage
    kept = merged.filter([0, 3], consume=True)
    assert kept.storage is storage
    kept.set_next([1, 1])
    newcomer = append_prompt(9, [50])
    newcomer.set_next([51])
    joined = Batch.concatenate([kept, newcomer], consume=True)
    assert all(np.shares_memory(joined.past[n], storage[n]) for n in NAMES)
    assert sorted(map(tuple, valid_markers(joined))) == [(5, 6, 20), (8, 9, 23), (50,)]


def test_a_regrown_cache_drops_the_padding_columns_every_row_shares():
    short, long = append_prompt(1, [5, 6, 7, 8]), append_prompt(2, [9, 10, 11, 12, 13])
    short.set_next([20])
    long.set_next([30])
    merged = Batch.concatenate([short, long], consume=True)
    fake_forward_append(merged)
    alone = merged.filter([1], consume=True)  # one shared padding column: too few to trim by copying
    assert alone.past_mask.tolist() == [[0, 1, 1, 1, 1, 1]]
    token = 40
    while alone.past_len < alone.capacity:  # fill the spare slots, then grow
        alone.set_next([token])
        fake_forward_append(alone)
        token += 1
    alone.set_next([token])
    fake_forward_append(alone)  # regrown: the padding column is gone
    assert alone.past_mask.all() and alone.capacity > alone.past_len
    assert markers(alone) == [5, 6, 7, 8, 20, *range(40, token + 1)]
    alone.set_next([0])
    assert alone.feed()["position_ids"].tolist() == [[len(markers(alone))]]  # positions count real tokens


def test_cache_buffers_are_zeroed_writable_and_contiguous():
    from condgen.server.batch import cache_zeros

    buffer = cache_zeros((3, 2, 5, 4), np.float16)
    assert buffer.shape == (3, 2, 5, 4) and buffer.dtype == np.float16 and buffer.flags["C_CONTIGUOUS"]
    assert not buffer.any()
    buffer[1:, :, 2] = 7
    assert buffer.sum() == 7 * 2 * 2 * 4
    assert cache_zeros((2, 2, 0, 4), np.float32).shape == (2, 2, 0, 4)


def test_a_kept_prefill_keeps_its_padding_masked():
    """A prompt prefilled beside a longer one keeps left padding in its cache: the prefix cache
    (and the scoring context cache) must give it back with that padding still masked out."""
    from condgen.server.prefix_cache import PrefixCache

    prompt = [5, 6, 7, 8, 9, 10, 11]
    pair = Batch.for_prompts([0, 1], [prompt, [1, *prompt]], NAMES, kv_heads=2, head_dim=3)
    fake_forward(pair)
    short = pair.filter([0])
    assert short.past_mask.tolist() == [[0, 1, 1, 1, 1, 1, 1, 1]]  # one column of padding: not worth trimming
    cache = PrefixCache(max_tokens=100)
    cache.store(prompt, short, np.zeros(4))
    again, _ = cache.lookup(prompt, seq_id=7)
    assert again.past_mask.tolist() == short.past_mask.tolist()
    assert again.feed()["position_ids"].tolist() == short.feed()["position_ids"].tolist()
    assert cache.tokens == short.past_len
