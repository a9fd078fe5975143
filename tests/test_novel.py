"""`condgen evaluate --setting novel`: the fold split leaks no novel row into fine-tuning, and
the quick run works end to end for both generators (tiny model, a small slice of banking77)."""

import csv
import json
from collections import Counter

import pytest

from condgen.codec import LabelledText
from condgen.training.novel import NovelConfig, fold_data, generator_rows, request_examples, split_folds

INTENTS = [
    "card_arrival",
    "lost_or_stolen_card",
    "exchange_rate",
    "top_up_failed",
    "pin_blocked",
    "card_linking",
    "cash_withdrawal_charge",
    "declined_transfer",
]


def records(per_intent=12):
    return [LabelledText(intent, f"{intent} text {n}") for intent in INTENTS for n in range(per_intent)]


def test_folds_are_disjoint_seeded_and_bounded():
    folds = split_folds(INTENTS, 2, 2, seed=3)
    assert len(folds) == 3 and all(len(f) == 2 for f in folds)
    assert len({i for f in folds for i in f}) == 6
    assert folds == split_folds(INTENTS, 2, 2, seed=3) and folds != split_folds(INTENTS, 2, 2, seed=4)
    with pytest.raises(ValueError, match="need 8 intents and at least one base intent"):
        split_folds(INTENTS, 4, 1, seed=0)


@pytest.mark.parametrize("generator", ["fold", "base-only"])
def test_no_novel_row_beyond_the_shots_reaches_the_generator(generator):
    rows = records()
    novel = ["exchange_rate", "pin_blocked"]
    fold = fold_data(1, rows, novel, shots=5, seed=0)
    config = NovelConfig(data="", test="", output=None, generator=generator)
    seen = generator_rows(config, fold) + [
        LabelledText(i, t) for i, ts in request_examples(config, fold).items() for t in ts
    ]
    held = {r for rows_ in fold.held_back.values() for r in rows_}
    assert not held & set(seen)
    shown = Counter(r.intent for r in seen if r.intent in novel)
    assert shown == {"exchange_rate": 5, "pin_blocked": 5}
    in_generator = Counter(r.intent for r in generator_rows(config, fold) if r.intent in novel)
    assert in_generator == ({} if generator == "base-only" else shown)
    assert all(len(fold.held_back[i]) == 7 for i in novel)
    assert sum(1 for r in fold.train if r.intent not in novel) == 6 * 12  # base intents whole


def slice_csv(path, source, per_intent):
    with open(source, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in INTENTS]
    taken, kept = Counter(), []
    for row in rows:
        if taken[row["category"]] < per_intent:
            taken[row["category"]] += 1
            kept.append(row)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "category": r["category"]} for r in kept)
    return path


@pytest.mark.parametrize("generator", ["fold", "base-only"])
def test_evaluate_novel_quick_runs_end_to_end(tmp_path, generator):
    from condgen.cli import main
    from tests.conftest import BANKING77_TRAIN

    train = slice_csv(tmp_path / "train.csv", BANKING77_TRAIN, 20)
    test = slice_csv(tmp_path / "test.csv", BANKING77_TRAIN.with_name("test.csv"), 8)
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--quick",
                "--data",
                str(train),
                "--test",
                str(test),
                "--output",
                str(out),
                "--generator",
                generator,
                "--novel-per-fold",
                "2",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    for key in (
        "setting",
        "shots",
        "novel_acc_baseline",
        "novel_acc_augmented",
        "novel_gain_points",
        "novel_gain_ci95",
        "novel_gain_ci95_by_intent",
        "novel_acc_topline",
        "baseline_name",
        "base_acc_delta_points",
        "overall_gain_points",
        "label_precision",
        "train_copy_rate",
        "records_per_second",
        "seconds",
    ):
        assert key in report, key
    assert report["setting"] == "novel" and report["generator"] == generator and len(report["per_fold"]) == 1
    assert len(report["novel_gain_ci95_by_intent"]) == 2
    assert 0.0 < report["label_precision_real_rows"] <= 1.0  # the judge knows most real test rows
    assert report["baseline_name"] in ("real", "oversampled", "balanced")
    assert set(report["novel_acc_by_recipe"]) == {"real", "oversampled", "balanced", "augmented", "topline"}
    # Every recipe is scored with both classifiers; the default (embeddings) heads the report.
    assert report["classifier"] == "embedding" and set(report["by_classifier"]) == {"embedding", "tfidf"}
    for block in report["by_classifier"].values():
        for key in (
            "novel_acc_baseline",
            "novel_acc_augmented",
            "novel_gain_points",
            "novel_gain_ci95",
            "novel_acc_topline",
            "base_acc_delta_points",
            "overall_gain_points",
        ):
            assert key in block, key
    assert report["novel_acc_augmented"] == report["by_classifier"]["embedding"]["novel_acc_augmented"]
    assert report["by_classifier"]["tfidf"] != report["by_classifier"]["embedding"]
    assert set(report["per_fold"][0]["scores"]) == {"embedding", "tfidf"}
    assert (out / "report.md").is_file() and (out / "label_precision.png").is_file()
    # The kept rows' quality report, per fold, and its mean in report.json.
    assert (out / "fold-1" / "quality" / "report.html").is_file()
    assert set(report["quality"]) == {"score", "label_score", "diversity_score", "fidelity_score", "privacy_score"}
    assert report["quality"] == report["per_fold"][0]["quality"] and 0 <= report["quality"]["score"] <= 100
    # The evaluation fold's generator saw its novel intents' 5 shots at most, never a held-back row.
    fold = report["per_fold"][0]
    bundle_examples = json.loads((out / "fold-1" / "bundle" / "examples.json").read_text())
    for intent in fold["novel"]:
        assert len(bundle_examples.get(intent, [])) == (0 if generator == "base-only" else 5)


