"""Generator-recipe sweep on a development split (never the test split): which fine-tuning
steps, temperature and prompt size give synthetic rows that help, and which filter keeps them.

Seed 0's few-shot set (`--shots` per intent) trains each recipe with condgen's own finetune();
the development split is every other row of the training file. For each sampling setting the
script draws `--candidates` first lines per intent with transformers `generate` (on CUDA where
there is one: the whole default sweep takes about 6 minutes on one H200, hours on 2 CPU cores)
from condgen's own prompts, drops malformed lines, prompt echoes, few-shot copies and
duplicates, and scores the fixed TF-IDF + logistic-regression classifier on the few-shot set
plus `--cap` rows per intent chosen by each filter. `oracle` filters use a judge trained on
the full training split: a diagnostic of what perfect labels would give, never a usable filter.

    python scripts/recipe_sweep.py --data ../shared/data/banking77/train.csv --output sweep_out \
        --train s80:80:3e-4:0 s160:160:3e-4:0 --sample 0.9:25 1.2:25

Writes OUTPUT/sweep.json (gain in points over the few-shot baseline per recipe and filter)
and OUTPUT/pool-*.csv.
"""

import argparse
import json
import multiprocessing
import os
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from condgen.codec import CodecError, LabelledText, decode_line, normalize_for_match
from condgen.server.copy_index import CopyIndex
from condgen.server.prompts import build_prompt
from condgen.training.data import load_records
from condgen.training.evaluate import distinct_2, sample_few_shot, write_csv
from condgen.training.fidelity import fit_classifier

parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--data", required=True, help="training CSV (intent/text columns)")
parser.add_argument("--output", type=Path, required=True, help="folder for sweep.json, pools and checkpoints")
parser.add_argument("--base-model", default="smollm2-135m")
parser.add_argument("--shots", type=int, default=10)
parser.add_argument("--candidates", type=int, default=40, help="first lines sampled per intent and setting")
parser.add_argument("--cap", type=int, default=20, help="synthetic rows per intent added to the few-shot set")
parser.add_argument(
    "--train",
    nargs="+",
    default=["s80:80:3e-4:0", "base-instruct:0:0:0", "s160:160:3e-4:0", "s40:40:3e-4:0", "s80-grouped:80:3e-4:1"],
    help="recipes NAME:STEPS:LR:GROUP_BY_INTENT (0 steps: the base model as it is)",
)
parser.add_argument(
    "--sample", nargs="+", default=["0.9:25", "1.2:25", "0.9:4"], help="sampling settings TEMPERATURE:PROMPT_EXAMPLES"
)
parser.add_argument(
    "--budget-seconds",
    type=float,
    default=float("inf"),
    help="start no further training recipe after this many seconds",
)
parser.add_argument("--intents", type=int, default=0, help="only the first N intents (0: all; for a dry run)")
ARGS = parser.parse_args()
OUT, CANDIDATES, CAP, BUDGET_S = ARGS.output, ARGS.candidates, ARGS.cap, ARGS.budget_seconds
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
t0 = time.time()


def log(*a):
    print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)


train = load_records(ARGS.data)
few = sample_few_shot(train, ARGS.shots, 0)
intents = sorted({r.intent for r in few})
if ARGS.intents:
    intents = intents[: ARGS.intents]
    few = [r for r in few if r.intent in intents]
    train = [r for r in train if r.intent in intents]
few_keys = {normalize_for_match(r.text) for r in few}
dev = [r for r in train if normalize_for_match(r.text) not in few_keys]
examples = defaultdict(list)
for r in few:
    examples[r.intent].append(r.text)
few_csv = write_csv(OUT / "few_shot.csv", few)
copies = CopyIndex(r.text for r in few)
few_intents = np.array([r.intent for r in few])
few_chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True).fit([r.text for r in few])
few_vectors = few_chars.transform([r.text for r in few])


def fit(rows):
    return fit_classifier([r.text for r in rows], [r.intent for r in rows])


def dev_acc(rows):
    model = fit(few + rows)
    return float((model.predict([r.text for r in dev]) == np.array([r.intent for r in dev])).mean())


# Workers fork now, before CUDA starts, and inherit the data; classifier fits run there while the GPU samples.
workers = ProcessPoolExecutor(
    max_workers=max(2, (os.cpu_count() or 2) - 2), mp_context=multiprocessing.get_context("fork")
)
judge_future, fs_future = workers.submit(fit, train), workers.submit(fit, few)
baseline_future = workers.submit(dev_acc, [])


