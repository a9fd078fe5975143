"""The record codec: one labelled record <-> one `intent<sep>text` line.

Training writes lines with `encode_line` / `training_line`, the server prompts the model with
`prompt_text` (examples, then `intent,`) and parses generated lines with `decode_line`, and the
client gets records already split: the format lives here alone. Texts keep their commas (only
the first separator splits a line); embedded newlines and runs of whitespace are folded
to single spaces; a label that contains the separator or a line break is rejected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from condgen.errors import CondgenError

DEFAULT_SEPARATOR = ","
_WHITESPACE = re.compile(r"\s+")


class CodecError(CondgenError, ValueError):
    """A record that cannot be written as, or read from, one line."""


@dataclass(frozen=True)
class LabelledText:
    """One record: its intent (label) and its text."""

    intent: str
    text: str


def fold_text(text: str) -> str:
    """Collapse newlines, tabs and repeated spaces into single spaces; trim the ends."""
    return _WHITESPACE.sub(" ", text).strip()


def check_label(label: str, separator: str = DEFAULT_SEPARATOR) -> str:
    """Return the trimmed label, or raise CodecError saying why it cannot be encoded."""
    cleaned = label.strip()
    if not cleaned:
        raise CodecError("empty label: every record needs an intent")
    if separator in cleaned:
        raise CodecError(
            f"label {label!r} contains the separator {separator!r}; rename the label or choose another separator"
        )
    if "\n" in cleaned or "\r" in cleaned:
        raise CodecError(f"label {label!r} contains a line break; labels must be one line")
    return cleaned


def encode_line(intent: str, text: str, separator: str = DEFAULT_SEPARATOR) -> str:
    """Encode one record as a single line without the trailing newline."""
    return f"{check_label(intent, separator)}{separator}{fold_text(text)}"


def decode_line(line: str, separator: str = DEFAULT_SEPARATOR) -> LabelledText:
    """Split a line at its first separator into intent and text.

    Raises CodecError when the line has no separator or an empty intent. The text may be
    empty; callers decide whether that is acceptable.
    """
    stripped = line.strip()
    intent, found, text = stripped.partition(separator)
    if not found:
        raise CodecError(f"no {separator!r} separator in line {stripped[:80]!r}")
    intent = intent.strip()
    if not intent:
        raise CodecError(f"empty intent in line {stripped[:80]!r}")
    return LabelledText(intent=intent, text=fold_text(text))


def training_line(intent: str, text: str, separator: str = DEFAULT_SEPARATOR) -> str:
    """One record as the model reads and writes it: its line and the line break that ends it."""
    return encode_line(intent, text, separator) + "\n"


def encode_records(records, separator: str = DEFAULT_SEPARATOR) -> str:
    """Encode (intent, text) pairs as newline-terminated lines, ready for a language model."""
    return "".join(training_line(intent, text, separator) for intent, text in records)


def line_prefix(intent: str, separator: str = DEFAULT_SEPARATOR) -> str:
    """The start of every line the model writes for `intent`."""
    return f"{intent}{separator}"


def prompt_text(intent: str, texts, separator: str = DEFAULT_SEPARATOR) -> str:
    """The prompt format shared by serving, the label check and export's parity check: the
    examples of one intent as training lines, then the open line `intent,` to continue."""
    return "".join(training_line(intent, text, separator) for text in texts) + line_prefix(intent, separator)


_NON_WORD = re.compile(r"[^\w\s]+")


def normalize_for_match(text: str) -> str:
    """Fold case, punctuation and spacing so near-identical texts compare equal."""
    return _WHITESPACE.sub(" ", _NON_WORD.sub(" ", text.casefold())).strip()
