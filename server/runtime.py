"""Which runtime runs a bundle: ONNX Runtime (CUDA or CPU) or OpenVINO (CPU).

`condgen serve --runtime auto` (the default) takes OpenVINO where the bundle carries an
OpenVINO graph, the `openvino` package is installed, no CUDA device is in use and the CPU
computes bf16 (AMX or AVX-512 BF16): there OpenVINO's CPU plugin measured 1.9x ONNX Runtime's
CPU provider at batch 16 on this project's bench (docs/benchmarks.md). Everywhere else, ONNX
Runtime. `--runtime onnxruntime|openvino` forces either; the server says which at start and in
`GetModelInfo`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from condgen.bundle import Manifest
from condgen.server.engine import RUNTIMES, Engine, EngineConfig, EngineError, choose_providers

log = logging.getLogger(__name__)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_computes_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has AMX or AVX-512 BF16, from /proc/cpuinfo's flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def choose_runtime(
    requested: str, manifest: Manifest, cuda: bool, cpuinfo: str | None = None, installed: bool | None = None
) -> tuple[str, str]:
    """(runtime, why). `cuda`: the engine would run on a CUDA device; `installed`: whether the
    openvino package is there (looked up when None)."""
    if requested not in RUNTIMES:
        raise EngineError(f"runtime {requested!r} is not one of {', '.join(RUNTIMES)}")
    if requested == "onnxruntime":
        return "onnxruntime", "asked for"
    installed = openvino_available() if installed is None else installed
    has_graph = manifest.openvino is not None
    if requested == "openvino":
        if not has_graph:
            raise EngineError(
                "--runtime openvino: this bundle has no OpenVINO graph; "
                "export it with `condgen export --runtime openvino`"
            )
        if not installed:
            raise EngineError(
                "--runtime openvino: the openvino package is not installed (pip install 'condgen[openvino]')"
            )
        return "openvino", "asked for"
    if not has_graph:
        return "onnxruntime", "the bundle has no OpenVINO graph"
    if cuda:
        return "onnxruntime", "a CUDA device is in use"
    if not installed:
        return "onnxruntime", "the openvino package is not installed"
    if not cpu_computes_bf16(cpuinfo):
        return "onnxruntime", "this CPU has neither AMX nor AVX-512 BF16"
    return "openvino", "this CPU computes bf16 (AMX or AVX-512 BF16)"


def uses_cuda(config: EngineConfig) -> bool:
    """Whether ONNX Runtime would put this config's engine on a CUDA device."""
    if config.device == "cpu":
        return False
    return choose_providers(config.device)[0] == "CUDAExecutionProvider"


def open_engine(bundle: str | Path, manifest: Manifest, config: EngineConfig = EngineConfig()):
    """The engine for the bundle in the runtime `config.runtime` resolves to."""
    runtime, why = choose_runtime(config.runtime, manifest, uses_cuda(config) if config.runtime == "auto" else False)
    log.info("runtime: %s (%s)", runtime, why)
    if runtime == "openvino":
        from condgen.server.openvino_engine import OpenVINOEngine

        return OpenVINOEngine(bundle, manifest, config)
    return Engine(bundle, manifest, config)
