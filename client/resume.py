"""Retries that lose nothing: what a Generate call still owes, and how to ask for it again.

A logical generate call may take several gRPC calls. One that fails with UNAVAILABLE or
RESOURCE_EXHAUSTED (a server died, drained or is full) is retried after a backoff (the
server's `retry-after` hint when it sent one, else exponential backoff with jitter) on the
next target. One that ends normally but short (the server dropped nothing, but a text it sent
was a repeat of one the caller already has, or its round budget ran out) is followed at once
by a request for what is still missing. Every call after the first counts as an attempt of the
`RetryPolicy`, within the client's total deadline.

A follow-up asks only for the records still missing per intent, keeps the examples of the
intents already complete as label-check rivals (`rival_examples`), and drops any text already
received, so the caller gets exactly the requested count per intent, with unique indices and no
duplicates. A seeded call keeps its seed while nothing was received (a briefly full server does
not change a seeded result); once records came back, a follow-up takes a new seed derived from
the original, so that it does not draw the same texts again.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import grpc

from condgen.codec import normalize_for_match
from condgen.metadata import RETRY_AFTER_KEY
from condgen.v1 import generator_pb2 as pb

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
SEED_STRIDE = 1_000_003
SUMMED_FIELDS = ("lines_parsed", "tokens_generated", "elapsed_seconds", "rounds")


@dataclass(frozen=True)
class RetryPolicy:
    """Follow-up calls allowed, and the backoff between them: base * 2**attempt, capped, with
    full jitter (a server's `retry-after` hint replaces it)."""

    max_attempts: int = 6
    base_seconds: float = 0.2
    max_seconds: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.max_seconds, self.base_seconds * 2**attempt))


def retry_after_seconds(metadata) -> float | None:
    """The server's `retry-after` hint (seconds) in a call's trailing metadata, if any."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                seconds = float(value)
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None


@dataclass
class CallTally:
    """What one gRPC call delivered: records kept for the caller, repeats dropped, its summary."""

    kept: int = 0
    dropped: int = 0
    summary: pb.Summary | None = None


class Progress:
    """What one logical generate call has received and still owes."""

    def __init__(self, request: pb.GenerateRequest):
        self.request = request
        self.received: dict[str, int] = defaultdict(int)
        self.seen: set[tuple[str, str]] = set()
        self.calls: list[CallTally] = []
        self.attempt = 0  # follow-up calls made so far (the policy's max_attempts bounds it)
        self.reseeds = 0  # how often the seed moved on (only after records came back)
        self._since_move = 0  # index of the first call since the last `move_on`

    @property
    def call(self) -> CallTally:
        """The tally of the call in progress."""
        if not self.calls:
            self.calls.append(CallTally())
        return self.calls[-1]

    def start_call(self) -> None:
        self.calls.append(CallTally())

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
        return [self._request_for(intents, missing) for missing, intents in groups.items()]

    def _request_for(self, intents: list[str], missing: int) -> pb.GenerateRequest:
        request = pb.GenerateRequest()
        request.CopyFrom(self.request)
        del request.intents[:]
        request.intents.extend(intents)
        # Examples of the intents asked for now (and any the server must refuse as unlisted) stay
        # prompts; those of the other requested intents stay rivals of the label check.
        examples = list(request.examples)
        del request.examples[:]
        request.examples.extend(e for e in examples if e.intent in intents or e.intent not in self.request.intents)
        request.rival_examples.extend(
            e for e in examples if e.intent in self.request.intents and e.intent not in intents
        )
        request.num_records = missing
        if self.reseeds and request.sampling.HasField("seed"):
            request.sampling.seed = (request.sampling.seed + self.reseeds * SEED_STRIDE) % (1 << 63)
        return request

    def move_on(self, *, ended_short: bool) -> None:
        """Before a follow-up call: count the attempt; take a new seed if any call since the last
        follow-up sent records (or one ended short: the same seed would draw the same texts again)."""
        self.attempt += 1
        recent, self._since_move = self.calls[self._since_move :], len(self.calls)
        if ended_short or any(call.kept or call.dropped for call in recent):
            self.reseeds += 1

    @property
    def received_any(self) -> bool:
        return any(self.received.values())

    def accept(self, record: pb.Record):
        """The record renumbered for the caller, or None if it is a repeat or beyond the count."""
        key = (record.intent, normalize_for_match(record.text))
        if key in self.seen or self.received[record.intent] >= self.request.num_records:
            self.call.dropped += 1
            return None
        self.seen.add(key)
        index = self.received[record.intent]
        self.received[record.intent] += 1
        self.call.kept += 1
        return index

    def summary(self) -> pb.Summary | None:
        """One Summary for the logical call, as the caller saw it: `records_accepted` is what it
        received; a repeat the client dropped counts as a duplicate; a call that failed before
        its summary counts the records it sent as lines parsed."""
        if not self.calls or not any(c.summary is not None or c.kept or c.dropped for c in self.calls):
            return None
        total = pb.Summary()
        for call in self.calls:
            part = call.summary
            if part is None:  # failed mid-stream: what it sent is all that is known
                total.lines_parsed += call.kept + call.dropped
            else:
                for name in SUMMED_FIELDS:
                    setattr(total, name, getattr(total, name) + getattr(part, name))
                for field, value in part.rejected.ListFields():
                    setattr(total.rejected, field.name, getattr(total.rejected, field.name) + value)
            total.records_accepted += call.kept
            total.rejected.duplicate += call.dropped
        missing = self.remaining()
        total.complete = not missing
        total.incomplete_intents.extend(sorted(missing))
        return total
