"""Find training texts that a generated text copies, exactly or near-exactly.

Texts are normalised (`normalize_for_match`: case, punctuation and spacing folded) and cut
into character 3-gram sets; a record is a near copy when the Jaccard similarity of its set
with a training text's set is at least the threshold (0.9 by default: a changed letter or
two, not a changed word). The search is exact and fast by prefix filtering (the AllPairs
method): with shingles ordered rarest first, two sets with Jaccard >= t must share a
shingle among the first |x| - ceil(t|x|) + 1 of each, so only training texts that share
one of the query's few rarest shingles are compared.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable

from condgen.codec import normalize_for_match

SHINGLE = 3


def shingles(normalized: str) -> frozenset[str]:
    if len(normalized) <= SHINGLE:
        return frozenset([normalized]) if normalized else frozenset()
    return frozenset(normalized[i : i + SHINGLE] for i in range(len(normalized) - SHINGLE + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class CopyIndex:
    """Exact and near-exact (Jaccard >= threshold over 3-grams) lookup of training texts."""

    def __init__(self, texts: Iterable[str], threshold: float = 0.9):
        self.threshold = threshold
        normalized = sorted({normalize_for_match(t) for t in texts} - {""})
        self.exact = set(normalized)
        self.sets = [shingles(t) for t in normalized]
        self.frequency = Counter(s for shingle_set in self.sets for s in shingle_set)
        self.postings: dict[str, list[int]] = defaultdict(list)
        for doc, shingle_set in enumerate(self.sets):
            for shingle in self._prefix(shingle_set):
                self.postings[shingle].append(doc)

    def __len__(self) -> int:
        return len(self.sets)

    def _prefix(self, shingle_set: frozenset) -> list[str]:
        keep = len(shingle_set) - math.ceil(self.threshold * len(shingle_set)) + 1
        return sorted(shingle_set, key=lambda s: (self.frequency.get(s, 0), s))[:keep]

    def closest(self, text: str) -> float:
        """The highest Jaccard similarity to any training text at or above the threshold, else 0."""
        normalized = normalize_for_match(text)
        if normalized in self.exact:
            return 1.0
        query = shingles(normalized)
        if not query:
            return 0.0
        low, high = self.threshold * len(query), len(query) / self.threshold
        best = 0.0
        seen: set[int] = set()
        for shingle in self._prefix(query):
            for doc in self.postings.get(shingle, ()):
                if doc in seen:
                    continue
                seen.add(doc)
                if low <= len(self.sets[doc]) <= high:
                    best = max(best, jaccard(query, self.sets[doc]))
        return best if best >= self.threshold else 0.0

    def is_copy(self, text: str) -> bool:
        return self.closest(text) > 0.0
