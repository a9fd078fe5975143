"""`condgen report`: the quality of one generated set, judged against the real rows.

Four parts, each 0-100 (higher is better), per intent and overall, from sentence embeddings
(`condgen.training.encoder`, all-MiniLM-L6-v2 by default):

- **label**: the share of rows that an embedding classifier trained on the real rows assigns
  to the requested intent; the off-label rows' predictions show which intents they drift into.
- **diversity**: 100 x (1 - near-duplicate share) x min(1, spread ratio), where a near
  duplicate is a row within `near_duplicate_cosine` of an earlier row of its intent and the
  spread ratio is (1 - mean pairwise cosine of the synthetic rows) / (1 - the real rows' own).
- **fidelity**: the mean of a semantic and a structure score. Semantic: 100 x (1 - KS distance)
  between the rows' nearest-neighbour cosine to the real rows of their intent and the same
  for real unseen rows (the holdout, else each real row against the others). Structure:
  100 x (1 - mean KS distance) over characters per row, words per row and characters per word.
- **privacy**: 100 x (1 - share of rows that copy a training row), a copy being an exact match
  after folding case and punctuation or a cosine of at least `copy_cosine`. Rows closer to
  train than 95% of real unseen rows are counted too, as a memorisation signal.

The headline score is the weighted mean in `SCORE_WEIGHTS`. Intents the real rows lack get no
label or fidelity part (nothing to judge them by); their score uses the other parts.
`quality_page` draws the figures and writes the self-contained report.html.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from condgen.codec import LabelledText, normalize_for_match
from condgen.training.encoder import DEFAULT_ENCODER, EmbeddingCache

log = logging.getLogger(__name__)

PARTS = ("label", "diversity", "fidelity", "privacy")
SCORE_WEIGHTS = {"label": 0.4, "diversity": 0.2, "fidelity": 0.2, "privacy": 0.2}
CLOSE_PERCENTILE = 5.0  # a row is "close" when nearer to train than this percentile of unseen rows
DRIFT_TARGETS = 3  # sibling intents listed per intent


@dataclass
class QualityConfig:
    """Settings of one quality report."""

    encoder: str = DEFAULT_ENCODER
    near_duplicate_cosine: float = 0.95
    copy_cosine: float = 0.99  # 3% of unseen banking77 rows are this close to a training row; 30% within 0.95
    map_intents: int = 12  # intents drawn in the 2-D embedding map

    def __post_init__(self) -> None:
        for name in ("near_duplicate_cosine", "copy_cosine"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")


@dataclass
class Rows:
    """A set of rows with their unit-length embeddings."""

    texts: list[str]
    intents: np.ndarray
    vectors: np.ndarray

    @classmethod
    def of(cls, records: Sequence[LabelledText], embed: EmbeddingCache) -> Rows:
        texts = [r.text for r in records]
        return cls(texts, np.array([r.intent for r in records], dtype=object), embed(texts))

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, intent: str) -> np.ndarray:
        return np.flatnonzero(self.intents == intent)


@dataclass
class QualityData:
    """The per-row figures behind the report; `quality_page` draws them."""

    synthetic: Rows
    real: Rows
    reference_name: str  # "holdout" or "train (leave-one-out)"
    predicted: np.ndarray  # the label judge's intent per synthetic row ("" where unjudged)
    nn_similarity: np.ndarray  # cosine to the closest real row of the same intent (nan: unknown intent)
    reference_nn_similarity: np.ndarray
    reference_intents: np.ndarray
    closest_train: np.ndarray  # cosine to the closest training row, any intent
    reference_closest_train: np.ndarray
    exact_copy: np.ndarray
    near_duplicate: np.ndarray
    copy_cosine: float
    structure: dict[str, np.ndarray]
    real_structure: dict[str, np.ndarray]
    extra: dict = field(default_factory=dict)


# ---- row-level measures ------------------------------------------------------------------------


def closest(queries: np.ndarray, keys: np.ndarray, exclude_self: bool = False, chunk: int = 1024) -> np.ndarray:
    """Each query's highest cosine to a key (unit vectors); with `exclude_self`, queries are the
    keys and a row is not its own neighbour. -inf where there is no key."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    if len(keys) == 0 or len(queries) == 0:
        return best
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ keys.T
        if exclude_self:
            rows = np.arange(len(sims))
            sims[rows, rows + start] = -np.inf
        best[start : start + chunk] = sims.max(axis=1)
    return best


