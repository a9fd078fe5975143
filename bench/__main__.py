"""Run every benchmark side by side and write bench/results/latest.json (see condgen.bench)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from condgen.bench.engines import bench_prompts, optimum_generate, our_engine, transformers_generate
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

TARGETS = [  # (name, numerator, denominator, at least)
    ("engine / transformers, batch 16", "engine_tok_s_b16", "transformers_tok_s_b16", 2.0),
    ("engine / transformers, batch 1", "engine_tok_s_b1", "transformers_tok_s_b1", 1.3),
    ("engine / optimum, batch 16", "engine_tok_s_b16", "optimum_tok_s_b16", 1.5),
    ("server c16 / in-process c16", "server_tok_s_c16", "inproc_tok_s_c16", 0.85),
    ("server c64 / server c16", "server_tok_s_c64", "server_tok_s_c16", 0.9),
    ("continuous / static, mixed", "continuous_tok_s_mixed", "static_tok_s_mixed", 1.5),
]


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
        help="the server's and the in-process scheduler's batch rows (condgen serve's default)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=0,
        help="KV-cache budget for the server and the in-process scheduler (0: none)",
    )
    parser.add_argument("--quick", action="store_true", help="small loads (a smoke test, not figures)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/latest.json"))
    return parser.parse_args(argv)


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
        ratio = report[top] / report[bottom] if report.get(bottom) else float("nan")
        print(f"  {name:<38} {ratio:>8.2f}  >= {target:<4}  {'yes' if ratio >= target else 'NO'}")
    rss = report["peak_rss_mb"]
    print(f"  {'server peak RSS under 64 streams (MB)':<38} {rss:>8.0f}  <= 1500  {'yes' if rss <= 1500 else 'NO'}")


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
    report["seconds"] = time.time() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
