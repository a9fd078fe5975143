"""The model bundle: what `condgen export` writes and `condgen serve` reads.

A bundle is a folder holding `model.onnx` (+ external data), `tokenizer.json`,
`examples.json` (real texts per intent, for prompts) and `condgen.json`, the manifest
described by `Manifest`. The manifest is enough to serve the bundle; it also records the
SHA-256 of every file so that a tampered or incomplete bundle is refused before loading.
Nothing in a bundle is executed or unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from condgen.errors import CondgenError

FORMAT_VERSION = 2  # 2: the graph may be rewritten for serving (`OnnxInfo.rewrites`)
READABLE_VERSIONS = (1, 2)  # 1: optimum's graph as exported
MANIFEST_NAME = "condgen.json"
EXAMPLES_NAME = "examples.json"
TOKENIZER_NAME = "tokenizer.json"
# Names of the serving rewrites of the graph (training/graph.py) recorded in `OnnxInfo.rewrites`.
LAST_POSITION_LOGITS = "last_position_logits"
LOGITS_WINDOW = "logits_window"  # the graph input LOGITS_TO_KEEP sets how many last positions get logits
LOGITS_TO_KEEP = "num_logits_to_keep"
SHARED_ATTENTION_BIAS = "shared_attention_bias"
GROUPED_QUERY_ATTENTION = "grouped_query_attention"
FUSED_ROTARY_EMBEDDING = "fused_rotary_embedding"  # com.microsoft RotaryEmbedding nodes
APPEND_ONLY_CACHE = "append_only_cache"  # present.* hold only new entries: the server must append them
# every layer is one com.microsoft GroupQueryAttention over a right-padded cache that the server
# binds as both past and present (written in place): attention reads only each row's own tokens
RAGGED_ATTENTION = "ragged_attention"


class BundleError(CondgenError, RuntimeError):
    """A bundle that is missing, incomplete, tampered with or of an unknown format."""


@dataclass
class OnnxInfo:
    """The exported graph and how to drive it."""

    file: str
    inputs: list[str]
    outputs: list[str]
    past_key_names: list[str]
    present_key_names: list[str]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    opset: int = 0
    parity_max_abs_diff: float = 0.0
    parity_top1_agreement: float = 1.0
    parity_greedy_match: float = 1.0  # share of a greedy continuation matched before the first difference
    parity_tolerance: float = 0.0
    variant: str = "fp32"
    rewrites: list[str] = field(default_factory=list)  # graph rewrites applied at export (training/graph.py)


OPTIONAL_KEYS = ("lora", "generate_defaults", "privacy", "openvino")  # left out of condgen.json when None


@dataclass
class Manifest:
    """`condgen.json`: everything the server needs to know about a bundle."""

    base_model: str
    separator: str
    intents: dict[str, int]
    onnx: OnnxInfo
    eos_token_id: int | None
    training_config: dict = field(default_factory=dict)
    training_stats: dict = field(default_factory=dict)
    text_length: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    lora: dict | None = None  # {"r", "alpha", "target_modules", ...} when trained with LoRA; absent otherwise
    # the training config's `generate` block: defaults of requests that leave a field unset
    generate_defaults: dict | None = None
    # differential privacy of the fine-tuning ({"epsilon": spent, "delta", "noise_multiplier",
    # "max_grad_norm", "unit": "row" or the entity column, ...}); absent without DP
    privacy: dict | None = None
    # the OpenVINO graph (`condgen export --runtime openvino`): {"file", "precision", parity
    # figures, ...}; absent from ONNX-only bundles
    openvino: dict | None = None

    def privacy_line(self) -> str | None:
        """One line saying the bundle's DP guarantee, for logs; None without DP."""
        p = self.privacy
        if not p:
            return None
        return (
            f"trained with differential privacy: epsilon {p['epsilon']:.2f} at delta {p['delta']:.3g} per "
            f"{p['unit']} (noise multiplier {p['noise_multiplier']:.3f}, clipping norm {p['max_grad_norm']})"
        )

    def to_json(self) -> str:
        fields_ = {k: v for k, v in asdict(self).items() if not (k in OPTIONAL_KEYS and v is None)}
        return json.dumps(fields_, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict) -> Manifest:
        try:
            onnx = OnnxInfo(**raw.pop("onnx"))
            return cls(onnx=onnx, **raw)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{MANIFEST_NAME} is not a valid manifest: {exc}") from exc


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def record_checksums(bundle_dir: Path, manifest: Manifest) -> None:
    """Fill `manifest.files` with the SHA-256 of every file in the bundle but the manifest."""
    manifest.files = {
        str(p.relative_to(bundle_dir)): sha256_of(p)
        for p in sorted(bundle_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    record_checksums(bundle_dir, manifest)
    path = bundle_dir / MANIFEST_NAME
    path.write_text(manifest.to_json())
    return path


def read_manifest(bundle_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and check a bundle's manifest; raise BundleError saying what is wrong."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist; run `condgen export` first")
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST_NAME}; is it a condgen bundle?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"bundle format version {version!r} is not supported (this condgen reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); re-export it"
        )
    manifest = Manifest.from_dict(raw)
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Check every recorded file exists and has its recorded SHA-256."""
    if not manifest.files:
        raise BundleError(f"{bundle_dir / MANIFEST_NAME} records no file checksums; re-export it")
    for name, expected in manifest.files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"bundle is incomplete: {name} is missing from {bundle_dir}")
        if sha256_of(path) != expected:
            raise BundleError(
                f"bundle file {name} does not match its recorded checksum: "
                f"it was changed after export; re-export the bundle"
            )


def read_examples(bundle_dir: str | Path) -> dict[str, list[str]]:
    """The real texts per intent that prompts are built from."""
    return json.loads((Path(bundle_dir) / EXAMPLES_NAME).read_text())