def local_base_model() -> str:
    """The base model as a local folder: an offline GGUF model loads and dequantises once,
    and every recipe starts from the saved copy."""
    from condgen.training.base_models import OFFLINE_MODELS, load_base_model

    if ARGS.base_model not in OFFLINE_MODELS:
        return ARGS.base_model
    folder = OUT / "base"
    if not (folder / "config.json").is_file():
        model, tokenizer = load_base_model(ARGS.base_model)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def train_recipe(name, steps, lr, group):
    """The recipe's model and tokenizer: the base model for 0 steps, else fine-tuned on the few-shot set."""
    from condgen.training.base_models import load_base_model
    from condgen.training.config import TrainingConfig
    from condgen.training.finetune import finetune

    if steps == 0:
        return load_base_model(BASE)
    cfg = TrainingConfig(
        data_source=str(few_csv),
        pretrained_model=BASE,
        steps=steps,
        batch_size=8,
        max_tokens=64,
        learning_rate=lr,
        warmup_steps=max(1, steps // 10),
        validation_fraction=0.0,
        eval_steps=10_000,
        save_steps=10_000,
        logging_steps=max(1, steps // 5),
        seed=0,
        group_by_intent=group,
    )
    return load_base_model(str(finetune(cfg, OUT / name).output_dir))


@torch.no_grad()
def sample_pool(model, tok, temperature, k, top_p=0.95, max_new=64):
    """CANDIDATES first lines per intent."""
    tok.padding_side = "left"
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
    prompts, owners = [], []
    for i, intent in enumerate(intents):
        for j in range(CANDIDATES):
            prompts.append(build_prompt(intent, examples[intent], k, np.random.default_rng([0, i, j]), ",")[0])
            owners.append(intent)
    lines = []
    chunk = 1024
    for s in range(0, len(prompts), chunk):
        enc = tok(
            prompts[s : s + chunk],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            return_token_type_ids=False,
        ).to(DEVICE)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new,
            eos_token_id=[newline, tok.eos_token_id],
            pad_token_id=tok.pad_token_id,
        )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        lines.extend(t.split("\n")[0] for t in texts)
    pool, seen, reasons = [], set(), defaultdict(int)
    for intent, cont in zip(owners, lines):
        try:
            rec = decode_line(f"{intent},{cont}")
        except CodecError:
            reasons["malformed"] += 1
            continue
        key = normalize_for_match(rec.text)
        if not (3 <= len(rec.text) <= 300):
            reasons["length"] += 1
        elif key in few_keys:
            reasons["echo"] += 1
        elif (intent, key) in seen:
            reasons["duplicate"] += 1
        elif copies.is_copy(rec.text):
            reasons["copy"] += 1
        else:
            seen.add((intent, key))
            pool.append(LabelledText(intent, rec.text))
    return pool, dict(reasons)


def novelty(rows):
    """Each row's highest character n-gram cosine to a few-shot text of its own intent."""
    sim = (few_chars.transform([r.text for r in rows]) @ few_vectors.T).toarray()
    same = few_intents[None, :] == np.array([r.intent for r in rows])[:, None]
    return np.where(same, sim, 0).max(1)


def cap(rows, mask, order=None):
    idx = [i for i in range(len(rows)) if mask[i]]
    if order is not None:
        idx.sort(key=lambda i: order[i])
    count, keep = defaultdict(int), []
    for i in idx:
        if count[rows[i].intent] < CAP:
            keep.append(i)
            count[rows[i].intent] += 1
    return keep


def evaluate_pool(name, pool, reasons):
    labels = np.array([r.intent for r in pool])
    texts = [r.text for r in pool]
    jok = judge.predict(texts) == labels
    P = fs_clf.predict_proba(texts)
    cols = {c: i for i, c in enumerate(fs_clf.classes_)}
    own = P[np.arange(len(pool)), [cols[label] for label in labels]]
    agree = fs_clf.classes_[P.argmax(1)] == labels
    nov = novelty(pool)
    everything = np.ones(len(pool), bool)
    selections = {
        "raw": cap(pool, everything),
        "agree": cap(pool, agree),
        "agree-novel": cap(pool, agree, nov),
        "agree-confident": cap(pool, agree, -own),
        "oracle": cap(pool, jok),
        "oracle-novel": cap(pool, jok, nov),
    }
    futures = [workers.submit(dev_acc, [pool[i] for i in keep]) for keep in selections.values()]
    row = {
        "recipe": name,
        "pool": len(pool),
        "rejected": reasons,
        "judge_ok_raw": float(jok.mean()),
        "novelty_median": float(np.median(nov)),
        "distinct_2": distinct_2(texts),
    }
    return row, selections, jok, futures


def finish_pool(row, selections, jok, futures):
    accs = [f.result() for f in futures]
    for (sel, keep), acc in zip(selections.items(), accs):
        row[sel] = {
            "n": len(keep),
            "judge_ok": float(jok[keep].mean()) if keep else 0.0,
            "gain": round((acc - baseline) * 100, 2),
        }
    log(json.dumps(row))
    return row


judge, fs_clf = judge_future.result(), fs_future.result()
log("judge and few-shot classifier fitted; dev rows", len(dev))
TRAIN = [(n, int(st), float(lr), g == "1") for n, st, lr, g in (item.split(":") for item in ARGS.train)]
SAMPLE = [(float(t), int(k)) for t, k in (item.split(":") for item in ARGS.sample)]
pending = []
torch.backends.cuda.matmul.allow_tf32 = True
BASE = local_base_model()
for name, steps, lr, group in TRAIN:
    model, tok = train_recipe(name, steps, lr, group)
    model = model.to(DEVICE).eval()
    log("trained", name)
    for temperature, k in SAMPLE:
        pool, reasons = sample_pool(model, tok, temperature, k)
        log("sampled", name, temperature, k, len(pool))
        pending.append(evaluate_pool(f"{name} T{temperature} k{k}", pool, reasons))
        write_csv(OUT / f"pool-{name}-T{temperature}-k{k}.csv", pool)
    del model
    if time.time() - t0 > BUDGET_S:
        log("time budget spent: no more recipes")
        break
baseline = baseline_future.result()
log("baseline dev acc", round(baseline, 4))
results = {"baseline_dev_acc": baseline, "dev_rows": len(dev), "candidates_per_intent": CANDIDATES, "rows": []}
for item in pending:
    results["rows"].append(finish_pool(*item))
    (OUT / "sweep.json").write_text(json.dumps(results, indent=1))
log("done")
