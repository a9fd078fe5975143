"""Run every benchmark side by side and write bench/results/latest.json (see condgen.bench)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from condgen.bench.engines import (
    bench_engine,
    bench_prompts,
    engine_details,
    optimum_generate,
    our_engine,
    teacher_forced_agreement,
    transformers_generate,
    transformers_greedy,
)
from condgen.bench.load import (
    ServerProcess,
    StreamLoad,
    in_process,
    latency_figures,
    mixed_specs,
    run_streams,
    spec_for,
)
from condgen.bundle import read_examples, read_manifest
from condgen.server.scheduler import SchedulerConfig
from condgen.training.export import greedy_match

TARGETS = [  # (name, numerator, denominator, at least)
    ("engine / transformers, batch 16", "engine_tok_s_b16", "transformers_tok_s_b16", 2.0),
    ("engine / transformers, batch 1", "engine_tok_s_b1", "transformers_tok_s_b1", 1.3),
    ("engine / optimum, batch 16", "engine_tok_s_b16", "optimum_tok_s_b16", 1.5),
    ("server c16 / in-process c16", "server_tok_s_c16", "inproc_tok_s_c16", 0.85),
    ("server c64 / server c16", "server_tok_s_c64", "server_tok_s_c16", 0.9),
    ("continuous / static, mixed", "continuous_tok_s_mixed", "static_tok_s_mixed", 1.5),
    ("engine fp32 / OpenVINO fp32, batch 1", "engine_tok_s_b1", "openvino_f32_tok_s_b1", 1.0),
    ("engine fp32 / OpenVINO fp32, batch 16", "engine_tok_s_b16", "openvino_f32_tok_s_b16", 1.0),
    ("engine CPU variant / OpenVINO defaults, b1", "engine_q_tok_s_b1", "openvino_tok_s_b1", 1.0),
    ("engine CPU variant / OpenVINO defaults, b16", "engine_q_tok_s_b16", "openvino_tok_s_b16", 1.0),
    ("engine CPU variant / engine fp32, batch 1", "engine_q_tok_s_b1", "engine_tok_s_b1", 2.0),
    # condgen's OpenVINO engine (server/openvino_engine.py) against GenAI's defaults on the same graph.
    ("engine OpenVINO / OpenVINO defaults, b1", "engine_ov_tok_s_b1", "openvino_tok_s_b1", 0.9),
    ("engine OpenVINO / OpenVINO defaults, b16", "engine_ov_tok_s_b16", "openvino_tok_s_b16", 0.9),
    ("engine OpenVINO / engine fp32, b16", "engine_ov_tok_s_b16", "engine_tok_s_b16", 1.0),
    ("continuous / static, mixed, OpenVINO", "continuous_ov_tok_s_mixed", "static_ov_tok_s_mixed", 1.5),
]
# The CPU peers (`make bench-peers`): virtual environment, and configuration -> report prefix.
PEERS = {
    "openvino": (".venv-openvino", {"f32": "openvino_f32", "default": "openvino"}),
    "ortgenai": (".venv-ortgenai", {"int4": "ortgenai_int4", "fp32": "ortgenai_fp32"}),
}
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "run_peer.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="condgen bench", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("demo_out/bundle"), help="bundle to serve (make demo)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint of the bundle, for the transformers and "
        "optimum baselines (default: the bundle's sibling `checkpoint`)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per sequence in the engine runs")
    parser.add_argument("--prompt-examples", type=int, default=10, help="real examples per prompt")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="the server's and the in-process scheduler's batch rows (condgen serve's own default on a CPU)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=0,
        help="KV-cache budget for the server and the in-process scheduler (0: none)",
    )
    parser.add_argument(
        "--variant",
        default="w8",
        help="the CPU export variant measured beside fp32 (built from the checkpoint beside the bundle "
        "when missing; default w8)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip OpenVINO GenAI and ONNX Runtime GenAI")
    parser.add_argument("--quick", action="store_true", help="small loads (a smoke test, not figures)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/latest.json"))
    return parser.parse_args(argv)


def read_tokenizer_ids(bundle: Path, prompt: str) -> list[int]:
    """The bundle tokenizer's ids for `prompt`: every contender gets exactly these."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def serving_figures(args, intents: list[str], load: StreamLoad, streams: tuple[int, ...]) -> dict:
    results = {}
    server = ServerProcess(
        args.bundle,
        "--device",
        args.device,
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
    )
    try:
        for count in streams:
            progress(f"server: {count} concurrent streams")
            tok_s, per_stream = run_streams(server.target, intents, count, load)
            results[f"server_tok_s_c{count}"] = tok_s
            if count == 16 or count == streams[1]:
                results.update({f"{k}_c16": v for k, v in latency_figures(per_stream, load).items()})
        results["peak_rss_mb"] = server.peak_rss_mb()
    finally:
        server.stop()
    return results


