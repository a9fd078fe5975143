"""`Client` and `AsyncClient`: call condgen servers and get records or a DataFrame.

    from condgen.client import Client
    with Client("127.0.0.1:50051") as client:
        df = client.generate_df(["card_arrival", "lost_or_stolen_card"], num_records=20, seed=1)
        # an intent the model was never trained on, from a few examples sent with the request
        new = client.generate_df(["crypto_refund"], 10, examples={"crypto_refund": ["Can I get my bitcoin back?",
                                                                                  "Refund my crypto purchase"]})

Records stream in as the server accepts them; the closing summary (acceptance, rejections
by reason, tokens, time) is kept in `client.last_summary`. A client may know several
targets (a list, or one `dns:///name:port` balanced round-robin): when a call fails with
UNAVAILABLE or RESOURCE_EXHAUSTED it backs off and asks the next target for only the
records still missing (see `condgen.client.resume`); a call that ends short is followed by
one for what is missing, so a call returns exactly the requested count per intent or raises
`IncompleteError` naming what is missing. TLS and a bearer token are optional.
Every `generate` call sends an `x-request-id` (the `request_id` given, else a new random one,
the same for all its retries) that shows in the server's log line; the id the server used
(echoed in trailing metadata) lands in `client.last_request_id`.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from condgen.client.resume import RETRYABLE, Progress, RetryPolicy, retry_after_seconds
from condgen.errors import CondgenError
from condgen.metadata import REQUEST_ID_KEY
from condgen.v1 import generator_pb2 as pb
from condgen.v1 import generator_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Record:
    """One synthetic record, with the bundle classifier's view of it."""

    intent: str
    text: str
    index: int
    fidelity: float = 0.0
    predicted_intent: str = ""
    label_margin: float = float("nan")  # the label check's margin (nats per token); NaN: not checked


class GenerateError(CondgenError, RuntimeError):
    """The server refused or failed a call; `code` is the gRPC status code, `request_id` the
    server's id for the call (to find its log line), when it sent one."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.request_id = request_id

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError, sent_id: str | None = None) -> GenerateError:
        return cls(exc.code(), exc.details(), _echoed_request_id(exc.trailing_metadata()) or sent_id)


class IncompleteError(GenerateError):
    """The servers could not deliver every requested record within the retry policy's attempts
    or the deadline. `missing` maps intents to the records still missing, `summary` adds up
    every call; from `generate_df`, `records` and `frame` hold what was received (`generate`
    has yielded those records already). `code` is the status of the last call when it failed
    (DEADLINE_EXCEEDED, say), None when the calls ended normally but short."""

    def __init__(
        self,
        missing: dict[str, int],
        summary: pb.Summary | None,
        why: str,
        code: grpc.StatusCode | None = None,
        request_id: str | None = None,
    ):
        counts = ", ".join(f"{intent}: {count}" for intent, count in sorted(missing.items()))
        message = f"incomplete after {why}: records still missing per intent: {counts}"
        CondgenError.__init__(self, message)
        self.code = code
        self.details = message
        self.request_id = request_id
        self.missing = missing
        self.summary = summary
        self.records: list = []
        self.frame = None


# gRPC servers refuse messages above 4 MiB unless configured otherwise (condgen serve refuses
# bigger requests than --max-request-bytes itself, with INVALID_ARGUMENT).
MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TlsSettings:
    """PEM bytes: the CA that signed the server, and a client certificate for mutual TLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


