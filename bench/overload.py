"""`python -m condgen.bench.overload`: many concurrent streams with deadlines against one server.

Starts `condgen serve` on a loopback port (a child process), opens `--streams` Generate calls
at once (raw gRPC stubs, no client retries, so every status is the server's own answer), each
with a `--deadline`, and reports how they ended: the count per status code, the slowest
refusal (RESOURCE_EXHAUSTED, from the call to its status), the records delivered, whether
every OK call got all its rows, and whether the server still answers its health check at the
end. Writes bench/results/overload.json. With deadline-aware admission (the default; see
docs/operations.md) no call should end DEADLINE_EXCEEDED and every refusal should come within a
second; `--serve-arg=--no-deadline-admission` shows the server without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from condgen.bench.load import ServerProcess
from condgen.client.resume import retry_after_seconds
from condgen.v1 import generator_pb2 as pb
from condgen.v1 import generator_pb2_grpc as pb_grpc

DEFAULT_INTENTS = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked")


@dataclass
class CallOutcome:
    """How one stream ended."""

    code: str
    seconds: float  # from the call to its status
    records: int
    wanted: int
    retry_after: float | None = None


@dataclass(frozen=True)
class OverloadLoad:
    """What each stream asks for, and with what deadline."""

    streams: int = 200
    deadline_seconds: float = 180.0
    num_records: int = 10
    intents: tuple[str, ...] = DEFAULT_INTENTS
    temperature: float = 0.9
    max_new_tokens: int = 48
    prompt_examples: int = 10
    sequences_per_round: int = 4


def _request(load: OverloadLoad, index: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        intents=[load.intents[index % len(load.intents)]],
        num_records=load.num_records,
        sampling=pb.SamplingParams(seed=index, temperature=load.temperature, max_new_tokens=load.max_new_tokens),
        num_prompt_examples=load.prompt_examples,
        sequences_per_round=load.sequences_per_round,
    )


async def one_call(stub: pb_grpc.GeneratorStub, load: OverloadLoad, index: int) -> CallOutcome:
    started = time.monotonic()
    call = stub.Generate(_request(load, index), timeout=load.deadline_seconds)
    records = 0
    try:
        async for response in call:
            records += response.HasField("record")
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    retry_after = retry_after_seconds(await call.trailing_metadata())
    return CallOutcome(code.name, time.monotonic() - started, records, load.num_records, retry_after)


async def run_load(target: str, load: OverloadLoad) -> list[CallOutcome]:
    """Every stream opened at once on one channel; their outcomes in stream order."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        return list(await asyncio.gather(*[one_call(stub, load, n) for n in range(load.streams)]))


def serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def report(outcomes: list[CallOutcome], wall_seconds: float, alive: bool, peak_rss_mb: float) -> dict:
    refusals = [o for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
    ok = [o for o in outcomes if o.code == "OK"]
    return {
        "calls": len(outcomes),
        "by_status": dict(Counter(o.code for o in outcomes)),
        "slowest_refusal_s": max((o.seconds for o in refusals), default=None),
        "refusals_with_retry_after": sum(o.retry_after is not None for o in refusals),
        "records_delivered": sum(o.records for o in outcomes),
        "ok_calls_complete": sum(o.records == o.wanted for o in ok),
        "slowest_ok_s": max((o.seconds for o in ok), default=None),
        "wall_s": wall_seconds,
        "server_serving_after": alive,
        "server_peak_rss_mb": peak_rss_mb,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m condgen.bench.overload", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("demo_out/bundle"))
    parser.add_argument("--streams", type=int, default=OverloadLoad.streams)
    parser.add_argument("--deadline", type=float, default=OverloadLoad.deadline_seconds, help="seconds per call")
    parser.add_argument("--records", type=int, default=OverloadLoad.num_records, help="records asked per call")
    parser.add_argument(
        "--intents", default=",".join(OverloadLoad.intents), help="comma-separated; call n asks for intent n mod k"
    )
    parser.add_argument("--output", type=Path, default=Path("bench/results/overload.json"))
    parser.add_argument("--serve-arg", action="append", default=[], help="a further `condgen serve` flag (repeatable)")
    args = parser.parse_args(argv)
    if not (args.bundle / "condgen.json").is_file():
        parser.error(f"no bundle at {args.bundle}: run `make demo` first, or pass --bundle")
    intents = tuple(i.strip() for i in args.intents.split(",") if i.strip())
    load = OverloadLoad(args.streams, args.deadline, args.records, intents)
    server = ServerProcess(args.bundle, *args.serve_arg)
    try:
        print(f"{load.streams} streams of {load.num_records} records, {load.deadline_seconds:.0f} s deadline each")
        started = time.monotonic()
        outcomes = asyncio.run(run_load(server.target, load))
        figures = report(outcomes, time.monotonic() - started, serving(server.target), server.peak_rss_mb())
    finally:
        server.stop()
    figures["load"] = asdict(load)
    figures["serve_args"] = args.serve_arg
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({**figures, "outcomes": [asdict(o) for o in outcomes]}, indent=2))
    print(json.dumps({k: v for k, v in figures.items() if k != "load"}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
