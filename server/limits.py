"""Request limits and defaults of `condgen serve` (plain dataclasses; no heavy imports,
so the CLI can build its flags from them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds on what one Generate request may ask for."""

    max_intents: int = 100
    max_records_per_intent: int = 10_000
    max_prompt_examples: int = 100
    max_new_tokens: int = 512
    max_temperature: float = 5.0
    max_sequences_per_round: int = 64
    max_rounds: int = 10_000
    max_intent_chars: int = 200
    max_request_bytes: int = 65_536

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Defaults:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    num_prompt_examples: int = 25
    sequences_per_round: int = 8
