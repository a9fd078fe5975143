"""Can a filter a user could run raise label precision without losing the gain?

Reads a finished `condgen evaluate --setting novel` output folder (its report.json and each
evaluation fold's synthetic.csv), rebuilds the same folds, and for each fold compares the kept
rows with three filters built only from data the user has (the fold's real rows: base intents
whole, novel intents with their few shots), through a class-balanced TF-IDF classifier:

- `own_top1`: keep a row only if that classifier predicts its requested intent;
- `own_in_top3`: keep it if the requested intent is among its 3 most likely;
- `not_base`: drop it if the classifier predicts a base intent.

For each: rows kept, their label precision (the full-data judge, as in the report) and the
novel-intent accuracy of real + kept rows. Also the judge's own accuracy on the novel intents'
real test rows: the ceiling that label precision is measured against.

    python scripts/novel_filter_study.py /tmp/eval-novel
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import numpy as np

from condgen.codec import LabelledText
from condgen.training.data import load_records
from condgen.training.novel import fit, fold_data, judged_right, metrics, split_folds

RULES = ("own_top1", "own_in_top3", "not_base")


def keep(rule: str, intent: str, top3: list[str], novel: set[str]) -> bool:
    if rule == "own_top1":
        return top3[0] == intent
    if rule == "own_in_top3":
        return intent in top3
    return top3[0] in novel


def study_fold(number: int, novel: list[str], config: dict, train, test, judge, folder: Path) -> dict:
    fold = fold_data(number, train, novel, config["shots"], config["seed"])
    with open(folder / f"fold-{number}" / "synthetic.csv", newline="", encoding="utf-8") as handle:
        rows = [LabelledText(r["intent"], r["text"]) for r in csv.DictReader(handle)]
    novel_set = set(novel)
    right = judged_right(judge, rows)
    balanced = fit(fold.train, balanced=True)
    probs = balanced.predict_proba([r.text for r in rows])
    classes = list(balanced.classes_)
    top3 = [[classes[i] for i in np.argsort(-p)[:3]] for p in probs]
    real_novel = [r for r in test if r.intent in novel_set]
    result = {
        "fold": number,
        "judge_accuracy_on_real_novel_rows": statistics.mean(judged_right(judge, real_novel)),
        "all": {
            "kept": len(rows),
            "label_precision": statistics.mean(right),
            "novel_acc": metrics(fit(fold.train + rows), test, novel)["novel_acc"],
        },
    }
    for rule in RULES:
        kept = [keep(rule, r.intent, t, novel_set) for r, t in zip(rows, top3)]
        chosen = [r for r, k in zip(rows, kept) if k]
        result[rule] = {
            "kept": len(chosen),
            "label_precision": statistics.mean([ok for ok, k in zip(right, kept) if k]) if chosen else 0.0,
            "novel_acc": metrics(fit(fold.train + chosen), test, novel)["novel_acc"],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="the folder of a finished `condgen evaluate --setting novel`")
    args = parser.parse_args()
    report = json.loads((args.output / "report.json").read_text())
    config = report["config"]
    train = load_records(config["data"], config.get("text_column"), config.get("label_column"))
    test = load_records(config["test"], config.get("text_column"), config.get("label_column"))
    judge = fit(train)
    intents = sorted({r.intent for r in train})
    splits = split_folds(intents, config["novel_per_fold"], config["folds"], config["seed"])
    results = [
        study_fold(number, splits[number], config, train, test, judge, args.output) for number in range(1, len(splits))
    ]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