def closest_same_intent(queries: Rows, keys: Rows, exclude_self: bool = False) -> np.ndarray:
    """Each query's highest cosine to a key of its own intent; nan where the keys lack the intent."""
    best = np.full(len(queries), np.nan, dtype=np.float32)
    for intent in set(queries.intents):
        rows, pool = queries.where(intent), keys.where(intent)
        if len(pool) > int(exclude_self):
            found = closest(queries.vectors[rows], keys.vectors[pool], exclude_self)
            best[rows] = np.where(np.isfinite(found), found, np.nan)
    return best


def near_duplicates(rows: Rows, threshold: float) -> np.ndarray:
    """True for a row within `threshold` cosine of an earlier row of its intent."""
    flags = np.zeros(len(rows), dtype=bool)
    for intent in set(rows.intents):
        index = rows.where(intent)
        sims = rows.vectors[index] @ rows.vectors[index].T
        flags[index] = (np.tril(sims, k=-1) >= threshold).any(axis=1)
    return flags


def exact_copies(texts: Sequence[str], of: Sequence[str]) -> np.ndarray:
    """True for a text equal to one of `of` once case, punctuation and spacing are folded."""
    known = {normalize_for_match(t) for t in of}
    return np.array([normalize_for_match(t) in known for t in texts], dtype=bool)


def exact_repeats(texts: Sequence[str]) -> np.ndarray:
    """True for a text that folds to the same string as an earlier one."""
    seen: set[str] = set()
    flags = []
    for text in texts:
        key = normalize_for_match(text)
        flags.append(key in seen)
        seen.add(key)
    return np.array(flags, dtype=bool)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams of the texts (0 when there are none)."""
    grams = [
        tuple(words[i : i + n]) for words in (text.lower().split() for text in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_pairwise_similarity(vectors: np.ndarray) -> float | None:
    """Mean cosine over all pairs of distinct rows (unit vectors); None under two rows."""
    n = len(vectors)
    if n < 2:
        return None
    total = vectors.sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


def structure_features(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Characters per row, words per row and characters per word, one value per text."""
    words = [t.split() for t in texts]
    return {
        "characters": np.array([len(t) for t in texts], dtype=float),
        "words": np.array([len(w) for w in words], dtype=float),
        "characters_per_word": np.array([sum(map(len, w)) / len(w) if w else 0.0 for w in words], dtype=float),
    }


