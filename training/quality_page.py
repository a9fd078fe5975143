"""report.html of `condgen report`: one self-contained page (figures as inline PNGs, no scripts,
no network) with the headline score and its formula, the four parts, and per-intent detail."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from condgen.training.quality import PARTS, QualityConfig, QualityData

SYNTHETIC, REAL = "tab:orange", "tab:blue"
PART_COLOURS = {"label": "tab:green", "diversity": "tab:purple", "fidelity": "tab:blue", "privacy": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """The figure as a base64 PNG, closed afterwards."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def parts_by_intent(report: dict) -> str:
    """One bar panel per part, intents sorted by their headline score."""
    plt = _pyplot()
    intents = sorted(report["per_intent"], key=lambda i: report["per_intent"][i]["score"])
    fig, axes = plt.subplots(1, len(PARTS), sharey=True, figsize=(11, max(2.5, 0.2 * len(intents) + 1)))
    for ax, part in zip(axes, PARTS):
        values = [report["per_intent"][i][f"{part}_score"] for i in intents]
        ax.barh(intents, [v if v is not None else 0 for v in values], color=PART_COLOURS[part])
        ax.set_xlim(0, 100)
        ax.set_title(part)
        ax.tick_params(axis="y", labelsize=7)
    return _png(fig)


def _histogram(ax, synthetic: np.ndarray, reference: np.ndarray, reference_name: str, xlabel: str) -> None:
    synthetic, reference = synthetic[np.isfinite(synthetic)], reference[np.isfinite(reference)]
    values = np.concatenate([synthetic, reference]) if len(reference) else synthetic
    if len(values) == 0:
        return
    bins = np.linspace(values.min(), values.max() + 1e-6, 30)
    ax.hist(synthetic, bins=bins, density=True, alpha=0.55, color=SYNTHETIC, label="synthetic")
    if len(reference):
        ax.hist(reference, bins=bins, density=True, alpha=0.45, color=REAL, label=reference_name)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)


