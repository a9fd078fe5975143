"""Differentially private fine-tuning: DP-SGD with Opacus, for Gretel's `privacy_params`.

The unit of privacy is one row, or every row of one entity when `entity_column_name` names a
column. Each unit is one training sequence (its lines, cut at `max_tokens`); units are never
packed together, since a block shared by two units would let one unit's text shape another's
gradient. Every optimiser step:

1. samples each unit with probability q = batch / units (Poisson sampling; batch is
   `batch_size * gradient_accumulation_steps`, the expected units per step);
2. runs the sample in physical batches of `batch_size` (sorted by length, to pad little),
   computing one gradient per unit (Opacus' per-sample gradients);
3. clips each unit's gradient to `per_sample_max_grad_norm`, sums them, adds Gaussian noise
   of standard deviation noise_multiplier * max_grad_norm and divides by the expected batch.

The noise multiplier is the smallest that keeps the planned steps within (`epsilon`, `delta`)
by the PRV accountant; the epsilon actually spent is read from the accountant at the end.

Nothing else in the checkpoint may come from the private rows without going through the DP
model: the prompt examples (`examples.json`, which export also turns into the bundle's label
classifier) and the text length bounds are sampled from the fine-tuned model itself
(post-processing keeps the guarantee). Intent names are treated as the public schema.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from condgen.codec import fold_text
from condgen.training.base_models import load_base_model
from condgen.training.config import ConfigError, TrainingConfig
from condgen.training.data import encode_lines, load_records, read_csv_units, split_validation
from condgen.training.finetune import (
    TrainResult,
    text_length_stats,
    training_metrics,
    uses_bf16,
    with_lora,
    world_size,
    write_checkpoint_files,
    write_metrics,
)

log = logging.getLogger(__name__)
ACCOUNTANT = "prv"  # Opacus' privacy random variable accountant: tight epsilon for many steps
EXAMPLES_PER_INTENT = 12  # prompt examples sampled from the DP model per intent (repeats dropped)
SAMPLE_BATCH = 96  # sequences per generate call
SAMPLE_ATTEMPTS = 3  # rounds of sampling for intents that got no usable line
SAMPLE_TEMPERATURE = 0.8


@dataclass
class PrivacyPlan:
    """What DP-SGD will do, decided before training from the config and the unit count."""

    units: int
    batch: int  # expected units per optimiser step
    sample_rate: float
    steps: int
    delta: float
    target_epsilon: float
    noise_multiplier: float
    max_grad_norm: float
    unit: str


def plan_privacy(config: TrainingConfig, units: int) -> PrivacyPlan:
    """The noise that reaches the config's epsilon at its delta over the planned steps; a
    config DP cannot honour raises ConfigError in one line."""
    from opacus.accountants.utils import get_noise_multiplier

    privacy = config.privacy
    batch = config.batch_size * config.gradient_accumulation_steps
    if units <= batch:
        raise ConfigError(
            f"DP training needs more units of privacy ({privacy.unit}s: {units}) than one step's batch "
            f"(batch_size x gradient_accumulation_steps = {batch}): lower the batch or add data"
        )
    sample_rate = batch / units
    steps = config.steps if config.steps is not None else max(1, math.ceil(config.epochs * units / batch))
    delta = privacy.resolved_delta(units)
    try:
        noise = get_noise_multiplier(
            target_epsilon=privacy.epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=ACCOUNTANT,
            epsilon_tolerance=0.01,
        )
    except ValueError as exc:
        raise ConfigError(
            f"epsilon {privacy.epsilon} at delta {delta:.3g} cannot be reached in {steps} steps at sampling "
            f"rate {sample_rate:.4f} ({exc}): raise epsilon, or train fewer steps or smaller batches"
        ) from exc
    return PrivacyPlan(
        units=units,
        batch=batch,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        target_epsilon=privacy.epsilon,
        noise_multiplier=float(noise),
        max_grad_norm=privacy.per_sample_max_grad_norm,
        unit=privacy.unit,
    )


def load_units(config: TrainingConfig) -> list[list]:
    """The data as units of privacy: one record each, or one list per entity."""
    column = config.privacy.entity_column_name
    if column is None:
        records = load_records(config.data_source, config.text_column, config.label_column, config.separator)
        return [[record] for record in records]
    if config.data_source.startswith("hf:"):
        raise ConfigError("`entity_column_name` needs CSV data: export the dataset to a CSV first")
    return read_csv_units(config.data_source, column, config.text_column, config.label_column, config.separator)


def unit_sequences(tokenizer, units: list[list], config: TrainingConfig) -> tuple[list[list[int]], int]:
    """Each unit's lines as one token sequence, cut at `max_tokens`; and how many were cut."""
    sequences, cut = [], 0
    for unit in units:
        ids = tokenizer("".join(encode_lines(unit, config.separator)), add_special_tokens=False)["input_ids"]
        if len(ids) > config.max_tokens:
            ids, cut = ids[: config.max_tokens], cut + 1
        sequences.append(ids)
    return sequences, cut