def test_too_few_intents_for_the_folds_is_a_one_line_error(tmp_path, capsys):
    from condgen.cli import main
    from tests.conftest import BANKING77_TRAIN

    train = slice_csv(tmp_path / "train.csv", BANKING77_TRAIN, 6)
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(train),
                "--test",
                str(train),
                "--output",
                str(tmp_path / "o"),
                "--novel-per-fold",
                "4",
                "--folds",
                "2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "lower --folds or --novel-per-fold" in err and "Traceback" not in err


def test_tuning_keeps_the_base_intents_within_the_limit_and_the_rows_precise():
    from condgen.training.novel import Candidate, pick_margin_and_count

    # (novel acc, base-intent delta in points, judge's label precision, margin, rows)
    candidates = [
        Candidate(0.589, -0.95, 0.57, -0.1, 80),
        Candidate(0.509, -0.61, 0.57, -0.1, 40),
        Candidate(0.536, -0.38, 0.73, 0.1, 80),
        Candidate(0.50, -0.34, 0.64, 0.0, 40),
        Candidate(0.52, -0.30, 0.82, 0.25, 80),
    ]
    assert pick_margin_and_count(candidates, 0.5, 0.8) == (0.25, 80)
    assert pick_margin_and_count(candidates, 0.5, 0.0) == (0.1, 80)
    assert pick_margin_and_count(candidates, 1.0, 0.0) == (-0.1, 80)
    assert pick_margin_and_count(candidates, 0.5, 0.9) == (0.1, 80)  # none precise enough: the limit alone
    assert pick_margin_and_count(candidates, 0.1, 0.8) == (0.25, 80)  # none within: the least costly


@pytest.mark.parametrize("baseline", ["real", "oversampled", "balanced"])
def test_synthetic_rows_and_the_topline_are_trained_as_the_chosen_baseline(baseline):
    from condgen.training.novel import recipes

    fold = fold_data(0, records(), ["card_arrival", "exchange_rate"], shots=3, seed=0)
    synthetic = [LabelledText("card_arrival", f"new card_arrival line {n}") for n in range(4)]
    chosen = recipes(fold, synthetic, seed=0, baseline=baseline)
    augmented_rows, augmented_balanced = chosen["augmented"]
    topline_rows, topline_balanced = chosen["topline"]
    assert augmented_balanced == topline_balanced == (baseline == "balanced")
    assert set(synthetic) <= set(augmented_rows)
    novel_counts = Counter(r.intent for r in augmented_rows)
    if baseline == "oversampled":  # topped up to a base intent's 12 rows, synthetic ones included
        assert novel_counts["card_arrival"] == novel_counts["exchange_rate"] == 12
    else:
        assert novel_counts["card_arrival"] == 3 + 4 and novel_counts["exchange_rate"] == 3
    # the topline takes as many held-back rows per intent as there are synthetic ones
    held = [r for r in topline_rows if r.intent == "card_arrival" and r not in fold.train]
    assert held and set(held) <= set(fold.held_back["card_arrival"])
    # the baselines themselves do not depend on the choice
    assert chosen["balanced"] == (fold.train, True) and chosen["real"] == (fold.train, False)
