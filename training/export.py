"""Export a fine-tuned checkpoint to a servable bundle (ONNX with KV cache + manifest).

optimum exports the model for `text-generation-with-past`; a parity check then runs real
prompts through both PyTorch and ONNX Runtime (a prefill and one cached decode step) and
fails the export when the largest logit difference exceeds the tolerance.

Lighter variants of the fp32 graph: `fp16` (weights, activations and KV cache in half
precision, for GPUs), `int8` (dynamic quantisation of the MatMul weights and activations), and
the weight-only `w8` / `w4` (every MatMul with a constant weight, the LM head included, becomes
ONNX Runtime's MatMulNBits: 8- or 4-bit weights with a scale per block of 32, multiplied in
int8 at accuracy level 4; decoding on CPUs is bound by reading the weights; the token
embedding table becomes an 8-bit GatherBlockQuantized; a head tied to the embedding, exported
as MatMul(h, Transpose(table)), has its Transpose folded first so that it is quantised too).
Their logits cannot match fp32 to 1e-3, so their parity check is the share of positions where
ONNX and PyTorch agree on the most likely next token (`--min-top1-agreement`); the largest logit
difference and the greedy agreement (tokens of a 32-token greedy continuation matched before the
first difference, mean share over 3 prompts) are reported alongside and kept in the manifest.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from condgen.bundle import (
    APPEND_ONLY_CACHE,
    EXAMPLES_NAME,
    LOGITS_TO_KEEP,
    RAGGED_ATTENTION,
    TOKENIZER_NAME,
    Manifest,
    OnnxInfo,
    write_manifest,
)
from condgen.codec import prompt_text
from condgen.errors import CondgenError
from condgen.training.finetune import read_training_info

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
DEFAULT_TOLERANCE = 1e-3
DEFAULT_MIN_TOP1 = 0.9
VARIANTS = ("fp32", "fp16", "int8", "w8", "w4")
WEIGHT_ONLY_BITS = {"w8": 8, "w4": 4}
WEIGHT_ONLY_BLOCK = 32  # weights per scale: divides the hidden sizes of every model served here
GREEDY_TOKENS = 32
EXPORT_RUNTIMES = ("onnxruntime", "openvino")  # openvino: the ONNX graph and an OpenVINO one
# OpenVINO's f32 kernels sum in another order than PyTorch's: SmolLM2-135M ends 2.5e-3 apart at
# most (ONNX Runtime: 5e-5), every top token the same. A broken graph misses by whole units; the
# top-1 and greedy checks hold the rest (training/export_openvino.py).
OPENVINO_TOLERANCE = 1e-2
CACHE_LAYOUTS = ("auto", "append", "whole", "ragged")  # the first is the default


class ExportError(CondgenError, RuntimeError):
    """An export that failed or produced a graph that disagrees with PyTorch."""


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: Manifest


def parity_prompts(examples: dict[str, list[str]], separator: str, count: int = 8, shots: int = 6) -> list[str]:
    """Real prompts in serving format (examples of one intent, then `intent,`), of 2 to `shots`
    examples so that their lengths differ."""
    rng = random.Random(0)
    intents = sorted(examples)[:count]
    prompts = []
    for number, intent in enumerate(intents):
        wanted = 2 + number % max(1, shots - 1)
        texts = rng.sample(examples[intent], min(wanted, len(examples[intent])))
        prompts.append(prompt_text(intent, texts, separator))
    return prompts


def onnx_info(session, opset: int) -> OnnxInfo:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    past = [n for n in inputs if n.startswith("past_key_values.")]
    present = [n for n in outputs if n.startswith("present.")]
    if not past or len(past) != len(present):
        raise ExportError(f"the ONNX graph has no usable KV cache inputs/outputs: {inputs} -> {outputs}")
    past_shape = next(i.shape for i in session.get_inputs() if i.name == past[0])
    elem = next(i.type for i in session.get_inputs() if i.name == past[0])
    return OnnxInfo(
        file=MODEL_FILE,
        inputs=inputs,
        outputs=outputs,
        past_key_names=past,
        present_key_names=present,
        num_layers=len(past) // 2,
        num_kv_heads=int(past_shape[1]),
        head_dim=int(past_shape[3]),
        dtype="float16" if "float16" in elem else "float32",
        opset=opset,
    )


def _ort_feed(info: OnnxInfo, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]) -> dict:
    past_len = mask.shape[1] - ids.shape[1]
    feed = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in info.inputs:
        feed["position_ids"] = np.arange(past_len, mask.shape[1], dtype=np.int64)[None, :].repeat(ids.shape[0], 0)
    if LOGITS_TO_KEEP in info.inputs:  # a required input of the ragged graph
        feed[LOGITS_TO_KEEP] = np.array([1], dtype=np.int64)
    feed.update(past)
    return feed


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    greedy_match: float = 1.0


def torch_reference(checkpoint: Path):
    """The checkpoint in PyTorch fp32, loaded once for both parity checks."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()