def build_request(
    intents: Sequence[str],
    num_records: int,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    num_prompt_examples: int | None = None,
    sequences_per_round: int | None = None,
    max_rounds: int | None = None,
    allow_training_copies: bool = False,
    avoid_recent_duplicates: bool | None = None,
    min_fidelity: float | None = None,
    require_predicted_intent: bool = False,
    examples: Mapping[str, Sequence[str]] | None = None,
    label_check: bool | None = None,
    label_margin: float | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; None leaves a setting to the server's default.

    `examples` maps intents (each also in `intents`) to real texts the server builds their
    prompts from: an intent new to the served model needs nothing else. `label_check` and
    `label_margin` switch and tune the server's check that the model itself prefers the
    requested intent for each line. With a `seed` the same request gives the same records
    (unless `avoid_recent_duplicates=True`)."""
    if isinstance(intents, str):
        intents = [intents]
    supplied = [pb.IntentExamples(intent=name, texts=list(texts)) for name, texts in (examples or {}).items()]
    params: dict[str, Any] = {
        k: v
        for k, v in dict(
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens
        ).items()
        if v is not None
    }
    sampling = pb.SamplingParams(**params)
    optional: dict[str, Any] = {
        k: v
        for k, v in dict(
            num_prompt_examples=num_prompt_examples,
            sequences_per_round=sequences_per_round,
            max_rounds=max_rounds,
            avoid_recent_duplicates=avoid_recent_duplicates,
            min_fidelity=min_fidelity,
            label_check=label_check,
            label_margin=label_margin,
        ).items()
        if v is not None
    }
    return pb.GenerateRequest(
        intents=list(intents),
        num_records=num_records,
        sampling=sampling,
        allow_training_copies=allow_training_copies,
        require_predicted_intent=require_predicted_intent,
        examples=supplied,
        **optional,
    )


def _echoed_request_id(metadata) -> str | None:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return value
    return None


def _record(message: pb.Record, index: int) -> Record:
    return Record(message.intent, message.text, index, message.fidelity, message.predicted_intent, message.label_margin)


def _channel_options(target: str) -> list:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 4 * 1024 * 1024)]
    if target.startswith("dns:"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


class _Base:
    """Targets, credentials, channels and retry settings shared by both clients."""

    _grpc: Any = grpc  # the channel factories: grpc, or grpc.aio for AsyncClient

    def __init__(
        self,
        target: str | Sequence[str],
        timeout: float | None = None,
        *,
        token: str | None = None,
        tls: TlsSettings | None = None,
        retry: RetryPolicy = RetryPolicy(),
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ):
        self.targets = [target] if isinstance(target, str) else list(target)
        if not self.targets:
            raise ValueError("give at least one target")
        self.timeout = timeout
        self.retry = retry
        self.max_request_bytes = max_request_bytes
        self._tls = tls
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._current = 0
        self._rng = random.Random()
        self.last_summary: pb.Summary | None = None
        self.last_request_id: str | None = None
        self._channels: dict[str, Any] = {}

    def _stub(self) -> pb_grpc.GeneratorStub:
        target = self.targets[self._current]
        if target not in self._channels:
            options = _channel_options(target)
            self._channels[target] = (
                self._grpc.secure_channel(target, self._tls.credentials(), options)
                if self._tls
                else self._grpc.insecure_channel(target, options)
            )
        return pb_grpc.GeneratorStub(self._channels[target])

    def _call_metadata(self, request_id: str | None) -> tuple:
        return self._metadata + (((REQUEST_ID_KEY, request_id),) if request_id else ())

    def _left(self, deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _should_retry(self, exc: grpc.RpcError, progress: Progress, deadline: float | None) -> bool:
        left = self._left(deadline)
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (exc.details() or ""):
            return False  # gRPC's message size limit: every target would refuse it the same way
        return exc.code() in RETRYABLE and progress.attempt < self.retry.max_attempts and (left is None or left > 0)

    def _rotate(self) -> None:
        self._current = (self._current + 1) % len(self.targets)

    # ---- the resume loop both clients run (only their waiting and iterating differ) ----------
    def _begin(self, intents, num_records: int, request_id: str | None, settings: dict):
        """A request's progress, deadline and id, before its first call."""
        progress = Progress(build_request(intents, num_records, **settings))
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self.last_summary = None
        return progress, deadline, request_id or uuid.uuid4().hex[:16]

    def _calls(self, progress: Progress) -> list[pb.GenerateRequest]:
        """The requests for what is still missing, each checked against the size limit first:
        a request too big for any server is refused here once, not retried on every target."""
        requests = progress.next_requests()
        for request in requests:
            size = request.ByteSize()
            if size > self.max_request_bytes:
                raise GenerateError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is {size} bytes; the limit is {self.max_request_bytes} "
                    "(Client(max_request_bytes=...)); send fewer or shorter examples",
                )
        return requests

    def _take(self, progress: Progress, response: pb.GenerateResponse) -> Record | None:
        """A streamed message: a new record to hand out, or None (a summary, a resent record)."""
        if response.HasField("summary"):
            progress.call.summary = response.summary
            return None
        index = progress.accept(response.record)
        return None if index is None else _record(response.record, index)

    def _retry_delay(
        self, exc: grpc.RpcError, progress: Progress, deadline: float | None, request_id: str, allow_incomplete: bool
    ) -> float | None:
        """Seconds to wait before resuming on the next target. When the failure is final (not
        retryable, attempts or deadline spent, or the server's `retry-after` hint ends past the
        deadline on the only target): GenerateError if nothing was received, else
        IncompleteError, or None (stop, short) with `allow_incomplete`."""
        self.last_request_id = _echoed_request_id(exc.trailing_metadata()) or request_id
        hint = retry_after_seconds(exc.trailing_metadata())
        delay = self.retry.delay(progress.attempt, self._rng)
        if hint is not None:  # the server's own estimate; another target need not wait for it
            delay = hint if len(self.targets) == 1 else min(hint, delay)
        left = self._left(deadline)
        if not self._should_retry(exc, progress, deadline) or (left is not None and delay >= left):
            self.last_summary = progress.summary()
            if not progress.received_any:
                raise GenerateError.from_rpc(exc, request_id) from exc
            if allow_incomplete:
                return None
            why = f"{exc.code().name} ({exc.details()})"
            raise IncompleteError(progress.remaining(), self.last_summary, why, exc.code(), request_id) from exc
        progress.move_on(ended_short=False)
        self._rotate()
        return delay

    def _follow_up(self, progress: Progress, deadline: float | None, allow_incomplete: bool) -> bool:
        """After calls that ended normally: whether to ask again for what is still missing.
        False when nothing is missing, or (with `allow_incomplete`) when attempts or time are
        spent; then raises IncompleteError instead unless `allow_incomplete`."""
        self.last_summary = progress.summary()
        if not progress.remaining():
            return False
        left = self._left(deadline)
        spent = (
            "the deadline"
            if left is not None and left <= 0
            else (f"{progress.attempt} follow-up calls" if progress.attempt >= self.retry.max_attempts else None)
        )
        if spent is None:
            progress.move_on(ended_short=True)
            return True
        if allow_incomplete:
            return False
        raise IncompleteError(progress.remaining(), self.last_summary, spent)


