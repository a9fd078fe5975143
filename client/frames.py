"""Records -> pandas DataFrame, and DataFrame -> .csv / .parquet / .jsonl by file extension."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas

COLUMNS = ["intent", "text"]
SCORE_COLUMNS = ["fidelity", "predicted_intent", "label_margin"]
LABEL_COLUMN_GUESSES = ("intent", "category", "label", "class")
WRITERS = (".csv", ".parquet", ".jsonl")


def records_to_frame(records: Iterable, with_scores: bool = False) -> pandas.DataFrame:
    """A DataFrame with columns `intent`, `text` (ready to append to a training set), and
    `fidelity`, `predicted_intent`, `label_margin` when `with_scores`."""
    import pandas as pd

    columns = COLUMNS + (SCORE_COLUMNS if with_scores else [])
    rows = [tuple(getattr(r, c) for c in columns) for r in records]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"intent": "string", "text": "string"}) if rows else frame


def read_examples_csv(path: str | Path, text_column: str = "text") -> dict[str, list[str]]:
    """Intent -> texts from a CSV with a `text` column and an `intent` (or `category`, `label`,
    `class`) column: examples to send with a request (`Client.generate(..., examples=...)`)."""
    import pandas as pd

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    label = next((c for c in LABEL_COLUMN_GUESSES if c in frame.columns), None)
    if text_column not in frame.columns or label is None:
        raise ValueError(
            f"{path}: need a `{text_column}` column and one of {', '.join(LABEL_COLUMN_GUESSES)}; "
            f"found {', '.join(frame.columns)}"
        )
    examples: dict[str, list[str]] = {}
    for intent, text in zip(frame[label], frame[text_column]):
        examples.setdefault(intent.strip(), []).append(" ".join(text.split()))
    return examples


def check_output_path(path: str | Path) -> Path:
    """Raise ValueError unless the extension is one we can write."""
    path = Path(path)
    if path.suffix.lower() not in WRITERS:
        raise ValueError(f"cannot write {path.name}: use a .csv, .parquet or .jsonl file name")
    return path


def write_frame(frame, path: str | Path) -> Path:
    """Write by extension: .csv, .parquet or .jsonl (one JSON object per line)."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return path
