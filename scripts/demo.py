"""`make demo`: fine-tune, export, serve, generate 20 records for each of 5 intents, stop, report.

Runs the real commands (`condgen train`, `condgen export`, `condgen serve`) as a user
would, then uses the Python client to fetch a DataFrame and writes demo_out/synthetic.csv.
The server's label check is on (its default); the bundle classifier's filter is off, so the
share of rows it assigns to their requested intent judges the generator and its label check.
A second request brings five texts of an intent the model was never trained on
(`NEW_INTENT`) and gets new rows of it. Last, `condgen report` judges the rows of the five
intents against the real ones (demo_out/report/report.html).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

INTENTS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked"]
NEW_INTENT = "crypto_purchase"  # not one of banking77's intents: its examples come with the request
NEW_INTENT_TEXTS = [
    "Can I buy bitcoin with the money in my account?",
    "How do I purchase cryptocurrency in the app?",
    "I want to buy some ethereum, is that possible?",
    "Which cryptocurrencies can I buy with my card?",
    "Is there a fee for buying crypto?",
]


PROGRESS = re.compile(r"(\d+)/(\d+) \[")  # a tqdm bar in the command's output: steps done / total


def run_step(title: str, command: list[str], log_path: Path) -> float:
    """Run one stage with its output in `log_path`; the console gets one line, and a progress bar
    where the command draws one (fine-tuning). A failure shows the log's last lines."""
    from tqdm import tqdm

    print(f"{title}: {' '.join(command[2:])}  (log: {log_path})", flush=True)
    started = time.time()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, tqdm(unit="step", leave=False, disable=None) as bar:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert process.stdout is not None
        for chunk in iter(lambda: process.stdout.read(256), ""):
            log.write(chunk)
            for done, total in PROGRESS.findall(chunk)[-1:]:
                bar.total = int(total)
                bar.n = int(done)
                bar.refresh()
        code = process.wait()
    if code != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(f"{title} failed (exit {code}); the end of {log_path}:\n" + "\n".join(tail))
    seconds = time.time() - started
    print(f"  done in {seconds:.0f} s", flush=True)
    return seconds


