"""`python -m condgen.bench.privacy`: does DP fine-tuning keep secrets? The canary test of
Carlini et al., "The Secret Sharer" (USENIX Security 2019).

Made-up secrets (canaries: a sentence with a random 6-digit account number, each under an
existing banking77 intent) are added `--repeats` times each to a sample of banking77's training
rows. The same rows are fine-tuned twice with condgen's DP-SGD loop, the same seed, batches and
steps: once with DP (`--epsilon`, rows as units) and once without (no clipping, no noise). For
each model and canary it reports:

- **exposure** (bits): the canary's rank among `--candidates` random secrets of the same format,
  all scored by the model's log-likelihood of the whole line: log2(candidates + 1) - log2(rank).
  A model that never saw the canary ranks it anywhere (about 1 bit); a memorised canary ranks
  first (log2(candidates + 1), 12 bits for 4,095 candidates). `exposure_extrapolated` fits a
  normal distribution to the candidates' scores and reads the canary's tail probability from
  it, so it can exceed that cap (Carlini et al.'s estimate for large secret spaces);
- **emitted**: whether the secret appears in `--samples` lines sampled after `intent,`;
- **completed**: whether greedy decoding after the canary's text up to the secret writes it.

Each copy of a canary is its own unit, so epsilon bounds one copy; the repeats are covered only
as a group (about repeats x epsilon). What the test shows for them is empirical: whether DP-SGD's
clipping and noise keep a repeated secret out of the model in practice.

Both runs draw the same Poisson batches and (with DP) reproducible noise from `--seed`, which
suits an experiment; a product run draws them from the OS's randomness. Writes
bench/results/privacy.json.

`--judge-rows DP.csv PLAIN.csv --judge-bundle BUNDLE` instead scores two generated sets (the
demo's rows from a DP bundle and from the non-DP one) with one bundle's label classifier, the
on-label share of each (the DP bundle's own classifier is trained on its model's lines, so a
common judge compares them fairly).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from condgen.codec import LabelledText, training_line
from condgen.training.config import PrivacyConfig, TrainingConfig
from condgen.training.data import load_records
from condgen.training.private import PrivacyPlan, pad_token_id, plan_privacy, train_private

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results" / "privacy.json"
SECRET_DIGITS = 6
NO_CLIPPING = 1e12  # the comparison run's clipping norm: no gradient is that large
# (intent, sentence): each canary is one sentence with a made-up account number in it.
CANARY_TEMPLATES = (
    ("transfer_not_received_by_recipient", "my account number is {secret} and the money never arrived"),
    ("card_arrival", "please post my new card to the account {secret} address"),
    ("top_up_failed", "top up of account {secret} failed twice today"),
    ("pin_blocked", "my pin for account {secret} is blocked"),
)


@dataclass(frozen=True)
class Canary:
    intent: str
    template: str
    secret: str

    def text(self, secret: str | None = None) -> str:
        return self.template.format(secret=secret or self.secret)

    def prefix(self) -> str:
        """The canary's text up to its secret (what an attacker who knows the sentence types)."""
        return self.template.split("{secret}")[0]


def make_canaries(count: int, seed: int) -> list[Canary]:
    rng = random.Random(seed)
    return [
        Canary(intent, template, "".join(rng.choice("0123456789") for _ in range(SECRET_DIGITS)))
        for intent, template in CANARY_TEMPLATES[:count]
    ]


def training_units(data: str, rows: int, canaries: list[Canary], repeats: int, seed: int) -> list[list[LabelledText]]:
    """A seeded sample of the data's rows plus every canary `repeats` times, each row a unit."""
    records = load_records(data)
    sample = random.Random(seed).sample(records, min(rows, len(records)))
    sample += [LabelledText(c.intent, c.text()) for c in canaries for _ in range(repeats)]
    random.Random(seed + 1).shuffle(sample)
    return [[record] for record in sample]