class Client(_Base):
    """Blocking client for one or more server targets (`host:port`, or `dns:///name:port`)."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def generate(
        self,
        intents: Sequence[str],
        num_records: int,
        *,
        on_record: Callable[[Record], None] | None = None,
        request_id: str | None = None,
        allow_incomplete: bool = False,
        **settings,
    ) -> Iterator[Record]:
        """Stream exactly `num_records` records of each intent (settings: see `build_request`);
        the summary lands in `last_summary`. When the servers cannot deliver them all within
        the retry policy and the deadline, raises `IncompleteError` after the last record, or
        with `allow_incomplete=True` returns short (`last_summary.complete` is False)."""
        progress, deadline, request_id = self._begin(intents, num_records, request_id, settings)
        try:
            while True:
                try:
                    for request in self._calls(progress):
                        progress.start_call()
                        yield from self._one_call(request, progress, deadline, on_record, request_id)
                except grpc.RpcError as exc:
                    delay = self._retry_delay(exc, progress, deadline, request_id, allow_incomplete)
                    if delay is None:
                        break
                    time.sleep(delay)
                    continue
                if not self._follow_up(progress, deadline, allow_incomplete):
                    break
        finally:
            self.last_summary = progress.summary()

    def _one_call(self, request, progress: Progress, deadline, on_record, request_id) -> Iterator[Record]:
        call = self._stub().Generate(request, timeout=self._left(deadline), metadata=self._call_metadata(request_id))
        for response in call:
            record = self._take(progress, response)
            if record is not None:
                if on_record is not None:
                    on_record(record)
                yield record
        self.last_request_id = _echoed_request_id(call.trailing_metadata())

    def generate_df(
        self,
        intents: Sequence[str],
        num_records: int,
        *,
        return_summary: bool = False,
        with_scores: bool = False,
        **settings,
    ):
        """All records of one request as a pandas DataFrame with columns `intent`, `text`
        (plus `fidelity`, `predicted_intent`, `label_margin` with `with_scores=True`);
        `return_summary=True` returns (frame, Summary).

            frame = client.generate_df(["card_arrival"], 20, seed=7, examples=None)
        """
        from condgen.client.frames import records_to_frame

        records: list[Record] = []
        try:
            records.extend(self.generate(intents, num_records, **settings))
        except IncompleteError as exc:
            exc.records, exc.frame = records, records_to_frame(records, with_scores)
            raise
        frame = records_to_frame(records, with_scores)
        return (frame, self.last_summary) if return_summary else frame

    def list_intents(self) -> dict[str, int]:
        """Intent name -> number of real examples in the served bundle."""
        response = self._call("ListIntents", pb.ListIntentsRequest())
        return {info.name: info.example_count for info in response.intents}

    def model_info(self) -> pb.ModelInfo:
        return self._call("GetModelInfo", pb.GetModelInfoRequest())

    def _call(self, method: str, request):
        try:
            return getattr(self._stub(), method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise GenerateError.from_rpc(exc) from exc


class AsyncClient(_Base):
    """asyncio client with the same calls (and the same retries) as `Client`."""

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def generate(
        self,
        intents: Sequence[str],
        num_records: int,
        *,
        request_id: str | None = None,
        allow_incomplete: bool = False,
        **settings,
    ) -> AsyncIterator[Record]:
        """Stream records, as `Client.generate` does."""
        progress, deadline, request_id = self._begin(intents, num_records, request_id, settings)
        try:
            while True:
                try:
                    for request in self._calls(progress):
                        progress.start_call()
                        call = self._stub().Generate(
                            request, timeout=self._left(deadline), metadata=self._call_metadata(request_id)
                        )
                        async for response in call:
                            record = self._take(progress, response)
                            if record is not None:
                                yield record
                        self.last_request_id = _echoed_request_id(await call.trailing_metadata())
                except grpc.RpcError as exc:
                    delay = self._retry_delay(exc, progress, deadline, request_id, allow_incomplete)
                    if delay is None:
                        break
                    await asyncio.sleep(delay)
                    continue
                if not self._follow_up(progress, deadline, allow_incomplete):
                    break
        finally:
            self.last_summary = progress.summary()

    async def generate_df(
        self,
        intents: Sequence[str],
        num_records: int,
        *,
        return_summary: bool = False,
        with_scores: bool = False,
        **settings,
    ):
        from condgen.client.frames import records_to_frame

        records: list[Record] = []
        try:
            async for record in self.generate(intents, num_records, **settings):
                records.append(record)
        except IncompleteError as exc:
            exc.records, exc.frame = records, records_to_frame(records, with_scores)
            raise
        frame = records_to_frame(records, with_scores)
        return (frame, self.last_summary) if return_summary else frame

    async def list_intents(self) -> dict[str, int]:
        response = await self._call("ListIntents", pb.ListIntentsRequest())
        return {info.name: info.example_count for info in response.intents}

    async def model_info(self) -> pb.ModelInfo:
        return await self._call("GetModelInfo", pb.GetModelInfoRequest())

    async def _call(self, method: str, request):
        try:
            return await getattr(self._stub(), method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise GenerateError.from_rpc(exc) from exc
