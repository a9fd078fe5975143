"""Fine-tune a causal LM on `intent,text` lines with the Hugging Face Trainer.

Lines are tokenised, concatenated and packed into blocks of `max_tokens` tokens, in a
fresh order for every pass over the data (`pack_blocks`); `epochs` become the equivalent
number of optimiser steps. A held-out share of the records gives a validation loss. Trainer checkpoints go to
`OUTPUT/trainer/` so `--resume` continues an interrupted run; the final model, tokenizer,
the training config and stats (`condgen_training.json`) and the real examples per intent
(`examples.json`) go to `OUTPUT/`, which is everything `condgen export` needs.

Progress shows as the Trainer's bar with the loss printed every `logging_steps`;
`OUTPUT/metrics.json` (rewritten at every logged step, complete at the end) holds the logged
losses, learning rates, evaluations and the run's totals, and `OUTPUT/loss_curve.png` plots them.

Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) the Trainer runs DistributedDataParallel
(NCCL on GPUs, gloo on CPUs) and its sampler gives each process its share of the packed blocks;
`steps` count optimiser steps of the whole group, whose batch is `batch_size` per process. Every
process trains and evaluates; only the main process writes files, and all wait for it before returning.
See docs/distributed-training.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from condgen.bundle import EXAMPLES_NAME
from condgen.training.base_models import load_base_model
from condgen.training.config import ConfigError, TrainingConfig
from condgen.training.data import (
    encode_lines,
    examples_by_intent,
    intent_counts,
    load_records,
    pack_blocks,
    split_validation,
)

log = logging.getLogger(__name__)
TRAINING_INFO_NAME = "condgen_training.json"
TRAINER_DIR = "trainer"
METRICS_NAME = "metrics.json"
LOSS_CURVE_NAME = "loss_curve.png"
# Environment variables that carry the process count under torchrun, accelerate launch and MPI.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    stats: dict
    main_process: bool = True  # False on the other ranks of a distributed run


class BlockDataset:
    """Packed token blocks as a map-style dataset of causal-LM examples."""

    def __init__(self, blocks: list[list[int]]):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        import torch

        ids = torch.tensor(self.blocks[index], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tokenize_lines(tokenizer, records, config: TrainingConfig) -> list[list[int]]:
    return tokenizer(encode_lines(records, config.separator), add_special_tokens=False)["input_ids"]


def world_size() -> int:
    """Processes in the training group, from the launcher's environment (1 when not launched)."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def planned_steps(config: TrainingConfig, blocks_per_pass: int, processes: int = 1) -> int:
    """Optimiser steps of the run: `steps`, or `epochs` over the packed data (one optimiser
    step consumes `batch_size * gradient_accumulation_steps` blocks in each of `processes`)."""
    if config.steps is not None:
        return config.steps
    per_step = config.batch_size * config.gradient_accumulation_steps * processes
    return max(1, math.ceil(config.epochs * blocks_per_pass / per_step))


def training_blocks(tokenizer, records, config: TrainingConfig, processes: int = 1) -> tuple[list[list[int]], int]:
    """Enough packed blocks for the whole run (reshuffled per pass), and the step count.

    Every process packs the same blocks; the Trainer's distributed sampler then hands each
    process its own share, so the group holds exactly one pass of the sampler.
    """
    lines = tokenize_lines(tokenizer, records, config)
    groups = [r.intent for r in records] if config.group_by_intent else None
    steps = planned_steps(config, len(pack_blocks(lines, config.max_tokens)), processes)
    needed = steps * config.batch_size * config.gradient_accumulation_steps * processes
    return pack_blocks(lines, config.max_tokens, min_blocks=needed, seed=config.seed, groups=groups), steps


def text_length_stats(texts: list[str]) -> dict:
    import numpy as np

    lengths = np.array([len(t) for t in texts])
    return {
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
        "p01": float(np.percentile(lengths, 1)),
        "p99": float(np.percentile(lengths, 99)),
    }


def last_complete_checkpoint(trainer_dir: Path) -> str | None:
    """The newest Trainer checkpoint that was fully written (a run killed while saving leaves
    a checkpoint folder without its trainer_state.json, which is written last)."""
    if not trainer_dir.is_dir():
        return None
    steps = sorted(
        (int(p.name.split("-")[1]), p) for p in trainer_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()
    )
    for _, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            return str(path)
    return None


def cpu_computes_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has bf16 instructions (AVX-512 BF16 or AMX): there bf16 autocast speeds the
    matrix products up (1.5x per step on 2 AVX-512 BF16 cores); elsewhere it is emulated, slower."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(precision: str) -> bool:
    """Resolve a TrainingConfig `precision` for this machine."""
    import torch

    if precision != "auto":
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_computes_bf16()


