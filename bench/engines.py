"""Engine-alone throughput: our ONNX engine vs transformers `generate` vs optimum's ORT model.

Every contender gets the same prompts (one per intent, k real examples each), generates the
same number of new tokens greedily (EOS ignored) and is timed from prompt to last token,
prefill included, on its second run of the workload (the first, untimed, lets each one
allocate and pick kernels for these shapes). Tokens per second count generated tokens only.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from condgen.bundle import read_examples, read_manifest
from condgen.server.engine import Engine, EngineConfig
from condgen.server.prompts import build_prompt
from condgen.server.runtime import open_engine
from condgen.server.sampling import log_normalizer


def bench_prompts(bundle: Path, count: int, examples_per_prompt: int, separator: str) -> list[str]:
    examples = read_examples(bundle)
    intents = sorted(examples)
    rng = np.random.default_rng(0)
    return [
        build_prompt(
            intents[i % len(intents)], examples[intents[i % len(intents)]], examples_per_prompt, rng, separator
        )[0]
        for i in range(count)
    ]


def engine_greedy(
    engine: Engine, prompts: list[list[int]], new_tokens: int, head: bool = False, timings: dict | None = None
) -> list[list[int]]:
    """Prefill the prompts (several per pass), join them in one batch, decode greedily; the
    tokens generated per prompt. `head`: decode through `Engine.step` (the sampling head picks
    the top token on the device) instead of the full logits on the host; `timings` then adds up
    where each step's time goes (`Engine.step`'s parts and the whole `step`)."""
    batches, produced = [], []
    for batch, logits in engine.prefill(list(range(len(prompts))), prompts):
        produced.append([int(np.argmax(logits))])
        batch.set_next(produced[-1])
        batches.append(batch)
    batch = type(batches[0]).concatenate(batches)
    ones = np.ones(len(prompts), dtype=np.float32)
    for _ in range(new_tokens - 1):
        started = time.perf_counter()
        chosen = engine.step(batch, ones, timings).ids[:, 0] if head else np.argmax(engine.forward(batch), axis=-1)
        batch.set_next(chosen)
        for row, token in enumerate(chosen):
            produced[row].append(int(token))
        if timings is not None:
            timings["step"] = timings.get("step", 0.0) + time.perf_counter() - started
    return produced


def timed(fn, tokens: int) -> float:
    """Tokens per second of `fn`'s second run."""
    fn()
    started = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - started)


def bench_engine(bundle: Path, device: str, runtime: str = "onnxruntime"):
    """The bundle's engine in `runtime` (onnxruntime or openvino)."""
    return open_engine(bundle, read_manifest(bundle, verify=False), EngineConfig(device=device, runtime=runtime))


def our_engine(
    bundle: Path, prompts: list[str], new_tokens: int, device: str, runtime: str = "onnxruntime", engine=None
) -> tuple[float, str]:
    """Tokens/s of our engine (`engine`, or the bundle's in `runtime`) and where it runs."""
    engine = engine or bench_engine(bundle, device, runtime)
    ids = [engine.encode(p) for p in prompts]
    return timed(lambda: engine_greedy(engine, ids, new_tokens), len(ids) * new_tokens), engine.provider


def engine_details(
    bundle: Path, prompts: list[list[int]], new_tokens: int, device: str, runtime: str = "onnxruntime", engine=None
) -> dict:
    """Prefill tokens/s and decode ms per step at batch 1 and len(prompts), and the greedy
    tokens of the first 3 prompts (as `bench/peers/run_peer.py` reports them for the peers)."""
    engine = engine or bench_engine(bundle, device, runtime)
    out: dict = {}
    for batch in (1, len(prompts)):
        chosen, label = prompts[:batch], "b1" if batch == 1 else "b16"
        whole = 1 / timed(lambda c=chosen: engine_greedy(engine, c, new_tokens), 1)  # seconds
        prefill = 1 / timed(lambda c=chosen: engine_greedy(engine, c, 1), 1)
        out[f"prefill_tok_s_{label}"] = sum(len(p) for p in chosen) / prefill
        out[f"decode_ms_{label}"] = max(0.0, whole - prefill) / max(1, new_tokens - 1) * 1000
    out["greedy"] = engine_greedy(engine, prompts[:3], new_tokens)
    return out


