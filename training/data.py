"""Labelled data in: CSV files (any label/text column names), `hf:NAME` datasets, and the
.parquet / .jsonl files `condgen generate` writes.

Rows become `condgen.codec.LabelledText` records; `pack_blocks` turns their encoded lines
into fixed-size token blocks for causal-LM training (no padding wasted on short lines).
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from condgen.codec import CodecError, LabelledText, check_label, fold_text, training_line
from condgen.errors import CondgenError

LABEL_COLUMN_GUESSES = ("intent", "category", "label", "class")
TEXT_COLUMN_GUESSES = ("text", "utterance", "sentence", "query")


class DataError(CondgenError, ValueError):
    """Training data that cannot be read or used; the message says how to fix it."""


def _pick_column(available: Sequence[str], wanted: str | None, guesses: Sequence[str], role: str) -> str:
    if wanted is not None:
        if wanted not in available:
            raise DataError(f"{role} column {wanted!r} not found; the data has columns {list(available)}")
        return wanted
    for guess in guesses:
        if guess in available:
            return guess
    raise DataError(
        f"cannot tell which column holds the {role}; the data has columns {list(available)}: pass --{role}-column"
    )


def _to_records(
    rows: Iterable[dict], text_column: str, label_column: str, separator: str, entities: list | None = None
) -> list[LabelledText]:
    """Rows as records (rows with an empty text are dropped). `entities`, when given, receives
    each kept row's `entity` value (the key `_entity` of the row), in the records' order."""
    records = []
    for number, row in enumerate(rows, start=2):
        label, text = row.get(label_column), row.get(text_column)
        if label is None or text is None:
            raise DataError(f"row {number}: missing {label_column!r} or {text_column!r} value")
        try:
            intent = check_label(str(label), separator)
        except CodecError as exc:
            raise DataError(f"row {number}: {exc}") from exc
        folded = fold_text(str(text))
        if folded:
            records.append(LabelledText(intent, folded))
            if entities is not None:
                entities.append(row["_entity"])
    if not records:
        raise DataError("the data holds no records with a non-empty text")
    return records


def read_csv_records(
    path: str | Path, text_column: str | None = None, label_column: str | None = None, separator: str = ","
) -> list[LabelledText]:
    """Read a CSV with a header row; columns are guessed when not given."""
    return _read_csv(path, text_column, label_column, separator)[0]


def _read_csv(
    path: str | Path,
    text_column: str | None,
    label_column: str | None,
    separator: str,
    entity_column: str | None = None,
) -> tuple[list[LabelledText], list[str]]:
    """The CSV's records and, with `entity_column`, each record's entity (else an empty list)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        text_col = _pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text")
        label_col = _pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label")
        if entity_column is None:
            return _to_records(reader, text_col, label_col, separator), []
        if entity_column not in columns:
            raise DataError(f"entity column {entity_column!r} not found; the data has columns {list(columns)}")
        rows = ({**row, "_entity": _entity_of(row, entity_column, number)} for number, row in enumerate(reader, 2))
        entities: list[str] = []
        return _to_records(rows, text_col, label_col, separator, entities), entities


def read_table_records(
    path: str | Path, text_column: str | None = None, label_column: str | None = None
) -> list[LabelledText]:
    """Records from what `condgen generate` writes: .csv, .parquet or .jsonl (columns guessed)."""
    path = Path(path)
    if path.suffix.lower() not in (".parquet", ".jsonl"):
        return read_csv_records(path, text_column, label_column)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    import pandas

    try:
        frame = pandas.read_parquet(path) if path.suffix.lower() == ".parquet" else pandas.read_json(path, lines=True)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    columns = [str(c) for c in frame.columns]
    text_col = _pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text")
    label_col = _pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label")
    return _to_records(frame[[text_col, label_col]].astype(str).to_dict("records"), text_col, label_col, ",")


