"""Continuous (iteration-level) batching of generation requests.

A request asks for `num_records` records of each of its intents; each intent is a `Job`.
A job runs in prompt rounds: a round prefills one prompt (k real examples, then
`intent,`) once and forks its KV cache into n sequences that sample independently.
Every loop iteration the scheduler (1) admits new rounds while the batch has room,
(2) runs one forward pass for all running sequences, (3) feeds each sequence its next
token, cutting the output into lines that are parsed, checked and streamed as records.
After a line ends, the `intent,` prefix is fed back (forced), so every line the model
writes is for the round's intent. Sequences leave the batch as soon as they finish, their
job has enough records or their request was cancelled.

Memory: the cache of the running batch is (rows x longest row) tokens per layer. Besides
`max_batch_size`, `max_batch_tokens` bounds it: a round joins only if, with every row grown to
its reserved length (prompt + max_new_tokens + the `intent,` prefixes re-fed after each line,
estimated from the prompt's tokens per line), rows x longest reservation stays within the
budget; otherwise it waits. The reservation is an estimate (lines shorter than the prompt's
lines re-feed more prefixes). A round is never split (its n forks are part of what the seed
fixes), and one that alone exceeds the budget runs when the batch is empty.

Rounds that start together have their prompts prefilled in one engine pass (left-padded);
a prompt that recurs (it shows every example of its intent, so every round repeats it) is
taken from the prefix cache after its first prefill; prompts of drawn subsets are not cached.
Which requests may start rounds is the batching policy's (server/policy.py); how a sequence's
tokens become lines and lines become records is the `LineKeeper`'s (server/lines.py); the
request types are in server/requests.py.

A request may bring its own examples for some intents (known to the bundle or new): those
intents' prompts are drawn from them, in a seeded order, and its lines are also checked for
copies of them. Under the label check (server/label_check.py), a line that passes the judge's
checks waits until the end of its step; then all such lines are scored together by the
engine and each is accepted or rejected (`label_check`) by its margin.

Admission: `submit` refuses a request at once when the queue is full, and (server/admission.py)
when the rows owed ahead of it, at the measured rows per second, would outlast its caller's
deadline. Rounds start in arrival order: a round that does not fit the batch's free rows (or
its token budget) stops the pass, so later, smaller rounds cannot take the rows it waits for.
`stop` fails at once the requests that have not started (UNAVAILABLE: their callers go to
another replica) and lets the started ones finish.

All state lives on the event loop thread; only the engine's passes (`Engine.forward`,
`Engine.prefill`, `Engine.score`) run in a worker thread; the loop never touches the batch
while a pass is running, even when it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from condgen.bundle import read_examples, read_manifest
from condgen.codec import line_prefix, normalize_for_match
from condgen.server.admission import Admission, AdmissionConfig
from condgen.server.batch import Batch
from condgen.server.engine import Engine, EngineConfig
from condgen.server.errors import Overloaded, ShuttingDown
from condgen.server.label_check import LabelChecker
from condgen.server.limits import LabelCheckConfig
from condgen.server.lines import LineKeeper, Sequence
from condgen.server.policy import POLICIES, make_policy
from condgen.server.prefix_cache import PrefixCache
from condgen.server.prompts import build_prompt
from condgen.server.ragged_batch import RaggedBatch
from condgen.server.records import CopyIndex, LengthBounds, RecordJudge
from condgen.server.requests import GeneratedRecord, GenerationSpec, GenerationSummary, Job, RequestHandle, RequestState
from condgen.server.runtime import open_engine
from condgen.server.sampling import TokenWindows, head_temperature, sequence_rng

log = logging.getLogger(__name__)


CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256
ENGINE_PASS_WAIT_SECONDS = 60.0  # at shutdown, for a pass still running in the engine thread
CACHE_SHARE = 0.6  # of the free device memory, for the KV cache by default (the rest: activations)


@dataclass(frozen=True)
class SchedulerConfig:
    """Capacity of the running batch and of the admission queue; the batching policy."""

    max_batch_size: int = 0  # 0: CPU_BATCH_SIZE on the CPU, GPU_BATCH_SIZE on a GPU
    max_active_requests: int = 256
    prefix_cache_tokens: int = 4096
    # KV-cache budget of the running batch in tokens (rows x length); 0: none on the CPU, sized from
    # the device's free memory on a GPU (`for_device`)
    max_batch_tokens: int = 0
    policy: str = "continuous"  # or "static": whole requests at a time (a baseline)
    admission: AdmissionConfig = AdmissionConfig()  # refusing requests that would miss their deadline

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.max_batch_size < 0 or self.max_active_requests < 1:
            raise ValueError("max_batch_size must be 0 (auto) or positive, max_active_requests at least 1")
        if self.max_batch_tokens < 0:
            raise ValueError("max_batch_tokens must be 0 (auto) or positive")

    def for_device(self, device_type: str, cache_bytes_per_token: int = 0, free_bytes: int | None = None):
        """This config with its automatic values settled for the engine's device: the batch size
        (32 rows on the CPU, 256 on a GPU), and on a GPU a KV budget of `CACHE_SHARE` of the free
        device memory (`free_bytes`, measured after the model is loaded; a step holds the cache in
        and out, hence the factor 2)."""
        on_gpu = device_type == "cuda"
        size = self.max_batch_size or (GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE)
        tokens = self.max_batch_tokens
        if not tokens and on_gpu and free_bytes and cache_bytes_per_token:
            tokens = max(1, int(CACHE_SHARE * free_bytes / (2 * cache_bytes_per_token)))
        return dataclasses.replace(self, max_batch_size=size, max_batch_tokens=tokens)


@dataclass
class RoundPlan:
    """A round about to start: its sequences, its prompt and (once run) its prefill."""

    state: RequestState
    seq_ids: list[int]
    prompt_ids: list[int]
    recurs: bool = False  # the prompt shows every example of its intent: later rounds repeat it
    prefill: tuple[Batch | RaggedBatch, np.ndarray] | None = None


class Scheduler:
    """Owns the running `Batch` (a `RaggedBatch` for a ragged bundle) and moves sequences in and out of it."""

    def __init__(
        self,
        engine: Engine,
        examples: dict[str, list[str]],
        separator: str,
        config: SchedulerConfig = SchedulerConfig(),
        judge: RecordJudge | None = None,
        on_step: Callable[[str, int, float], None] | None = None,
        label_checker: LabelChecker | None = None,
        on_queue_wait: Callable[[float], None] | None = None,
    ):
        self.engine = engine
        self.examples = examples
        self.separator = separator
        self.config = config.for_device(engine.device_type, engine.cache_bytes_per_token, engine.free_device_bytes())
        if self.config.max_batch_tokens != config.max_batch_tokens:
            share = 100 * CACHE_SHARE
            log.info("KV budget %d tokens (%.0f%% of free device memory)", self.config.max_batch_tokens, share)
        judge = judge or RecordJudge(
            separator, LengthBounds(), CopyIndex(t for texts in examples.values() for t in texts), None
        )
        self.lines = LineKeeper(engine, judge)
        self.policy = make_policy(self.config.policy)
        self.requests: list[RequestState] = []
        self.sequences: dict[int, Sequence] = {}
        self.batch: Batch | RaggedBatch | None = None
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._stopping = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="condgen-engine")
        self.prefix_cache = PrefixCache(self.config.prefix_cache_tokens)
        self.steps = 0
        self._on_step = on_step or (lambda phase, rows, seconds: None)
        self._on_queue_wait = on_queue_wait or (lambda seconds: None)
        self.label_checker = label_checker  # None: the label check is not available
        self.admission = Admission(self.config.admission)

    @property
    def judge(self) -> RecordJudge:
        return self.lines.judge

    @classmethod
    def build(
        cls,
        bundle: str | Path,
        config: SchedulerConfig = SchedulerConfig(),
        engine_config: EngineConfig = EngineConfig(),
        label_check: LabelCheckConfig = LabelCheckConfig(),
        on_step: Callable[[str, int, float], None] | None = None,
        manifest=None,
        engine: Engine | None = None,
        on_queue_wait: Callable[[float], None] | None = None,
    ) -> Scheduler:
        """A scheduler over a bundle: its engine, judge and (where the graph can score) label check.
        `manifest`: the bundle's, when the caller has read (and verified) it already; `engine`: one
        already running over this bundle (benchmarks reuse one across schedulers)."""
        bundle = Path(bundle)
        manifest = manifest or (engine.manifest if engine is not None else read_manifest(bundle))
        engine = engine or open_engine(bundle, manifest, engine_config)
        examples = read_examples(bundle)
        judge = RecordJudge.for_bundle(bundle, manifest, examples)
        checker = None
        if engine.can_score:
            checker = LabelChecker(engine, judge.scorer, examples, manifest.separator, label_check)
        else:
            log.warning("this bundle's graph keeps only the last logits: no label check (re-export the bundle)")
        return cls(engine, examples, manifest.separator, config, judge, on_step, checker, on_queue_wait)

    @classmethod
    def for_bundle(
        cls, bundle: str | Path, config: SchedulerConfig = SchedulerConfig(), **options: Any
    ) -> contextlib.AbstractAsyncContextManager[Scheduler]:
        """`async with Scheduler.for_bundle(bundle) as scheduler:` builds a scheduler (`options`:
        those of `build`) and runs it for the block (see `running`)."""
        return cls.build(bundle, config, **options).running()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Scheduler]:
        """Run the batching loop for the `async with` block; then stop taking requests, let the
        ones in flight finish and shut the loop down."""
        task = asyncio.create_task(self.run(), name="condgen-scheduler")
        try:
            yield self
        finally:
            self.stop()
            await task

    async def collect(
        self, spec: GenerationSpec, on_record: Callable[[GeneratedRecord], None] | None = None
    ) -> tuple[list[GeneratedRecord], GenerationSummary]:
        """Every record of one request (each also handed to `on_record`), and its summary."""
        records, summary = [], None
        async for item in self.submit(spec):
            if isinstance(item, GeneratedRecord):
                records.append(item)
                if on_record is not None:
                    on_record(item)
            else:
                summary = item
        return records, summary

    # ---- public API -------------------------------------------------------------------
    def submit(self, spec: GenerationSpec, time_left: float | None = None) -> RequestHandle:
        """Queue a request; `time_left`: seconds until its caller's deadline (None: none).
        Raises ShuttingDown, or Overloaded when the queue is full or the request would not be
        done before the deadline (see server/admission.py)."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down; retry on another server")
        if len(self.requests) >= self.config.max_active_requests:
            raise Overloaded(
                f"the server is full ({len(self.requests)} requests in flight, "
                f"limit {self.config.max_active_requests}); retry later"
            )
        if spec.label_check and self.label_checker is None:
            raise ValueError("this server has no label check (its bundle cannot score lines)")
        self.admission.check(self.rows_owed(), spec.num_records * len(spec.intents), time_left)
        jobs = [self._job(spec, number, intent) for number, intent in enumerate(spec.intents)]
        state = RequestState(next(self._ids), spec, jobs)
        self.requests.append(state)
        self._wake.set()
        return RequestHandle(state, self.cancel)

    def _job(self, spec: GenerationSpec, number: int, intent: str) -> Job:
        supplied = spec.examples.get(intent)
        return Job(
            intent,
            number,
            self.engine.encode(line_prefix(intent, self.separator)),
            spec.num_records,
            examples=list(supplied) if supplied else self.examples[intent],
            supplied=CopyIndex(supplied) if supplied else None,
        )

    def rows_owed(self) -> int:
        """Records still owed to the requests in flight."""
        return sum(max(0, job.target - job.accepted) for state in self.requests for job in state.jobs)

    def cancel(self, state: RequestState) -> None:
        if not state.finished:
            state.cancelled = True
            self._wake.set()

    def stats(self) -> dict:
        """A snapshot of the state; safe from another thread (metrics scrapes): containers the
        loop mutates are copied in one C-level step before they are walked."""
        requests, sequences, batch = list(self.requests), list(self.sequences.values()), self.batch
        rows, past_len = (len(batch), batch.past_len) if batch is not None else (0, 0)
        return {
            "running_sequences": len(sequences),
            "active_requests": len(requests),
            "queued_requests": sum(1 for r in requests if not any(job.active for job in r.jobs)),
            "batch_tokens": rows * past_len,
            "reserved_batch_tokens": self._footprint(sequences),
            "batch_rows": rows,
            "steps": self.steps,
            "rows_owed": self.rows_owed(),
            "rows_per_second": self.admission.rate.rows_per_second,
            "policy": self.config.policy,
            "prefix_cache": self.prefix_cache.stats(),
        }

    def totals(self) -> dict:
        """Counters since the server started: tokens, lines, records, rejections, steps."""
        t = self.lines.totals
        return {
            "tokens_generated": t.tokens_generated,
            "lines_parsed": t.lines_parsed,
            "records_accepted": t.records_accepted,
            "rejected": dict(t.rejected),
            "steps": self.steps,
        }

    def stop(self) -> None:
        """Take no new requests and fail the queued ones that have not started (UNAVAILABLE, so
        their callers go to another replica); `run` returns once the started ones are done."""
        self._stopping = True
        for state in [r for r in self.requests if r.first_round_at is None]:
            self._finish(state, error=ShuttingDown("the server is shutting down; retry on another server"))
        self._wake.set()

    async def run(self) -> None:
        """The batching loop; runs until `stop` and the last request finishes."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._retire_requests()
                if not self.requests:
                    if self._stopping:  # stopped, and the last request just retired
                        break
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                started, delivered = time.perf_counter(), self.lines.totals.records_accepted
                await self._iterate(loop)
                self.admission.rate.observe(
                    self.lines.totals.records_accepted - delivered, time.perf_counter() - started
                )
        finally:
            # A pass may still run in the engine thread (the loop was cancelled while awaiting
            # it): wait for it before the requests' rows leave the batch it is working on.
            waiting = asyncio.ensure_future(asyncio.to_thread(self._executor.shutdown, True))
            _, hung = await asyncio.wait([waiting], timeout=ENGINE_PASS_WAIT_SECONDS)
            if hung:
                log.error("an engine pass did not end within %.0f s of shutdown", ENGINE_PASS_WAIT_SECONDS)
            for state in list(self.requests):
                self._finish(state, error=ShuttingDown("the server stopped before this request finished"))

    async def _iterate(self, loop) -> None:
        """One turn of the loop: admit rounds, decode a step, check the lines that ended."""
        await self._admit_rounds(loop)
        await self._check_labels(loop)
        if self.batch is not None and len(self.batch):
            await self._decode_step(loop)
            await self._check_labels(loop)
        else:  # nothing to decode: requests whose budget is spent finish; never spin
            self._retire_requests()
            await asyncio.sleep(0)

    async def _decode_step(self, loop) -> None:
        """One forward pass for the whole batch. If the pass itself fails, every request in the
        batch fails (their cache is gone) but the loop, and requests still waiting, go on."""
        batch = self.batch
        assert batch is not None
        started, rows = time.perf_counter(), len(batch)
        try:
            windows = await loop.run_in_executor(
                self._executor, self.engine.step, batch, self._temperatures(batch.seq_ids)
            )
        except Exception as exc:  # noqa: BLE001 - isolated to the requests of this batch
            failed = {self.sequences[s].request for s in batch.seq_ids if s in self.sequences}
            log.exception("forward pass failed; failing %d request(s)", len(failed))
            self.batch = None
            for state in failed:
                self._finish(state, error=exc)
            return
        self.steps += 1
        self._on_step("decode", rows, time.perf_counter() - started)
        self._after_step(windows)

    def _fail(self, state: RequestState, exc: Exception) -> None:
        """One request's processing broke: fail it alone; its batch-mates go on."""
        log.error("request %d failed: %r", state.id, exc, exc_info=exc)
        state.cancelled = True
        self._finish(state, error=exc)

    # ---- admission --------------------------------------------------------------------
    def _room(self) -> int:
        return self.config.max_batch_size - len(self.sequences)

    @staticmethod
    def _footprint(sequences: list[Sequence], new_rows: int = 0, new_reserve: int = 0) -> int:
        """Cache tokens of a batch of `sequences` plus `new_rows` rows reserving `new_reserve`,
        every row grown to its reserved length (rows x the longest reservation)."""
        longest = max((seq.reserved_tokens for seq in sequences), default=0)
        return (len(sequences) + new_rows) * max(longest, new_reserve)

    def _fits_token_budget(self, rows: int, reserve: int) -> bool:
        budget = self.config.max_batch_tokens
        return (
            not budget or not self.sequences or self._footprint(list(self.sequences.values()), rows, reserve) <= budget
        )

    async def _admit_rounds(self, loop) -> None:
        """Start every round there is room for; their prompts are prefilled together."""
        plans = self._plan_rounds()
        if not plans:
            return
        await self._prefill(loop, plans)
        new_batches = [self._fork(plan) for plan in plans if plan.prefill is not None and not plan.state.finished]
        new_batches = [b for b in new_batches if any(s in self.sequences for s in b.seq_ids)]
        if new_batches:
            joining = ([self.batch] if self.batch is not None else []) + new_batches
            self.batch = type(joining[0]).concatenate(joining, consume=True)
            self.batch = self.batch.filter([s for s in self.batch.seq_ids if s in self.sequences], consume=True)

    def _plan_rounds(self) -> list[RoundPlan]:
        """Rounds to start now, in request order. The first round that does not fit the free
        rows or the token budget stops the pass, so later rounds cannot take what it waits for."""
        plans: list[RoundPlan] = []
        for state in self.policy.admissible(self.requests, self.config.max_batch_size):
            for job in state.jobs:
                n = min(state.spec.sequences_per_round, self.config.max_batch_size, job.target - job.accepted)
                if state.finished or not self.policy.wants_round(state, job):
                    continue
                if n > self._room():
                    return plans
                try:
                    plan = self._plan_round(state, job, n)
                except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                    self._fail(state, exc)
                    continue
                if plan is None:
                    return plans
                plans.append(plan)
        return plans

    def _plan_round(self, state: RequestState, job: Job, n: int) -> RoundPlan | None:
        """Draw the round's prompt and register its n sequences; the prefill comes later.
        None (nothing changed) when the round does not fit the token budget yet: its prompt
        depends only on the request's seed and round number, so it is drawn the same later."""
        spec = state.spec
        prompt_rng = sequence_rng(spec.seed, job.number, job.rounds, 1 << 20)
        examples = job.examples
        prompt, shown = build_prompt(
            job.intent, examples, spec.num_prompt_examples, prompt_rng, self.separator, shuffle=job.supplied is not None
        )
        prompt_ids = self.engine.encode(prompt)
        tokens_per_line = len(prompt_ids) / len(shown) if shown else job.tokens_per_line
        reserve = self._reserve(len(prompt_ids), spec.max_new_tokens, len(job.prefix_tokens), tokens_per_line)
        if not self._fits_token_budget(n, reserve):
            return None
        job.tokens_per_line = tokens_per_line
        prompt_keys = frozenset(normalize_for_match(t) for t in shown)
        seq_ids = [next(self._ids) for _ in range(n)]
        for fork_index, seq_id in enumerate(seq_ids):
            self.sequences[seq_id] = Sequence(
                seq_id,
                state,
                job,
                sequence_rng(spec.seed, job.number, job.rounds, fork_index),
                list(job.prefix_tokens),
                prompt_keys,
                reserved_tokens=reserve,
            )
            job.active.add(seq_id)
        job.rounds += 1
        state.summary.rounds += 1
        if state.first_round_at is None:
            state.first_round_at = time.monotonic()
            self._on_queue_wait(state.first_round_at - state.started)
        return RoundPlan(state, seq_ids, prompt_ids, recurs=len(shown) == len(examples) and job.supplied is None)

    @staticmethod
    def _reserve(prompt_tokens: int, max_new_tokens: int, prefix_tokens: int, tokens_per_line: float) -> int:
        """The cache length a sequence may reach: prompt, sampled tokens, re-fed line prefixes."""
        lines = math.ceil(max_new_tokens / max(1.0, tokens_per_line - prefix_tokens))
        return prompt_tokens + max_new_tokens + prefix_tokens * lines

    async def _prefill(self, loop, plans: list[RoundPlan]) -> None:
        """Give every plan its prefill: from the prefix cache, from another plan of this pass
        with the same prompt, or from one engine call that prefills all the remaining prompts."""
        unique: dict[tuple[int, ...], RoundPlan] = {}
        for plan in plans:
            key = tuple(plan.prompt_ids)
            if key in unique:
                continue  # shares the prefill of the first plan with this prompt
            if plan.recurs:
                plan.prefill = self.prefix_cache.lookup(plan.prompt_ids, plan.seq_ids[0])
            if plan.prefill is None:
                unique[key] = plan
        firsts = list(unique.values())
        if firsts:
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self.engine.prefill, [p.seq_ids[0] for p in firsts], [p.prompt_ids for p in firsts]
                )
            except Exception as exc:  # noqa: BLE001 - the requests of these rounds fail, others go on
                for plan in plans:
                    if plan.prefill is None:
                        self._fail(plan.state, exc)
                return
            self._on_step("prefill", len(firsts), time.perf_counter() - started)
            for plan, (batch, logits) in zip(firsts, results):
                plan.prefill = (batch, logits)
                if plan.recurs:  # a drawn subset recurs only by chance: not worth its memory
                    self.prefix_cache.store(plan.prompt_ids, batch, logits)
        for plan in plans:
            if plan.prefill is None:
                plan.prefill = unique[tuple(plan.prompt_ids)].prefill
                self.prefix_cache.hits += 1

    def _fork(self, plan: RoundPlan) -> Batch | RaggedBatch:
        """The round's n sequences share its prefill; each samples its own first token."""
        assert plan.prefill is not None
        single, last_logits = plan.prefill
        forked = single.fork(plan.seq_ids)
        temperature = head_temperature(plan.state.spec.sampling)
        windows = TokenWindows.from_logits(last_logits[None, :], np.array([temperature]))
        self._set_next_or_drop(forked, [self._guarded_next_token(s, windows, 0) for s in plan.seq_ids])
        return forked

    # ---- decoding ---------------------------------------------------------------------
    def _after_step(self, windows: TokenWindows) -> None:
        batch = self.batch
        assert batch is not None
        next_tokens = [self._guarded_next_token(s, windows, row) for row, s in enumerate(batch.seq_ids)]
        self._set_next_or_drop(batch, next_tokens)
        self.batch = batch.filter([s for s in batch.seq_ids if s in self.sequences], consume=True)

    def _temperatures(self, seq_ids: list[int]) -> np.ndarray:
        """Each row's sampling temperature, for its log-normaliser (1 where it does not sample)."""
        temperatures = np.ones(len(seq_ids), dtype=np.float32)
        for row, seq_id in enumerate(seq_ids):
            seq = self.sequences.get(seq_id)
            if seq is not None:
                temperatures[row] = head_temperature(seq.request.spec.sampling)
        return temperatures

    def _guarded_next_token(self, seq_id: int, windows: TokenWindows, row: int) -> int | None:
        seq = self.sequences.get(seq_id)
        if seq is None or seq.request.finished:
            return None
        try:
            return self.lines.next_token(seq, windows, row)
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            self._fail(seq.request, exc)
            return None

    def _set_next_or_drop(self, batch: Batch | RaggedBatch, next_tokens: list[int | None]) -> None:
        for seq_id, token in zip(batch.seq_ids, next_tokens):
            if token is None:
                self._drop_sequence(seq_id)
        batch.set_next([t if t is not None else 0 for t in next_tokens])

    async def _check_labels(self, loop) -> None:
        """Score the step's waiting lines together; accept those whose margin is enough."""
        pending = self.lines.take_pending()
        if not pending:
            return
        assert self.label_checker is not None  # `submit` refuses label_check requests without one
        started = time.perf_counter()
        try:
            margins = await loop.run_in_executor(
                self._executor, self.label_checker.margins, [p.to_check() for p in pending]
            )
        except Exception as exc:  # noqa: BLE001 - the requests of these lines fail, the others go on
            for state in {p.state for p in pending}:
                self._fail(state, exc)
            return
        self._on_step("label_check", len(pending), time.perf_counter() - started)
        self.lines.settle(pending, margins)

    def _drop_sequence(self, seq_id: int) -> None:
        seq = self.sequences.pop(seq_id, None)
        if seq is not None:
            seq.job.active.discard(seq_id)

    # ---- completion -------------------------------------------------------------------
    def _retire_requests(self) -> None:
        for state in list(self.requests):
            if state.cancelled or all(state.job_done(job) for job in state.jobs):
                self._finish(state)

    def _finish(self, state: RequestState, error: BaseException | None = None) -> None:
        for seq_id in [s for s, seq in self.sequences.items() if seq.request is state]:
            self._drop_sequence(seq_id)
        if self.batch is not None:
            self.batch = self.batch.filter([s for s in self.batch.seq_ids if s in self.sequences], consume=True)
        if state in self.requests:
            self.requests.remove(state)
        state.finished = True
        if error is not None:
            state.outbox.put_nowait(error)
            return
        summary = state.summary
        summary.elapsed_seconds = time.monotonic() - state.started
        summary.incomplete_intents = [j.intent for j in state.jobs if not j.satisfied]
        if not state.cancelled:
            state.outbox.put_nowait(summary)
        state.outbox.put_nowait(None)