def compare_logits(model, session, info: OnnxInfo, tokenizer, prompts: list[str]) -> Parity:
    """|PyTorch - ONNX| logits and argmax agreement over each prompt's prefill and one cached step."""
    import torch

    dtype = np.float16 if info.dtype == "float16" else np.float32
    worst, agree, positions = 0.0, 0, 0
    for prompt in prompts:
        ids = np.array([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=np.int64)
        prefix, last = ids[:, :-1], ids[:, -1:]
        empty = {n: np.zeros((1, info.num_kv_heads, 0, info.head_dim), dtype=dtype) for n in info.past_key_names}
        first = session.run(None, _ort_feed(info, prefix, np.ones_like(prefix), empty))
        present = dict(zip(info.present_key_names, first[1:]))
        past = {p: present[q] for p, q in zip(info.past_key_names, info.present_key_names)}
        step = session.run(None, _ort_feed(info, last, np.ones_like(ids), past))
        onnx_logits = np.concatenate([first[0], step[0]], axis=1).astype(np.float32)
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(ids)).logits.float().numpy()
        torch_logits = torch_logits[:, -onnx_logits.shape[1] :]  # a last-position graph: the trailing ones
        worst = max(worst, float(np.abs(torch_logits - onnx_logits).max()))
        agree += int((torch_logits.argmax(-1) == onnx_logits.argmax(-1)).sum())
        positions += onnx_logits.shape[1]
    return Parity(worst, agree / positions)


def greedy_match(references: list[list[int]], tokens: list[list[int]]) -> float:
    """Mean share of each reference continuation matched before the first difference."""
    shares = []
    for reference, ours in zip(references, tokens):
        matched = next((i for i, (a, b) in enumerate(zip(reference, ours)) if a != b), min(len(reference), len(ours)))
        shares.append(matched / max(1, len(reference)))
    return float(np.mean(shares)) if shares else 0.0


def torch_greedy(model, tokenizer, prompts: list[str], new_tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    """PyTorch fp32's greedy continuation of each prompt: the reference of the greedy checks."""
    import torch

    references = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.int64)
        with torch.no_grad():
            generated = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
            )
        references.append(generated[0, ids.shape[1] :].tolist())
    return references


