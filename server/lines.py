"""From tokens to records: each sequence's current line, its end, and the line's judgement.

A `Sequence` is one sampling stream forked from a round's prompt. `LineKeeper.next_token`
feeds it one token (forced or sampled) and cuts its output at line ends; after a line ends
the job's `intent,` prefix is queued as forced tokens, so every line the model writes is for
the round's intent. A finished line goes to the `RecordJudge` (format, length, copies,
duplicates, fidelity); under the label check a line that passes waits in `pending` until the
scheduler has scored the step's lines (`settle`). A sequence that writes a line it wrote before
is looping, as small models do after a few lines: it ends there, and the next round samples
afresh from the prompt (whose prefill the prefix cache keeps), instead of spending tokens on
repeats. Only the sequence's own history decides, so a seeded request gets
the same records whatever shares the batch. A line the label check refused is remembered with
the job's accepted ones: written again by any sequence, it is a duplicate, not scored again.
Accepted lines become `GeneratedRecord`s in their request's outbox; every record accepted and
rejection is counted per request and over the server's life (`Totals`), and a line counts as
parsed when it gets one of those verdicts, so parsed = accepted + rejected. A waiting line
dropped because its request no longer wants it (its intent complete, the request cancelled)
gets no verdict and is not counted. The check against the server's recent output is made again
when a waiting line is accepted: another request may have been given the same text meanwhile.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from condgen.codec import normalize_for_match
from condgen.server.label_check import NOT_CHECKED, LineToCheck
from condgen.server.records import REJECTION_REASONS, RecordJudge, Verdict
from condgen.server.requests import GeneratedRecord, Job, RequestState
from condgen.server.sampling import TokenWindows


@dataclass
class Sequence:
    """One sampling stream forked from a round's prompt."""

    id: int
    request: RequestState
    job: Job
    rng: np.random.Generator
    line_tokens: list[int]
    prompt_keys: frozenset[str] = frozenset()
    forced: deque = field(default_factory=deque)
    generated: int = 0
    written: set[str] = field(default_factory=set)  # its lines so far, normalised
    reserved_tokens: int = 0  # the cache length this sequence may reach (see max_batch_tokens)


@dataclass
class PendingLine:
    """A line that passed the judge and waits for the label check at the end of the step."""

    state: RequestState
    job: Job
    verdict: Verdict

    @property
    def live(self) -> bool:
        return not (self.state.finished or self.state.cancelled or self.job.satisfied)

    def to_check(self) -> LineToCheck:
        return LineToCheck(self.verdict.text, self.job.intent, self.state.spec.label_examples)


@dataclass
class Totals:
    """Counters over the server's life, across requests (exported as metrics)."""

    tokens_generated: int = 0
    lines_parsed: int = 0
    records_accepted: int = 0
    rejected: Counter = field(default_factory=lambda: Counter(dict.fromkeys(REJECTION_REASONS, 0)))


class LineKeeper:
    """Cuts sequences' tokens into lines and turns lines into records or rejections."""

    def __init__(self, engine, judge: RecordJudge):
        self.engine = engine  # encode/decode, eos_token_id, newline_tokens
        self.judge = judge
        self.totals = Totals()
        self.pending: list[PendingLine] = []

    def next_token(self, seq: Sequence, windows: TokenWindows, row: int) -> int | None:
        """Feed one token to `seq`, sampled from its row `row` of this step's `windows`;
        None when the sequence is finished."""
        state, job, spec = seq.request, seq.job, seq.request.spec
        if state.cancelled or job.satisfied:
            return None
        if seq.forced:
            token = seq.forced.popleft()
        else:
            token = windows.sample(row, spec.sampling, seq.rng)
            seq.generated += 1
            state.summary.tokens_generated += 1
            self.totals.tokens_generated += 1
        seq.line_tokens.append(token)
        if token == self.engine.manifest.eos_token_id:
            self._end_line(seq, at_eos=True)
            return None
        if self.engine.newline_tokens[token]:
            looped = self._end_line(seq)
            if looped or job.satisfied or seq.generated >= spec.max_new_tokens:
                return None
            seq.forced.extend(job.prefix_tokens)
            seq.line_tokens = []
            return token
        if seq.generated >= spec.max_new_tokens and not seq.forced:
            if len(seq.line_tokens) > len(job.prefix_tokens):
                self.reject(state, "truncated")
            return None
        return token

    def _end_line(self, seq: Sequence, at_eos: bool = False) -> bool:
        """Judge the line `seq` just finished; whether `seq` is looping (it wrote the line
        before). Echoing a prompt example is not looping: the next line is often new."""
        if at_eos and len(seq.line_tokens) <= len(seq.job.prefix_tokens) + 1:
            return False  # nothing but the prefix before EOS: not a line
        line = self.engine.decode(seq.line_tokens).split("\n", 1)[0]
        key = normalize_for_match(line)
        looped = key in seq.written
        self._judge_line(seq, line)
        seq.written.add(key)
        return looped

    def _judge_line(self, seq: Sequence, line: str) -> None:
        state, job = seq.request, seq.job
        verdict = self.judge.judge(line, job.intent, state.spec.judging, job.seen, seq.prompt_keys, job.supplied)
        if verdict.reason is not None:
            self.reject(state, verdict.reason)
        elif state.spec.label_check:
            self.pending.append(PendingLine(state, job, verdict))
        else:
            self.accept(state, job, verdict)

    def take_pending(self) -> list[PendingLine]:
        """The step's lines waiting for the label check whose request still wants them."""
        pending, self.pending = self.pending, []
        return [p for p in pending if p.live]

    def settle(self, pending: list[PendingLine], margins) -> None:
        """Accept the waiting lines whose label margin is enough; reject the others."""
        for line, margin in zip(pending, margins):
            if margin < line.state.spec.label_margin:  # NaN (no rival to compare with) passes
                line.job.seen.add(normalize_for_match(line.verdict.text))  # a repeat is a duplicate
                self.reject(line.state, "label_check")
            else:
                self.accept(line.state, line.job, line.verdict, margin)

    def accept(self, state: RequestState, job: Job, verdict: Verdict, label_margin: float = NOT_CHECKED) -> None:
        if job.satisfied or state.cancelled or state.finished:
            return  # no longer wanted: no verdict, not counted
        if self.judge.seen_before(verdict.text, job.seen):  # an earlier line of this step
            return self.reject(state, "duplicate")
        if self.judge.recently_sent(job.intent, verdict.text, state.spec.judging):  # to another request
            return self.reject(state, "duplicate")
        self.judge.remember(job.intent, verdict.text, job.seen)
        self._count_parsed(state)
        state.outbox.put_nowait(
            GeneratedRecord(
                job.intent, verdict.text, job.accepted, verdict.fidelity, verdict.predicted_intent, label_margin
            )
        )
        job.accepted += 1
        state.summary.records_accepted += 1
        self.totals.records_accepted += 1

    def reject(self, state: RequestState, reason: str) -> None:
        state.summary.rejected[reason] += 1
        self.totals.rejected[reason] += 1
        self._count_parsed(state)

    def _count_parsed(self, state: RequestState) -> None:
        state.summary.lines_parsed += 1
        self.totals.lines_parsed += 1
