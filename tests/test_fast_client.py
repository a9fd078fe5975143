"""The client's resume loop against scripted servers: every call's answer is fixed in advance,
so failover, short ends, repeats, backoff hints and size limits are tested exactly. The servers
are real gRPC servers on loopback ports; only what they answer is scripted (the live failover
test in tests/test_reliability.py kills a real server)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest

from condgen.client import AsyncClient, Client, GenerateError, IncompleteError, RetryPolicy
from condgen.metadata import RETRY_AFTER_KEY
from condgen.v1 import generator_pb2 as pb
from condgen.v1 import generator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.fast
FAST_RETRY = RetryPolicy(max_attempts=4, base_seconds=0.01, max_seconds=0.02)
Script = Callable[[pb.GenerateRequest, grpc.ServicerContext], Iterator[pb.GenerateResponse]]


def record(intent: str, text: str, index: int = 0) -> pb.GenerateResponse:
    return pb.GenerateResponse(record=pb.Record(intent=intent, text=text, index=index))


def summary(accepted: int, parsed: int, **rejected: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        summary=pb.Summary(records_accepted=accepted, lines_parsed=parsed, rejected=pb.RejectionCounts(**rejected))
    )


def sends(*responses: pb.GenerateResponse, fail: grpc.StatusCode | None = None, trailing=()) -> Script:
    """A call that streams `responses`, then ends (or fails with `fail`)."""

    def script(request, context):
        yield from responses
        if fail is not None:
            context.set_trailing_metadata(trailing)
            context.abort(fail, "scripted failure")

    return script


class ScriptedServer(pb_grpc.GeneratorServicer):
    """A Generator whose n-th Generate call (counted over every server sharing `calls`) runs
    the n-th script; it keeps every request it got."""

    def __init__(self, scripts: list[Script], calls: list[tuple[str, pb.GenerateRequest]], name: str):
        self.scripts, self.calls, self.name = scripts, calls, name
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_GeneratorServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def Generate(self, request, context):
        copy = pb.GenerateRequest()
        copy.CopyFrom(request)
        self.calls.append((self.name, copy))
        yield from self.scripts[len(self.calls) - 1](request, context)


@pytest.fixture()
def scripted():
    """`scripted(scripts, servers=2)`: that many servers sharing one script list; returns
    (targets, calls)."""
    servers: list[ScriptedServer] = []

    def start(scripts: list[Script], count: int = 2):
        calls: list[tuple[str, pb.GenerateRequest]] = []
        servers.extend(ScriptedServer(scripts, calls, f"s{n}") for n in range(count))
        return [s.target for s in servers], calls

    yield start
    for server in servers:
        server.server.stop(0)


def test_a_repeat_after_failover_is_asked_for_again_until_the_counts_are_exact(scripted):
    """The first server dies after two records; the second repeats one of them and ends
    normally one short; the client asks again and gets exactly 2 + 2 records."""
    targets, calls = scripted(
        [
            sends(record("a", "one"), record("b", "uno"), fail=grpc.StatusCode.UNAVAILABLE),
            sends(record("a", "one"), record("b", "dos"), summary(2, 3, duplicate=1)),
            sends(record("a", "two"), summary(1, 1)),
        ]
    )
    with Client(targets, timeout=30, retry=FAST_RETRY) as client:
        frame = client.generate_df(["a", "b"], 2, seed=9)
        got = client.last_summary
    assert sorted(zip(frame["intent"], frame["text"])) == [("a", "one"), ("a", "two"), ("b", "dos"), ("b", "uno")]
    # after the failure, the next server: one of each; after its short end, the same server: only a
    assert [name for name, _ in calls] == ["s0", "s1", "s1"]
    assert [list(r.intents) for _, r in calls] == [["a", "b"], ["a", "b"], ["a"]]
    assert [r.num_records for _, r in calls] == [2, 1, 1]
    assert len({r.sampling.seed for _, r in calls}) == 3  # records came back each time: new seeds
    # the summary is what the caller saw: 4 records; the repeat the client dropped a duplicate;
    # the failed call's 2 records counted as lines parsed too (accepted + rejected = parsed)
    assert got.complete and got.records_accepted == 4
    assert got.rejected.duplicate == 2 and got.lines_parsed == 2 + 3 + 1


def test_the_async_client_asks_again_after_a_short_end(scripted):
    import asyncio

    targets, calls = scripted([sends(record("a", "one"), summary(1, 1)), sends(record("a", "two"), summary(1, 1))])

    async def main():
        async with AsyncClient(targets, timeout=30, retry=FAST_RETRY) as client:
            return [r.text async for r in client.generate(["a"], 2, seed=1)], client.last_summary

    texts, got = asyncio.run(main())
    assert texts == ["one", "two"] and got.complete and len(calls) == 2


def test_a_call_that_stays_short_raises_naming_what_is_missing(scripted):
    short = sends(record("a", "one"), summary(1, 9, duplicate=8))
    targets, calls = scripted([short] + [sends(summary(0, 5, duplicate=5))] * 2)
    retry = RetryPolicy(max_attempts=2, base_seconds=0.01)
    with Client(targets, timeout=30, retry=retry) as client, pytest.raises(IncompleteError) as raised:
        client.generate_df(["a", "b"], 1, seed=1)
    error = raised.value
    assert error.missing == {"b": 1} and "b: 1" in str(error)
    assert list(error.frame["text"]) == ["one"] and not error.summary.complete and len(calls) == 3


def test_allow_incomplete_returns_short_with_the_flag(scripted):
    targets, _ = scripted([sends(record("a", "one"), summary(1, 1)), sends(summary(0, 0))])
    with Client(targets, timeout=30, retry=RetryPolicy(max_attempts=1, base_seconds=0.01)) as client:
        frame, got = client.generate_df(["a"], 2, seed=1, allow_incomplete=True, return_summary=True)
    assert list(frame["text"]) == ["one"] and not got.complete and list(got.incomplete_intents) == ["a"]


def test_a_full_server_keeps_the_seed_and_its_retry_after_is_the_backoff(scripted):
    hint = ((RETRY_AFTER_KEY, "0.4"),)
    targets, calls = scripted(
        [sends(fail=grpc.StatusCode.RESOURCE_EXHAUSTED, trailing=hint), sends(record("a", "one"), summary(1, 1))],
        count=1,
    )
    started = time.monotonic()
    with Client(targets, timeout=30, retry=FAST_RETRY) as client:
        texts = [r.text for r in client.generate(["a"], 1, seed=77)]
    assert texts == ["one"] and time.monotonic() - started >= 0.4  # the hint, not FAST_RETRY's 0.02 s
    assert [r.sampling.seed for _, r in calls] == [77, 77]  # nothing received: the same seeded request


def test_a_retry_after_past_the_deadline_fails_at_once(scripted):
    hint = ((RETRY_AFTER_KEY, "60"),)
    targets, calls = scripted([sends(fail=grpc.StatusCode.RESOURCE_EXHAUSTED, trailing=hint)], count=1)
    started = time.monotonic()
    with Client(targets, timeout=5, retry=FAST_RETRY) as client, pytest.raises(GenerateError) as raised:
        list(client.generate(["a"], 1))
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(calls) == 1
    assert time.monotonic() - started < 2


def test_a_request_too_big_to_send_is_refused_once_before_any_call(scripted):
    targets, calls = scripted([], count=2)
    huge = {"a": ["x" * 900] * 5000}
    with Client(targets, timeout=30, retry=FAST_RETRY) as client, pytest.raises(GenerateError) as raised:
        list(client.generate(["a"], 1, examples=huge))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in raised.value.details
    assert calls == []


def test_a_message_size_refusal_from_grpc_is_not_retried(scripted):
    targets, calls = scripted([], count=2)
    over_grpc_limit = {"a": ["x" * 900] * 6000}  # 5.4 MB: servers with gRPC's default 4 MiB refuse it
    with Client(targets, timeout=30, retry=FAST_RETRY, max_request_bytes=8 << 20) as client:
        stubs = []
        original = client._stub
        client._stub = lambda: stubs.append(1) or original()  # type: ignore[method-assign]
        with pytest.raises(GenerateError) as raised:
            list(client.generate(["a"], 1, examples=over_grpc_limit))
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and calls == []
    assert len(stubs) == 1  # one call, not one per attempt


def test_a_deadline_mid_stream_raises_incomplete_with_the_rows_received(scripted):
    deadline = sends(record("a", "one"), fail=grpc.StatusCode.DEADLINE_EXCEEDED)
    targets, calls = scripted([deadline, deadline], count=1)
    with Client(targets, timeout=30, retry=FAST_RETRY) as client, pytest.raises(IncompleteError) as raised:
        client.generate_df(["a"], 3, seed=1)
    error = raised.value
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED and error.missing == {"a": 2}
    assert isinstance(error, GenerateError) and list(error.frame["text"]) == ["one"] and len(calls) == 1
    with Client(targets, timeout=30, retry=FAST_RETRY) as client:
        frame, got = client.generate_df(["a"], 3, seed=1, allow_incomplete=True, return_summary=True)
    assert list(frame["text"]) == ["one"] and not got.complete and got.records_accepted == 1


def test_a_failure_after_a_short_end_in_another_group_still_moves_the_seed_on(scripted):
    """Intents missing different counts go out as separate calls: a's ends short after a
    repeat, b's fails before sending anything. The next round must not reuse the seed that
    just drew a's repeat."""
    targets, calls = scripted(
        [
            sends(record("a", "one"), summary(1, 1)),  # a: 1 of 2, b: 0 of 2
            sends(record("a", "one"), summary(1, 1)),  # a's follow-up: a repeat
            sends(fail=grpc.StatusCode.UNAVAILABLE),  # b's: nothing
            sends(record("a", "two"), summary(1, 1)),
            sends(record("b", "uno"), record("b", "dos"), summary(2, 2)),
        ]
    )
    with Client(targets, timeout=30, retry=FAST_RETRY) as client:
        frame = client.generate_df(["a", "b"], 2, seed=3)
    assert sorted(frame["text"]) == ["dos", "one", "two", "uno"]
    assert [list(r.intents) for _, r in calls] == [["a", "b"], ["a"], ["b"], ["a"], ["b"]]
    seeds = [r.sampling.seed for _, r in calls]
    assert seeds[1] == seeds[2] != seeds[0] and seeds[3] == seeds[4] != seeds[1]