def greedy_agreement(
    model, session, info: OnnxInfo, tokenizer, prompts: list[str], new_tokens: int = GREEDY_TOKENS
) -> float:
    """Mean share of a `new_tokens` greedy continuation that ONNX matches PyTorch (fp32) on
    before their first difference, over `prompts`."""
    append_only = APPEND_ONLY_CACHE in info.rewrites
    dtype = np.float16 if info.dtype == "float16" else np.float32
    references, produced = torch_greedy(model, tokenizer, prompts, new_tokens), []
    for prompt, reference in zip(prompts, references):
        ids = np.array([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=np.int64)
        past = {n: np.zeros((1, info.num_kv_heads, 0, info.head_dim), dtype=dtype) for n in info.past_key_names}
        step, length, ours = ids, 0, []
        for _ in range(len(reference)):
            length += step.shape[1]
            outputs = session.run(None, _ort_feed(info, step, np.ones((1, length), dtype=np.int64), past))
            present = dict(zip(info.present_key_names, outputs[1:]))
            past = {
                p: np.concatenate([past[p], present[q]], axis=2) if append_only else present[q]
                for p, q in zip(info.past_key_names, info.present_key_names)
            }
            ours.append(int(outputs[0][0, -1].argmax()))
            step = np.array([[ours[-1]]], dtype=np.int64)
        produced.append(ours)
    return greedy_match(references, produced)


def rewrite_graph(checkpoint: Path, model_path: Path, append_only: bool, ragged: bool = False) -> list[str]:
    """Apply the serving rewrites of `condgen.training.graph` to the exported fp32 graph."""
    from transformers import AutoConfig

    from condgen.training.graph import optimise_graph

    config = AutoConfig.from_pretrained(str(checkpoint))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return optimise_graph(
        model_path,
        heads,
        kv_heads,
        head_dim,
        config.num_hidden_layers,
        append_only=append_only,
        max_positions=getattr(config, "max_position_embeddings", 0) or 0,
        ragged=ragged,
    )


def cache_note(cache: str, append_only: bool, rewrites: list[str]) -> tuple[int, str] | None:
    """(log level, message) when the append-only cache was wanted but the graph could not take it:
    a warning when `--cache append` asked for it, a note under `auto`."""
    if cache == "ragged" and RAGGED_ATTENTION not in rewrites:
        return logging.WARNING, (
            "the ragged cache does not apply to this model's graph (it needs a Llama-style attention with "
            "rotary embeddings): the bundle keeps the append-only cache where it can"
        )
    if not append_only or APPEND_ONLY_CACHE in rewrites or RAGGED_ATTENTION in rewrites:
        return None
    level = logging.WARNING if cache == "append" else logging.INFO
    return level, (
        "the append-only cache does not apply to this model's graph (it builds on the grouped-query attention "
        "rewrite, which needs fewer KV heads than query heads): the bundle returns the whole cache"
    )


def convert_variant(model_path: Path, variant: str) -> None:
    """Rewrite the fp32 graph at `model_path` as the fp16 or int8 variant, in place."""
    import onnx

    if variant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=False), str(model_path))
    elif variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = model_path.with_name("model.fp32.onnx")
        model_path.rename(fp32)
        # Shape inference does not see through com.microsoft nodes (the fused rotary embedding):
        # tensors it cannot type are float.
        quantize_dynamic(
            str(fp32),
            str(model_path),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        fp32.unlink()
    elif variant in WEIGHT_ONLY_BITS:
        quantize_weights(model_path, WEIGHT_ONLY_BITS[variant])


def quantize_weights(model_path: Path, bits: int) -> None:
    """Weight-only quantisation in place: MatMul with a constant weight -> MatMulNBits (symmetric,
    one scale per WEIGHT_ONLY_BLOCK weights). Accuracy level 4 lets ONNX Runtime multiply in int8
    (activations quantised per block on the fly, VNNI on x86): at level 1 (float compute) it
    dequantises every weight at every step, which measured 4x slower than fp32 here."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from condgen.training.graph import fold_weight_transposes, quantize_embedding_tables

    model = onnx.load(str(model_path))
    fold_weight_transposes(model)
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True, accuracy_level=4
    )
    quantizer.process()
    quantize_embedding_tables(quantizer.model.model, WEIGHT_ONLY_BLOCK)
    for stale in (model_path, model_path.with_name(model_path.name + "_data")):
        stale.unlink(missing_ok=True)
    quantizer.model.save_model_to_file(str(model_path), use_external_data_format=False)


def check_parity(parity: Parity, variant: str, tolerance: float, min_top1: float) -> None:
    print(
        f"parity ({variant}): max |logit(PyTorch fp32) - logit(ONNX)| = {parity.max_abs_diff:.3e}, "
        f"top-1 agreement {parity.top1_agreement:.1%}, greedy match {parity.greedy_match:.1%}",
        flush=True,
    )
    if variant == "fp32" and parity.max_abs_diff > tolerance:
        raise ExportError(
            f"ONNX logits differ from PyTorch by {parity.max_abs_diff:.3e} "
            f"> tolerance {tolerance:.0e}; the export is wrong, not saved as servable"
        )
    if variant != "fp32" and parity.top1_agreement < min_top1:
        raise ExportError(
            f"the {variant} graph agrees with PyTorch on the next token at only "
            f"{parity.top1_agreement:.1%} of positions (< {min_top1:.0%}); not saved as servable"
        )


def write_fidelity_classifier(bundle_dir: Path, examples: dict[str, list[str]]) -> None:
    """Train the label classifier on the bundle's own training texts and store it as arrays."""
    from condgen.training.fidelity import fit_classifier, save_classifier

    texts = [t for intent in sorted(examples) for t in examples[intent]]
    labels = [intent for intent in sorted(examples) for _ in examples[intent]]
    if len(set(labels)) < 2:
        log.warning("one intent only: no fidelity classifier in the bundle")
        return
    log.info("training the fidelity classifier on %d texts of %d intents", len(texts), len(set(labels)))
    save_classifier(fit_classifier(texts, labels), bundle_dir)


def bundle_generate_defaults(config: dict) -> dict | None:
    """The fields the training config's `generate` block sets, for the manifest; None if none."""
    block = {k: v for k, v in (config.get("generate") or {}).items() if v is not None}
    return block or None


def export_bundle(
    checkpoint: str | Path,
    output: str | Path,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int | None = None,
    variant: str = "fp32",
    min_top1: float = DEFAULT_MIN_TOP1,
    cache: str = "auto",
    runtime: str = "onnxruntime",
    openvino_tolerance: float = OPENVINO_TOLERANCE,
) -> ExportResult:
    """Export `checkpoint` (the output of `condgen train`) to the bundle folder `output`;
    `runtime="openvino"` adds the OpenVINO graph (training/export_openvino.py)."""
    if variant not in VARIANTS:
        raise ExportError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if cache not in CACHE_LAYOUTS:
        raise ExportError(f"cache {cache!r} is not one of {', '.join(CACHE_LAYOUTS)}")
    if runtime not in EXPORT_RUNTIMES:
        raise ExportError(f"runtime {runtime!r} is not one of {', '.join(EXPORT_RUNTIMES)}")
    if runtime == "openvino":
        from condgen.training.export_openvino import converter_python

        converter_python()  # before the long part: say now if the exporter is missing
    import onnxruntime as ort
    from optimum.exporters.onnx import main_export
    from transformers import AutoTokenizer

    checkpoint, output = Path(checkpoint), Path(output)
    info_json = read_training_info(checkpoint)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="condgen-export-") as tmp:
        log.info("exporting %s to ONNX (text-generation-with-past)", checkpoint)
        main_export(
            str(checkpoint),
            output=tmp,
            task="text-generation-with-past",
            opset=opset,
            device="cpu",
            do_validation=False,
        )
        for item in Path(tmp).iterdir():
            if item.name.startswith(MODEL_FILE) or item.name == TOKENIZER_NAME:
                shutil.move(str(item), output / item.name)
    shutil.copy(checkpoint / EXAMPLES_NAME, output / EXAMPLES_NAME)
    # The fp16 (GPU) graph returns the whole cache, which IO binding keeps on the device.
    # auto: ragged attention on CPU variants (append-only where the graph cannot take it)
    append_only = cache in ("append", "ragged") or (cache == "auto" and variant != "fp16")
    ragged = cache == "ragged" or (cache == "auto" and variant != "fp16")
    rewrites = rewrite_graph(checkpoint, output / MODEL_FILE, append_only, ragged)
    note = cache_note(cache, append_only, rewrites)
    if note is not None:
        log.log(*note)
    if variant != "fp32":
        log.info("converting the graph to %s", variant)
        convert_variant(output / MODEL_FILE, variant)

    session = ort.InferenceSession(str(output / MODEL_FILE), providers=["CPUExecutionProvider"])
    import onnx

    graph_opset = max(
        (
            o.version
            for o in onnx.load(str(output / MODEL_FILE), load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        ),
        default=0,
    )
    info = onnx_info(session, graph_opset)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    examples = json.loads((output / EXAMPLES_NAME).read_text())
    prompts = parity_prompts(examples, info_json["separator"])
    reference = torch_reference(checkpoint)
    parity = compare_logits(reference, session, info, tokenizer, prompts)
    info.parity_max_abs_diff = parity.max_abs_diff
    info.parity_top1_agreement = parity.top1_agreement
    info.rewrites = rewrites
    info.parity_greedy_match = greedy_agreement(reference, session, info, tokenizer, prompts[:3])
    info.parity_tolerance = tolerance
    info.variant = variant
    parity.greedy_match = info.parity_greedy_match
    check_parity(parity, variant, tolerance, min_top1)
    write_fidelity_classifier(output, examples)
    manifest = Manifest(
        base_model=info_json["base_model"],
        separator=info_json["separator"],
        intents=info_json["intents"],
        onnx=info,
        eos_token_id=tokenizer.eos_token_id,
        training_config=info_json["config"],
        training_stats=info_json["stats"],
        text_length=info_json["stats"].get("text_length", {}),
        lora=info_json["stats"].get("lora"),
        privacy=info_json["stats"].get("privacy"),
        generate_defaults=bundle_generate_defaults(info_json["config"]),
    )
    if runtime == "openvino":
        from condgen.training.export_openvino import add_openvino_graph

        add_openvino_graph(checkpoint, output, manifest, reference, tokenizer, prompts, openvino_tolerance, min_top1)
    write_manifest(output, manifest)
    return ExportResult(output, manifest)
