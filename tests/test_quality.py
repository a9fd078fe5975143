"""`condgen report`: the quality report of a generated set, on real banking77 rows with the real
all-MiniLM-L6-v2 encoder; its page rendered in headless Chromium (Debian's, not a downloaded one)."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import BANKING77_TRAIN

from condgen.codec import LabelledText
from condgen.training.quality import (
    PARTS,
    QualityConfig,
    closest,
    distinct_n,
    exact_copies,
    exact_repeats,
    headline,
    mean_pairwise_similarity,
)

BANKING77_TEST = BANKING77_TRAIN.parent / "test.csv"
INTENTS = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked", "card_linking")
PER_INTENT = 20
CHROMIUM = os.environ.get("CONDGEN_CHROMIUM", "/usr/bin/chromium")


# ---- pure measures (the fast layer) ------------------------------------------------------------


@pytest.mark.fast
def test_closest_skips_a_row_itself_when_asked():
    vectors = np.eye(3, dtype=np.float32)
    vectors[2] = vectors[0]
    assert closest(vectors, vectors).tolist() == [1.0, 1.0, 1.0]
    assert closest(vectors, vectors, exclude_self=True).tolist() == [1.0, 0.0, 1.0]
    assert np.isneginf(closest(vectors, vectors[:0])).all()


@pytest.mark.fast
def test_copies_and_repeats_fold_case_and_punctuation():
    copies = exact_copies(["When will my card ARRIVE?", "new text"], ["when will my card arrive"])
    assert copies.tolist() == [True, False]
    assert exact_repeats(["a b", "A b!", "c"]).tolist() == [False, True, False]


@pytest.mark.fast
def test_distinct_n_and_pairwise_similarity():
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b c"], 2) == 1.0 and distinct_n([], 2) == 0.0
    same = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert mean_pairwise_similarity(same) == pytest.approx(1.0)
    assert mean_pairwise_similarity(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.0)
    assert mean_pairwise_similarity(same[:1]) is None


@pytest.mark.fast
def test_the_headline_renormalises_over_known_parts():
    assert headline({"label": 50.0, "diversity": 100.0, "fidelity": 100.0, "privacy": 100.0}) == 80.0
    assert headline({"label": None, "diversity": 60.0, "fidelity": None, "privacy": 100.0}) == 80.0


@pytest.mark.fast
def test_thresholds_outside_zero_to_one_are_refused():
    with pytest.raises(ValueError, match="copy_cosine"):
        QualityConfig(copy_cosine=1.5)


# ---- the report on banking77 -------------------------------------------------------------------


def _rows(path: Path) -> list[LabelledText]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [LabelledText(r["category"], r["text"]) for r in csv.DictReader(handle) if r["category"] in INTENTS]


def _first(rows: list[LabelledText], per_intent: int) -> list[LabelledText]:
    taken: dict[str, int] = {}
    out = []
    for row in rows:
        if taken.get(row.intent, 0) < per_intent:
            out.append(row)
            taken[row.intent] = taken.get(row.intent, 0) + 1
    return out


@pytest.fixture(scope="module")
def embed():
    from condgen.training.encoder import EmbeddingCache

    return EmbeddingCache.load()


@pytest.fixture(scope="module")
def sets():
    """Real training rows, a holdout, and four candidate sets whose quality is known."""
    rng = random.Random(0)
    real, test = _rows(BANKING77_TRAIN), _rows(BANKING77_TEST)
    rng.shuffle(test)
    unseen = _first(test, PER_INTENT)
    holdout = [r for r in test if r not in unseen]
    # A generator that drifts: a third of its rows carry the label of another of the intents.
    drifting = [
        LabelledText(INTENTS[(INTENTS.index(r.intent) + 1) % len(INTENTS)], r.text) if i % 3 == 0 else r
        for i, r in enumerate(unseen)
    ]
    labels = [r.intent for r in unseen]
    rng.shuffle(labels)
    shuffled = [LabelledText(label, r.text) for label, r in zip(labels, unseen)]
    shuffled_train = real[:]
    rng.shuffle(shuffled_train)
    copies = _first(shuffled_train, PER_INTENT)
    candidates = {"unseen": unseen, "drifting": drifting, "shuffled": shuffled, "copies": copies}
    return real, holdout, candidates


@pytest.fixture(scope="module")
def reports(sets, embed, tmp_path_factory):
    from condgen.training.quality import quality_report

    real, holdout, candidates = sets
    root = tmp_path_factory.mktemp("quality")
    return {
        name: (quality_report(real, rows, root / name, holdout, embed=embed), root / name)
        for name, rows in candidates.items()
    }


def test_report_json_has_every_part_overall_and_per_intent(reports):
    report, folder = reports["unseen"]
    assert json.loads((folder / "report.json").read_text())["score"] == report["score"]
    assert report["rows"] == PER_INTENT * len(INTENTS)
    for block in [report, *report["per_intent"].values()]:
        assert 0 <= block["score"] <= 100
        for part in PARTS:
            assert 0 <= block[f"{part}_score"] <= 100
    assert sorted(report["per_intent"]) == sorted(INTENTS)
    assert report["reference"] == "holdout" and 0.8 <= report["judge_holdout_accuracy"] <= 1.0


def test_the_report_ranks_sets_as_their_quality_is_known(reports):
    score = {name: r["score"] for name, (r, _) in reports.items()}
    label = {name: r["label_score"] for name, (r, _) in reports.items()}
    assert score["unseen"] > score["drifting"] > score["shuffled"], score
    assert label["unseen"] >= 85 and label["drifting"] <= label["unseen"] - 20, label
    assert label["shuffled"] <= label["unseen"] - 50, label
    drift = reports["drifting"][0]["per_intent"]["card_arrival"]["label"]["drift"]
    assert drift and drift[0]["to"] == INTENTS[-1]  # the rows relabelled into card_arrival came from card_linking


def test_rows_copied_from_train_are_flagged_on_the_privacy_part(reports):
    copies, unseen = reports["copies"][0], reports["unseen"][0]
    assert copies["privacy"]["exact_copies"] == copies["rows"] and copies["privacy_score"] == 0
    assert copies["privacy"]["closer_than_reference_share"] == 1.0
    assert unseen["privacy_score"] >= 85 and unseen["privacy"]["closer_than_reference_share"] <= 0.15
    assert copies["fidelity"]["semantic_score"] < unseen["fidelity"]["semantic_score"]


def test_intents_without_real_rows_get_no_label_or_fidelity_part(sets, embed, tmp_path):
    from condgen.training.quality import quality_report

    real, holdout, candidates = sets
    novel = [LabelledText("crypto_purchase", t) for t in ("can I buy bitcoin here", "how do I buy ethereum")]
    report = quality_report(real, candidates["unseen"][:10] + novel, tmp_path, holdout, embed=embed)
    block = report["per_intent"]["crypto_purchase"]
    assert report["unjudged_intents"] == ["crypto_purchase"]
    assert block["label_score"] is None and block["fidelity_score"] is None and block["privacy_score"] == 100


# ---- the command line --------------------------------------------------------------------------


def _write(path: Path, rows: list[LabelledText]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["intent", "text"])
        writer.writerows((r.intent, r.text) for r in rows)
    return path


def test_condgen_report_writes_the_page_and_the_json(sets, tmp_path, capsys):
    from condgen.cli import main

    real, holdout, candidates = sets
    argv = ["report", "--real", str(_write(tmp_path / "real.csv", real[:300]))]
    argv += ["--synthetic", str(_write(tmp_path / "rows.csv", candidates["unseen"]))]
    argv += ["--holdout", str(_write(tmp_path / "holdout.csv", holdout)), "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "quality score" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows"] == len(candidates["unseen"])
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_condgen_report_of_intents_the_real_rows_lack_says_what_it_cannot_judge(sets, tmp_path, capsys):
    from condgen.cli import main

    real = _write(tmp_path / "real.csv", sets[0][:200])
    rows = _write(
        tmp_path / "rows.csv",
        [LabelledText("crypto_purchase", "can I buy bitcoin"), LabelledText("crypto_purchase", "buy ethereum")],
    )
    assert main(["report", "--real", str(real), "--synthetic", str(rows), "--output", str(tmp_path / "out")]) == 0
    assert "label n/a" in capsys.readouterr().out


def test_condgen_report_bad_input_is_a_one_line_error(tmp_path, capsys):
    from condgen.cli import main

    real = _write(tmp_path / "real.csv", [LabelledText("a", "hello there")])
    assert main(["report", "--real", str(real), "--synthetic", str(tmp_path / "none.csv"), "--output", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", "--real", str(real), "--synthetic", str(real), "--output", "x", "--copy-cosine", "2"]) == 2
    assert "copy_cosine" in capsys.readouterr().err


def test_generate_writes_the_report_of_its_rows(server, train_csv, tmp_path, capsys):
    from condgen.cli import main

    out, report_dir = tmp_path / "rows.csv", tmp_path / "quality"
    argv = ["generate", "--target", server.target, "--intent", "card_arrival", "--intent", "exchange_rate"]
    argv += ["--num-records", "3", "--seed", "3", "--output", str(out), "--report", str(report_dir)]
    assert main(argv) == 2 and "--report needs --real" in capsys.readouterr().err
    assert main([*argv, "--real", str(train_csv)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["rows"] == 6 and sorted(report["per_intent"]) == ["card_arrival", "exchange_rate"]


# ---- the page, as a user sees it ---------------------------------------------------------------


def _browser_or_skip():
    missing = []
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        missing.append(f"no Chromium at {CHROMIUM} (apt-get install chromium; `make browser`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("no playwright package")
    if missing and os.environ.get("CONDGEN_REQUIRE_BROWSER"):
        pytest.fail("; ".join(missing) + ", but CONDGEN_REQUIRE_BROWSER is set")
    if missing:
        pytest.skip("; ".join(missing))


def test_the_page_renders_in_headless_chromium_with_its_figures_and_no_errors(reports, tmp_path):
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    page_path = reports["drifting"][1] / "report.html"
    problems: list[str] = []
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else problems.append(r.url))
            page.goto(page_path.as_uri(), wait_until="load")
            widths = page.eval_on_selector_all("img.figure", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            score = page.inner_text("#score")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []  # no console errors, no script errors, no request off the page
    assert len(widths) == 4 and min(widths) > 100, widths
    assert float(score) == pytest.approx(reports["drifting"][0]["score"], abs=0.05)
    assert (tmp_path / "page.png").stat().st_size > 10_000