def teacher_forced_agreement(reference: Path, variant: Path, prompts: list[list[int]], device: str) -> dict:
    """The variant's next-token distributions against the reference bundle's (fp32) at every
    position of the prompts, each position fed the real text (teacher forcing): one near tie does
    not end the comparison there, as it ends a greedy continuation. Returns the share of positions
    whose most likely token is the same (`top1_agreement`) and the mean KL divergence of the
    variant from the reference, in nats (`mean_kl`)."""
    engines = [Engine(b, read_manifest(b, verify=False), EngineConfig(device=device)) for b in (reference, variant)]
    same, divergences = 0, []
    for prompt in prompts:
        ours, theirs = (e.position_logits(prompt).astype(np.float64) for e in engines)
        same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        log_p, log_q = (x - log_normalizer(x)[:, None] for x in (ours, theirs))
        divergences.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
    kl = np.concatenate(divergences)
    return {"top1_agreement": same / len(kl), "mean_kl": float(kl.mean())}


def transformers_greedy(checkpoint: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers fp32 greedy tokens, one prompt at a time (no padding): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    produced = []
    with torch.inference_mode():
        for ids in prompts:
            tensor = torch.tensor([ids])
            out = model.generate(
                tensor,
                attention_mask=torch.ones_like(tensor),
                max_new_tokens=new_tokens,
                do_sample=False,
            )  # it may stop at EOS: agreement is counted over the tokens it gave
            produced.append(out[0, len(ids) :].tolist())
    return produced


def hf_generate(model, tokenizer, prompts: list[str], new_tokens: int, device) -> None:
    import torch

    encoded = tokenizer(
        prompts, return_tensors="pt", padding=True, add_special_tokens=False, return_token_type_ids=False
    ).to(device)
    with torch.inference_mode():
        model.generate(
            **encoded,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
        )


def _tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def transformers_generate(
    checkpoint: Path, prompts: list[str], new_tokens: int, device: str, half_on_gpu: bool = False
) -> float:
    """transformers `generate` in its default precision (fp32), or in fp16 when it runs on a GPU
    and `half_on_gpu` (to match an fp16 bundle)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    target = "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    half = {"dtype": torch.float16} if half_on_gpu and target == "cuda" else {}
    model: Any = AutoModelForCausalLM.from_pretrained(str(checkpoint), **half)
    model = model.to(target).eval()
    tokenizer = _tokenizer(checkpoint)
    return timed(lambda: hf_generate(model, tokenizer, prompts, new_tokens, target), len(prompts) * new_tokens)


@functools.lru_cache(maxsize=1)
def _optimum_model(checkpoint: str, provider: str):
    """Exported once per bench run (batch 1 and 16 share it)."""
    from optimum.onnxruntime import ORTModelForCausalLM

    return ORTModelForCausalLM.from_pretrained(checkpoint, export=True, use_cache=True, provider=provider)


def optimum_generate(checkpoint: Path, prompts: list[str], new_tokens: int, device: str) -> float:
    """optimum's ORTModelForCausalLM as its users run it: exported by optimum from the same
    checkpoint (the bundle's graph is rewritten for our engine and is not optimum's to drive)."""
    import onnxruntime as ort

    cuda = device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers()
    model = _optimum_model(str(checkpoint), "CUDAExecutionProvider" if cuda else "CPUExecutionProvider")
    tokenizer = _tokenizer(checkpoint)
    target = "cuda" if cuda else "cpu"
    return timed(lambda: hf_generate(model, tokenizer, prompts, new_tokens, target), len(prompts) * new_tokens)
