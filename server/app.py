"""`condgen serve`: load a bundle, start the scheduler and the gRPC server, drain on signals.

Besides condgen.v1.Generator the server offers the standard grpc.health.v1.Health
service and server reflection, and Prometheus metrics over HTTP when `metrics_port` is set.
SIGTERM/SIGINT turn health to NOT_SERVING, refuse new calls with UNAVAILABLE, fail the
queued requests that have not started with UNAVAILABLE (their callers go to another replica),
let the started streams finish within the grace period, then exit. If the scheduler itself
crashes, the server logs the traceback, turns NOT_SERVING, drains and `condgen serve` exits
non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from condgen.bundle import read_manifest
from condgen.errors import CondgenError
from condgen.server.engine import Engine, EngineConfig
from condgen.server.heap import HeapConfig, HeapKeeper
from condgen.server.limits import Defaults, LabelCheckConfig, Limits
from condgen.server.scheduler import Scheduler, SchedulerConfig
from condgen.server.security import SecurityConfig
from condgen.server.servicer import GeneratorServicer
from condgen.server.telemetry import Telemetry
from condgen.v1 import generator_pb2 as pb
from condgen.v1 import generator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SCHEDULER_STOP_SECONDS = 10.0  # after the grace: for the loop to notice the cancelled streams


class SchedulerCrashed(CondgenError, RuntimeError):
    """The batching loop stopped with an error; the server shut down (traceback in the log)."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything `condgen serve` takes."""

    bundle: Path
    host: str = "127.0.0.1"
    port: int = 50051
    engine: EngineConfig = EngineConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    limits: Limits = Limits()
    defaults: Defaults = Defaults()
    label_check: LabelCheckConfig = LabelCheckConfig()
    grace_seconds: float = 30.0
    verify_bundle: bool = True
    security: SecurityConfig = SecurityConfig()
    metrics_port: int | None = None  # None: no /metrics endpoint; 0 picks a free port
    # After this long a client connection is asked (GOAWAY) to reconnect for new calls, so
    # dns:/// round-robin clients find replicas added by a scale-out. Streams in flight finish.
    max_connection_age_seconds: float | None = None
    heap: HeapConfig = HeapConfig()  # process-wide: applied by serve_forever only


@dataclass
class RunningServer:
    """A started server: its port, scheduler task and health servicer."""

    server: grpc.aio.Server
    port: int
    scheduler: Scheduler
    scheduler_task: asyncio.Task
    health: health.aio.HealthServicer
    grace_seconds: float
    telemetry: Telemetry
    metrics_port: int | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    failure: BaseException | None = None  # the scheduler's crash, if it crashed
    _not_serving: asyncio.Task | None = None  # health turning NOT_SERVING after a crash

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new work and fail what has not started, finish the started
        streams within the grace, then let the scheduler loop end (cancelled only if it hangs)."""
        if self.stopped.is_set():
            return
        log.info("shutting down: draining for up to %.0f s", self.grace_seconds)
        await self.health.enter_graceful_shutdown()
        self.scheduler.stop()
        await self.server.stop(self.grace_seconds)
        done, _ = await asyncio.wait([self.scheduler_task], timeout=SCHEDULER_STOP_SECONDS)
        if not done:
            log.warning(
                "the scheduler did not stop within %.0f s after the grace; cancelling it", SCHEDULER_STOP_SECONDS
            )
            self.scheduler_task.cancel()
            await asyncio.gather(self.scheduler_task, return_exceptions=True)
        self._note_failure()
        self.telemetry.close()
        self.stopped.set()

    def _note_failure(self) -> None:
        task = self.scheduler_task
        if task.done() and not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()

    def on_scheduler_done(self, task: asyncio.Task) -> None:
        """The loop ended: fine while stopping; otherwise it crashed, so say so and stop serving."""
        if task.cancelled() or task.exception() is None:
            return
        log.critical("the scheduler crashed; the server stops serving", exc_info=task.exception())
        self.failure = task.exception()
        self.scheduler.stop()  # new calls get UNAVAILABLE: nothing would run them
        self._not_serving = asyncio.get_running_loop().create_task(self.health.enter_graceful_shutdown())


async def start_server(config: ServeConfig, engine: Engine | None = None) -> RunningServer:
    """Load the bundle and start serving; returns once the port is bound. `engine`: one already
    built over this bundle (the fast tests pass a fake one); by default the bundle's graph."""
    manifest = read_manifest(config.bundle, verify=config.verify_bundle)
    telemetry = Telemetry()
    scheduler = Scheduler.build(
        config.bundle,
        config.scheduler,
        config.engine,
        config.label_check,
        on_step=telemetry.observe_step,
        manifest=manifest,
        engine=engine,
        on_queue_wait=telemetry.observe_queue_wait,
    )
    engine = scheduler.engine
    telemetry.watch(scheduler)
    # twice --max-request-bytes: a request over that limit gets validation's INVALID_ARGUMENT, which
    # says which flag sets it, rather than gRPC's RESOURCE_EXHAUSTED (which clients would retry)
    receive_limit = max(MAX_MESSAGE_BYTES, 2 * config.limits.max_request_bytes)
    options = [
        ("grpc.max_receive_message_length", receive_limit),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if config.max_connection_age_seconds is not None:
        if config.max_connection_age_seconds < 0.001:
            raise ValueError(f"max connection age {config.max_connection_age_seconds} s: give a positive number")
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)))
    server = grpc.aio.server(interceptors=config.security.interceptors(on_denied=telemetry.denied), options=options)
    pb_grpc.add_GeneratorServicer_to_server(
        GeneratorServicer(
            scheduler, manifest, config.limits, config.defaults.with_bundle(manifest.generate_defaults), telemetry
        ),
        server,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    credentials = config.security.server_credentials()
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}: is the port in use?")
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = telemetry.serve_http(config.host.strip("[]"), config.metrics_port)  # [::] -> ::
        log.info("metrics on http://%s:%d/metrics", config.host, metrics_port)
    await server.start()
    task = asyncio.create_task(scheduler.run(), name="condgen-scheduler")
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %s (%d intents) on %s:%d with %s on %s%s%s",
        config.bundle,
        len(manifest.intents),
        config.host,
        port,
        engine.runtime,
        engine.provider,
        ", TLS" if credentials else "",
        ", token auth" if config.security.auth_token else "",
    )
    running = RunningServer(
        server, port, scheduler, task, health_servicer, config.grace_seconds, telemetry, metrics_port
    )
    task.add_done_callback(running.on_scheduler_done)
    if manifest.privacy_line():
        log.info("bundle %s", manifest.privacy_line())
    return running


async def serve_forever(config: ServeConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    heap = HeapKeeper(config.heap).start()  # before the model loads, so its buffers follow the same rules
    try:
        await _serve_until_signalled(config)
    finally:
        heap.stop()


async def _serve_until_signalled(config: ServeConfig, engine: Engine | None = None) -> None:
    """Serve until a signal, the gRPC server's end or the scheduler's crash; then drain.
    Raises SchedulerCrashed (the CLI exits non-zero) when the scheduler crashed."""
    running = await start_server(config, engine)
    print(f"condgen server listening on {config.host}:{running.port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiters = [
        asyncio.create_task(stop.wait()),
        asyncio.create_task(running.server.wait_for_termination()),
        running.scheduler_task,
    ]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    await running.stop()
    if running.failure is not None:
        raise SchedulerCrashed(
            f"the scheduler crashed ({running.failure!r}; traceback in the log above); the server shut down"
        )
