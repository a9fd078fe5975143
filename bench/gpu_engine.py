"""GPU figures side by side in one run (a GPU machine with onnxruntime-gpu):

    python -m condgen.bench.gpu_engine --bundle BUNDLE_FP16 --checkpoint CHECKPOINT

- the engine alone, greedy, at batch 1, 16, 64 and 256 (`--batches`): IO binding keeps the
  KV cache on the GPU, the sampling head sends back only each row's top tokens; at batch 16
  also with the head off (the full logits to the host), for comparison;
- what a decode step's time goes to at each batch: the model pass, the sampling head, and the
  host (Python, bookkeeping);
- with `--checkpoint`, transformers `generate` in half precision at batch 1 and 16 on the same
  GPU, prompts and token counts;
- `condgen serve` in a child process under 16 and 256 concurrent streams (`--streams`):
  records/s and tokens/s.

Prints and writes JSON (`bench/results/gpu.json`). Exits 1 if CUDA is not what the engine runs
on, unless `--device cpu`, which only rehearses the script (small `--batches`/`--streams`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from condgen.bench.engines import bench_prompts, engine_greedy, timed, transformers_generate
from condgen.bench.load import ServerProcess, StreamLoad, run_streams
from condgen.bundle import read_examples, read_manifest
from condgen.server.engine import Engine, EngineConfig


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def engine_figures(engine: Engine, ids: list[list[int]], new_tokens: int) -> tuple[float, dict]:
    """Tokens/s of greedy decoding through the sampling head (second run; the first warms up),
    and a decode step's time split (ms per step: model pass, head, host)."""
    engine_greedy(engine, ids, min(new_tokens, 4), head=True)  # warm-up: kernels, allocations
    timings: dict = {}
    started = time.perf_counter()
    engine_greedy(engine, ids, new_tokens, head=True, timings=timings)
    seconds = time.perf_counter() - started
    steps = max(1, new_tokens - 1)
    decode, model, head = (timings.get(part, 0.0) / steps * 1000 for part in ("step", "model", "head"))
    split = {
        "decode_ms": round(decode, 3),
        "model_ms": round(model, 3),
        "head_ms": round(head, 3),
        "host_ms": round(max(0.0, decode - model - head), 3),
    }
    return len(ids) * new_tokens / seconds, split


def host_logits_tok_s(engine: Engine, ids: list[list[int]], new_tokens: int) -> float:
    """Greedy tokens/s with the full logits coming to the host every step (no sampling head)."""
    return timed(lambda: engine_greedy(engine, ids, new_tokens), len(ids) * new_tokens)


def server_figures(bundle: Path, device: str, streams: int, load: StreamLoad) -> dict:
    """`condgen serve` (its defaults for the device) under `streams` concurrent Generate calls."""
    server = ServerProcess(bundle, "--device", device)
    try:
        intents = sorted(read_examples(bundle))
        run_streams(server.target, intents, min(streams, 4), load)  # warm-up
        started = time.perf_counter()
        tok_s, results = run_streams(server.target, intents, streams, load)
        wall = time.perf_counter() - started
    finally:
        server.stop()
    return {
        f"server_tok_s_c{streams}": tok_s,
        f"server_records_s_c{streams}": sum(r.records for r in results) / wall,
    }


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-examples", type=int, default=10)
    parser.add_argument(
        "--batches", type=_ints, default=[1, 16, 64, 256], help="engine batch sizes (default 1,16,64,256)"
    )
    parser.add_argument("--streams", type=_ints, default=[16, 256], help="concurrent server streams (default 16,256)")
    parser.add_argument("--checkpoint", type=Path, help="also time transformers generate (fp16) on it")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a rehearsal only")
    parser.add_argument("--output", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args(argv)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA / cuDNN from the nvidia-* wheels
    manifest = read_manifest(args.bundle, verify=False)
    prompts = bench_prompts(args.bundle, max(args.batches), args.prompt_examples, manifest.separator)
    engine = Engine(args.bundle, manifest, EngineConfig(device=args.device))
    ids = [engine.encode(p) for p in prompts]
    report: dict = {
        "device": engine.provider,
        "git_sha": git_sha(),
        "bundle": str(args.bundle),
        "variant": manifest.onnx.variant,
        "ort": ort.__version__,
        "new_tokens": args.new_tokens,
        "io_binding": engine.io_binding,
        "cuda_graphs": False,  # not used yet: decode steps run eagerly
    }
    for batch in args.batches:
        tok_s, split = engine_figures(engine, ids[:batch], args.new_tokens)
        report[f"engine_tok_s_b{batch}"] = tok_s
        report[f"step_b{batch}"] = split
        print(f"engine, batch {batch}: {tok_s:.1f} tok/s; a decode step {split}", flush=True)
    middle = 16 if 16 in args.batches else args.batches[-1]
    report[f"engine_tok_s_b{middle}_host_logits"] = host_logits_tok_s(engine, ids[:middle], args.new_tokens)
    del engine  # the server gets the device to itself
    load = StreamLoad(prompt_examples=args.prompt_examples)
    for streams in args.streams:
        report.update(server_figures(args.bundle, args.device, streams, load))
        print(f"server, {streams} streams: {report[f'server_tok_s_c{streams}']:.1f} tok/s", flush=True)
        if f"engine_tok_s_b{streams}" in report:
            ratio = report[f"server_tok_s_c{streams}"] / report[f"engine_tok_s_b{streams}"]
            report[f"server_over_engine_c{streams}"] = ratio
    if args.checkpoint:  # last: torch keeps its CUDA memory until the process ends
        for batch in (1, 16):
            report[f"transformers_tok_s_b{batch}"] = transformers_generate(
                args.checkpoint, prompts[:batch], args.new_tokens, args.device, half_on_gpu=True
            )
            print(f"transformers fp16, batch {batch}: {report[f'transformers_tok_s_b{batch}']:.1f} tok/s", flush=True)
        if "engine_tok_s_b16" in report:
            report["engine_over_transformers_b16"] = report["engine_tok_s_b16"] / report["transformers_tok_s_b16"]
    print(json.dumps(report, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["device"] == "CUDAExecutionProvider" or args.device == "cpu" else 1


if __name__ == "__main__":
    sys.exit(main())