def batching_figures(args, intents: list[str], load: StreamLoad, quick: bool) -> dict:
    progress("in process: the 16-stream load straight to the scheduler")
    specs = [spec_for(intents[i % len(intents)], i, load.num_records, load) for i in range(4 if quick else 16)]
    same_as_server = SchedulerConfig(max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens)
    figures = {"inproc_tok_s_c16": in_process(args.bundle, args.device, specs, same_as_server)}
    mixed = mixed_specs(intents, load, small=2 if quick else 5, large=10 if quick else 100, count=5 if quick else 10)
    for policy in ("continuous", "static"):
        progress(f"mixed workload, {policy} batching")
        figures[f"{policy}_tok_s_mixed"] = in_process(
            args.bundle, args.device, mixed, SchedulerConfig(max_batch_size=16, policy=policy)
        )
    return figures


def engine_figures(args, prompts: list[str], checkpoint: Path) -> dict:
    figures = {}
    for batch in (1, 16):
        chosen = prompts[:batch]
        progress(f"engine alone, batch {batch}")
        figures[f"engine_tok_s_b{batch}"], figures["device"] = our_engine(
            args.bundle, chosen, args.new_tokens, args.device
        )
        progress(f"transformers generate, batch {batch}")
        figures[f"transformers_tok_s_b{batch}"] = transformers_generate(
            checkpoint, chosen, args.new_tokens, args.device
        )
        progress(f"optimum ORTModelForCausalLM, batch {batch}")
        figures[f"optimum_tok_s_b{batch}"] = optimum_generate(checkpoint, chosen, args.new_tokens, args.device)
    return figures


def variant_bundle(args, checkpoint: Path) -> Path:
    """The `--variant` bundle beside the fp32 one, exported from the checkpoint when missing."""
    path = args.bundle.with_name(f"{args.bundle.name}-{args.variant}")
    if not (path / "condgen.json").is_file():
        from condgen.training.export import export_bundle

        progress(f"exporting the {args.variant} bundle to {path}")
        export_bundle(checkpoint, path, variant=args.variant)
    return path


def greedy_figures(args, prompts: list[str], ids: list[list[int]], checkpoint: Path) -> dict:
    """The fp32 engine and the `--variant` bundle: speed, prefill / decode split, greedy agreement
    with transformers fp32, server peak RSS at 64 streams; then the peers on the same ids."""
    progress("transformers fp32 greedy tokens (the reference)")
    reference = transformers_greedy(checkpoint, ids[:3], args.new_tokens)
    figures: dict = {}
    variant = variant_bundle(args, checkpoint)
    figures["engine_q_variant"] = args.variant
    for batch in (1, 16):
        progress(f"engine, {args.variant} bundle, batch {batch}")
        figures[f"engine_q_tok_s_b{batch}"], _ = our_engine(variant, prompts[:batch], args.new_tokens, args.device)
    for prefix, bundle in (("engine", args.bundle), ("engine_q", variant)):
        progress(f"{prefix}: prefill and decode apart, greedy agreement")
        details = engine_details(bundle, ids[:16], args.new_tokens, args.device)
        figures[f"{prefix}_greedy_match"] = greedy_match(reference, details.pop("greedy"))
        figures.update({f"{prefix}_{k}": v for k, v in details.items()})
    progress(f"{args.variant} against fp32, teacher-forced over every prompt position")
    forced = teacher_forced_agreement(args.bundle, variant, ids[:16], args.device)
    figures.update({f"engine_q_{k}": v for k, v in forced.items()})
    progress(f"server, {args.variant} bundle: 64 concurrent streams")
    intents = sorted(read_examples(variant))
    server = ServerProcess(
        variant,
        "--device",
        args.device,
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-batch-tokens",  # the KV budget of the fp32 server's figures: peak RSS compares like with like
        str(args.max_batch_tokens),
    )
    try:
        load = StreamLoad(num_records=2 if args.quick else 8, prompt_examples=args.prompt_examples)
        figures["server_q_tok_s_c64"], _ = run_streams(server.target, intents, 64, load)
        figures["peak_rss_mb_q"] = server.peak_rss_mb()
    finally:
        server.stop()
    if args.device != "cuda":
        figures.update(openvino_figures(args, prompts, ids, checkpoint, reference))
    if not args.no_peers:
        figures.update(peer_figures(args, ids[:16], checkpoint, reference))
    return figures