def ks_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sample Kolmogorov-Smirnov statistic; None when either side is empty."""
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return None
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).statistic)


# ---- parts -------------------------------------------------------------------------------------


def _score(share_bad: float) -> float:
    return round(100.0 * (1.0 - share_bad), 2)


def label_part(data: QualityData, rows: np.ndarray) -> dict:
    judged = rows[data.predicted[rows] != ""]
    if len(judged) == 0:
        return {"score": None, "judged_rows": 0}
    requested, predicted = data.synthetic.intents[judged], data.predicted[judged]
    off = Counter(predicted[requested != predicted])
    return {
        "score": _score(float(np.mean(requested != predicted))),
        "on_label_share": round(float(np.mean(requested == predicted)), 4),
        "judged_rows": len(judged),
        "drift": [{"to": intent, "rows": count} for intent, count in off.most_common(DRIFT_TARGETS)],
    }


def diversity_part(data: QualityData, rows: np.ndarray, real_rows: np.ndarray) -> dict:
    texts = [data.synthetic.texts[i] for i in rows]
    pairwise = mean_pairwise_similarity(data.synthetic.vectors[rows])
    real_pairwise = mean_pairwise_similarity(data.real.vectors[real_rows])
    ratio = 1.0
    if pairwise is not None and real_pairwise is not None and real_pairwise < 1.0:
        ratio = min(1.0, (1.0 - pairwise) / (1.0 - real_pairwise))
    near_share = float(np.mean(data.near_duplicate[rows]))
    return {
        "score": round(100.0 * (1.0 - near_share) * ratio, 2),
        "distinct_1": round(distinct_n(texts, 1), 4),
        "distinct_2": round(distinct_n(texts, 2), 4),
        "exact_duplicate_share": round(float(np.mean(exact_repeats(texts))), 4),
        "near_duplicate_share": round(near_share, 4),
        "mean_pairwise_similarity": None if pairwise is None else round(pairwise, 4),
        "real_mean_pairwise_similarity": None if real_pairwise is None else round(real_pairwise, 4),
        "spread_ratio": round(ratio, 4),
    }


def fidelity_part(data: QualityData, rows: np.ndarray, reference_rows: np.ndarray, real_rows: np.ndarray) -> dict:
    known = rows[np.isfinite(data.nn_similarity[rows])]
    if len(known) == 0 or len(real_rows) == 0:
        return {"score": None}
    semantic = ks_distance(data.nn_similarity[known], data.reference_nn_similarity[reference_rows])
    structure = {}
    for name, values in data.structure.items():
        distance = ks_distance(values[known], data.real_structure[name][real_rows])
        structure[name] = {
            "synthetic_mean": round(float(values[known].mean()), 3),
            "real_mean": round(float(data.real_structure[name][real_rows].mean()), 3),
            "ks": None if distance is None else round(distance, 4),
        }
    distances = [s["ks"] for s in structure.values() if s["ks"] is not None]
    semantic_score = None if semantic is None else _score(semantic)
    structure_score = _score(float(np.mean(distances))) if distances else None
    scores = [s for s in (semantic_score, structure_score) if s is not None]
    reference = data.reference_nn_similarity[reference_rows]
    reference_mean = round(float(np.nanmean(reference)), 4) if np.isfinite(reference).any() else None
    return {
        "score": round(float(np.mean(scores)), 2) if scores else None,
        "semantic_score": semantic_score,
        "structure_score": structure_score,
        "nn_similarity_mean": round(float(data.nn_similarity[known].mean()), 4),
        "reference_nn_similarity_mean": reference_mean,
        "structure": structure,
    }


def privacy_part(data: QualityData, rows: np.ndarray, close_below: float) -> dict:
    exact = data.exact_copy[rows]
    near = (data.closest_train[rows] >= data.copy_cosine) & ~exact
    distance = 1.0 - data.closest_train[rows]
    return {
        "score": _score(float(np.mean(exact | near))),
        "exact_copies": int(exact.sum()),
        "near_copies": int(near.sum()),
        "copy_share": round(float(np.mean(exact | near)), 4),
        "closer_than_reference_share": round(float(np.mean(distance < close_below)), 4),
        "distance_to_closest_train_median": round(float(np.median(distance)), 4),
    }


def headline(parts: dict[str, float | None]) -> float:
    """The weighted mean of the known parts (weights renormalised over them)."""
    known = {name: value for name, value in parts.items() if value is not None}
    weight = sum(SCORE_WEIGHTS[name] for name in known)
    return round(sum(SCORE_WEIGHTS[name] * value for name, value in known.items()) / weight, 2)


# ---- the report --------------------------------------------------------------------------------


def measure(
    real: Sequence[LabelledText],
    synthetic: Sequence[LabelledText],
    holdout: Sequence[LabelledText] | None,
    embed: EmbeddingCache,
    config: QualityConfig,
) -> QualityData:
    """Embed the three sets once and compute every per-row figure."""
    from condgen.training.classifiers import fit_intent_classifier

    real_rows, synthetic_rows = Rows.of(real, embed), Rows.of(synthetic, embed)
    judge = fit_intent_classifier("embedding", real_rows.texts, list(real_rows.intents), embed=embed)
    known = np.isin(synthetic_rows.intents, judge.classes_)
    predicted = np.full(len(synthetic_rows), "", dtype=object)
    if known.any():
        predicted[known] = judge.predict([t for t, k in zip(synthetic_rows.texts, known) if k])
    if holdout:
        reference = Rows.of(holdout, embed)
        reference_nn = closest_same_intent(reference, real_rows)
        reference_closest = closest(reference.vectors, real_rows.vectors)
        name = "holdout"
    else:
        reference = real_rows
        reference_nn = closest_same_intent(real_rows, real_rows, exclude_self=True)
        reference_closest = closest(real_rows.vectors, real_rows.vectors, exclude_self=True)
        name = "train (leave-one-out)"
    data = QualityData(
        synthetic=synthetic_rows,
        real=real_rows,
        reference_name=name,
        predicted=predicted,
        nn_similarity=closest_same_intent(synthetic_rows, real_rows),
        reference_nn_similarity=reference_nn,
        reference_intents=reference.intents,
        closest_train=closest(synthetic_rows.vectors, real_rows.vectors),
        reference_closest_train=reference_closest,
        exact_copy=exact_copies(synthetic_rows.texts, real_rows.texts),
        near_duplicate=near_duplicates(synthetic_rows, config.near_duplicate_cosine),
        copy_cosine=config.copy_cosine,
        structure=structure_features(synthetic_rows.texts),
        real_structure=structure_features(real_rows.texts),
    )
    if holdout:
        data.extra["judge_holdout_accuracy"] = float(np.mean(judge.predict(reference.texts) == reference.intents))
        data.extra["reference_copy_share"] = float(
            np.mean(exact_copies(reference.texts, real_rows.texts) | (reference_closest >= config.copy_cosine))
        )
    return data


def summarise(data: QualityData, config: QualityConfig) -> dict:
    """report.json's content: every part overall and per intent."""
    reference_distance = 1.0 - data.reference_closest_train[np.isfinite(data.reference_closest_train)]
    close_below = float(np.percentile(reference_distance, CLOSE_PERCENTILE)) if len(reference_distance) else 0.0
    intents = sorted(set(data.synthetic.intents))

    def parts(rows: np.ndarray, wanted: Sequence[str]) -> dict:
        real_rows = np.flatnonzero(np.isin(data.real.intents, list(wanted)))
        reference_rows = np.flatnonzero(np.isin(data.reference_intents, list(wanted)))
        blocks = {
            "label": label_part(data, rows),
            "diversity": diversity_part(data, rows, real_rows),
            "fidelity": fidelity_part(data, rows, reference_rows, real_rows),
            "privacy": privacy_part(data, rows, close_below),
        }
        scores = {name: blocks[name]["score"] for name in PARTS}
        return {"rows": len(rows), "score": headline(scores), **{f"{n}_score": s for n, s in scores.items()}, **blocks}

    per_intent = {intent: parts(data.synthetic.where(intent), [intent]) for intent in intents}
    overall = parts(np.arange(len(data.synthetic)), intents)
    # Diversity compares each intent with its own real rows; overall it is their row-weighted mean.
    weighted = [(b["rows"], b["diversity_score"]) for b in per_intent.values()]
    overall["diversity_score"] = round(sum(n * s for n, s in weighted) / sum(n for n, _ in weighted), 2)
    overall["diversity"]["score"] = overall["diversity_score"]
    overall["score"] = headline({name: overall[f"{name}_score"] for name in PARTS})
    unjudged = sorted(set(intents) - set(data.real.intents))
    return {
        **overall,
        "intents": len(intents),
        "unjudged_intents": unjudged,
        "real_rows": len(data.real),
        "reference": data.reference_name,
        "judge": f"{config.encoder} + logistic regression on the real rows",
        **{k: round(v, 4) for k, v in data.extra.items()},
        "close_distance_threshold": round(close_below, 4),
        "weights": SCORE_WEIGHTS,
        "settings": {
            "encoder": config.encoder,
            "near_duplicate_cosine": config.near_duplicate_cosine,
            "copy_cosine": config.copy_cosine,
            "close_percentile": CLOSE_PERCENTILE,
        },
        "per_intent": per_intent,
    }


def quality_report(
    real: Sequence[LabelledText],
    synthetic: Sequence[LabelledText],
    output: Path,
    holdout: Sequence[LabelledText] | None = None,
    config: QualityConfig | None = None,
    embed: EmbeddingCache | None = None,
) -> dict:
    """Measure `synthetic` against `real` (and `holdout`), write report.json and report.html
    into `output`, and return the report. `embed` may be shared with other work of the run."""
    from condgen.training.quality_page import write_page

    if not synthetic:
        raise ValueError("the synthetic set holds no rows")
    config = config or QualityConfig()
    started = time.time()
    embed = embed or EmbeddingCache.load(config.encoder)
    data = measure(real, synthetic, holdout or None, embed, config)
    report = summarise(data, config)
    output.mkdir(parents=True, exist_ok=True)
    write_page(output / "report.html", report, data, config)
    report["seconds"] = round(time.time() - started, 1)
    (output / "report.json").write_text(json.dumps(report, indent=2))
    log.info("quality report of %d rows in %.0f s: %s", len(synthetic), report["seconds"], output)
    return report