def training_arguments(config: TrainingConfig, trainer_dir: Path, has_validation: bool, steps: int):
    import torch
    from transformers import TrainingArguments

    on_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        bf16=uses_bf16(config.precision),  # autocast; weights and optimiser state stay fp32
        output_dir=str(trainer_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_steps=steps,  # the packed data holds exactly enough blocks (one pass of the sampler)
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        logging_steps=config.logging_steps,
        report_to=[],
        use_cpu=on_cpu,
        # Several processes (torchrun, accelerate launch): gloo on CPUs; on GPUs the default, NCCL.
        ddp_backend="gloo" if on_cpu and world_size() > 1 else None,
        dataloader_num_workers=0,
        disable_tqdm=False,  # the progress bar, with the logged loss printed every `logging_steps`
    )


def _finite(value):
    """Numbers as JSON allows them: NaN and infinities (a diverged run) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def training_metrics(log_history: list[dict], **extra) -> dict:
    """The Trainer's log history as metrics.json: one row per logged training step, one per
    evaluation, and the totals the Trainer logs when a run ends (runtime, samples/s...)."""
    train, evaluations, summary = [], [], {}
    for entry in log_history:
        entry = {k: _finite(v) for k, v in entry.items()}
        if "loss" in entry:
            keys = ("step", "epoch", "loss", "learning_rate", "grad_norm") + (
                ("epsilon",) if "epsilon" in entry else ()
            )
            train.append({k: entry.get(k) for k in keys})
        elif "eval_loss" in entry:
            evaluations.append(entry)
        elif "train_runtime" in entry:
            summary = entry
    return {**extra, "train": train, "eval": evaluations, "summary": summary}


def write_metrics(output_dir: Path, metrics: dict) -> Path:
    """Write metrics.json through a temporary file, so a reader never sees half of it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / METRICS_NAME
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(metrics, indent=2, allow_nan=False))
    os.replace(partial, path)
    return path


def write_loss_curve(output_dir: Path, metrics: dict) -> Path | None:
    from condgen.training.plots import plot_loss_curve

    try:
        return plot_loss_curve(output_dir / LOSS_CURVE_NAME, metrics)
    except ImportError as exc:  # a missing plotting library must not throw away a finished run
        log.warning("%s not written (%s): pip install matplotlib", LOSS_CURVE_NAME, exc)
        return None


