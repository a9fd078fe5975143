"""One CPU peer of `make bench`, run inside its own virtual environment (`make bench-peers`).

    .venv-openvino/bin/python bench/peers/run_peer.py openvino --checkpoint CKPT --work DIR --request REQ.json
    .venv-ortgenai/bin/python bench/peers/run_peer.py ortgenai --checkpoint CKPT --work DIR --request REQ.json

It exports the checkpoint with the peer's own tool (cached in DIR), then for every configuration
of the peer generates greedily from exactly the token ids in REQ.json (`prompts`: lists of ids,
`new_tokens`): batch 1 (the first prompt) and batch 16 (all), each timed on its second run, plus
a one-token run for the prefill rate. It prints one JSON object: per configuration the tokens/s
at both batch sizes, prefill tokens/s, decode ms per step and the greedy tokens of the first 3
prompts (the caller compares them with transformers fp32). condgen is not installed in these
environments: this file imports nothing of it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def timed(fn):
    """(seconds of the second run, its result): the first run warms up."""
    fn()
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def figures(generate, prompts: list[list[int]], new_tokens: int) -> dict:
    """tok/s at batch 1 and 16, prefill tok/s and decode ms/step at both, greedy tokens."""
    out: dict = {}
    for batch in (1, len(prompts)):
        chosen = prompts[:batch]
        seconds, tokens = timed(lambda chosen=chosen: generate(chosen, new_tokens))
        prefill_seconds, _ = timed(lambda chosen=chosen: generate(chosen, 1))
        label = "b1" if batch == 1 else "b16"
        out[f"tok_s_{label}"] = batch * new_tokens / seconds
        out[f"prefill_tok_s_{label}"] = sum(len(p) for p in chosen) / prefill_seconds
        out[f"decode_ms_{label}"] = max(0.0, seconds - prefill_seconds) / max(1, new_tokens - 1) * 1000
        if batch > 1:
            out["greedy"] = [list(t) for t in tokens[:3]]
    return out


# ---- OpenVINO GenAI ------------------------------------------------------------------------
def openvino_model(checkpoint: Path, work: Path) -> Path:
    folder = work / "openvino-fp32"
    if not (folder / "openvino_model.xml").is_file():
        command = [
            sys.executable,
            "-m",
            "optimum.commands.optimum_cli",
            "export",
            "openvino",
            "--model",
            str(checkpoint),
            "--task",
            "text-generation-with-past",
            "--weight-format",
            "fp32",
            str(folder),
        ]
        subprocess.run(command, check=True, stdout=sys.stderr)
    return folder


def openvino(checkpoint: Path, work: Path, prompts: list[list[int]], new_tokens: int) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    folder = openvino_model(checkpoint, work)
    results = {}
    # fp32 compute and KV cache; then the CPU plugin's own defaults (bf16 where the CPU has it, u8 KV).
    for name, properties in (
        ("f32", {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}),
        ("default", {}),
    ):
        scheduler = genai.SchedulerConfig()
        scheduler.enable_prefix_caching = False  # a repeated timed run would otherwise look free
        scheduler.cache_size = 2
        scheduler.max_num_seqs = 64
        scheduler.max_num_batched_tokens = 8192
        pipe = genai.ContinuousBatchingPipeline(str(folder), scheduler, "CPU", properties)

        def generate(chosen, count, pipe=pipe):
            config = genai.GenerationConfig()
            config.max_new_tokens = count
            config.min_new_tokens = count
            config.do_sample = False
            inputs = [ov.Tensor(np.array([ids], dtype=np.int64)) for ids in chosen]
            outputs = pipe.generate(inputs, [config] * len(inputs))
            return [list(o.m_generation_ids[0]) for o in outputs]

        results[name] = figures(generate, prompts, new_tokens)
        del pipe
    return results


# ---- ONNX Runtime GenAI --------------------------------------------------------------------
def ortgenai_model(checkpoint: Path, work: Path, precision: str) -> Path:
    folder = work / f"ortgenai-{precision}"
    if not (folder / "genai_config.json").is_file():
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(checkpoint),
            "-o",
            str(folder),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(work / "builder-cache"),
        ]
        subprocess.run(command, check=True, stdout=sys.stderr)
    return folder


def ortgenai(checkpoint: Path, work: Path, prompts: list[list[int]], new_tokens: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    results = {}
    for precision in ("int4", "fp32"):
        model = og.Model(str(ortgenai_model(checkpoint, work, precision)))
        pad = json.loads((work / f"ortgenai-{precision}" / "genai_config.json").read_text())["model"].get(
            "pad_token_id", 0
        )

        def generate(chosen, count, model=model, pad=pad):
            width = max(len(ids) for ids in chosen)
            ids = np.full((len(chosen), width), pad, dtype=np.int32)
            for row, prompt in enumerate(chosen):
                ids[row, width - len(prompt) :] = prompt  # left padding, as the model builder's configs expect
            params = og.GeneratorParams(model)
            params.set_search_options(
                do_sample=False, max_length=width + count, min_length=width + count, batch_size=len(chosen)
            )
            generator = og.Generator(model, params)
            generator.append_tokens(ids)
            produced: list[list[int]] = [[] for _ in chosen]
            for _ in range(count):
                if generator.is_done():
                    break
                generator.generate_next_token()
                for row, token in enumerate(generator.get_next_tokens()):
                    produced[row].append(int(token))
            return produced

        results[precision] = figures(generate, prompts, new_tokens)
        del model
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=("openvino", "ortgenai"))
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="folder for the peer's exported models")
    parser.add_argument("--request", type=Path, required=True, help="JSON: prompts (token ids), new_tokens")
    args = parser.parse_args()
    request = json.loads(args.request.read_text())
    args.work.mkdir(parents=True, exist_ok=True)
    run = openvino if args.peer == "openvino" else ortgenai
    print(json.dumps(run(args.checkpoint, args.work, request["prompts"], request["new_tokens"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
