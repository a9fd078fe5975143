"""The downstream intent classifiers `condgen evaluate` trains on real and synthetic rows.

- `embedding` (the default): a frozen sentence encoder (all-MiniLM-L6-v2 unless `--encoder`
  names another) and a multinomial logistic regression on its unit-length embeddings: what a
  team that classifies intents today trains first.
- `tfidf`: word 1-2 and character 2-5 gram TF-IDF and a logistic regression, the bundle's own
  fidelity classifier (`condgen.training.fidelity`).

Both take the same rows and the same class weighting, so one run scores every recipe with each.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from condgen.training.encoder import EmbeddingCache

CLASSIFIERS = ("embedding", "tfidf")
DEFAULT_CLASSIFIER = "embedding"
# Inverse regularisation of the embedding classifier's logistic regression. Unit-length
# embeddings of 384 dimensions want far weaker regularisation than scikit-learn's default of 1.
EMBEDDING_C = 10.0


class IntentClassifier(Protocol):
    classes_: np.ndarray

    def predict(self, texts: list[str]) -> np.ndarray: ...

    def predict_proba(self, texts: list[str]) -> np.ndarray: ...


class EmbeddingClassifier:
    """Logistic regression over a sentence encoder's embeddings."""

    def __init__(self, embed: EmbeddingCache, c: float = EMBEDDING_C):
        self.embed = embed
        self.c = c

    def fit(self, texts: list[str], labels: list[str], balanced: bool = False) -> EmbeddingClassifier:
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(C=self.c, max_iter=1000, class_weight="balanced" if balanced else None)
        self.model.fit(self.embed(texts), labels)
        self.classes_ = self.model.classes_
        return self

    def predict(self, texts: list[str]) -> np.ndarray:
        return self.model.predict(self.embed(texts))

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.model.predict_proba(self.embed(texts))


def fit_intent_classifier(
    name: str, texts: list[str], labels: list[str], balanced: bool = False, embed: EmbeddingCache | None = None
) -> IntentClassifier:
    """The classifier `name` (one of CLASSIFIERS) fitted on `texts`; `embed` is needed for
    `embedding` and shared across fits so that each text is embedded once."""
    if name == "embedding":
        if embed is None:
            raise ValueError("the embedding classifier needs an EmbeddingCache")
        return EmbeddingClassifier(embed).fit(texts, labels, balanced)
    if name == "tfidf":
        from condgen.training.fidelity import make_pipeline

        pipeline = make_pipeline()
        if balanced:
            pipeline.set_params(logisticregression__class_weight="balanced")
        return pipeline.fit(texts, labels)
    raise ValueError(f"classifier {name!r} is not one of {', '.join(CLASSIFIERS)}")
