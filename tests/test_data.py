"""Reading labelled CSVs with any column names, packing token blocks."""

import csv

import pytest

from condgen.training.data import (
    DataError,
    encode_lines,
    examples_by_intent,
    load_records,
    pack_blocks,
    split_validation,
)

pytestmark = pytest.mark.fast


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_banking77_columns_are_guessed(tmp_path):
    path = write_csv(tmp_path / "b.csv", ["text", "category"], [["Hi, where is\nmy card?", "card_arrival"]])
    [record] = load_records(str(path))
    assert (record.intent, record.text) == ("card_arrival", "Hi, where is my card?")


def test_intent_text_shape_and_explicit_columns(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["intent", "text"], [["a", "x"], ["b", "y"]])
    assert [r.intent for r in load_records(str(path))] == ["a", "b"]
    other = write_csv(tmp_path / "d.csv", ["utt", "lbl"], [["x", "a"]])
    assert load_records(str(other), text_column="utt", label_column="lbl")[0].text == "x"


def test_unknown_columns_are_explained(tmp_path):
    path = write_csv(tmp_path / "e.csv", ["utt", "lbl"], [["x", "a"]])
    with pytest.raises(DataError, match="pass --label-column"):
        load_records(str(path), text_column="utt")
    with pytest.raises(DataError, match="not found"):
        load_records(str(path), text_column="nope", label_column="lbl")


def test_label_with_separator_is_rejected_with_its_row(tmp_path):
    path = write_csv(tmp_path / "f.csv", ["text", "intent"], [["ok", "a"], ["bad", "x,y"]])
    with pytest.raises(DataError, match=r"row 3: label 'x,y' contains the separator"):
        load_records(str(path))


def test_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        load_records("/nonexistent/data.csv")


def test_pack_blocks_uses_every_full_block():
    blocks = pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert pack_blocks([[1, 2]], 4) == [[1, 2]]


def test_further_passes_reshuffle_the_lines():
    lines = [[i, i, i] for i in range(1, 9)]  # 24 tokens: 6 blocks of 4 per pass
    blocks = pack_blocks(lines, 4, min_blocks=30, seed=1)
    assert len(blocks) >= 30 and all(len(b) == 4 for b in blocks)
    assert blocks[:6] == pack_blocks(lines, 4)  # the first pass keeps the given order
    assert blocks[6:12] != blocks[:6]  # later passes do not repeat it
    tokens = [t for b in blocks for t in b]
    assert sorted(set(tokens)) == list(range(1, 9))
    assert pack_blocks(lines, 4, min_blocks=30, seed=1) == blocks  # seeded: resumable


def test_grouped_packing_puts_each_intents_lines_next_to_each_other():
    lines = [[i] * 2 for i in range(12)]  # line i belongs to group "abc"[i % 3]
    groups = ["abc"[i % 3] for i in range(12)]
    blocks = pack_blocks(lines, 8, min_blocks=9, seed=3, groups=groups)  # 3 blocks per pass
    for start in range(0, 9, 3):
        stream = [t for b in blocks[start : start + 3] for t in b][::2]  # one token per line
        assert sorted(stream) == list(range(12))  # every line once per pass
        runs = [groups[line] for line in stream]
        assert sum(a != b for a, b in zip(runs, runs[1:])) == 2  # three runs: one per group
    assert blocks[:3] != blocks[3:6]  # every pass draws a new order
    assert pack_blocks(lines, 8, min_blocks=9, seed=3, groups=groups) == blocks


def test_split_and_examples(tmp_path):
    path = write_csv(tmp_path / "g.csv", ["text", "intent"], [[f"t{i}", "a" if i % 2 else "b"] for i in range(20)])
    records = load_records(str(path))
    train, held = split_validation(records, 0.1, seed=0)
    assert len(held) == 2 and len(train) == 18 and not set(held) & set(train)
    assert sorted(examples_by_intent(records)) == ["a", "b"]
    assert encode_lines(records[:1]) == ["b,t0\n"]
