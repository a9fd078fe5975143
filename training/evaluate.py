"""`condgen evaluate`: does adding synthetic rows make a classifier better?

For each seed: sample `shots` real examples per intent from the training data (the
few-shot set); fine-tune the generator on the few-shot set only, export it (its copy index
and fidelity classifier see only the few-shot set, so nothing leaks from the rest of the
training split), generate `per_intent` records per intent in process (by default keeping only records the
few-shot classifier assigns to their intent: agreement filtering); train the same
TF-IDF + logistic-regression classifier on the few-shot set (baseline) and on the few-shot
set plus the synthetic rows (augmented), and score both on the test split. A classifier
trained on the full training split judges the synthetic rows' label fidelity; it is never
used as a filter. Writes report.json and report.md with PNG plots, and each seed's quality
report (`condgen report`) to seed-N/quality/.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import random
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from condgen.codec import LabelledText

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class GeneratorRecipe:
    """How an experiment fine-tunes and samples its generator (both settings share it)."""

    base_model: str = "smollm2-135m"
    steps: int = 160
    batch_size: int = 8
    max_tokens: int = 64
    learning_rate: float = 3e-4
    temperature: float = 1.2
    top_p: float = 0.95
    prompt_examples: int = 25
    group_by_intent: bool = False
    text_column: str | None = None
    label_column: str | None = None
    quick: bool = False  # the tiny model, for tests


@dataclass(kw_only=True)
class EvaluateConfig(GeneratorRecipe):
    """Settings of one few-shot augmentation experiment (`--setting few-shot`)."""

    data: str
    test: str
    output: Path
    shots: int = 10
    per_intent: int = 20
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    min_fidelity: float = 0.0
    agreement_filter: bool = True
    reuse_bundles: bool = False
    reuse_synthetic: bool = False


@dataclass
class SeedResult:
    seed: int
    baseline_acc: float
    augmented_acc: float
    baseline_f1: float
    augmented_f1: float
    per_intent_gain: dict[str, float]
    synthetic: list[LabelledText]
    acceptance_rate: float | None
    seconds: float


def sample_few_shot(records: list[LabelledText], shots: int, seed: int) -> list[LabelledText]:
    """`shots` distinct records per intent (all of them where an intent has fewer)."""
    by_intent: dict[str, list[LabelledText]] = defaultdict(list)
    for record in records:
        by_intent[record.intent].append(record)
    rng = random.Random(seed)
    chosen = []
    for intent in sorted(by_intent):
        group = by_intent[intent]
        chosen.extend(rng.sample(group, min(shots, len(group))))
    return chosen


def write_csv(path: Path, records: list[LabelledText]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["intent", "text"])
        writer.writerows((r.intent, r.text) for r in records)
    return path


def train_generator(config: GeneratorRecipe, few_shot_csv: Path, folder: Path) -> Path:
    """Fine-tune the recipe's generator on the rows in `few_shot_csv` and export its bundle."""
    from condgen.training.config import TrainingConfig
    from condgen.training.finetune import finetune

    base = config.base_model
    if config.quick:
        from condgen.training.data import encode_lines, load_records
        from condgen.training.tiny import build_tiny_base_model

        base = str(build_tiny_base_model(encode_lines(load_records(str(few_shot_csv))), folder / "tiny-base"))
    training = TrainingConfig(
        data_source=str(few_shot_csv),
        pretrained_model=base,
        steps=config.steps,
        batch_size=config.batch_size,
        max_tokens=config.max_tokens,
        learning_rate=config.learning_rate,
        warmup_steps=max(1, config.steps // 10),
        validation_fraction=0.0,
        eval_steps=10_000,
        save_steps=10_000,
        logging_steps=max(1, config.steps // 5),
        seed=0,
        group_by_intent=config.group_by_intent,
    )
    finetune(training, folder / "checkpoint")
    from condgen.training.export import export_bundle

    return export_bundle(folder / "checkpoint", folder / "bundle").bundle_dir


async def _generate(bundle: Path, intents: list[str], config: EvaluateConfig, seed: int):
    from tqdm import tqdm

    from condgen.server.requests import GenerationSpec
    from condgen.server.sampling import SamplingSettings
    from condgen.server.scheduler import Scheduler, SchedulerConfig

    spec = GenerationSpec(
        intents=tuple(intents),
        num_records=config.per_intent,
        seed=seed,
        sampling=SamplingSettings(temperature=config.temperature, top_p=config.top_p),
        max_new_tokens=48 if config.quick else 128,
        num_prompt_examples=config.prompt_examples,
        min_fidelity=config.min_fidelity,
        avoid_recent_duplicates=False,
        require_predicted_intent=config.agreement_filter,
    )
    # Every intent's prompt recurs when it shows all of a few-shot set: keep all of them.
    async with Scheduler.for_bundle(bundle, SchedulerConfig(prefix_cache_tokens=16384)) as scheduler:
        with tqdm(total=len(intents) * config.per_intent, unit="rec", desc=f"generating (seed {seed})") as bar:
            generated, summary = await scheduler.collect(spec, on_record=lambda _: bar.update(1))
    return [LabelledText(r.intent, r.text) for r in generated], summary


def score(train: list[LabelledText], test: list[LabelledText]) -> tuple[float, float, dict[str, float]]:
    """Accuracy, macro-F1 and per-intent recall of the fixed classifier trained on `train`."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    from condgen.training.fidelity import fit_classifier

    model = fit_classifier([r.text for r in train], [r.intent for r in train])
    truth = [r.intent for r in test]
    predicted = model.predict([r.text for r in test])
    labels = sorted(set(truth))
    recalls = recall_score(truth, predicted, labels=labels, average=None, zero_division=0)
    return (
        float(accuracy_score(truth, predicted)),
        float(f1_score(truth, predicted, average="macro")),
        dict(zip(labels, map(float, recalls))),
    )


def synthetic_rows(
    config: EvaluateConfig, folder: Path, bundle: Path, intents: list[str], seed: int
) -> tuple[list[LabelledText], float | None]:
    """Generate the seed's synthetic rows (or, with `reuse_synthetic`, read an earlier run's);
    returns them and the acceptance rate (None when an earlier run did not record it)."""
    rows_csv, stats_json = folder / "synthetic.csv", folder / "generation.json"
    if config.reuse_synthetic and rows_csv.is_file():
        from condgen.training.data import load_records

        log.info("seed %d: reusing %s", seed, rows_csv)
        stats = json.loads(stats_json.read_text()) if stats_json.is_file() else {}
        return load_records(str(rows_csv)), stats.get("acceptance_rate")
    synthetic, summary = asyncio.run(_generate(bundle, intents, config, seed))
    write_csv(rows_csv, synthetic)
    acceptance = summary.records_accepted / summary.lines_parsed if summary.lines_parsed else 0.0
    stats_json.write_text(
        json.dumps(
            {
                "acceptance_rate": acceptance,
                "lines_parsed": summary.lines_parsed,
                "rejected": dict(summary.rejected),
                "tokens": summary.tokens_generated,
                "seconds": summary.elapsed_seconds,
            },
            indent=2,
        )
    )
    return synthetic, acceptance


def run_seed(config: EvaluateConfig, train: list[LabelledText], test: list[LabelledText], seed: int) -> SeedResult:
    started = time.time()
    folder = config.output / f"seed-{seed}"
    few_shot = sample_few_shot(train, config.shots, seed)
    few_shot_csv = write_csv(folder / "few_shot.csv", few_shot)
    if config.reuse_bundles and (folder / "bundle" / "condgen.json").is_file():
        log.info("seed %d: reusing %s", seed, folder / "bundle")
        bundle = folder / "bundle"
    else:
        bundle = train_generator(config, few_shot_csv, folder)
    synthetic, acceptance = synthetic_rows(config, folder, bundle, sorted({r.intent for r in few_shot}), seed)
    base_acc, base_f1, base_recall = score(few_shot, test)
    aug_acc, aug_f1, aug_recall = score(few_shot + synthetic, test)
    gain = {intent: aug_recall[intent] - base_recall[intent] for intent in base_recall}
    log.info("seed %d: baseline %.4f, augmented %.4f (%d synthetic rows)", seed, base_acc, aug_acc, len(synthetic))
    return SeedResult(seed, base_acc, aug_acc, base_f1, aug_f1, gain, synthetic, acceptance, time.time() - started)


def paired_ci95(differences: list[float]) -> list[float]:
    """95% confidence interval of the mean of paired differences (Student t)."""
    if len(differences) < 2:
        return [float("nan"), float("nan")]
    from scipy import stats

    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    half = stats.t.ppf(0.975, len(differences) - 1) * sd / math.sqrt(len(differences))
    return [mean - half, mean + half]


def distinct_2(texts: list[str]) -> float:
    """Distinct word bigrams over all word bigrams of the texts."""
    from condgen.training.quality import distinct_n

    return distinct_n(texts, 2)


def judge_fidelity(train: list[LabelledText], synthetic: list[LabelledText]) -> float:
    """Mean probability of the requested intent under a classifier trained on the full train split."""
    from condgen.training.fidelity import fit_classifier

    if not synthetic:
        return 0.0
    judge = fit_classifier([r.text for r in train], [r.intent for r in train])
    probs = judge.predict_proba([r.text for r in synthetic])
    column = {c: i for i, c in enumerate(judge.classes_)}
    return float(np.mean([probs[i, column[r.intent]] for i, r in enumerate(synthetic)]))


def copy_rate(config: EvaluateConfig, train: list[LabelledText], results: list[SeedResult]) -> float:
    """Share of synthetic rows that copy (Jaccard >= 0.9) a text of their own seed's few-shot set."""
    from condgen.server.copy_index import CopyIndex

    copies = total = 0
    for result in results:
        index = CopyIndex(r.text for r in sample_few_shot(train, config.shots, result.seed))
        copies += sum(index.is_copy(r.text) for r in result.synthetic)
        total += len(result.synthetic)
    return copies / total if total else 0.0


def mean_of_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def build_report(config: EvaluateConfig, train, results: list[SeedResult], seconds: float) -> dict:
    base = [r.baseline_acc for r in results]
    aug = [r.augmented_acc for r in results]
    diffs = [(a - b) * 100 for a, b in zip(aug, base)]
    synthetic = [s for r in results for s in r.synthetic]
    per_intent = {
        intent: statistics.mean(r.per_intent_gain[intent] for r in results) * 100
        for intent in results[0].per_intent_gain
    }
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "baseline_acc": base,
        "augmented_acc": aug,
        "baseline_acc_mean": statistics.mean(base),
        "augmented_acc_mean": statistics.mean(aug),
        "gain_points": statistics.mean(diffs),
        "gain_ci95": paired_ci95(diffs),
        "baseline_macro_f1": [r.baseline_f1 for r in results],
        "augmented_macro_f1": [r.augmented_f1 for r in results],
        "macro_f1_gain_points": statistics.mean((r.augmented_f1 - r.baseline_f1) * 100 for r in results),
        "fidelity_mean": judge_fidelity(train, synthetic),
        "train_copy_rate": copy_rate(config, train, results),
        "distinct_2": distinct_2([s.text for s in synthetic]),
        "acceptance_rate": mean_of_known([r.acceptance_rate for r in results]),
        "synthetic_rows": [len(r.synthetic) for r in results],
        "per_intent_gain_points": per_intent,
        "seconds_per_seed": [r.seconds for r in results],
        "seconds": seconds,
    }


