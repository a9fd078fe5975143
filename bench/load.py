"""Serving throughput and latency: concurrent gRPC streams vs the same load in process,
and continuous vs static batching on a mixed workload.

Tokens per second are the `tokens_generated` of every request's Summary over the wall time
of the whole load. TTFT is the time from a call to its first record; TPOT is a stream's
time after its first record per token of one of its sequences.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from condgen.bundle import read_manifest
from condgen.server.engine import Engine, EngineConfig
from condgen.server.limits import Defaults
from condgen.server.requests import GeneratedRecord, GenerationSpec
from condgen.server.sampling import SamplingSettings
from condgen.server.scheduler import Scheduler, SchedulerConfig


@dataclass(frozen=True)
class StreamLoad:
    """What each stream asks for."""

    num_records: int = 8
    sequences_per_round: int = 4
    max_new_tokens: int = 48
    prompt_examples: int = 10
    temperature: float = 0.9


@dataclass
class StreamResult:
    ttft: float
    elapsed: float
    tokens: int
    records: int


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class ServerProcess:
    """`condgen serve` in a child process on a free loopback port (so its memory is measured
    alone); `serve_args` are further `condgen serve` flags."""

    def __init__(self, bundle: Path, *serve_args: str):
        # O_APPEND: reading it never moves the child's writes; open as long as the server runs
        self._log = tempfile.TemporaryFile(mode="a+")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "condgen.cli", "serve", "--bundle", str(bundle), "--port", "0", *serve_args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            match = re.search(r"listening on (\S+):(\d+)", line)
            if match:
                self.port = int(match.group(2))
                self.target = f"{match.group(1)}:{self.port}"
                return
        self._log.seek(0)
        raise RuntimeError(f"the server exited before listening: {self._log.read()[-2000:]}")

    def log_text(self) -> str:
        """What the server has written to stderr so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        assert match is not None, "no VmHWM in /proc status"
        return int(match.group(1)) / 1024

    def stop(self) -> None:
        """SIGTERM (drain) if still running; SIGKILL if it does not exit within a minute."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()


def one_stream(target: str, intent: str, seed: int, load: StreamLoad, out: list, index: int) -> None:
    from condgen.client import Client

    started = time.perf_counter()
    first = None
    records = 0
    with Client(target, timeout=1800) as client:
        for _ in client.generate(
            [intent],
            load.num_records,
            seed=seed,
            temperature=load.temperature,
            max_new_tokens=load.max_new_tokens,
            num_prompt_examples=load.prompt_examples,
            sequences_per_round=load.sequences_per_round,
        ):
            records += 1
            first = first or time.perf_counter() - started
        out[index] = StreamResult(
            first or 0.0, time.perf_counter() - started, client.last_summary.tokens_generated, records
        )


def run_streams(target: str, intents: list[str], streams: int, load: StreamLoad) -> tuple[float, list[StreamResult]]:
    """`streams` concurrent Generate calls; returns tokens/s over the wall time and per-stream results."""
    results: list = [None] * streams
    threads = [
        threading.Thread(target=one_stream, args=(target, intents[i % len(intents)], i, load, results, i))
        for i in range(streams)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if any(r is None for r in results):
        raise RuntimeError("a benchmark stream failed")
    return sum(r.tokens for r in results) / wall, results


def latency_figures(results: list[StreamResult], load: StreamLoad) -> dict:
    ttfts = [r.ttft * 1000 for r in results]
    tpots = [(r.elapsed - r.ttft) * 1000 / max(1.0, r.tokens / load.sequences_per_round) for r in results]
    return {
        "ttft_p50_ms": statistics.median(ttfts),
        "ttft_p95_ms": percentile(ttfts, 0.95),
        "tpot_ms": statistics.median(tpots),
    }


def spec_for(intent: str, seed: int, num_records: int, load: StreamLoad) -> GenerationSpec:
    """The request a benchmark stream makes, with what `condgen serve` fills in by default (the
    label check among them), so that in-process and server figures time the same work."""
    defaults = Defaults()
    return GenerationSpec(
        intents=(intent,),
        num_records=num_records,
        seed=seed,
        sampling=SamplingSettings(temperature=load.temperature),
        max_new_tokens=load.max_new_tokens,
        num_prompt_examples=load.prompt_examples,
        sequences_per_round=load.sequences_per_round,
        label_check=defaults.label_check,
        label_margin=defaults.label_margin,
        avoid_recent_duplicates=False,  # the server's default for a seeded request
    )


async def _run_in_process(engine: Engine, bundle: Path, specs: list[GenerationSpec], config: SchedulerConfig) -> float:
    async with Scheduler.for_bundle(bundle, config, engine=engine) as scheduler:  # the checks the server runs

        async def drain(spec) -> int:
            tokens = 0
            async for item in scheduler.submit(spec):
                if not isinstance(item, GeneratedRecord):
                    tokens = item.tokens_generated
            return tokens

        started = time.perf_counter()
        tokens = await asyncio.gather(*[drain(s) for s in specs])
        wall = time.perf_counter() - started
    return sum(tokens) / wall


def in_process(bundle: Path, device: str, specs: list[GenerationSpec], config: SchedulerConfig, engine=None) -> float:
    """Tokens/s of `specs` submitted together straight to a scheduler (no gRPC)."""
    manifest = read_manifest(bundle, verify=False)
    engine = engine or Engine(bundle, manifest, EngineConfig(device=device))
    return asyncio.run(_run_in_process(engine, bundle, specs, config))


def mixed_specs(intents: list[str], load: StreamLoad, small: int, large: int, count: int) -> list[GenerationSpec]:
    """Every fifth request wants `large` records, the others `small`."""
    return [spec_for(intents[i % len(intents)], 1000 + i, large if i % 5 == 0 else small, load) for i in range(count)]
