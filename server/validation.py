"""Request validation at the boundary: every field checked against documented limits.

`Limits` are settings of `condgen serve` (reported by GetModelInfo). A violation raises
RequestError naming the field, the limit and the value; unknown intents get close matches.
An intent the bundle does not know is fine when the request brings examples of it.
"""

from __future__ import annotations

import difflib
import secrets

from condgen.codec import CodecError, check_label
from condgen.server.errors import RequestError
from condgen.server.limits import Defaults, Limits
from condgen.server.requests import GenerationSpec
from condgen.server.sampling import SamplingSettings
from condgen.v1 import generator_pb2 as pb


def _check_range(name: str, value, low, high) -> None:
    if not low <= value <= high:
        raise RequestError(f"`{name}` must be between {low} and {high}, got {value}")


def check_intents(intents, known: dict[str, int], limits: Limits, supplied=frozenset()) -> tuple[str, ...]:
    if not intents:
        raise RequestError("`intents` is empty: name at least one intent (see ListIntents)")
    if len(intents) > limits.max_intents:
        raise RequestError(f"`intents` has {len(intents)} entries; the limit is {limits.max_intents}")
    seen = set()
    for intent in intents:
        if len(intent) > limits.max_intent_chars:
            raise RequestError(f"an intent name is {len(intent)} characters; the limit is {limits.max_intent_chars}")
        if intent in seen:
            raise RequestError(f"intent {intent!r} is listed twice in `intents`")
        seen.add(intent)
        if intent not in known and intent not in supplied:
            close = difflib.get_close_matches(intent, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see ListIntents"
            raise RequestError(f"unknown intent {intent!r}{hint} (or bring examples of a new intent in `examples`)")
    return tuple(intents)


def check_examples(request: pb.GenerateRequest, limits: Limits, separator: str) -> dict[str, tuple[str, ...]]:
    """The request's own examples, intent -> texts, each checked against the limits."""
    examples: dict[str, tuple[str, ...]] = {}
    for entry in request.examples:
        name = entry.intent
        if len(name) > limits.max_intent_chars:
            raise RequestError(
                f"`examples`: an intent name is {len(name)} characters; the limit is {limits.max_intent_chars}"
            )
        try:
            if check_label(name, separator) != name:
                raise CodecError(f"label {name!r} has spaces at its ends; trim them")
        except CodecError as exc:
            raise RequestError(f"`examples`: {exc}") from exc
        if name in examples:
            raise RequestError(f"`examples` lists intent {name!r} twice; give all its texts in one entry")
        if name not in request.intents:
            raise RequestError(f"`examples` brings texts for {name!r}, which is not in `intents`; add it there")
        examples[name] = _checked_texts(name, entry.texts, limits)
    return examples


def _checked_texts(intent: str, texts, limits: Limits) -> tuple[str, ...]:
    if not texts:
        raise RequestError(f"`examples` for {intent!r} has no texts; give at least one")
    if len(texts) > limits.max_examples_per_intent:
        raise RequestError(
            f"`examples` for {intent!r} has {len(texts)} texts; the limit is {limits.max_examples_per_intent}"
        )
    for number, text in enumerate(texts):
        where = f"`examples` for {intent!r}, text {number}"
        if "\n" in text or "\r" in text:
            raise RequestError(
                f"{where} contains a line break; each example must be one line (replace line breaks with spaces)"
            )
        if not text.strip():
            raise RequestError(f"{where} is empty")
        if len(text) > limits.max_example_chars:
            raise RequestError(f"{where} is {len(text)} characters; the limit is {limits.max_example_chars}")
    return tuple(t.strip() for t in texts)


def check_sampling(
    request: pb.GenerateRequest, limits: Limits, defaults: Defaults
) -> tuple[SamplingSettings, int, int]:
    sampling = request.sampling
    temperature = sampling.temperature if sampling.HasField("temperature") else defaults.temperature
    top_p = sampling.top_p if sampling.HasField("top_p") else defaults.top_p
    top_k = sampling.top_k if sampling.HasField("top_k") else defaults.top_k
    _check_range("sampling.top_k", top_k, 0, 1_000_000)
    max_new = sampling.max_new_tokens if sampling.HasField("max_new_tokens") else defaults.max_new_tokens
    if not temperature == temperature:  # NaN
        raise RequestError("`sampling.temperature` is NaN")
    _check_range("sampling.temperature", temperature, 0.0, limits.max_temperature)
    if not (0.0 < top_p <= 1.0):
        raise RequestError(f"`sampling.top_p` must be in (0, 1], got {top_p}")
    _check_range("sampling.max_new_tokens", max_new, 1, limits.max_new_tokens)
    seed = sampling.seed if sampling.HasField("seed") else secrets.randbits(63)
    return SamplingSettings(float(temperature), float(top_p), int(top_k)), int(max_new), int(seed)


def check_label_check(request: pb.GenerateRequest, defaults: Defaults, available: bool) -> tuple[bool, float]:
    """(label_check on, margin): the request's fields, else the server's defaults."""
    wanted = request.label_check if request.HasField("label_check") else defaults.label_check
    if wanted and not available:
        if request.HasField("label_check"):
            raise RequestError(
                "`label_check`: this server's bundle cannot score lines (its graph keeps only the "
                "last logits); re-export it with this condgen version, or leave label_check unset"
            )
        wanted = False
    margin = request.label_margin if request.HasField("label_margin") else defaults.label_margin
    if not margin == margin or abs(margin) > 100:  # NaN, or beyond any mean log-probability gap
        raise RequestError(f"`label_margin` must be a number between -100 and 100, got {margin}")
    return bool(wanted), float(margin)


def to_spec(
    request: pb.GenerateRequest,
    known: dict[str, int],
    limits: Limits,
    defaults: Defaults,
    max_batch_size: int,
    separator: str = ",",
    label_check_available: bool = True,
) -> GenerationSpec:
    """Validate a GenerateRequest and turn it into the scheduler's GenerationSpec."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise RequestError(
            f"the request is {size} bytes; the limit is {limits.max_request_bytes} "
            "(condgen serve --max-request-bytes); send fewer or shorter examples"
        )
    examples = check_examples(request, limits, separator)
    intents = check_intents(list(request.intents), known, limits, frozenset(examples))
    _check_range("num_records", request.num_records, 1, limits.max_records_per_intent)
    settings, max_new_tokens, seed = check_sampling(request, limits, defaults)
    shots = request.num_prompt_examples if request.HasField("num_prompt_examples") else defaults.num_prompt_examples
    _check_range("num_prompt_examples", shots, 0, limits.max_prompt_examples)
    spr = request.sequences_per_round if request.HasField("sequences_per_round") else defaults.sequences_per_round
    _check_range("sequences_per_round", spr, 1, min(limits.max_sequences_per_round, max_batch_size))
    rounds = request.max_rounds if request.HasField("max_rounds") else 0
    if request.HasField("max_rounds"):
        _check_range("max_rounds", rounds, 1, limits.max_rounds)
    min_fidelity = request.min_fidelity if request.HasField("min_fidelity") else 0.0
    if not 0.0 <= min_fidelity <= 1.0:
        raise RequestError(f"`min_fidelity` must be between 0 and 1, got {min_fidelity}")
    # A seeded request is reproducible unless it asks to avoid the server's recent output.
    seeded = request.sampling.HasField("seed")
    avoid_recent = request.avoid_recent_duplicates if request.HasField("avoid_recent_duplicates") else not seeded
    label_check, label_margin = check_label_check(request, defaults, label_check_available)
    return GenerationSpec(
        intents=intents,
        num_records=int(request.num_records),
        sampling=settings,
        seed=seed,
        max_new_tokens=max_new_tokens,
        num_prompt_examples=int(shots),
        sequences_per_round=int(spr),
        max_rounds=int(rounds),
        allow_training_copies=bool(request.allow_training_copies),
        avoid_recent_duplicates=bool(avoid_recent),
        min_fidelity=float(min_fidelity),
        require_predicted_intent=bool(request.require_predicted_intent),
        examples=examples,
        label_check=label_check,
        label_margin=label_margin,
    )
