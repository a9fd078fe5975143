"""What the label check is worth: its agreement with a full-data judge, and its cost.

    python -m condgen.bench.label_check --bundle demo_out/bundle --data ../shared/data/banking77/train.csv

In one process, on the bundle's own scheduler (the server's path, no gRPC), one seeded request
for PER_INTENT records of each intent is run three times:

1. label check off: the rows every other check passes (the "raw" rows);
2. label check on with margin -100, which keeps every row and records its margin: the same
   rows as run 1 (same seed), so the time difference is the scoring's own cost, and a sweep
   over margins gives what each margin would keep;
3. label check on with the margin given (the server's default unless --margin): the rows a
   user gets, and their records per second (rejected lines cost generation time too).

The judge is a TF-IDF + logistic-regression classifier trained on the full training CSV (not
the bundle's classifier, which the check uses to pick rivals): a row is "right" when the judge
predicts its requested intent. Precision of a margin = right rows among those it keeps; recall =
kept rows among the right ones. Writes bench/results/label_check.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import time
from pathlib import Path

from condgen.server.engine import RUNTIMES, EngineConfig
from condgen.server.limits import Defaults, LabelCheckConfig
from condgen.server.requests import GenerationSpec
from condgen.server.sampling import SamplingSettings
from condgen.server.scheduler import Scheduler

DEMO_INTENTS = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked")
SWEEP = (-100.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0)
NO_FILTER_MARGIN = -100.0


def fit_judge(data: str):
    """The full-data judge: the project's fixed classifier recipe on every training row."""
    from condgen.training.data import load_records
    from condgen.training.fidelity import fit_classifier

    records = load_records(data)
    return fit_classifier([r.text for r in records], [r.intent for r in records])


async def timed_run(scheduler: Scheduler, spec: GenerationSpec) -> dict:
    started = time.perf_counter()
    records, summary = await scheduler.collect(spec)
    seconds = time.perf_counter() - started
    return {
        "records": records,
        "seconds": seconds,
        "records_per_s": len(records) / seconds,
        "lines_parsed": summary.lines_parsed,
        "rejected": dict(summary.rejected),
        "complete": summary.complete,
    }


def sweep(records, right: list[bool]) -> list[dict]:
    """What each margin of SWEEP keeps out of the unfiltered, scored rows."""
    rows = []
    total_right = sum(right)
    for margin in SWEEP:
        kept = [ok for r, ok in zip(records, right) if r.label_margin >= margin]
        rows.append(
            {
                "margin": margin,
                "kept_share": len(kept) / len(records) if records else 0.0,
                "precision": sum(kept) / len(kept) if kept else 0.0,
                "recall": sum(kept) / total_right if total_right else 0.0,
            }
        )
    return rows


async def measure(args) -> dict:
    judge = fit_judge(args.data)
    intents = tuple(args.intent or DEMO_INTENTS)
    base = GenerationSpec(
        intents=intents,
        num_records=args.per_intent,
        seed=args.seed,
        sampling=SamplingSettings(temperature=args.temperature, top_p=args.top_p),
        max_new_tokens=args.max_new_tokens,
        num_prompt_examples=args.prompt_examples,
        avoid_recent_duplicates=False,
    )
    config = LabelCheckConfig(rivals=args.rivals, context_examples=args.context_examples)
    runs = {}
    engine = EngineConfig(runtime=args.runtime)
    async with Scheduler.for_bundle(args.bundle, label_check=config, engine_config=engine) as scheduler:
        device = f"{scheduler.engine.runtime} on {scheduler.engine.provider}"
        await scheduler.collect(dataclasses.replace(base, num_records=2))  # warm-up
        for name, check, margin in (("off", False, 0.0), ("scored", True, NO_FILTER_MARGIN), ("on", True, args.margin)):
            print(f"run: label check {name}", flush=True)
            runs[name] = await timed_run(scheduler, dataclasses.replace(base, label_check=check, label_margin=margin))

    def right(records) -> list[bool]:
        predicted = judge.predict([r.text for r in records]) if records else []
        return [p == r.intent for p, r in zip(predicted, records)]

    report = {
        "bundle": str(args.bundle),
        "intents": list(intents),
        "per_intent": args.per_intent,
        "margin": args.margin,
        "rivals": args.rivals,
        "context_examples": args.context_examples,
        "engine": device,
        "temperature": args.temperature,
        "seed": args.seed,
        "git_sha": _git_sha(),
    }
    for name, run in runs.items():
        ok = right(run["records"])
        report[name] = {
            "records": len(ok),
            "on_label_share": sum(ok) / len(ok) if ok else 0.0,
            **{k: v for k, v in run.items() if k != "records"},
        }
    scored = runs["scored"]["records"]
    report["sweep"] = sweep(scored, right(scored))
    predicted = judge.predict([r.text for r in scored]) if scored else []
    report["rows"] = [
        {"intent": r.intent, "text": r.text, "label_margin": r.label_margin, "judge": str(p)}
        for r, p in zip(scored, predicted)
    ]
    report["scoring_overhead"] = runs["scored"]["seconds"] / runs["off"]["seconds"] - 1.0
    report["records_per_s_ratio_on_vs_off"] = runs["on"]["records_per_s"] / runs["off"]["records_per_s"]
    return report


def _git_sha() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip()


def print_report(report: dict) -> None:
    print(f"engine: {report['engine']}")
    for name in ("off", "scored", "on"):
        run = report[name]
        print(
            f"label check {name:6s}: {run['records']} rows, on-label (judge) {run['on_label_share']:.1%}, "
            f"{run['records_per_s']:.2f} records/s, {run['lines_parsed']} lines, "
            f"label_check rejections {run['rejected'].get('label_check', 0)}"
        )
    print(
        f"scoring overhead {report['scoring_overhead']:+.1%}; records/s on/off "
        f"{report['records_per_s_ratio_on_vs_off']:.2f}"
    )
    print("margin   kept   precision  recall")
    for row in report["sweep"]:
        print(f"{row['margin']:7.2f}  {row['kept_share']:5.1%}  {row['precision']:8.1%}  {row['recall']:6.1%}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("demo_out/bundle"))
    parser.add_argument("--data", default="../shared/data/banking77/train.csv", help="training CSV for the judge")
    parser.add_argument("--intent", action="append", help="an intent (repeat; default: the demo's five)")
    parser.add_argument("--per-intent", type=int, default=40)
    parser.add_argument("--margin", type=float, default=Defaults.label_margin)
    parser.add_argument("--rivals", type=int, default=LabelCheckConfig.rivals)
    parser.add_argument("--context-examples", type=int, default=LabelCheckConfig.context_examples)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto", help="as `condgen serve --runtime`")
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt-examples", type=int, default=25)
    parser.add_argument("--output", type=Path, default=Path("bench/results/label_check.json"))
    args = parser.parse_args(argv)
    report = asyncio.run(measure(args))
    print_report(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
