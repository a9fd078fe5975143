"""Score one evaluation fold of a `condgen evaluate --setting novel` run from its saved rows.

For a run stopped before its report (for time): rebuilds fold N's split with the run's settings
(report-less, so they are passed as flags), reads OUTPUT/fold-N/synthetic.csv and fits the same
recipes with the same functions as `evaluate`, printing every recipe's figures, the label
precision (full-data judge) and the training-copy share as JSON.

    python scripts/novel_score_fold.py OUT 1 --data train.csv --test test.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from condgen.codec import LabelledText
from condgen.training.data import load_records
from condgen.training.novel import BASELINES, copy_share, fit, fold_data, judged_right, score_recipes, split_folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("fold", type=int)
    parser.add_argument("--data", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--novel-per-fold", type=int, default=11)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline",
        choices=BASELINES,
        default="balanced",
        help="the run's baseline (real + synthetic is trained as it is)",
    )
    args = parser.parse_args()
    train, test = load_records(args.data, None, None), load_records(args.test, None, None)
    splits = split_folds(sorted({r.intent for r in train}), args.novel_per_fold, args.folds, args.seed)
    fold = fold_data(args.fold, train, splits[args.fold], args.shots, args.seed)
    with open(args.output / f"fold-{args.fold}" / "synthetic.csv", newline="", encoding="utf-8") as handle:
        rows = [LabelledText(r["intent"], r["text"]) for r in csv.DictReader(handle)]
    scores = score_recipes(fold, rows, test, args.seed, baseline=args.baseline)
    report: dict = {name: {k: v for k, v in s.items() if k != "novel_recall"} for name, s in scores.items()}
    report["label_precision"] = statistics.mean(judged_right(fit(train), rows))
    report["train_copy_rate"] = copy_share(fold, rows)
    report["rows"] = len(rows)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
