"""What a generation request is while the scheduler serves it.

`GenerationSpec` is a validated request (built by server/validation.py or by callers in
process); `Job` is one intent of it, `RequestState` the request in flight (its jobs, its output
queue and counters), `RequestHandle` what a caller iterates for records and then the summary.
None of these know how batches are formed: that is the scheduler's and its policy's business.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from condgen.server.label_check import NOT_CHECKED
from condgen.server.records import CopyIndex, JudgeSettings
from condgen.server.sampling import SamplingSettings


@dataclass(frozen=True)
class GenerationSpec:
    """A validated generation request."""

    intents: tuple[str, ...]
    num_records: int
    sampling: SamplingSettings = SamplingSettings()
    seed: int = 0
    max_new_tokens: int = 128
    num_prompt_examples: int = 25
    sequences_per_round: int = 8
    max_rounds: int = 0  # 0: derived from num_records
    allow_training_copies: bool = False
    avoid_recent_duplicates: bool = True
    min_fidelity: float = 0.0
    require_predicted_intent: bool = False
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # request-supplied, per intent
    rival_examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # of intents not generated
    label_check: bool = False
    label_margin: float = 0.0

    @property
    def judging(self) -> JudgeSettings:
        return JudgeSettings(
            self.allow_training_copies, self.avoid_recent_duplicates, self.min_fidelity, self.require_predicted_intent
        )

    @property
    def label_examples(self) -> Mapping[str, tuple[str, ...]]:
        """Every intent the request brought examples of (generated or only a rival): the label
        check's request-supplied candidates."""
        return {**self.rival_examples, **self.examples} if self.rival_examples else self.examples

    def round_budget(self) -> int:
        if self.max_rounds:
            return self.max_rounds
        return 4 + 8 * math.ceil(self.num_records / self.sequences_per_round)


@dataclass(frozen=True)
class GeneratedRecord:
    intent: str
    text: str
    index: int
    fidelity: float = 0.0
    predicted_intent: str = ""
    label_margin: float = NOT_CHECKED


@dataclass
class GenerationSummary:
    records_accepted: int = 0
    lines_parsed: int = 0
    rejected: Counter = field(default_factory=Counter)
    tokens_generated: int = 0
    elapsed_seconds: float = 0.0
    rounds: int = 0
    incomplete_intents: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.incomplete_intents


@dataclass
class Job:
    """The records still wanted for one intent of one request."""

    intent: str
    number: int
    prefix_tokens: list[int]
    target: int
    examples: list[str] = field(default_factory=list)  # texts its prompts are drawn from
    supplied: CopyIndex | None = None  # the request's own examples of the intent (copy checks)
    accepted: int = 0
    rounds: int = 0
    tokens_per_line: float = 24.0
    active: set[int] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)  # normalised texts accepted, or refused by the label check

    @property
    def satisfied(self) -> bool:
        return self.accepted >= self.target


class RequestState:
    """One request in flight: its jobs, its output queue and its counters."""

    def __init__(self, request_id: int, spec: GenerationSpec, jobs: list[Job]):
        self.id = request_id
        self.spec = spec
        self.jobs = jobs
        self.summary = GenerationSummary()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.started = time.monotonic()
        self.first_round_at: float | None = None  # when its first prompt round started
        self.cancelled = False
        self.finished = False

    def exhausted(self, job: Job) -> bool:
        return not job.satisfied and not job.active and job.rounds >= self.spec.round_budget()

    def job_done(self, job: Job) -> bool:
        return job.satisfied or self.exhausted(job)

    def may_start_round(self, job: Job) -> bool:
        """Whatever the policy: not cancelled, records still wanted, rounds left."""
        return not (self.cancelled or job.satisfied or job.rounds >= self.spec.round_budget())


class RequestHandle:
    """What `Scheduler.submit` returns: iterate it for records, then the summary."""

    def __init__(self, state: RequestState, cancel: Callable[[RequestState], None]):
        self._state = state
        self._cancel = cancel

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> GeneratedRecord | GenerationSummary:
        item = await self._state.outbox.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._cancel(self._state)