def seed_quality(config: EvaluateConfig, train, test, results: list[SeedResult]) -> dict[str, float]:
    """Each seed's quality report (seed-N/quality/report.html: its rows against its few-shot set,
    the test split as the unseen reference); returns the mean headline and parts over seeds."""
    from condgen.training.encoder import EmbeddingCache
    from condgen.training.quality import PARTS, quality_report

    keys = ("score", *(f"{part}_score" for part in PARTS))
    embed = EmbeddingCache.load()
    reports = [
        quality_report(
            sample_few_shot(train, config.shots, r.seed),
            r.synthetic,
            config.output / f"seed-{r.seed}" / "quality",
            test,
            embed=embed,
        )
        for r in results
        if r.synthetic
    ]
    return {key: statistics.mean(r[key] for r in reports) for key in keys} if reports else {}


def evaluate(config: EvaluateConfig) -> dict:
    """Run the experiment and write report.json, report.md and the plots to config.output."""
    from condgen.training.data import load_records
    from condgen.training.plots import write_markdown, write_plots

    started = time.time()
    config.output.mkdir(parents=True, exist_ok=True)
    train = load_records(config.data, config.text_column, config.label_column)
    test = load_records(config.test, config.text_column, config.label_column)
    results = [run_seed(config, train, test, seed) for seed in config.seeds]
    quality = seed_quality(config, train, test, results)
    report = build_report(config, train, results, time.time() - started)
    report["quality"] = quality
    (config.output / "report.json").write_text(json.dumps(report, indent=2))
    plots = write_plots(config.output, report, train, [s for r in results for s in r.synthetic])
    write_markdown(config.output / "report.md", report, plots)
    return report
