"""Request limits and defaults of `condgen serve` (plain dataclasses; no heavy imports,
so the CLI can build its flags from them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


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
    max_request_bytes: int = 262_144
    max_examples_per_intent: int = 200  # request-supplied examples of one intent
    max_example_chars: int = 1_000  # characters of one request-supplied example

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Defaults:
    """What a request that leaves a field unset gets."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    num_prompt_examples: int = 25
    sequences_per_round: int = 8
    label_check: bool = True  # the served model checks each line's label (request field label_check)
    label_margin: float = 0.0  # nats per token the requested intent must win by
    num_records: int = 0  # for a request with num_records 0; 0: such a request is invalid

    def with_bundle(self, generate: dict | None) -> Defaults:
        """These defaults with the bundle's (its training config's `generate` block) on top:
        `maximum_text_length` (tokens of one record) caps max_new_tokens, so no record is longer."""
        if not generate:
            return self
        changes = {k: generate[k] for k in ("temperature", "top_p", "top_k", "num_records") if k in generate}
        if "maximum_text_length" in generate:
            changes["max_new_tokens"] = int(generate["maximum_text_length"])
        return replace(self, **changes)


@dataclass(frozen=True)
class LabelCheckConfig:
    """How the label check scores lines (settings of `condgen serve`)."""

    rivals: int = 3  # the classifier's most likely other intents scored against the requested one
    context_examples: int = 0  # examples of the candidate intent before its prefix; 0: the bare prefix
    supplied_context_examples: int = 3  # the same, for lines with a request-supplied candidate intent
    max_tokens_per_pass: int = 1024  # padded tokens of one scoring pass (its logits: this x vocab floats)

    def __post_init__(self) -> None:
        if self.rivals < 1:
            raise ValueError("label check: rivals must be at least 1")
        if self.context_examples < 0 or self.supplied_context_examples < 0:
            raise ValueError("label check: context_examples must not be negative")
        if self.max_tokens_per_pass < 64:
            raise ValueError("label check: max_tokens_per_pass must be at least 64")