def similarity_histograms(report: dict, data: QualityData) -> str:
    """Nearest-neighbour similarity to the real rows of the same intent, and distance to the
    closest training row, synthetic against the reference (holdout or train leave-one-out)."""
    plt = _pyplot()
    wanted = np.isin(data.reference_intents, list(report["per_intent"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
    _histogram(
        left,
        data.nn_similarity,
        data.reference_nn_similarity[wanted],
        data.reference_name,
        "cosine to the closest real row of the same intent",
    )
    _histogram(
        right,
        1.0 - data.closest_train,
        1.0 - data.reference_closest_train[wanted],
        data.reference_name,
        "distance to the closest training row (1 - cosine)",
    )
    right.axvline(report["close_distance_threshold"], color="black", linestyle="--", linewidth=1)
    return _png(fig)


def structure_histograms(report: dict, data: QualityData) -> str:
    plt = _pyplot()
    wanted = np.isin(data.real.intents, list(report["per_intent"]))
    fig, axes = plt.subplots(1, len(data.structure), figsize=(11, 3.2))
    for ax, (name, values) in zip(axes, data.structure.items()):
        _histogram(ax, values, data.real_structure[name][wanted], "real", name.replace("_", " "))
    return _png(fig)


def embedding_map(report: dict, data: QualityData, config: QualityConfig) -> str | None:
    """Per intent (those with the most synthetic rows), real and synthetic rows on the intent's
    first two principal components."""
    counts = {i: b["rows"] for i, b in report["per_intent"].items() if len(data.real.where(i))}
    intents = sorted(counts, key=lambda i: -counts[i])[: config.map_intents]
    if not intents:
        return None
    plt = _pyplot()
    columns = min(4, len(intents))
    rows = -(-len(intents) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.8 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(intents) :]:
        ax.axis("off")
    for ax, intent in zip(axes.flat, intents):
        real = data.real.vectors[data.real.where(intent)]
        synthetic = data.synthetic.vectors[data.synthetic.where(intent)]
        both = np.concatenate([real, synthetic])
        centred = both - both.mean(axis=0)
        _, _, components = np.linalg.svd(centred, full_matrices=False)
        points = centred @ components[:2].T
        ax.scatter(*points[: len(real)].T, s=8, alpha=0.5, color=REAL, label="real")
        ax.scatter(*points[len(real) :].T, s=8, alpha=0.7, color=SYNTHETIC, label="synthetic")
        ax.set_title(intent, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=7)
    return _png(fig)


# ---- the page ----------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 1em; min-width: 9em; }
.card b { font-size: 1.8em; display: block; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border-bottom: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
td:first-child, th:first-child, td:last-child, th:last-child { text-align: left; }
img { max-width: 100%; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _number(value, digits: int = 1, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}%}" if percent else f"{value:.{digits}f}"


def _cards(report: dict) -> str:
    cards = [f'<div class="card">score<b id="score">{_number(report["score"])}</b></div>']
    for part in PARTS:
        cards.append(f'<div class="card">{part}<b>{_number(report[f"{part}_score"])}</b></div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def _formula(report: dict, config: QualityConfig) -> str:
    weights = " + ".join(f"{w:g} x {part}" for part, w in report["weights"].items())
    return f"""<h2>How the score is computed</h2>
<p><b>score = {weights}</b> (over the parts an intent has; each part is 0-100, higher is better).</p>
<ul>
<li><b>label</b> = 100 x share of rows that a classifier trained on the real rows ({html.escape(report["judge"])})
assigns to the requested intent.</li>
<li><b>diversity</b> = 100 x (1 - near-duplicate share) x min(1, spread ratio); a near duplicate is within cosine
{config.near_duplicate_cosine:g} of an earlier row of its intent; spread ratio = (1 - mean pairwise cosine of the
synthetic rows) / (1 - the real rows' own), per intent; overall, the row-weighted mean over intents.</li>
<li><b>fidelity</b> = mean of semantic = 100 x (1 - KS distance between the rows' cosine to the closest real row of
their intent and the same for {html.escape(report["reference"])} rows) and structure = 100 x (1 - mean KS distance
of characters per row, words per row and characters per word against the real rows).</li>
<li><b>privacy</b> = 100 x (1 - share of rows that copy a training row: equal after folding case and punctuation,
or cosine at least {config.copy_cosine:g}).</li>
</ul>
<p>Encoder: <code>{html.escape(config.encoder)}</code>. Reference for unseen real rows:
{html.escape(report["reference"])}.</p>"""


def _details(report: dict) -> str:
    label, diversity, fidelity, privacy = (report[p] for p in PARTS)
    lines = [
        f"rows: {report['rows']} over {report['intents']} intents; real rows: {report['real_rows']}",
        f"on-label share: {_number(label.get('on_label_share'), percent=True)} "
        f"of {label.get('judged_rows', 0)} judged rows"
        + (
            f" (the judge's own accuracy on the holdout: {_number(report['judge_holdout_accuracy'], percent=True)})"
            if "judge_holdout_accuracy" in report
            else ""
        ),
        f"distinct-1 / distinct-2: {_number(diversity['distinct_1'], 3)} / {_number(diversity['distinct_2'], 3)}; "
        f"exact duplicates {_number(diversity['exact_duplicate_share'], percent=True)}, "
        f"near duplicates {_number(diversity['near_duplicate_share'], percent=True)}",
        f"nearest-neighbour similarity to same-intent real rows: {_number(fidelity.get('nn_similarity_mean'), 3)} "
        f"against {_number(fidelity.get('reference_nn_similarity_mean'), 3)} for {report['reference']} rows",
        f"copies of training rows: {privacy['exact_copies']} exact, {privacy['near_copies']} near "
        f"({_number(privacy['copy_share'], percent=True)})"
        + (
            f"; the holdout's own share: {_number(report['reference_copy_share'], percent=True)}"
            if "reference_copy_share" in report
            else ""
        ),
        f"rows closer to train than 95% of {report['reference']} rows (distance below "
        f"{report['close_distance_threshold']:.3f}): {_number(privacy['closer_than_reference_share'], percent=True)} "
        f"(about 5% when nothing is memorised)",
    ]
    if report["unjudged_intents"]:
        lines.append("intents without real rows (no label or fidelity part): " + ", ".join(report["unjudged_intents"]))
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def _intent_table(report: dict) -> str:
    head = "<tr><th>intent</th><th>rows</th><th>score</th>" + "".join(f"<th>{p}</th>" for p in PARTS)
    head += "<th>drifts into (rows)</th></tr>"
    body = []
    for intent, block in sorted(report["per_intent"].items(), key=lambda item: item[1]["score"]):
        drift = ", ".join(f"{d['to']} ({d['rows']})" for d in block["label"].get("drift", []))
        cells = "".join(f"<td>{_number(block[f'{p}_score'])}</td>" for p in PARTS)
        body.append(
            f"<tr><td>{html.escape(intent)}</td><td>{block['rows']}</td><td>{_number(block['score'])}</td>"
            f"{cells}<td>{html.escape(drift)}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _figure(title: str, png: str | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<h2>{title}</h2><img class="figure" alt="{alt}" src="data:image/png;base64,{png}">'


def render(report: dict, data: QualityData, config: QualityConfig) -> str:
    figures = [
        _figure("Parts by intent", parts_by_intent(report), "per-intent bars of the four parts"),
        _figure("Similarity to the real rows", similarity_histograms(report, data), "similarity histograms"),
        _figure("Structure", structure_histograms(report, data), "length histograms"),
        _figure("Embedding map per intent", embedding_map(report, data, config), "2-D map of real and synthetic rows"),
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>condgen quality report</title><style>{STYLE}</style></head>
<body>
<h1>Quality of {report["rows"]} synthetic rows</h1>
{_cards(report)}
{_details(report)}
{_formula(report, config)}
{"".join(figures)}
<h2>Per intent</h2>
{_intent_table(report)}
</body></html>
"""


def write_page(path: Path, report: dict, data: QualityData, config: QualityConfig) -> Path:
    path.write_text(render(report, data, config), encoding="utf-8")
    return path
