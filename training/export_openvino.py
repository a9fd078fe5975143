"""The bundle's OpenVINO graph (`condgen export --runtime openvino`), with its parity checks.

optimum-intel, OpenVINO's exporter in the optimum family, converts the checkpoint to an
OpenVINO IR (fp32 weights; the CPU plugin computes in bf16 where the CPU can, at load). It needs
a newer transformers than optimum-onnx allows, so it runs in its own virtual environment
(`make .venv-openvino/.installed`; `CONDGEN_OPENVINO_PYTHON` names another interpreter). The
IR is the stateful one OpenVINO GenAI also reads; the server turns it into the paged-attention
form at load (server/openvino_engine.py).

Parity, through the serving engine itself: with f32 compute and cache, the logits at every
position of the parity prompts against PyTorch fp32 (within the export's tolerance); with the
CPU plugin's defaults (bf16 where the CPU computes it), the share of positions whose top token
agrees (at least `min_top1`) and the greedy continuation matched before the first difference.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from condgen.bundle import Manifest
from condgen.errors import CondgenError
from condgen.training.export import ExportError, greedy_match, torch_greedy

log = logging.getLogger(__name__)
CONVERTER_PYTHON = "CONDGEN_OPENVINO_PYTHON"
GRAPH_FOLDER = "openvino"
GRAPH_FILES = ("openvino_model.xml", "openvino_model.bin")
REPO_ROOT = Path(__file__).resolve().parents[1]


def converter_python() -> Path:
    """The interpreter with optimum-intel: $CONDGEN_OPENVINO_PYTHON, else the project's .venv-openvino."""
    named = os.environ.get(CONVERTER_PYTHON)
    path = Path(named) if named else REPO_ROOT / ".venv-openvino" / "bin" / "python"
    if not path.is_file():
        raise ExportError(
            f"--runtime openvino needs optimum-intel, which lives in its own environment: run "
            f"`make .venv-openvino/.installed` in {REPO_ROOT}, or set {CONVERTER_PYTHON} to a Python that "
            f"has optimum-intel[openvino] (looked for {path})"
        )
    return path


def convert(checkpoint: Path, folder: Path) -> None:
    """optimum-intel's export of `checkpoint` (fp32 weights) into `folder`."""
    command = [
        str(converter_python()),
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
        "--disable-convert-tokenizer",
        str(folder),
    ]
    log.info("exporting %s to OpenVINO with optimum-intel", checkpoint)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ExportError(f"optimum-intel could not export {checkpoint} to OpenVINO:\n{tail}")


def _engine(bundle: Path, manifest: Manifest, precision: str):
    from condgen.server.engine import EngineConfig
    from condgen.server.openvino_engine import OpenVINOEngine

    return OpenVINOEngine(bundle, manifest, EngineConfig(runtime="openvino", openvino_precision=precision))


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids], dtype=torch.int64)).logits[0].float().numpy()


def engine_greedy(engine, prompt: list[int], new_tokens: int) -> list[int]:
    """The engine's greedy continuation of `prompt` (prefill, then one token a step)."""
    (batch, logits), *_ = engine.prefill([0], [prompt])
    tokens = [int(logits.argmax())]
    while len(tokens) < new_tokens:
        batch.set_next([tokens[-1]])
        tokens.append(int(engine.forward(batch)[0].argmax()))
    return tokens


def parity(bundle: Path, manifest: Manifest, reference, tokenizer, prompts: list[str]) -> dict:
    """The OpenVINO graph's parity figures against PyTorch fp32 (see the module docstring)."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    torch_logits = [_torch_logits(reference, i) for i in ids]
    figures: dict = {}
    for precision in ("f32", "auto"):
        engine = _engine(bundle, manifest, precision)
        worst, agree, positions = 0.0, 0, 0
        for row, expected in zip(ids, torch_logits):
            ours = engine.position_logits(row)
            worst = max(worst, float(np.abs(ours - expected).max()))
            agree += int((ours.argmax(-1) == expected.argmax(-1)).sum())
            positions += len(row)
        figures[precision] = {"precision": engine.precision, "max_abs_diff": worst, "top1": agree / positions}
        if precision == "auto":
            references = torch_greedy(reference, tokenizer, prompts[:3])
            produced = [engine_greedy(engine, i, len(r)) if r else [] for i, r in zip(ids[:3], references)]
            figures[precision]["greedy_match"] = greedy_match(references, produced)
        del engine
    return figures


def add_openvino_graph(
    checkpoint: Path,
    output: Path,
    manifest: Manifest,
    reference,
    tokenizer,
    prompts: list[str],
    tolerance: float,
    min_top1: float,
) -> dict:
    """Export the OpenVINO graph into `output/openvino`, check it and fill `manifest.openvino`."""
    target = output / GRAPH_FOLDER
    if target.exists():
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory(prefix="condgen-openvino-") as tmp:
        convert(checkpoint, Path(tmp))
        target.mkdir(parents=True)
        for name in GRAPH_FILES:
            shutil.move(str(Path(tmp) / name), target / name)
    manifest.openvino = {"file": f"{GRAPH_FOLDER}/{GRAPH_FILES[0]}"}
    try:
        return _checked(output, manifest, reference, tokenizer, prompts, tolerance, min_top1)
    except CondgenError as error:
        shutil.rmtree(target, ignore_errors=True)
        manifest.openvino = None
        if isinstance(error, ExportError):
            raise
        raise ExportError(f"the OpenVINO graph does not run: {error}") from error


def _checked(
    output: Path, manifest: Manifest, reference, tokenizer, prompts, tolerance: float, min_top1: float
) -> dict:
    figures = parity(output, manifest, reference, tokenizer, prompts)
    f32, auto = figures["f32"], figures["auto"]
    log.info(
        "parity (OpenVINO): f32 max |logit diff| %.3e, top-1 %.1f%%; %s top-1 %.1f%%, greedy match %.1f%%",
        f32["max_abs_diff"],
        100 * f32["top1"],
        auto["precision"],
        100 * auto["top1"],
        100 * auto["greedy_match"],
    )
    if f32["max_abs_diff"] > tolerance:
        raise ExportError(
            f"OpenVINO f32 logits differ from PyTorch by {f32['max_abs_diff']:.3e} (> {tolerance:g}); "
            "not saved as servable"
        )
    if auto["top1"] < min_top1:
        raise ExportError(
            f"OpenVINO at {auto['precision']} agrees with PyTorch's top token at {auto['top1']:.1%} of positions "
            f"(< {min_top1:.0%}); not saved as servable"
        )
    manifest.openvino = {
        "file": f"{GRAPH_FOLDER}/{GRAPH_FILES[0]}",
        "exporter": "optimum-intel",
        "weights": "fp32",
        "parity_tolerance": tolerance,
        "parity_max_abs_diff_f32": f32["max_abs_diff"],
        "parity_top1_agreement_f32": f32["top1"],
        "default_precision": auto["precision"],
        "parity_top1_agreement": auto["top1"],
        "parity_greedy_match": auto["greedy_match"],
    }
    return manifest.openvino
