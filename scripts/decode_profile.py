"""Where a decode step's time goes: ONNX Runtime's profiler over one bundle's graph.

Runs decode steps of BATCH rows over a cache of PAST positions (random keys and values, every
position attended; the engine's session options) and splits the step's time into:

- `projections`: the MatMuls that multiply by weights (q/k/v/o, the MLP), per layer;
- `lm_head`: the vocabulary projection;
- `attention`: the score and value MatMuls over the cache and the softmax;
- `other kernels`: norms, rotary embedding, activations, the graph's shape arithmetic.

The split comes from a second, profiled session (the profiler slows every node a little), as
shares of its kernel time, and in milliseconds of the plain session's median wall time.

With `--prefill` it times a prefill pass of BATCH prompts of PAST tokens instead. With
`--provider openvino` (a virtual environment with `onnxruntime-openvino` instead of
`onnxruntime`) it times the same steps under the OpenVINO execution provider, as a whole:
its one fused node hides the split. The cache length grows by one each step, as in serving.

With `--compare OTHER` it times the same steps on BUNDLE's and OTHER's graphs instead, in
alternating blocks in one process (so both see the same machine), and prints both medians.

    python scripts/decode_profile.py BUNDLE --batch 16 --past 430
    python scripts/decode_profile.py BUNDLE --batch 1 --past 230 --compare OTHER_BUNDLE
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ATTENTION = re.compile(r"/condgen/gqa/|self_attn/Softmax")  # the grouped-query rewrite's nodes
PROJECTION = re.compile(r"_proj/MatMul")  # also MatMulNBits nodes named after the MatMul


def session(model: Path, provider: str, threads: int, profile_prefix: str | None) -> ort.InferenceSession:
    from condgen.server.engine import session_options

    options = session_options(threads)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers: list = ["CPUExecutionProvider"]
    if provider == "openvino":
        providers = [("OpenVINOExecutionProvider", {"device_type": "CPU", "num_of_threads": str(threads)})]
    return ort.InferenceSession(str(model), options, providers=providers)


def feeds(sess: ort.InferenceSession, batch: int, past: int, new: int, rng: np.random.Generator) -> dict:
    feed: dict = {
        "input_ids": rng.integers(0, 1000, (batch, new), dtype=np.int64),
        "attention_mask": np.ones((batch, past + new), dtype=np.int64),
        "position_ids": np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1)),
    }
    for node in sess.get_inputs():
        if node.name.startswith("past_key_values"):
            heads, dim = node.shape[1], node.shape[3]
            feed[node.name] = rng.standard_normal((batch, heads, past, dim), dtype=np.float32)
        elif node.name == "num_logits_to_keep":
            feed[node.name] = np.array([1], dtype=np.int64)
    return feed


def category(node: str) -> str:
    if node.startswith("/lm_head"):
        return "lm_head"
    if PROJECTION.search(node):
        return "projections"
    if ATTENTION.search(node):
        return "attention"
    return "other kernels"


def split(profile: Path, runs: int) -> dict[str, float]:
    """Kernel milliseconds per run by category."""
    totals: collections.Counter = collections.Counter()
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[category(event["name"][: -len("_kernel_time")])] += event["dur"] / 1000
    return {name: ms / runs for name, ms in totals.items()}


def compare(models: list[Path], args, shapes: list[tuple[int, int]], rng: np.random.Generator) -> dict:
    """Median ms per pass of each model, timed in alternating blocks of `shapes`."""
    sessions = [session(model, args.provider, args.threads, None) for model in models]
    walls: list[list[float]] = [[] for _ in models]
    for block in range(6):
        order = range(len(models)) if block % 2 == 0 else reversed(range(len(models)))
        for index in order:
            sess = sessions[index]
            sess.run(None, feeds(sess, args.batch, *shapes[0], rng))  # warm-up
            for past, new in shapes:
                feed = feeds(sess, args.batch, past, new, rng)
                started = time.perf_counter()
                sess.run(None, feed)
                walls[index].append((time.perf_counter() - started) * 1000)
    medians = [statistics.median(w) for w in walls]
    return {
        "batch": args.batch,
        "past": args.past,
        "pass": "prefill" if args.prefill else "decode",
        "wall_ms_median": {str(m): round(t, 2) for m, t in zip(models, medians)},
        "speedup_of_compare": round(medians[0] / medians[1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--past", type=int, default=430, help="cache positions before the step (prompt length)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    parser.add_argument("--prefill", action="store_true", help="time prefill passes of PAST tokens instead")
    parser.add_argument("--provider", choices=("cpu", "openvino"), default="cpu")
    parser.add_argument("--compare", type=Path, help="a second bundle: time both, alternating, instead of profiling")
    args = parser.parse_args()
    args.threads = args.threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)
    model = args.bundle / "model.onnx"
    shapes = [(0, args.past) if args.prefill else (args.past + i, 1) for i in range(args.steps)]
    if args.compare:
        print(json.dumps(compare([model, args.compare / "model.onnx"], args, shapes[:10], rng), indent=2))
        return

    plain = session(model, args.provider, args.threads, None)
    plain.run(None, feeds(plain, args.batch, *shapes[0], rng))  # warm-up (and compilation)
    walls = []
    for past, new in shapes:
        feed = feeds(plain, args.batch, past, new, rng)
        started = time.perf_counter()
        plain.run(None, feed)
        walls.append((time.perf_counter() - started) * 1000)
    report: dict = {
        "bundle": str(args.bundle),
        "provider": plain.get_providers()[0],
        "batch": args.batch,
        "past": args.past,
        "pass": "prefill" if args.prefill else "decode",
        "wall_ms_median": statistics.median(walls),
    }
    if args.provider == "cpu":
        with tempfile.TemporaryDirectory() as folder:
            profiled = session(model, "cpu", args.threads, str(Path(folder) / "profile"))
            for past, new in shapes:
                profiled.run(None, feeds(profiled, args.batch, past, new, rng))
            kernels = split(Path(profiled.end_profiling()), len(shapes))
        measured = sum(kernels.values())
        report["share_percent"] = {name: round(100 * ms / measured, 1) for name, ms in sorted(kernels.items())}
        report["ms_of_wall"] = {
            name: round(ms / measured * report["wall_ms_median"], 2) for name, ms in sorted(kernels.items())
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
