"""Prometheus metrics and one log line per request.

`Telemetry` owns a private registry (several servers may share a process, as in tests).
Counters that the scheduler keeps anyway (tokens, records, rejections, queue depth) are read
at scrape time by a collector; latencies and step times are observed as they happen. The
metrics endpoint is served over HTTP only when a port is given (`--metrics-port`).

`CallTracker` follows one RPC: it takes the caller's `x-request-id` (or makes one), echoes
it in the trailing metadata, counts the call by method and status code and logs one line
when it ends.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from condgen.metadata import REQUEST_ID_KEY
from condgen.v1 import generator_pb2 as pb

log = logging.getLogger("condgen.requests")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class SchedulerView(Protocol):
    """What the metrics read from the scheduler at scrape time."""

    def stats(self) -> dict: ...

    def totals(self) -> dict: ...


class _SchedulerCollector:
    """Exports the scheduler's own counters and gauges when Prometheus scrapes."""

    def __init__(self, scheduler: SchedulerView):
        self.scheduler = scheduler

    def describe(self):
        return []  # the scheduler may not exist yet at registration; nothing to check up front

    def collect(self):
        stats, totals = self.scheduler.stats(), self.scheduler.totals()
        for name, key, text in (
            ("condgen_queue_depth", "queued_requests", "Requests admitted but not yet decoding"),
            ("condgen_active_requests", "active_requests", "Requests in flight"),
            ("condgen_running_sequences", "running_sequences", "Sequences in the running batch"),
            (
                "condgen_batch_cache_tokens",
                "batch_tokens",
                "KV-cache size of the running batch in tokens (rows x length)",
            ),
        ):
            yield GaugeMetricFamily(name, text, value=stats[key])
        for name, key, text in (
            ("condgen_generated_tokens", "tokens_generated", "Tokens sampled by the model"),
            ("condgen_lines_parsed", "lines_parsed", "Lines the model completed"),
            ("condgen_records_accepted", "records_accepted", "Records streamed to clients"),
            ("condgen_engine_steps", "steps", "Decode steps of the running batch"),
        ):
            yield CounterMetricFamily(name, text, value=totals[key])
        rejected = CounterMetricFamily("condgen_records_rejected", "Lines rejected, by reason", labels=["reason"])
        for reason, count in sorted(totals["rejected"].items()):
            rejected.add_metric([reason], count)
        yield rejected
        cache = stats["prefix_cache"]
        lookups = CounterMetricFamily(
            "condgen_prefix_cache_lookups", "Prompt prefills looked up in the cache", labels=["result"]
        )
        lookups.add_metric(["hit"], cache["hits"])
        lookups.add_metric(["miss"], cache["misses"])
        yield lookups


class Telemetry:
    """The server's metrics; `serve_http` exposes them for Prometheus."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "condgen_requests", "RPCs by method and final status code", ["method", "code"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "condgen_request_duration_seconds",
            "RPC duration by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_record_seconds = Histogram(
            "condgen_time_to_first_record_seconds",
            "From a Generate call's start to its first record",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.record_seconds = Histogram(
            "condgen_record_latency_seconds",
            "Time between consecutive records of one Generate stream",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "condgen_batch_size",
            "Sequences in the batch per decode step",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "condgen_queue_wait_seconds",
            "From a Generate request's admission to the start of its first prompt round",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "condgen_engine_step_seconds",
            "Engine pass time by phase",
            ["phase"],
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self._http = None

    def watch(self, scheduler: SchedulerView) -> None:
        """Export the scheduler's counters and gauges (read at scrape time)."""
        self.registry.register(_SchedulerCollector(scheduler))

    def observe_step(self, phase: str, rows: int, seconds: float) -> None:
        """Called by the scheduler after every engine pass (`prefill`, `decode` or `label_check`)."""
        self.step_seconds.labels(phase).observe(seconds)
        if phase == "decode":
            self.batch_size.observe(rows)

    def observe_queue_wait(self, seconds: float) -> None:
        """Called by the scheduler when a request starts its first round."""
        self.queue_wait_seconds.observe(seconds)

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 picks a free port); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def track(self, method: str, request, context) -> CallTracker:
        return CallTracker(self, method, request, context)

    def denied(self, full_method: str, context) -> None:
        """A call refused before its handler ran (the auth interceptor): count and log it."""
        self.track(full_method.rsplit("/", 1)[-1], None, context).end(grpc.StatusCode.UNAUTHENTICATED)


def caller_request_id(context) -> str | None:
    """The caller's x-request-id when it is a sane token; None otherwise."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return None


@dataclass
class _CallCounts:
    records: int = 0
    summary: pb.Summary | None = None


class CallTracker:
    """One RPC from start to status: request id, metrics, the closing log line."""

    def __init__(self, telemetry: Telemetry, method: str, request, context):
        self.telemetry = telemetry
        self.method = method
        self.request = request
        self.request_id = caller_request_id(context) or uuid.uuid4().hex[:16]
        self.started = time.monotonic()
        self._last_record = self.started
        self._counts = _CallCounts()
        self._ended = False
        self._context = context
        self._trailing: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, self.request_id),)
        context.set_trailing_metadata(self._trailing)

    def add_trailing(self, key: str, value: str) -> None:
        """One more entry of the trailing metadata (beside the echoed request id)."""
        self._trailing += ((key, value),)
        self._context.set_trailing_metadata(self._trailing)

    def sent(self, response) -> None:
        """Note a streamed response (records feed the latency histograms)."""
        if not isinstance(response, pb.GenerateResponse):
            return
        if response.HasField("summary"):
            self._counts.summary = response.summary
            return
        now = time.monotonic()
        histogram = self.telemetry.record_seconds if self._counts.records else self.telemetry.first_record_seconds
        histogram.observe(now - self._last_record)
        self._last_record = now
        self._counts.records += 1

    def end(self, code: grpc.StatusCode, details: str = "") -> None:
        if self._ended:
            return
        self._ended = True
        seconds = time.monotonic() - self.started
        self.telemetry.requests.labels(self.method, code.name).inc()
        self.telemetry.request_seconds.labels(self.method).observe(seconds)
        level = logging.WARNING if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) else logging.INFO
        log.log(
            level,
            "%s %s %s in %.3f s",
            self.request_id,
            self.method,
            code.name,
            seconds,
            extra={"fields": self._fields(code, seconds, details)},
        )

    def _fields(self, code: grpc.StatusCode, seconds: float, details: str) -> dict:
        fields = {
            "request_id": self.request_id,
            "method": self.method,
            "status": code.name,
            "duration_s": round(seconds, 4),
        }
        if isinstance(self.request, pb.GenerateRequest):
            fields["intents"] = [intent[:64] for intent in list(self.request.intents)[:20]]
            fields["num_records"] = self.request.num_records
            fields["records_sent"] = self._counts.records
        summary = self._counts.summary
        if summary is not None:
            fields.update(
                lines_parsed=summary.lines_parsed,
                tokens=summary.tokens_generated,
                rounds=summary.rounds,
                rejected={k: v for k, v in _rejections(summary).items() if v},
            )
        if details and code != grpc.StatusCode.OK:
            fields["details"] = details[:300]
        return fields


def _rejections(summary: pb.Summary) -> dict:
    return {field.name: getattr(summary.rejected, field.name) for field in summary.rejected.DESCRIPTOR.fields}
