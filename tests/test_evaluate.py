"""`condgen evaluate --quick`: the whole experiment on a tiny model gives a well-formed report."""

import csv
import json

from conftest import BANKING77_TRAIN, TEST_INTENTS

from condgen.cli import main

REPORT_KEYS = [
    "baseline_acc",
    "augmented_acc",
    "baseline_acc_mean",
    "augmented_acc_mean",
    "gain_points",
    "gain_ci95",
    "macro_f1_gain_points",
    "fidelity_mean",
    "train_copy_rate",
    "distinct_2",
    "acceptance_rate",
    "seconds",
]


def subset(source, path, per_intent, columns):
    """banking77 rows of the test intents, rewritten with other column names (text,intent)."""
    with open(source, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in TEST_INTENTS]
    kept, counts = [], {}
    for row in rows:
        if counts.get(row["category"], 0) < per_intent:
            counts[row["category"]] = counts.get(row["category"], 0) + 1
            kept.append({columns[0]: row["text"], columns[1]: row["category"]})
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(kept)
    return path


def test_quick_evaluate_writes_a_complete_report(tmp_path, capsys):
    train = subset(BANKING77_TRAIN, tmp_path / "train.csv", 30, ("text", "intent"))
    test = subset(BANKING77_TRAIN.with_name("test.csv"), tmp_path / "test.csv", 20, ("text", "intent"))
    out = tmp_path / "eval_out"
    # the run, and later the same run re-scored from its saved bundles and rows
    run = [
        "evaluate", "--setting", "few-shot", "--data", str(train), "--test", str(test), "--shots", "5",
        "--per-intent", "3", "--seeds", "0", "1", "--steps", "120", "--quick", "--output", str(out),
    ]  # fmt: skip
    assert main([*run, "--prompt-examples", "4", "--temperature", "1.0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["prompt_examples"] == 4 and report["config"]["temperature"] == 1.0
    assert [k for k in REPORT_KEYS if k not in report] == []
    assert len(report["baseline_acc"]) == len(report["augmented_acc"]) == 2
    assert all(0.0 <= a <= 1.0 for a in report["baseline_acc"] + report["augmented_acc"])
    assert report["synthetic_rows"] == [9, 9]
    assert report["train_copy_rate"] == 0.0  # copies of the few-shot set are rejected by default
    assert 0.0 <= report["fidelity_mean"] <= 1.0 and len(report["gain_ci95"]) == 2
    for name in ("report.md", "accuracy.png", "per_intent_gain.png", "lengths.png"):
        assert (out / name).stat().st_size > 100
    for seed in (0, 1):  # each seed's quality report (condgen report), and their mean
        assert json.loads((out / f"seed-{seed}" / "quality" / "report.json").read_text())["rows"] == 9
    assert 0 <= report["quality"]["score"] <= 100 and 0 <= report["quality"]["privacy_score"] <= 100
    assert "points" in capsys.readouterr().out
    # re-scoring an earlier run's bundles and rows gives the same figures, without generating
    again = tmp_path / "again.json"
    (out / "report.json").rename(again)
    assert main([*run, "--reuse-bundles", "--reuse-synthetic"]) == 0
    rescored, first = json.loads((out / "report.json").read_text()), json.loads(again.read_text())
    assert rescored["augmented_acc"] == first["augmented_acc"]
    assert rescored["acceptance_rate"] == first["acceptance_rate"]
