"""Request validation at the boundary: every field checked against documented limits.

`Limits` are settings of `condgen serve` (reported by GetModelInfo). A violation raises
RequestError naming the field, the limit and the value; unknown intents get close matches.
"""
from __future__ import annotations

import difflib
import secrets

from condgen.server.errors import RequestError
from condgen.server.limits import Defaults, Limits
from condgen.server.sampling import SamplingSettings
from condgen.server.scheduler import GenerationSpec
from condgen.v1 import generator_pb2 as pb


def _check_range(name: str, value, low, high) -> None:
    if not low <= value <= high:
        raise RequestError(f"`{name}` must be between {low} and {high}, got {value}")


def check_intents(intents, known: dict[str, int], limits: Limits) -> tuple[str, ...]:
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
        if intent not in known:
            close = difflib.get_close_matches(intent, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see ListIntents"
            raise RequestError(f"unknown intent {intent!r}{hint}")
    return tuple(intents)


def check_sampling(request: pb.GenerateRequest, limits: Limits, defaults: Defaults) -> tuple[SamplingSettings, int, int]:
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


def to_spec(request: pb.GenerateRequest, known: dict[str, int], limits: Limits, defaults: Defaults,
            max_batch_size: int) -> GenerationSpec:
    """Validate a GenerateRequest and turn it into the scheduler's GenerationSpec."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise RequestError(f"the request is {size} bytes; the limit is {limits.max_request_bytes}")
    intents = check_intents(list(request.intents), known, limits)
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
    avoid_recent = request.avoid_recent_duplicates if request.HasField("avoid_recent_duplicates") else True
    return GenerationSpec(intents=intents, num_records=int(request.num_records), sampling=settings, seed=seed,
                          max_new_tokens=max_new_tokens, num_prompt_examples=int(shots),
                          sequences_per_round=int(spr), max_rounds=int(rounds),
                          allow_training_copies=bool(request.allow_training_copies),
                          avoid_recent_duplicates=bool(avoid_recent), min_fidelity=float(min_fidelity),
                          require_predicted_intent=bool(request.require_predicted_intent))