def read_hf_records(
    name: str,
    text_column: str | None = None,
    label_column: str | None = None,
    separator: str = ",",
    split: str = "train",
) -> list[LabelledText]:
    """Read a Hugging Face dataset (`hf:PolyAI/banking77`); needs `datasets` and a reachable hub."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError("hf: data sources need the `datasets` package: pip install 'condgen[datasets]'") from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, missing dataset: say which
        raise DataError(f"cannot load dataset {name!r} split {split!r}: {exc}") from exc
    columns = list(dataset.column_names)
    text_col = _pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text")
    label_col = _pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label")
    feature = dataset.features[label_col]
    to_name: Callable = feature.int2str if hasattr(feature, "int2str") else str
    rows = ({text_col: row[text_col], label_col: to_name(row[label_col])} for row in dataset)
    return _to_records(rows, text_col, label_col, separator)


def load_records(
    source: str,
    text_column: str | None = None,
    label_column: str | None = None,
    separator: str = ",",
    split: str = "train",
) -> list[LabelledText]:
    """Records from a CSV path or an `hf:NAME` dataset id."""
    if source.startswith("hf:"):
        return read_hf_records(source[3:], text_column, label_column, separator, split)
    return read_csv_records(source, text_column, label_column, separator)


def read_csv_units(
    path: str | Path,
    entity_column: str,
    text_column: str | None = None,
    label_column: str | None = None,
    separator: str = ",",
) -> list[list[LabelledText]]:
    """The records of a CSV grouped by the value of `entity_column`: one list per entity (the
    unit of privacy of DP training), entities and their rows in data order."""
    records, entities = _read_csv(path, text_column, label_column, separator, entity_column)
    grouped: dict[str, list[LabelledText]] = {}
    for entity, record in zip(entities, records, strict=True):
        grouped.setdefault(entity, []).append(record)
    return list(grouped.values())


def _entity_of(row: dict, column: str, number: int) -> str:
    """A row's entity, spaces trimmed (" Bob" and "Bob" are one person); a row without one is refused."""
    entity = (row.get(column) or "").strip()
    if not entity:
        raise DataError(f"row {number}: no value in the entity column {column!r}; every row needs its entity")
    return entity


def split_validation(records: Sequence[LabelledText], fraction: float, seed: int):
    """Shuffle and hold out `fraction` of the records (at least one when fraction > 0)."""
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    held = 0 if fraction <= 0 else max(1, int(round(len(shuffled) * fraction)))
    held = min(held, len(shuffled) - 1)
    return shuffled[held:], shuffled[:held]


def examples_by_intent(records: Iterable[LabelledText]) -> dict[str, list[str]]:
    """Texts per intent, in data order, without repeats: the prompt material of a bundle."""
    grouped: dict[str, list[str]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for record in records:
        if (record.intent, record.text) not in seen:
            seen.add((record.intent, record.text))
            grouped[record.intent].append(record.text)
    return dict(sorted(grouped.items()))


def intent_counts(records: Iterable[LabelledText]) -> dict[str, int]:
    return dict(sorted(Counter(r.intent for r in records).items()))


def encode_lines(records: Iterable[LabelledText], separator: str = ",") -> list[str]:
    """Each record as one newline-terminated training line."""
    return [training_line(r.intent, r.text, separator) for r in records]


def pack_blocks(
    token_lists: Sequence[Sequence[int]],
    block_size: int,
    min_blocks: int = 0,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> list[list[int]]:
    """Concatenate tokenised lines and cut them into full blocks of `block_size` tokens.

    One pass packs the lines in their given order. When `min_blocks` asks for more blocks
    than one pass gives, further passes pack the lines in a fresh shuffled order (seeded),
    so that repeated epochs see every line in new neighbourhoods and at new offsets instead
    of the same block over and over. A pass's tail shorter than a block is carried over
    into the next pass; with a single short pass, that tail is the only block.

    `groups` (one key per line, e.g. its intent): every pass, the first included, packs each
    group's lines next to each other (groups and the lines within them in a seeded random order),
    so that a block reads like a generation prompt: several lines of one intent in a row.
    """
    order = list(range(len(token_lists)))
    rng = random.Random(seed)
    blocks: list[list[int]] = []
    stream: list[int] = []
    passes = 0
    while passes == 0 or len(blocks) < min_blocks:
        if groups is not None:
            order = _grouped_order(groups, rng)
        elif passes:
            rng.shuffle(order)
        stream.extend(t for i in order for t in token_lists[i])
        cut = len(stream) - len(stream) % block_size
        blocks.extend(stream[i : i + block_size] for i in range(0, cut, block_size))
        stream = stream[cut:]
        passes += 1
        if not blocks and passes > 1:
            break
    if not blocks and stream:
        blocks = [stream]
    return blocks


def _grouped_order(groups: Sequence[str], rng: random.Random) -> list[int]:
    """Line indices with each group's lines next to each other, groups and lines shuffled."""
    members: dict[str, list[int]] = defaultdict(list)
    for index, key in enumerate(groups):
        members[key].append(index)
    keys = sorted(members)
    rng.shuffle(keys)
    order = []
    for key in keys:
        lines = members[key]
        rng.shuffle(lines)
        order.extend(lines)
    return order