def padded_batch(sequences: list[list[int]], pad_id: int):
    """Input ids, attention mask and labels (-100 on padding) of right-padded sequences."""
    import torch

    length = max((len(s) for s in sequences), default=1)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@dataclass(frozen=True)
class Compute:
    """Where the passes run: `cuda` when a GPU is there, else `cpu`; bf16 autocast or not."""

    device: str
    bf16: bool

    @classmethod
    def for_config(cls, config: TrainingConfig) -> Compute:
        import torch

        return cls("cuda" if torch.cuda.is_available() else "cpu", uses_bf16(config.precision))


def per_unit_loss(model, sequences: list[list[int]], pad_id: int, compute: Compute):
    """Each sequence's mean next-token loss: one unit's loss depends on that unit alone."""
    import torch

    ids, mask, labels = (t.to(compute.device) for t in padded_batch(sequences, pad_id))
    with torch.autocast(compute.device, dtype=torch.bfloat16, enabled=compute.bf16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    targets = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view(targets.shape)
    return token_loss.sum(dim=1) / (targets != -100).sum(dim=1).clamp(min=1)


def physical_batches(indices: list[int], lengths: list[int], size: int) -> list[list[int]]:
    """A step's sampled units in batches of `size`, longest first, so each pads little."""
    ordered = sorted(indices, key=lambda i: -lengths[i])
    return [ordered[i : i + size] for i in range(0, len(ordered), size)] or [[]]


def validation_loss(model, sequences: list[list[int]], pad_id: int, batch_size: int, compute: Compute) -> float | None:
    import torch

    if not sequences:
        return None
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            total += float(per_unit_loss(model, sequences[start : start + batch_size], pad_id, compute).sum())
    model.train()
    return total / len(sequences)


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, or its end-of-text token without one."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _sample_lines(model, tokenizer, intents: list[str], config: TrainingConfig, newline: int, pad_id: int) -> list[str]:
    """One sampled line after `intent,` for each entry of `intents` ("" where none ended)."""
    import torch

    from condgen.codec import training_line

    prefixes = [training_line(intent, "", config.separator).rstrip("\n") for intent in intents]
    encoded = tokenizer(prefixes, return_tensors="pt", add_special_tokens=False, padding=True)
    with torch.no_grad():
        out = model.generate(
            input_ids=encoded["input_ids"].to(model.device),
            attention_mask=encoded["attention_mask"].to(model.device),
            do_sample=True,
            temperature=SAMPLE_TEMPERATURE,
            top_p=0.95,
            max_new_tokens=config.max_tokens,
            eos_token_id=newline,
            pad_token_id=pad_id,
        )
    texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return [fold_text(text.split("\n", 1)[0]) if "\n" in text else "" for text in texts]


def sample_examples(model, tokenizer, intents: list[str], config: TrainingConfig) -> dict[str, list[str]]:
    """Prompt examples for the bundle, written by the DP model itself: for each intent, lines
    sampled after `intent,` (several intents per batch), kept when they end in a line break,
    without repeats."""
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    pad_id = pad_token_id(tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    model.eval()
    torch.manual_seed(config.seed)
    per_call = max(1, SAMPLE_BATCH // EXAMPLES_PER_INTENT)
    examples: dict[str, list[str]] = {intent: [] for intent in intents}
    for attempt in range(SAMPLE_ATTEMPTS):  # intents still without a line get another try
        wanted = [intent for intent in intents if not examples[intent]] if attempt else intents
        if not wanted:
            break
        for start in tqdm(range(0, len(wanted), per_call), desc="sampling prompt examples", unit="batch"):
            batch = [i for i in wanted[start : start + per_call] for _ in range(EXAMPLES_PER_INTENT)]
            lines = _sample_lines(model, tokenizer, batch, config, newline, pad_id)
            for intent, line in zip(batch, lines, strict=True):
                if line and line not in examples[intent]:
                    examples[intent].append(line)
    tokenizer.padding_side = "right"
    missing = [intent for intent, texts in examples.items() if not texts]
    if missing:
        log.warning("the DP model wrote no usable example for %d intent(s): %s", len(missing), ", ".join(missing[:5]))
    return {intent: texts for intent, texts in examples.items() if texts}


def refuse_unsupported(config: TrainingConfig, resume: bool) -> None:
    if resume:
        raise ConfigError("a DP run cannot resume (its privacy accountant is not checkpointed): start it again")
    if world_size() > 1:
        raise ConfigError("DP training runs in one process: launch it without torchrun / accelerate")
    if config.data_source is None:
        raise ConfigError("no data: pass --data or set `data_source` in the config")


@dataclass
class PrivateRun:
    """What `train_private` returns: the fine-tuned model (adapters merged) and its record."""

    model: Any
    tokenizer: Any
    history: list[dict]  # logged steps: step, epoch, loss, learning_rate, epsilon
    validation_loss: float | None
    epsilon: float | None  # spent; None when the plan adds no noise (a non-private comparison run)
    units_cut: int
    lora: dict | None


def train_private(
    config: TrainingConfig,
    train_units: list,
    val_units: list,
    plan: PrivacyPlan,
    metrics_dir=None,
    randomness_seed: int | None = None,
) -> PrivateRun:
    """Run DP-SGD over the units as `plan` says; `metrics_dir` gets metrics.json as it goes.

    `config.seed` fixes the initialisation (the adapters) only. The noise and the Poisson
    sampling draw from a seed nobody knows (the OS's randomness), or `randomness_seed` where an
    experiment must repeat them (the canary bench); a run whose noise could be replayed would
    guarantee nothing.

    A plan with noise multiplier 0 and a clipping norm no gradient reaches is the same loop without privacy (the
    canary bench's comparison run)."""
    import torch
    from opacus import GradSampleModule
    from opacus.accountants import PRVAccountant
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from tqdm.auto import tqdm
    from transformers import get_scheduler, set_seed

    set_seed(config.seed)
    model, tokenizer = load_base_model(config.pretrained_model)
    lora = None
    if config.lora_r:
        model, lora = with_lora(model, config)
    pad_id = pad_token_id(tokenizer)
    sequences, cut = unit_sequences(tokenizer, train_units, config)
    val_sequences, _ = unit_sequences(tokenizer, val_units, config)
    lengths = [len(s) for s in sequences]
    compute = Compute.for_config(config)
    model.to(compute.device)
    private = plan.noise_multiplier > 0

    model.train()
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    trainable = [p for p in module.parameters() if p.requires_grad]
    base_optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    seed = secrets.randbits(62) if randomness_seed is None else randomness_seed
    noise_generator = torch.Generator(device=compute.device).manual_seed(seed)
    sampling_generator = torch.Generator().manual_seed(seed + 1)
    optimizer = DPOptimizer(
        base_optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.batch,
        loss_reduction="mean",
        generator=noise_generator,
    )
    accountant = PRVAccountant()
    if private:
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    scheduler = get_scheduler(config.lr_scheduler, optimizer, config.warmup_steps, plan.steps)
    sampler = UniformWithReplacementSampler(
        num_samples=len(sequences), sample_rate=plan.sample_rate, generator=sampling_generator, steps=plan.steps
    )

    history: list[dict] = []
    window_loss, window_units, units_seen = 0.0, 0, 0
    progress = tqdm(total=plan.steps, desc="DP fine-tuning" if private else "fine-tuning", unit="step")
    for step, indices in enumerate(sampler, start=1):
        chunks = physical_batches(list(indices), lengths, config.batch_size)
        for number, chunk in enumerate(chunks):
            optimizer.zero_grad(set_to_none=True)  # per-sample gradients only; clipped sums carry over
            optimizer.signal_skip_step(do_skip=number < len(chunks) - 1)
            if chunk:
                losses = per_unit_loss(module, [sequences[i] for i in chunk], pad_id, compute)
                losses.mean().backward()
                window_loss += float(losses.detach().sum())
                window_units += len(chunk)
            else:  # Poisson sampling drew no unit: the step still adds its noise (and counts)
                for parameter in trainable:
                    parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
            optimizer.step()
        units_seen += len(indices)
        scheduler.step()
        if step % config.logging_steps == 0 or step == plan.steps:
            entry = {
                "step": step,
                "epoch": round(units_seen / len(sequences), 4),
                "loss": window_loss / max(1, window_units),
                "learning_rate": scheduler.get_last_lr()[0],
                "epsilon": float(accountant.get_epsilon(plan.delta)) if private else None,
            }
            history.append(entry)
            progress.set_postfix(loss=f"{entry['loss']:.3f}", eps=entry["epsilon"])
            if metrics_dir is not None:
                metrics = training_metrics(history, global_step=step, max_steps=plan.steps, complete=False)
                write_metrics(Path(metrics_dir), metrics)
            window_loss, window_units = 0.0, 0
        progress.update(1)
    progress.close()

    model = module.to_standard_module()  # the hooks off, grad_sample attributes deleted
    eval_loss = validation_loss(model, val_sequences, pad_id, config.batch_size, compute)
    spent = float(accountant.get_epsilon(plan.delta)) if private else None
    if lora is not None:
        model = model.merge_and_unload()
    return PrivateRun(model, tokenizer, history, eval_loss, spent, cut, lora)


def finetune_private(config: TrainingConfig, output_dir: str | Path, resume: bool = False) -> TrainResult:
    """Fine-tune with DP-SGD as `config.privacy` says and write a checkpoint to `output_dir`."""
    from transformers import set_seed

    refuse_unsupported(config, resume)
    output_dir = Path(output_dir)
    started = time.time()
    set_seed(config.seed)
    units = load_units(config)
    train_units, val_units = split_validation(units, config.validation_fraction, config.seed)
    plan = plan_privacy(config, len(train_units))
    log.info(
        "DP-SGD: %d %s units, q=%.4f, %d steps, noise multiplier %.3f, clipping %.2f, epsilon %.2f at delta %.3g",
        plan.units,
        plan.unit,
        plan.sample_rate,
        plan.steps,
        plan.noise_multiplier,
        plan.max_grad_norm,
        plan.target_epsilon,
        plan.delta,
    )
    run = train_private(config, train_units, val_units, plan, metrics_dir=output_dir)
    if run.epsilon is None:  # a DP plan always adds noise; the accountant counted every step
        raise RuntimeError("the DP run has no accounted epsilon")
    log.info("DP training spent epsilon %.3f of %.2f at delta %.3g", run.epsilon, plan.target_epsilon, plan.delta)
    if run.units_cut:
        log.warning("%d unit(s) longer than max_tokens=%d were cut", run.units_cut, config.max_tokens)
    examples = sample_examples(run.model, run.tokenizer, sorted({r.intent for unit in units for r in unit}), config)
    if not examples:
        raise RuntimeError("the DP model wrote no usable line for any intent: train longer or raise epsilon")
    privacy = {
        "epsilon": round(run.epsilon, 4),
        "delta": plan.delta,
        "noise_multiplier": round(plan.noise_multiplier, 5),
        "max_grad_norm": plan.max_grad_norm,
        "unit": plan.unit,
        "target_epsilon": plan.target_epsilon,
        "units": plan.units,
        "sample_rate": round(plan.sample_rate, 6),
        "expected_batch": plan.batch,
        "steps": plan.steps,
        "accountant": ACCOUNTANT,
        "examples": "sampled from the DP model",
    }
    # The stats travel into the bundle's manifest: only what the DP model wrote, the plan (the
    # unit count sets the sampling rate and is treated as public) and facts of the run. The
    # losses are plain statistics of private rows: they stay in the checkpoint's metrics.json.
    stats = {
        "optimizer_steps": plan.steps,
        "seconds": round(time.time() - started, 1),
        "resumed_from": None,
        "world_size": 1,
        "precision": "bf16" if uses_bf16(config.precision) else "fp32",
        "text_length": text_length_stats([t for texts in examples.values() for t in texts]),
        "privacy": privacy,
    }
    if run.lora is not None:
        stats["lora"] = run.lora
    private_figures = {
        "note": "statistics of the private rows, without noise: keep them with the checkpoint, do not publish them",
        "records": sum(len(u) for u in units),
        "train_records": sum(len(u) for u in train_units),
        "validation_records": sum(len(u) for u in val_units),
        "units_cut_at_max_tokens": run.units_cut,
        "train_loss": run.history[-1]["loss"] if run.history else None,
        "validation_loss": run.validation_loss,
    }
    metrics = training_metrics(
        run.history,
        global_step=plan.steps,
        max_steps=plan.steps,
        complete=True,
        privacy=privacy,
        not_private=private_figures,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    run.model.save_pretrained(str(output_dir))
    intents = {intent: len(texts) for intent, texts in examples.items()}
    write_checkpoint_files(output_dir, run.tokenizer, config, stats, examples, intents, metrics)
    log.info("wrote %s (privacy: %s)", output_dir, json.dumps(privacy))
    return TrainResult(output_dir, stats)
