"""The label check: does the served model itself prefer the requested intent for a line?

A generated text is scored as the continuation of each candidate intent's line prefix,
`intent,` + `text\\n`, by the served model: the mean log-probability per token. The
candidates are the requested intent and its closest rivals: the bundle classifier's most
likely other intents for the text, plus the request's other intents that brought their own
examples (the classifier has never seen those). The margin is the requested intent's score
minus the best rival's; a line passes when the margin reaches the request's `label_margin`.

Context: with `context_examples` k = 0 the score of a candidate is taken right after its bare
`intent,` prefix; with k > 0 the candidate's first k examples (the bundle's, or the ones the
request brought) come first as lines, as in a prompt. A line among whose candidates is an intent
the request brought examples of uses `supplied_context_examples` instead: the model may never
have seen that intent's name, so its examples, and as many of every rival's, make the scores
comparable. All lines that end in one decoding step are scored together, in as few padded
passes as the token budget allows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from condgen.codec import prompt_text
from condgen.server.fidelity import FidelityScorer
from condgen.server.limits import LabelCheckConfig

NOT_CHECKED = math.nan  # the margin of a line that had no rival to be compared with


@dataclass(frozen=True)
class LineToCheck:
    """One accepted-so-far line: its text, the intent it was written for, and the examples
    its request brought (intent -> texts), which make those intents candidates too."""

    text: str
    intent: str
    supplied: Mapping[str, Sequence[str]] = field(default_factory=dict)


class LabelChecker:
    """Scores lines under competing intents with the served engine."""

    def __init__(
        self,
        engine,
        scorer: FidelityScorer | None,
        examples: Mapping[str, Sequence[str]],
        separator: str,
        config: LabelCheckConfig = LabelCheckConfig(),
    ):
        self.engine = engine
        self.scorer = scorer
        self.examples = examples
        self.separator = separator
        self.config = config
        self._contexts: dict[tuple[str, tuple[str, ...]], list[int]] = {}

    def rivals(self, lines: Sequence[LineToCheck]) -> list[list[str]]:
        """Each line's rival intents: the classifier's top other intents, then the request's
        other supplied intents."""
        ranked: list[list[str]] = [[] for _ in lines]
        if self.scorer is not None and lines:
            probs = self.scorer.predict_proba([line.text for line in lines])  # (lines, classes)
            order = np.argsort(-probs, axis=1)
            for row, line in enumerate(lines):
                names = (self.scorer.classes[int(i)] for i in order[row, : self.config.rivals + 1])
                ranked[row] = [n for n in names if n != line.intent][: self.config.rivals]
        for row, line in enumerate(lines):
            ranked[row] += [i for i in line.supplied if i != line.intent and i not in ranked[row]]
        return ranked

    def margins(self, lines: Sequence[LineToCheck]) -> list[float]:
        """Per line: score(requested) - max score(rival), or NOT_CHECKED without rivals."""
        rivals = self.rivals(lines)
        rows: dict[tuple[tuple[int, ...], str], int] = {}  # (context ids, text) -> row
        contexts: list[list[int]] = []
        continuations: list[list[int]] = []

        def row_of(line: LineToCheck, intent: str, k: int) -> int:
            context = self._context(intent, line.supplied, k)
            key = (tuple(context), line.text)
            if key not in rows:
                rows[key] = len(contexts)
                contexts.append(context)
                continuations.append(self.engine.encode(line.text + "\n"))
            return rows[key]

        plan = []
        for line, rival in zip(lines, rivals):
            k = self._examples_for(line, rival)
            plan.append((row_of(line, line.intent, k), [row_of(line, r, k) for r in rival]))
        if not contexts:
            return []
        scores = self.engine.score(contexts, continuations, self.config.max_tokens_per_pass)
        return [float(scores[own] - max(scores[r] for r in others)) if others else NOT_CHECKED for own, others in plan]

    def _examples_for(self, line: LineToCheck, rivals: list[str]) -> int:
        """Examples of context per candidate: more where a candidate came with the request."""
        if any(intent in line.supplied for intent in (line.intent, *rivals)):
            return self.config.supplied_context_examples
        return self.config.context_examples

    def _context(self, intent: str, supplied: Mapping[str, Sequence[str]], k: int) -> list[int]:
        """Token ids before the text: k example lines of `intent`, then `intent,`."""
        texts = tuple(supplied.get(intent, self.examples.get(intent, ())))[:k] if k else ()
        key = (intent, texts)
        if key not in self._contexts:
            if len(self._contexts) > 10_000:
                self._contexts.clear()  # request-supplied intents come and go: keep the memo bounded
            self._contexts[key] = self.engine.encode(prompt_text(intent, texts, self.separator))
        return self._contexts[key]
