"""`Client` and `AsyncClient`: call a condgen server and get records or a DataFrame.

    from condgen.client import Client
    with Client("127.0.0.1:50051") as client:
        df = client.generate_df(["card_arrival", "lost_or_stolen_card"], num_records=20, seed=1)

Records stream in as the server accepts them; the closing summary (acceptance, rejections
by reason, tokens, time) is kept in `client.last_summary`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Sequence

import grpc

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


class GenerateError(RuntimeError):
    """The server refused or failed a call; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def build_request(intents: Sequence[str], num_records: int, *, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                  max_new_tokens: int | None = None, num_prompt_examples: int | None = None,
                  sequences_per_round: int | None = None, max_rounds: int | None = None,
                  allow_training_copies: bool = False, avoid_recent_duplicates: bool | None = None,
                  min_fidelity: float | None = None) -> pb.GenerateRequest:
    """A GenerateRequest; None leaves a setting to the server's default."""
    if isinstance(intents, str):
        intents = [intents]
    sampling = pb.SamplingParams(**{k: v for k, v in dict(
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens).items()
        if v is not None})
    optional = {k: v for k, v in dict(num_prompt_examples=num_prompt_examples,
                                      sequences_per_round=sequences_per_round, max_rounds=max_rounds,
                                      avoid_recent_duplicates=avoid_recent_duplicates,
                                      min_fidelity=min_fidelity).items() if v is not None}
    return pb.GenerateRequest(intents=list(intents), num_records=num_records, sampling=sampling,
                              allow_training_copies=allow_training_copies, **optional)


def _to_record(message: pb.Record) -> Record:
    return Record(message.intent, message.text, message.index, message.fidelity, message.predicted_intent)


class Client:
    """Blocking client for one server target (`host:port`)."""

    def __init__(self, target: str, timeout: float | None = None, channel: grpc.Channel | None = None):
        self.target = target
        self.timeout = timeout
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = pb_grpc.GeneratorStub(self._channel)
        self.last_summary: pb.Summary | None = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, intents: Sequence[str], num_records: int, *,
                 on_record: Callable[[Record], None] | None = None, **settings) -> Iterator[Record]:
        """Stream records (settings: see `build_request`); the summary lands in `last_summary`."""
        request = build_request(intents, num_records, **settings)
        self.last_summary = None
        try:
            for response in self._stub.Generate(request, timeout=self.timeout):
                if response.HasField("record"):
                    record = _to_record(response.record)
                    if on_record is not None:
                        on_record(record)
                    yield record
                else:
                    self.last_summary = response.summary
        except grpc.RpcError as exc:
            raise GenerateError(exc.code(), exc.details()) from exc

    def generate_df(self, intents: Sequence[str], num_records: int, *, return_summary: bool = False,
                    with_scores: bool = False, **settings):
        """All records of one request as a pandas DataFrame with columns `intent`, `text`
        (plus `fidelity`, `predicted_intent` with `with_scores=True`); `return_summary=True`
        returns (frame, Summary)."""
        from condgen.client.frames import records_to_frame

        frame = records_to_frame(self.generate(intents, num_records, **settings), with_scores)
        return (frame, self.last_summary) if return_summary else frame

    def list_intents(self) -> dict[str, int]:
        """Intent name -> number of real examples in the served bundle."""
        response = self._call(self._stub.ListIntents, pb.ListIntentsRequest())
        return {info.name: info.example_count for info in response.intents}

    def model_info(self) -> pb.ModelInfo:
        return self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise GenerateError(exc.code(), exc.details()) from exc


class AsyncClient:
    """asyncio client with the same calls as `Client`."""

    def __init__(self, target: str, timeout: float | None = None):
        self.target = target
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.GeneratorStub(self._channel)
        self.last_summary: pb.Summary | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, intents: Sequence[str], num_records: int, **settings) -> AsyncIterator[Record]:
        request = build_request(intents, num_records, **settings)
        self.last_summary = None
        try:
            async for response in self._stub.Generate(request, timeout=self.timeout):
                if response.HasField("record"):
                    yield _to_record(response.record)
                else:
                    self.last_summary = response.summary
        except grpc.RpcError as exc:
            raise GenerateError(exc.code(), exc.details()) from exc

    async def generate_df(self, intents: Sequence[str], num_records: int, *, return_summary: bool = False,
                          with_scores: bool = False, **settings):
        from condgen.client.frames import records_to_frame

        records = [r async for r in self.generate(intents, num_records, **settings)]
        frame = records_to_frame(records, with_scores)
        return (frame, self.last_summary) if return_summary else frame

    async def list_intents(self) -> dict[str, int]:
        response = await self._call(self._stub.ListIntents, pb.ListIntentsRequest())
        return {info.name: info.example_count for info in response.intents}

    async def model_info(self) -> pb.ModelInfo:
        return await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise GenerateError(exc.code(), exc.details()) from exc
