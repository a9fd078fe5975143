"""Judging generated lines: parse, check and score each one before it becomes a record.

Every complete line the model writes goes through `RecordJudge.judge`, which either accepts
it (with its fidelity score) or names the rejection reason that the request's Summary
counts. The checks, in order: the line parses as `intent,text`; the intent is the one the
round asked for; the text is not empty and its length is within the bundle's bounds; it
does not echo a line of the round's prompt; it repeats no earlier record of the request
nor (unless the request allows it) a recent record of the server for the same intent; it
is no exact or near copy of a training text, nor of an example the request brought (unless
allowed); its fidelity (probability of
the intent under the bundle's classifier) is at least the request's `min_fidelity` and, if
the request asks, the classifier's most likely intent is the requested one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from condgen.codec import CodecError, decode_line, normalize_for_match
from condgen.server.copy_index import CopyIndex
from condgen.server.fidelity import FidelityScorer

REJECTION_REASONS = (
    "malformed",
    "wrong_intent",
    "empty_text",
    "too_short",
    "too_long",
    "truncated",
    "prompt_echo",
    "duplicate",
    "training_copy",
    "low_fidelity",
    "label_check",
)
RECENT_PER_INTENT = 5000
RECENT_INTENTS = 1000  # intents remembered (request-supplied ones come and go); least recent forgotten


@dataclass(frozen=True)
class LengthBounds:
    """Accepted text lengths in characters, from the training texts' distribution."""

    low: int = 1
    high: int = 10_000

    @classmethod
    def from_stats(cls, stats: dict) -> LengthBounds:
        if not stats:
            return cls()
        return cls(
            max(1, math.floor(0.5 * stats.get("p01", stats["min"]))), math.ceil(1.5 * stats.get("p99", stats["max"]))
        )


@dataclass(frozen=True)
class Verdict:
    """An accepted text (reason None) or the reason it was rejected."""

    text: str = ""
    reason: str | None = None
    fidelity: float = 0.0
    predicted_intent: str = ""


@dataclass(frozen=True)
class JudgeSettings:
    """Per-request switches of the checks."""

    allow_training_copies: bool = False
    avoid_recent_duplicates: bool = True
    min_fidelity: float = 0.0
    require_predicted_intent: bool = False


class RecentOutput:
    """The server's recent accepted texts per intent, bounded both ways: `per_intent` texts
    (oldest forgotten first) of at most `intents` intents (the one written to least recently
    forgotten first), so that intents brought by requests do not pile up."""

    def __init__(self, per_intent: int = RECENT_PER_INTENT, intents: int = RECENT_INTENTS):
        self.per_intent = per_intent
        self.intents = intents
        self._texts: OrderedDict[str, OrderedDict] = OrderedDict()

    def __contains__(self, item: tuple[str, str]) -> bool:
        intent, key = item
        return key in self._texts.get(intent, ())

    def __len__(self) -> int:
        """Intents remembered."""
        return len(self._texts)

    def add(self, intent: str, key: str) -> None:
        texts = self._texts.setdefault(intent, OrderedDict())
        self._texts.move_to_end(intent)
        texts[key] = None
        texts.move_to_end(key)
        while len(texts) > self.per_intent:
            texts.popitem(last=False)
        while len(self._texts) > self.intents:
            self._texts.popitem(last=False)


class RecordJudge:
    """The bundle-wide state the checks need: bounds, copy index, classifier, recent output."""

    def __init__(self, separator: str, bounds: LengthBounds, copies: CopyIndex, scorer: FidelityScorer | None):
        self.separator = separator
        self.bounds = bounds
        self.copies = copies
        self.scorer = scorer
        self.recent = RecentOutput()

    @classmethod
    def for_bundle(cls, bundle_dir, manifest, examples: dict[str, list[str]]) -> RecordJudge:
        texts = [t for group in examples.values() for t in group]
        return cls(
            manifest.separator,
            LengthBounds.from_stats(manifest.text_length),
            CopyIndex(texts),
            FidelityScorer.load(bundle_dir),
        )

    def judge(
        self,
        line: str,
        intent: str,
        settings: JudgeSettings,
        seen: set[str],
        prompt_texts: frozenset[str],
        supplied: CopyIndex | None = None,
    ) -> Verdict:
        """Check one line generated for `intent`; `seen` holds the request's accepted keys,
        `supplied` the examples the request brought for the intent."""
        try:
            record = decode_line(line, self.separator)
        except CodecError:
            return Verdict(reason="malformed")
        text = record.text
        if record.intent != intent:
            return Verdict(reason="wrong_intent")
        if not text:
            return Verdict(reason="empty_text")
        if len(text) < self.bounds.low:
            return Verdict(reason="too_short")
        if len(text) > self.bounds.high:
            return Verdict(reason="too_long")
        key = normalize_for_match(text)
        if key in prompt_texts:
            return Verdict(reason="prompt_echo")
        if key in seen or self.recently_sent(intent, text, settings):
            return Verdict(reason="duplicate")
        if not settings.allow_training_copies and (
            self.copies.is_copy(text) or (supplied is not None and supplied.is_copy(text))
        ):
            return Verdict(reason="training_copy")
        fidelity, predicted = self.scorer.score(text, intent) if self.scorer is not None else (1.0, intent)
        if fidelity < settings.min_fidelity or (settings.require_predicted_intent and predicted != intent):
            return Verdict(reason="low_fidelity", fidelity=fidelity, predicted_intent=predicted)
        return Verdict(text=text, fidelity=fidelity, predicted_intent=predicted)

    def recently_sent(self, intent: str, text: str, settings: JudgeSettings) -> bool:
        """Whether the server sent `text` for `intent` recently, when the request avoids that."""
        return settings.avoid_recent_duplicates and (intent, normalize_for_match(text)) in self.recent

    @staticmethod
    def seen_before(text: str, seen: set[str]) -> bool:
        """Whether the job of `seen` already has `text` (normalised): accepted, or refused."""
        return normalize_for_match(text) in seen

    def remember(self, intent: str, text: str, seen: set[str]) -> None:
        key = normalize_for_match(text)
        seen.add(key)
        self.recent.add(intent, key)
