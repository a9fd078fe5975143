"""Train the label-fidelity classifier and write it to a bundle as plain arrays + JSON.

TF-IDF over word 1-2 grams and character 2-5 grams (within words), sublinear tf, then a
multinomial logistic regression. Scored on the serving path by `condgen.server.fidelity`
without scikit-learn; `fit_classifier` is also the downstream classifier of `condgen evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from condgen.server.fidelity import FIDELITY_ARRAYS, FIDELITY_META

WORD_NGRAMS = (1, 2)
CHAR_NGRAMS = (2, 5)


def make_pipeline(max_features: int = 60_000, c: float = 10.0):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline as sk_pipeline
    from sklearn.pipeline import make_union

    features = make_union(
        TfidfVectorizer(analyzer="word", ngram_range=WORD_NGRAMS, sublinear_tf=True, max_features=max_features),
        TfidfVectorizer(analyzer="char_wb", ngram_range=CHAR_NGRAMS, sublinear_tf=True, max_features=max_features),
    )
    return sk_pipeline(features, LogisticRegression(C=c, max_iter=300))


def fit_classifier(texts: list[str], labels: list[str], **settings):
    """The fixed TF-IDF + logistic-regression intent classifier, fitted."""
    return make_pipeline(**settings).fit(texts, labels)


def save_classifier(pipeline, bundle_dir: str | Path) -> list[Path]:
    """Write the fitted pipeline as `fidelity.npz` (arrays) and `fidelity.json` (vocabularies)."""
    bundle_dir = Path(bundle_dir)
    union, model = pipeline.steps[0][1], pipeline.steps[-1][1]
    parts, arrays, offset = [], {}, 0
    for i, (_, vectorizer) in enumerate(union.transformer_list):
        vocabulary = {term: int(index) for term, index in vectorizer.vocabulary_.items()}
        parts.append(
            {
                "analyzer": vectorizer.analyzer,
                "ngram_range": list(vectorizer.ngram_range),
                "vocabulary": vocabulary,
                "offset": offset,
            }
        )
        arrays[f"idf_{i}"] = vectorizer.idf_.astype(np.float32)
        offset += len(vocabulary)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: scikit-learn keeps one row; expand to a softmax over two classes
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    arrays["coef"], arrays["intercept"] = coef.astype(np.float32), intercept.astype(np.float32)
    np.savez_compressed(bundle_dir / FIDELITY_ARRAYS, **arrays)
    meta = {"classes": [str(c) for c in model.classes_], "parts": parts}
    (bundle_dir / FIDELITY_META).write_text(json.dumps(meta, ensure_ascii=False))
    return [bundle_dir / FIDELITY_ARRAYS, bundle_dir / FIDELITY_META]
