"""Engine figures under the CUDA provider (run on a GPU machine with onnxruntime-gpu).

    python -m condgen.bench.gpu_engine --bundle demo_out/bundle-fp16 --checkpoint demo_out/checkpoint

Our engine alone at batch 1 and 16 (fp16 bundle, IO binding keeping the KV cache on the
GPU), with IO binding off for comparison; with `--checkpoint`, transformers `generate` in
half precision on the same GPU, prompts and token counts, side by side; and the 16-request
in-process scheduler load. Prints and writes JSON. Fails loudly if CUDA is not what the
session runs on (`--device cpu` only rehearses the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from condgen.bench.engines import bench_prompts, engine_greedy, transformers_generate
from condgen.bench.load import StreamLoad, in_process, spec_for
from condgen.bundle import read_examples, read_manifest
from condgen.server.engine import Engine, EngineConfig
from condgen.server.scheduler import SchedulerConfig


def engine_tok_s(engine: Engine, prompts: list[str], new_tokens: int) -> float:
    ids = [engine.encode(p) for p in prompts]
    engine_greedy(engine, ids[:1], 4)  # warm-up: CUDA kernels, allocations
    started = time.perf_counter()
    engine_greedy(engine, ids, new_tokens)
    return len(ids) * new_tokens / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-examples", type=int, default=10)
    parser.add_argument("--checkpoint", type=Path, help="also time transformers generate (fp16) on it")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a rehearsal only")
    parser.add_argument("--output", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args(argv)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA / cuDNN from the nvidia-* wheels
    manifest = read_manifest(args.bundle, verify=False)
    prompts = bench_prompts(args.bundle, 16, args.prompt_examples, manifest.separator)
    device = args.device  # cpu only rehearses the script
    report = {
        "bundle": str(args.bundle),
        "variant": manifest.onnx.variant,
        "ort": ort.__version__,
        "providers": ort.get_available_providers(),
        "new_tokens": args.new_tokens,
    }
    for binding in ("on", "off"):
        engine = Engine(args.bundle, manifest, EngineConfig(device=device, io_binding=binding))
        report["device"] = engine.provider
        for batch in (1, 16):
            report[f"engine_tok_s_b{batch}_iobinding_{binding}"] = engine_tok_s(
                engine, prompts[:batch], args.new_tokens
            )
            print(
                f"io binding {binding}, batch {batch}: {report[f'engine_tok_s_b{batch}_iobinding_{binding}']:.1f} "
                f"tok/s",
                flush=True,
            )
    if args.checkpoint:
        for batch in (1, 16):
            report[f"transformers_fp16_tok_s_b{batch}"] = transformers_generate(
                args.checkpoint, prompts[:batch], args.new_tokens, device, half_on_gpu=True
            )
            print(
                f"transformers fp16, batch {batch}: {report[f'transformers_fp16_tok_s_b{batch}']:.1f} tok/s", flush=True
            )
            report[f"engine_over_transformers_b{batch}"] = round(
                report[f"engine_tok_s_b{batch}_iobinding_on"] / report[f"transformers_fp16_tok_s_b{batch}"], 2
            )
    load = StreamLoad(prompt_examples=args.prompt_examples)
    intents = sorted(read_examples(args.bundle))
    specs = [spec_for(intents[i % len(intents)], i, load.num_records, load) for i in range(16)]
    report["inproc_tok_s_c16"] = in_process(args.bundle, device, specs, SchedulerConfig(max_batch_size=64))
    print(json.dumps(report, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    return 0 if report["device"] == "CUDAExecutionProvider" or device == "cpu" else 1


if __name__ == "__main__":
    sys.exit(main())
