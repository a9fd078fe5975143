"""Label fidelity: a TF-IDF + logistic-regression intent classifier scored in numpy.

The classifier is trained at export (`condgen.training.fidelity`) and stored in the bundle
as plain arrays and JSON (`fidelity.npz`, `fidelity.json`): no pickle is ever loaded. This
module re-implements scikit-learn's TfidfVectorizer transform (word 1-2 grams and character
2-5 grams, lowercase, sublinear tf, l2 norm) and the multinomial softmax, so the server
scores records without importing scikit-learn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIDELITY_ARRAYS = "fidelity.npz"
FIDELITY_META = "fidelity.json"
_WORD = re.compile(r"(?u)\b\w\w+\b")
_SPACES = re.compile(r"\s\s+")


def word_ngrams(text: str, low: int, high: int) -> list[str]:
    tokens = _WORD.findall(text.lower())
    grams: list[str] = []
    for n in range(low, high + 1):
        grams.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return grams


def char_wb_ngrams(text: str, low: int, high: int) -> list[str]:
    """scikit-learn's `char_wb` analyzer: n-grams inside space-padded words."""
    grams: list[str] = []
    for word in _SPACES.sub(" ", text.lower()).split():
        padded = f" {word} "
        for n in range(low, high + 1):
            if len(padded) < n:
                break
            grams.extend(padded[i : i + n] for i in range(len(padded) - n + 1))
    return grams


@dataclass
class TfidfPart:
    """One vectorizer: its analyzer, vocabulary and idf weights."""

    analyzer: str
    ngram_range: tuple[int, int]
    vocabulary: dict[str, int]
    idf: np.ndarray
    offset: int

    def grams(self, text: str) -> list[str]:
        low, high = self.ngram_range
        return word_ngrams(text, low, high) if self.analyzer == "word" else char_wb_ngrams(text, low, high)

    def add_row(self, text: str, row: np.ndarray) -> None:
        """Write this part's l2-normalised sublinear tf-idf features of `text` into `row`."""
        counts: dict[int, int] = {}
        for gram in self.grams(text):
            column = self.vocabulary.get(gram)
            if column is not None:
                counts[column] = counts.get(column, 0) + 1
        if not counts:
            return
        index = np.fromiter(counts.keys(), dtype=np.int64)
        values = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64))) * self.idf[index]
        row[self.offset + index] = values / np.linalg.norm(values)


class FidelityScorer:
    """P(intent | text) from the bundle's classifier."""

    def __init__(self, classes: list[str], parts: list[TfidfPart], coef: np.ndarray, intercept: np.ndarray):
        self.classes = classes
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.parts = parts
        self.coef = coef  # (classes, features)
        self.intercept = intercept  # (classes,)
        self.features = coef.shape[1]

    @classmethod
    def load(cls, bundle_dir: str | Path) -> FidelityScorer | None:
        """The bundle's classifier, or None for a bundle exported without one."""
        bundle_dir = Path(bundle_dir)
        if not (bundle_dir / FIDELITY_META).is_file():
            return None
        meta = json.loads((bundle_dir / FIDELITY_META).read_text())
        with np.load(bundle_dir / FIDELITY_ARRAYS, allow_pickle=False) as arrays:
            parts = [
                TfidfPart(
                    p["analyzer"],
                    tuple(p["ngram_range"]),
                    p["vocabulary"],
                    arrays[f"idf_{i}"].astype(np.float64),
                    p["offset"],
                )
                for i, p in enumerate(meta["parts"])
            ]
            return cls(meta["classes"], parts, arrays["coef"].astype(np.float32), arrays["intercept"])

    def features_of(self, texts: list[str]) -> np.ndarray:
        matrix = np.zeros((len(texts), self.features), dtype=np.float32)
        for row, text in zip(matrix, texts):
            for part in self.parts:
                part.add_row(text, row)
        return matrix

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(texts, classes) probabilities, as scikit-learn's predict_proba."""
        scores = self.features_of(texts) @ self.coef.T + self.intercept
        scores -= scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        return probs / probs.sum(axis=1, keepdims=True)

    def score(self, text: str, intent: str) -> tuple[float, str]:
        """(probability of `intent`, most likely intent) for one text."""
        probs = self.predict_proba([text])[0]
        index = self.class_index.get(intent)
        return (float(probs[index]) if index is not None else 0.0), self.classes[int(np.argmax(probs))]