def openvino_bundle(args, checkpoint: Path) -> Path | None:
    """The bundle with an OpenVINO graph beside the fp32 one, exported when missing; None where
    optimum-intel's environment is not installed."""
    from condgen.training.export import ExportError, export_bundle
    from condgen.training.export_openvino import converter_python

    path = args.bundle.with_name(f"{args.bundle.name}-openvino")
    if (path / "condgen.json").is_file() and read_manifest(path).openvino is not None:
        return path
    try:
        converter_python()
    except ExportError as error:
        progress(f"OpenVINO engine skipped: {error}")
        return None
    progress(f"exporting the bundle with its OpenVINO graph to {path}")
    try:
        export_bundle(checkpoint, path, runtime="openvino")
    except ExportError as error:
        progress(f"OpenVINO engine skipped: {error}")
        return None
    return path


def openvino_figures(args, prompts: list[str], ids: list[list[int]], checkpoint: Path, reference) -> dict:
    """condgen's OpenVINO engine (CPU defaults): speed, prefill / decode, greedy agreement with
    transformers fp32, and the server at 64 streams (peak RSS)."""
    from condgen.server.runtime import openvino_available

    if not openvino_available():
        progress("OpenVINO engine skipped: the openvino package is not installed")
        return {}
    bundle = openvino_bundle(args, checkpoint)
    if bundle is None:
        return {}
    figures: dict = {}
    engine = bench_engine(bundle, "cpu", "openvino")  # loaded once for every in-process figure
    for batch in (1, 16):
        progress(f"engine OpenVINO, batch {batch}")
        figures[f"engine_ov_tok_s_b{batch}"], figures["engine_ov_device"] = our_engine(
            bundle, prompts[:batch], args.new_tokens, "cpu", engine=engine
        )
    progress("engine OpenVINO: prefill and decode apart, greedy agreement")
    details = engine_details(bundle, ids[:16], args.new_tokens, "cpu", engine=engine)
    figures["engine_ov_greedy_match"] = greedy_match(reference, details.pop("greedy"))
    figures.update({f"engine_ov_{k}": v for k, v in details.items()})
    intents = sorted(read_examples(bundle))
    load = StreamLoad(num_records=2 if args.quick else 8, prompt_examples=args.prompt_examples)
    small, large, count = (2, 10, 5) if args.quick else (5, 100, 10)
    mixed = mixed_specs(intents, load, small=small, large=large, count=count)
    for policy in ("continuous", "static"):
        progress(f"mixed workload, {policy} batching, OpenVINO engine")
        figures[f"{policy}_ov_tok_s_mixed"] = in_process(
            bundle, "cpu", mixed, SchedulerConfig(max_batch_size=16, policy=policy), engine=engine
        )
    del engine
    progress("server, OpenVINO engine: 64 concurrent streams")
    server = ServerProcess(
        bundle,
        "--runtime",
        "openvino",
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
    )
    try:
        figures["server_ov_tok_s_c64"], _ = run_streams(server.target, intents, 64, load)
        figures["peak_rss_mb_ov"] = server.peak_rss_mb()
    finally:
        server.stop()
    return figures