def start_server(bundle: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start `condgen serve` on a free port; return the process and its address."""
    log = open(log_path, "w")  # noqa: SIM115 - the server's log, open while it runs
    process = subprocess.Popen(
        [sys.executable, "-m", "condgen.cli", "serve", "--bundle", str(bundle), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"listening on (\S+):(\d+)", line)
        if match:
            return process, f"{match.group(1)}:{match.group(2)}"
    raise SystemExit(f"the server exited before listening; see {log_path}")


def copy_rate(frame, train_csv: Path) -> float:
    import pandas as pd

    from condgen.codec import normalize_for_match

    train = {normalize_for_match(t) for t in pd.read_csv(train_csv)["text"]}
    return float(frame["text"].map(lambda t: normalize_for_match(t) in train).mean()) if len(frame) else 0.0


def describe(summary, what: str) -> str:
    acceptance = summary.records_accepted / summary.lines_parsed if summary.lines_parsed else 0.0
    rejected = {f.name: v for f, v in summary.rejected.ListFields()}
    return (
        f"{what}: accepted {summary.records_accepted}/{summary.lines_parsed} lines = {acceptance:.1%}; "
        f"rejected: {rejected or 'none'}; tokens generated: {summary.tokens_generated}"
        f"{'' if summary.complete else ' (INCOMPLETE: round budget spent)'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--config", default="configs/banking77-demo.yaml")
    parser.add_argument("--data", default="../shared/data/banking77/train.csv")
    parser.add_argument(
        "--holdout", default="../shared/data/banking77/test.csv", help="unseen real rows for the quality report"
    )
    parser.add_argument("--num-records", type=int, default=20)
    parser.add_argument("--new-intent-records", type=int, default=10)
    parser.add_argument("--skip-training", action="store_true", help="reuse an existing demo_out/bundle")
    args = parser.parse_args()
    started = time.time()
    condgen = [sys.executable, "-m", "condgen.cli"]
    bundle = args.out / "bundle"
    times = {}
    if not (args.skip_training and (bundle / "condgen.json").is_file()):
        times["train_s"] = run_step(
            "1/5 fine-tune",
            [*condgen, "train", "--config", args.config, "--data", args.data, "--output", str(args.out / "checkpoint")],
            args.out / "train.log",
        )
        times["export_s"] = run_step(
            "2/5 export",
            [*condgen, "export", "--checkpoint", str(args.out / "checkpoint"), "--output", str(bundle)],
            args.out / "export.log",
        )
    process, target = start_server(bundle, args.out / "server.log")
    print(f"3/5 serve: condgen serve --bundle {bundle}  (listening on {target}; log: {args.out / 'server.log'})")
    try:
        from tqdm import tqdm

        from condgen.client import Client

        print(f"4/5 generate: {args.num_records} records for each of {', '.join(INTENTS)}", flush=True)
        gen_started = time.time()
        with Client(target, timeout=1800) as client:
            with tqdm(total=len(INTENTS) * args.num_records, unit="rec", leave=False, disable=None) as bar:
                frame, summary = client.generate_df(
                    INTENTS,
                    args.num_records,
                    seed=7,
                    temperature=0.5,
                    top_p=0.95,
                    on_record=lambda _: bar.update(1),
                    return_summary=True,
                    allow_incomplete=True,  # the figures below say so when the round budget ran out
                    with_scores=True,
                )
            times["generate_s"] = time.time() - gen_started
            print(
                f"  and {args.new_intent_records} of a new intent, {NEW_INTENT!r}, from {len(NEW_INTENT_TEXTS)} "
                "examples sent with the request",
                flush=True,
            )
            new_started = time.time()
            new_frame, new_summary = client.generate_df(
                [NEW_INTENT],
                args.new_intent_records,
                seed=7,
                temperature=0.5,
                top_p=0.95,
                max_rounds=40,
                examples={NEW_INTENT: NEW_INTENT_TEXTS},
                return_summary=True,
                allow_incomplete=True,
                with_scores=True,
            )
            times["new_intent_s"] = time.time() - new_started
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    out_csv = args.out / "synthetic.csv"
    frame[["intent", "text"]].to_csv(out_csv, index=False)
    import pandas as pd

    sample = pd.concat([frame.groupby("intent", sort=False).head(1), new_frame.head(5)])
    with pd.option_context("display.max_colwidth", 90, "display.width", 140):
        print(f"\na sample: one row per intent, and 5 of the new intent {NEW_INTENT!r}")
        print(sample[["intent", "text", "label_margin"]].to_string(index=False))
    print(f"\nwrote {len(frame)} rows to {out_csv}")
    print(describe(summary, "the five intents"))
    print(describe(new_summary, f"the new intent {NEW_INTENT!r}"))
    on_label = (frame["predicted_intent"] == frame["intent"]).mean() if len(frame) else 0.0
    print(
        f"copies of a training text: {copy_rate(frame, Path(args.data)):.1%}; mean fidelity (bundle classifier): "
        f"{frame['fidelity'].mean():.3f}"
    )
    print(
        f"on-label: the bundle classifier assigns {on_label:.0%} of the rows to their requested intent "
        f"(its filter off; the served model's label check on)"
    )
    report = [
        *condgen,
        "report",
        "--real",
        args.data,
        "--synthetic",
        str(out_csv),
        "--output",
        str(args.out / "report"),
    ]
    if Path(args.holdout).is_file():
        report += ["--holdout", args.holdout]
    times["report_s"] = run_step("5/5 quality report", report, args.out / "report.log")
    quality = json.loads((args.out / "report" / "report.json").read_text())
    print(
        f"quality score {quality['score']:.1f} (label {quality['label_score']:.1f}, diversity "
        f"{quality['diversity_score']:.1f}, fidelity {quality['fidelity_score']:.1f}, privacy "
        f"{quality['privacy_score']:.1f}): {args.out / 'report' / 'report.html'}"
    )
    times["total_s"] = time.time() - started
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