def metrics_callback(output_dir: Path, extra: dict):
    """A TrainerCallback that rewrites OUTPUT/metrics.json (main process only) at every log."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                write_metrics(
                    output_dir,
                    training_metrics(
                        state.log_history,
                        global_step=state.global_step,
                        max_steps=state.max_steps,
                        complete=False,
                        **extra,
                    ),
                )

    return MetricsCallback()


def final_validation_loss(trainer) -> float:
    """The validation loss of the final weights: the one logged at the last step when the run
    evaluated there, else a fresh evaluation. Every process holds the same log history, so all
    of them take the same branch (an evaluation is collective under DDP)."""
    step = trainer.state.global_step
    logged = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == step]
    return logged[-1] if logged else trainer.evaluate()["eval_loss"]


def with_lora(model, config: TrainingConfig):
    """`model` with LoRA adapters on the configured modules (peft); only they train. Returns the
    peft model and what the checkpoint records of it."""
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha_over_r * config.lora_r,
        target_modules=targets,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # no module matched the targets
        raise ConfigError(f"`target_modules` {targets!r}: {exc}") from exc
    trainable, total = model.get_nb_trainable_parameters()
    resolved = sorted(model.peft_config["default"].target_modules)
    log.info("LoRA r=%d on %s: %d of %d parameters train", config.lora_r, ", ".join(resolved), trainable, total)
    record = {
        "r": config.lora_r,
        "alpha": lora.lora_alpha,
        "target_modules": resolved,
        "trainable_parameters": int(trainable),
        "total_parameters": int(total),
        "merged": True,
    }
    return model, record


def finetune(config: TrainingConfig, output_dir: str | Path, resume: bool = False) -> TrainResult:
    """Run one fine-tuning job as configured and save the result to `output_dir`."""
    from transformers import Trainer, default_data_collator, set_seed

    if config.privacy.dp:
        from condgen.training.private import finetune_private

        return finetune_private(config, output_dir, resume)
    output_dir = Path(output_dir)
    trainer_dir = output_dir / TRAINER_DIR
    if config.data_source is None:
        raise ValueError("no data: pass --data or set `data_source` in the config")
    started = time.time()
    set_seed(config.seed)
    records = load_records(config.data_source, config.text_column, config.label_column, config.separator)
    train_records, val_records = split_validation(records, config.validation_fraction, config.seed)
    log.info(
        "loaded %d records (%d intents); %d for training, %d held out",
        len(records),
        len(intent_counts(records)),
        len(train_records),
        len(val_records),
    )
    model, tokenizer = load_base_model(config.pretrained_model)
    lora = None
    if config.lora_r:
        model, lora = with_lora(model, config)
    processes = world_size()
    train_blocks, steps = training_blocks(tokenizer, train_records, config, processes)
    val_blocks = pack_blocks(tokenize_lines(tokenizer, val_records, config), config.max_tokens) if val_records else []
    log.info(
        "packed %d training blocks and %d validation blocks of %d tokens for %d steps on %d process(es)",
        len(train_blocks),
        len(val_blocks),
        config.max_tokens,
        steps,
        processes,
    )

    last = last_complete_checkpoint(trainer_dir) if resume else None
    if resume and last is None:
        log.warning("--resume: no checkpoint in %s, starting from the base model", trainer_dir)
    args = training_arguments(config, trainer_dir, bool(val_blocks), steps)
    log.info("training passes in %s", "bf16 mixed precision" if args.bf16 else "fp32")
    if args.world_size != processes:
        raise RuntimeError(
            f"the environment says {processes} process(es) (WORLD_SIZE) but the Trainer runs "
            f"{args.world_size}: launch with torchrun, or unset WORLD_SIZE for a single process"
        )
    extra = {
        "world_size": processes,
        "logging_steps": config.logging_steps,
        "resumed_from": Path(last).name if last else None,
    }
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=BlockDataset(train_blocks),
        eval_dataset=BlockDataset(val_blocks) if val_blocks else None,
        data_collator=default_data_collator,
        callbacks=[metrics_callback(output_dir, extra)],
    )
    train_output = trainer.train(resume_from_checkpoint=last)
    eval_loss = final_validation_loss(trainer) if val_blocks else None
    if eval_loss is not None:
        log.info("validation loss %.4f", eval_loss)

    stats = {
        "records": len(records),
        "train_records": len(train_records),
        "validation_records": len(val_records),
        "train_blocks": len(train_blocks),
        "validation_blocks": len(val_blocks),
        "optimizer_steps": int(trainer.state.global_step),
        "train_loss": float(train_output.training_loss),
        "validation_loss": eval_loss,
        "seconds": round(time.time() - started, 1),
        "resumed_from": Path(last).name if last else None,
        "world_size": processes,
        "precision": "bf16" if args.bf16 else "fp32",
        "text_length": text_length_stats([r.text for r in records]),
    }
    if lora is not None:
        stats["lora"] = lora
    metrics = training_metrics(
        trainer.state.log_history,
        global_step=int(trainer.state.global_step),
        max_steps=int(trainer.state.max_steps),
        complete=True,
        **extra,
    )
    save_checkpoint(output_dir, trainer, tokenizer, config, stats, records, metrics)
    return TrainResult(output_dir, stats, trainer.is_world_process_zero())


def save_checkpoint(
    output_dir: Path, trainer, tokenizer, config: TrainingConfig, stats: dict, records, metrics: dict | None = None
) -> None:
    """Write the final files from the main process; every process returns once they exist.

    LoRA adapters are merged into the base weights first, so export reads it as any other checkpoint.
    """
    if "lora" in stats:  # the adapters merged into the base weights: a plain checkpoint
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(str(output_dir))
    else:
        trainer.save_model(str(output_dir))  # every process calls it; the Trainer writes from the main one
    if trainer.is_world_process_zero():
        write_checkpoint_files(
            output_dir, tokenizer, config, stats, examples_by_intent(records), intent_counts(records), metrics
        )
    trainer.accelerator.wait_for_everyone()


def write_checkpoint_files(
    output_dir: Path,
    tokenizer,
    config: TrainingConfig,
    stats: dict,
    examples: dict[str, list[str]],
    intents: dict[str, int],
    metrics: dict | None = None,
) -> None:
    """Everything of a checkpoint but the weights. `condgen_training.json` goes last: its
    presence marks a complete checkpoint."""
    tokenizer.save_pretrained(str(output_dir))
    (output_dir / EXAMPLES_NAME).write_text(json.dumps(examples, ensure_ascii=False))
    if metrics is not None:
        write_metrics(output_dir, metrics)
        write_loss_curve(output_dir, metrics)
    info = {
        "base_model": config.pretrained_model,
        "separator": config.separator,
        "config": config.to_dict(),
        "stats": stats,
        "intents": intents,
    }
    (output_dir / TRAINING_INFO_NAME).write_text(json.dumps(info, indent=2))


def read_training_info(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / TRAINING_INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {TRAINING_INFO_NAME}: is it the output of `condgen train`?")
    return json.loads(path.read_text())
