"""Retries that lose nothing: what a Generate call still owes, and how to ask for it again.

A call that fails with UNAVAILABLE or RESOURCE_EXHAUSTED (a server died, drained or is
full) is retried with exponential backoff and jitter, on the next target, within the
client's total deadline. The retry asks only for the records still missing per intent,
with a new seed, and drops any text already received, so the caller gets exactly the
requested count per intent, with unique indices and no duplicates.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import grpc

from condgen.codec import normalize_for_match
from condgen.v1 import generator_pb2 as pb

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
SEED_STRIDE = 1_000_003
SUMMED_FIELDS = ("records_accepted", "lines_parsed", "tokens_generated", "elapsed_seconds", "rounds")


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between attempts: base * 2**attempt, capped, with full jitter."""

    max_attempts: int = 6
    base_seconds: float = 0.2
    max_seconds: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.max_seconds, self.base_seconds * 2**attempt))


class Progress:
    """What one logical generate call has received and still owes."""

    def __init__(self, request: pb.GenerateRequest):
        self.request = request
        self.received: dict[str, int] = defaultdict(int)
        self.seen: set[tuple[str, str]] = set()
        self.summaries: list[pb.Summary] = []
        self.attempt = 0

    def remaining(self) -> dict[str, int]:
        return {
            i: self.request.num_records - self.received[i]
            for i in self.request.intents
            if self.received[i] < self.request.num_records
        }

    def next_requests(self) -> list[pb.GenerateRequest]:
        """Requests for what is missing: one per distinct missing count (num_records is per intent)."""
        groups: dict[int, list[str]] = defaultdict(list)
        for intent, missing in self.remaining().items():
            groups[missing].append(intent)
        requests = []
        for missing, intents in groups.items():
            request = pb.GenerateRequest()
            request.CopyFrom(self.request)
            del request.intents[:]
            request.intents.extend(intents)
            # Examples of the intents still asked for (and any the server must refuse as unlisted).
            kept = [e for e in request.examples if e.intent in intents or e.intent not in self.request.intents]
            del request.examples[:]
            request.examples.extend(kept)
            request.num_records = missing
            if self.attempt and request.sampling.HasField("seed"):
                request.sampling.seed = (request.sampling.seed + self.attempt * SEED_STRIDE) % (1 << 63)
            requests.append(request)
        return requests

    def accept(self, record: pb.Record):
        """The record renumbered for the caller, or None if it is a repeat or beyond the count."""
        key = (record.intent, normalize_for_match(record.text))
        if key in self.seen or self.received[record.intent] >= self.request.num_records:
            return None
        self.seen.add(key)
        index = self.received[record.intent]
        self.received[record.intent] += 1
        return index

    def summary(self) -> pb.Summary | None:
        """The summaries of every call, added up."""
        if not self.summaries:
            return None
        total = pb.Summary()
        for part in self.summaries:
            for name in SUMMED_FIELDS:
                setattr(total, name, getattr(total, name) + getattr(part, name))
            for field, value in part.rejected.ListFields():
                setattr(total.rejected, field.name, getattr(total.rejected, field.name) + value)
        missing = self.remaining()
        total.complete = not missing
        total.incomplete_intents.extend(sorted(missing))
        return total