def peer_figures(args, ids: list[list[int]], checkpoint: Path, reference: list[list[int]]) -> dict:
    """Each installed peer, in its own environment, on exactly these token ids."""
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({"prompts": ids, "new_tokens": args.new_tokens}))
        for peer, (venv, configurations) in PEERS.items():
            python = Path(venv) / "bin" / "python"
            if not python.is_file():
                progress(f"{peer}: not installed (make bench-peers); skipped")
                continue
            progress(f"{peer}: {', '.join(configurations)}")
            work = PEER_SCRIPT.parent / "models" / checkpoint_key(checkpoint)
            command = [str(python), str(PEER_SCRIPT), peer, "--checkpoint", str(checkpoint), "--work", str(work)]
            done = subprocess.run([*command, "--request", str(request)], capture_output=True, text=True)
            if done.returncode != 0:
                progress(f"{peer} failed; skipped. Its last output:\n{done.stderr[-2000:]}")
                continue
            for configuration, result in json.loads(done.stdout.splitlines()[-1]).items():
                prefix = configurations[configuration]
                figures[f"{prefix}_greedy_match"] = greedy_match(reference, result.pop("greedy"))
                figures.update({f"{prefix}_{k}": v for k, v in result.items()})
    return figures


def checkpoint_key(checkpoint: Path) -> str:
    """Names the peers' exports of this checkpoint (a retrained one gets new exports)."""
    weights = next(p for p in (checkpoint / "model.safetensors", checkpoint / "config.json") if p.is_file())
    stat = weights.stat()
    return hashlib.sha256(f"{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def print_table(report: dict) -> None:
    print(
        f"\ncondgen bench  model={report['model']}  device={report['device']}  threads={report['threads']}  "
        f"git={report['git_sha']}"
    )
    for key, value in report.items():
        if isinstance(value, float):
            print(f"  {key:<28} {value:>10.1f}")
    print("\n  ratio                                   measured   target  met")
    for name, top, bottom, target in TARGETS:
        if top not in report or bottom not in report:
            print(f"  {name:<38} {'skipped':>8}  (not measured in this run)")
            continue
        ratio = report[top] / report[bottom]
        print(f"  {name:<38} {ratio:>8.2f}  >= {target:<4}  {'yes' if ratio >= target else 'NO'}")
    for key, limit in (("peak_rss_mb", 1500), ("peak_rss_mb_q", 800), ("peak_rss_mb_ov", 800)):
        if key in report:
            rss, met = report[key], "yes" if report[key] <= limit else "NO"
            print(f"  {'server peak RSS, 64 streams, ' + key + ' (MB)':<38} {rss:>8.0f}  <= {limit:<4}  {met}")
    for key in sorted(k for k in report if k.endswith("_greedy_match")):
        print(f"  {key:<38} {report[key]:>8.2f}  (share of {report['new_tokens']} greedy tokens = transformers fp32)")
    if "engine_q_top1_agreement" in report:
        print(
            f"  {report['engine_q_variant']} vs fp32, teacher-forced: top-1 agreement "
            f"{report['engine_q_top1_agreement']:.2%}, mean KL {report['engine_q_mean_kl']:.5f} nats"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    manifest = read_manifest(args.bundle)
    checkpoint = args.checkpoint or args.bundle.parent / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        print(f"error: no checkpoint at {checkpoint} for the baselines; pass --checkpoint", file=sys.stderr)
        return 2
    intents = sorted(read_examples(args.bundle))
    load = StreamLoad(num_records=2 if args.quick else 8, prompt_examples=args.prompt_examples)
    started = time.time()
    report = {
        "model": f"{manifest.base_model} ({manifest.onnx.variant})",
        "threads": os.cpu_count(),
        "git_sha": git_sha(),
        "platform": platform.platform(),
        "new_tokens": args.new_tokens,
        "prompt_examples": args.prompt_examples,
        "stream_load": asdict(load),
        "max_batch_size": args.max_batch_size,
        "max_batch_tokens": args.max_batch_tokens,
    }
    report.update(serving_figures(args, intents, load, (1, 4, 8) if args.quick else (1, 16, 64)))
    if args.quick:  # the quick run's middle load stands in for c16 and c64
        report["server_tok_s_c16"] = report.pop("server_tok_s_c4")
        report["server_tok_s_c64"] = report.pop("server_tok_s_c8")
    report.update(batching_figures(args, intents, load, args.quick))
    prompts = bench_prompts(args.bundle, 16, args.prompt_examples, manifest.separator)
    report.update(engine_figures(args, prompts if not args.quick else prompts[:16], checkpoint))
    ids = [read_tokenizer_ids(args.bundle, p) for p in prompts]
    report.update(greedy_figures(args, prompts, ids, checkpoint))
    report["seconds"] = time.time() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