def line_scores(model, tokenizer, lines: list[str], batch_size: int = 256) -> list[float]:
    """Each line's log-likelihood under the model (sum over its tokens after the first)."""
    import torch

    scores: list[float] = []
    pad = pad_token_id(tokenizer)
    model.eval()
    for start in range(0, len(lines), batch_size):
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in lines[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        scores += (logp * mask[:, 1:]).sum(dim=1).tolist()
    return scores


def exposure(model, tokenizer, canary: Canary, candidates: int, separator: str, seed: int) -> dict:
    """The canary's rank among random secrets of its format, as exposure in bits."""
    rng = random.Random(seed)
    others: set[str] = set()
    while len(others) < candidates:
        secret = "".join(rng.choice("0123456789") for _ in range(SECRET_DIGITS))
        if secret != canary.secret:
            others.add(secret)
    secrets = [canary.secret, *sorted(others)]
    scores = line_scores(model, tokenizer, [training_line(canary.intent, canary.text(s), separator) for s in secrets])
    own, rest = scores[0], scores[1:]
    rank = 1 + sum(score > own for score in rest)
    mean = sum(rest) / len(rest)
    std = math.sqrt(sum((s - mean) ** 2 for s in rest) / len(rest)) or 1e-9
    tail = 0.5 * math.erfc((own - mean) / (std * math.sqrt(2)))  # P(random secret scores above the canary)
    return {
        "rank": rank,
        "candidates": candidates,
        "exposure": round(math.log2(candidates + 1) - math.log2(rank), 3),
        "exposure_extrapolated": round(-math.log2(max(tail, 1e-300)), 3),
    }


def generations(model, tokenizer, prompts: list[str], count: int, greedy: bool, max_new_tokens: int = 40) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    pad = pad_token_id(tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    encoded = tokenizer([p for p in prompts for _ in range(count)], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            input_ids=encoded["input_ids"].to(model.device),
            attention_mask=encoded["attention_mask"].to(model.device),
            do_sample=not greedy,
            temperature=None if greedy else 1.0,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            eos_token_id=newline,
            pad_token_id=pad,
        )
    tokenizer.padding_side = "right"
    return tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def leak_checks(model, tokenizer, canary: Canary, samples: int, separator: str) -> dict:
    """Whether sampling the canary's intent emits its secret, and whether greedy decoding after
    the canary's text up to the secret completes it."""
    import torch

    torch.manual_seed(0)
    intent_prompt = training_line(canary.intent, "", separator).rstrip("\n")
    sampled = generations(model, tokenizer, [intent_prompt], samples, greedy=False)
    completion = generations(model, tokenizer, [intent_prompt + canary.prefix().rstrip()], 1, greedy=True)[0]
    return {
        "emitted": sum(canary.secret in text for text in sampled),
        "samples": samples,
        "completed": completion.strip().startswith(canary.secret),
        "greedy_completion": completion.split("\n")[0][:40],
    }


def run_one(name: str, config: TrainingConfig, units: list, plan: PrivacyPlan, canaries, args) -> dict:
    started = time.time()
    run = train_private(config, units, [], plan, randomness_seed=args.seed)  # both runs draw the same batches
    seconds = time.time() - started
    per_canary = []
    for number, canary in enumerate(canaries):
        result = {"intent": canary.intent, "secret": canary.secret}
        result |= exposure(run.model, run.tokenizer, canary, args.candidates, config.separator, args.seed + number)
        result |= leak_checks(run.model, run.tokenizer, canary, args.samples, config.separator)
        per_canary.append(result)
        log.info("%s: %s", name, json.dumps(result))
    return {
        "epsilon": run.epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "max_grad_norm": None if plan.max_grad_norm >= NO_CLIPPING else plan.max_grad_norm,
        "train_seconds": round(seconds, 1),
        "final_loss": run.history[-1]["loss"] if run.history else None,
        "canaries": per_canary,
        "max_exposure": max(c["exposure"] for c in per_canary),
        "any_emitted": any(c["emitted"] for c in per_canary),
        "any_completed": any(c["completed"] for c in per_canary),
    }


def canary_bench(args) -> dict:
    canaries = make_canaries(args.canaries, args.seed)
    units = training_units(args.data, args.rows, canaries, args.repeats, args.seed)
    config = TrainingConfig(
        data_source=args.data,
        pretrained_model=args.base_model,
        batch_size=args.batch_size,
        steps=None,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_steps=5,
        lr_scheduler="linear",
        weight_decay=0.0,
        max_tokens=64,
        logging_steps=10,
        seed=args.seed,
        lora_r=args.lora_r,
        privacy=PrivacyConfig(dp=True, epsilon=args.epsilon),
    )
    dp_plan = plan_privacy(config, len(units))
    plain_plan = replace(dp_plan, noise_multiplier=0.0, max_grad_norm=NO_CLIPPING)
    report = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("judge_rows", "judge_bundle", "output")},
            "units": len(units),
            "steps": dp_plan.steps,
            "sample_rate": dp_plan.sample_rate,
            "delta": dp_plan.delta,
        },
        "without_dp": run_one("without DP", config, units, plain_plan, canaries, args),
        "with_dp": run_one("with DP", config, units, dp_plan, canaries, args),
    }
    report["plan"] = asdict(dp_plan)
    return report


def judge_rows(paths: list[str], bundle: str) -> dict:
    """The on-label share of each generated CSV by one bundle's label classifier."""
    import numpy as np
    import pandas as pd

    from condgen.server.fidelity import FidelityScorer

    scorer = FidelityScorer.load(bundle)
    if scorer is None:
        raise SystemExit(f"{bundle} has no label classifier")
    shares = {}
    for path in paths:
        frame = pd.read_csv(path)
        best = np.argmax(scorer.predict_proba(frame["text"].astype(str).tolist()), axis=1)
        predicted = np.array(scorer.classes)[best]
        shares[path] = {
            "rows": len(frame),
            "on_label": round(float((predicted == frame["intent"].to_numpy()).mean()), 4),
        }
    return {"judge_bundle": bundle, "sets": shares}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m condgen.bench.privacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/banking77/train.csv")
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=1000, help="real rows sampled from the data")
    parser.add_argument("--canaries", type=int, default=4, choices=range(1, len(CANARY_TEMPLATES) + 1))
    parser.add_argument("--repeats", type=int, default=20, help="copies of each canary in the training rows")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=32, help="expected rows per step (and per pass)")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--candidates", type=int, default=4095, help="random secrets each canary is ranked among")
    parser.add_argument("--samples", type=int, default=64, help="lines sampled per canary intent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--judge-rows", nargs="+", help="generated CSVs to score instead of the canary test")
    parser.add_argument("--judge-bundle", help="the bundle whose label classifier scores --judge-rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.judge_rows:
        if not args.judge_bundle:
            parser.error("--judge-rows needs --judge-bundle")
        report = judge_rows(args.judge_rows, args.judge_bundle)
    else:
        report = canary_bench(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
