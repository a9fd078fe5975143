"""The real gRPC server and Python client over the fake engine: the serving path end to end
in seconds (`make test-fast`); tests/test_rpc.py runs the same path over a real model."""

from __future__ import annotations

import json

import grpc
import pytest
from fake_engine import FakeEngine
from grpc_health.v1 import health_pb2, health_pb2_grpc

from condgen.api import LocalServer
from condgen.bundle import read_manifest
from condgen.client import GenerateError

pytestmark = pytest.mark.fast
SETTINGS = dict(seed=3, temperature=1.0, max_new_tokens=30, num_prompt_examples=2, avoid_recent_duplicates=False)


@pytest.fixture(scope="module")
def fake_server(fake_bundle_dir):
    from condgen.server.app import ServeConfig

    config = ServeConfig(bundle=fake_bundle_dir, port=0, grace_seconds=2.0)
    with LocalServer(config, timeout=30, engine=FakeEngine(read_manifest(fake_bundle_dir))) as server:
        yield server


def test_records_stream_into_a_dataframe(fake_server):
    frame, summary = fake_server.generate_df(["card_arrival", "exchange_rate"], 3, return_summary=True, **SETTINGS)
    assert list(frame.columns[:2]) == ["intent", "text"]
    assert sorted(frame["intent"]) == ["card_arrival"] * 3 + ["exchange_rate"] * 3
    assert summary.records_accepted == 6 and summary.complete


def test_the_server_reports_its_bundle_and_device(fake_server):
    assert fake_server.list_intents() == {"card_arrival": 3, "exchange_rate": 3, "lost_or_stolen_card": 3}
    assert fake_server.model_info().device == FakeEngine.provider


def test_an_unknown_intent_is_invalid_and_the_server_stays_up(fake_server):
    with pytest.raises(GenerateError) as error:
        list(fake_server.generate(["no_such_intent"], 2, **SETTINGS))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no_such_intent" in str(error.value)
    assert len(list(fake_server.generate(["card_arrival"], 2, **SETTINGS))) == 2


def test_a_new_intent_with_examples_and_the_label_check(fake_server):
    examples = {"crypto_purchase": ["buy crypto with my card", "can i buy bitcoin", "purchase crypto today"]}
    records = list(
        fake_server.generate(["crypto_purchase", "exchange_rate"], 2, examples=examples, label_check=True, **SETTINGS)
    )
    assert sorted(r.intent for r in records) == ["crypto_purchase"] * 2 + ["exchange_rate"] * 2
    assert not {r.text for r in records} & set(examples["crypto_purchase"])


def test_health_says_serving(fake_server):
    with grpc.insecure_channel(fake_server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_async_client_gets_the_same_records_as_the_blocking_one(fake_server):
    import asyncio

    from condgen.client import AsyncClient

    async def fetch():
        async with AsyncClient(fake_server.target, timeout=30) as client:
            return [r async for r in client.generate(["card_arrival"], 3, **SETTINGS)], client.last_summary

    records, summary = asyncio.run(fetch())
    assert [r.text for r in records] == [r.text for r in fake_server.generate(["card_arrival"], 3, **SETTINGS)]
    assert summary.records_accepted == 3


# ---- overload, crash and size limits (issue 29) -------------------------------------------------


def test_a_call_that_would_miss_its_deadline_is_refused_at_once_with_a_retry_after(fake_bundle_dir):
    """A busy server (30 rows owed, 1 row/s assumed) refuses a call with a 5 s deadline within a
    second, hinting when to come back; the running call still finishes, and its queue wait
    is in the metrics."""
    import threading
    import time

    from condgen.server.admission import AdmissionConfig
    from condgen.server.app import ServeConfig
    from condgen.server.scheduler import SchedulerConfig
    from condgen.v1 import generator_pb2 as pb
    from condgen.v1 import generator_pb2_grpc as pb_grpc

    class SlowEngine(FakeEngine):  # 20 ms a step: the busy call lasts seconds, not milliseconds
        def step(self, batch, temperatures):
            time.sleep(0.02)
            return super().step(batch, temperatures)

    scheduler = SchedulerConfig(max_batch_size=3, admission=AdmissionConfig(prior_rows_per_second=1.0))
    config = ServeConfig(bundle=fake_bundle_dir, port=0, grace_seconds=2.0, scheduler=scheduler)
    with LocalServer(config, timeout=60, engine=SlowEngine(read_manifest(fake_bundle_dir))) as server:
        busy = threading.Thread(
            target=lambda: list(server.generate(["card_arrival"], 30, sequences_per_round=3, **SETTINGS))
        )
        busy.start()
        give_up = time.monotonic() + 10
        while json.loads(server.model_info().scheduler_json)["rows_owed"] == 0:
            assert time.monotonic() < give_up and busy.is_alive(), "the busy call never showed in the queue"
            time.sleep(0.005)
        request = pb.GenerateRequest(intents=["exchange_rate"], num_records=10, sequences_per_round=3)
        with grpc.insecure_channel(server.target) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                list(pb_grpc.GeneratorStub(channel).Generate(request, timeout=5))
            waited = time.monotonic() - started
        busy.join(60)
        registry = server.running.telemetry.registry
        queue_waits = registry.get_sample_value("condgen_queue_wait_seconds_count")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and waited < 1.0
    assert "deadline" in refused.value.details()
    hint = dict(refused.value.trailing_metadata())["retry-after"]
    assert float(hint) > 0
    assert queue_waits >= 1


def test_a_scheduler_crash_is_logged_stops_serving_and_fails_serve(fake_bundle_dir, monkeypatch, caplog):
    import asyncio

    from condgen.server import app
    from condgen.server.errors import ShuttingDown
    from condgen.server.requests import GenerationSpec
    from condgen.server.scheduler import Scheduler

    def crash(self):
        raise RuntimeError("injected scheduler bug")

    monkeypatch.setattr(Scheduler, "_retire_requests", crash)
    started = []
    real_start = app.start_server

    async def keep(config, engine=None):
        started.append(await real_start(config, engine))
        return started[-1]

    monkeypatch.setattr(app, "start_server", keep)
    config = app.ServeConfig(bundle=fake_bundle_dir, port=0, grace_seconds=1.0)
    with pytest.raises(app.SchedulerCrashed, match="injected scheduler bug"):
        asyncio.run(app._serve_until_signalled(config, FakeEngine(read_manifest(fake_bundle_dir))))
    crashed = [r for r in caplog.records if "scheduler crashed" in r.getMessage()]
    assert crashed and crashed[0].exc_info is not None  # the traceback is in the log
    health = started[0].health
    assert health._server_status[""] == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(ShuttingDown):  # nothing would run it
        started[0].scheduler.submit(GenerationSpec(intents=("card_arrival",), num_records=1))


def test_a_request_over_max_request_bytes_gets_invalid_argument_even_past_4_mib(fake_bundle_dir):
    """--max-request-bytes at 4 MiB: a slightly bigger request reaches validation, which says
    which flag limits it (gRPC's own 4 MiB limit would answer RESOURCE_EXHAUSTED, retried)."""
    from condgen.server.app import ServeConfig
    from condgen.server.limits import Limits
    from condgen.v1 import generator_pb2 as pb
    from condgen.v1 import generator_pb2_grpc as pb_grpc

    limits = Limits(max_request_bytes=4 * 1024 * 1024, max_examples_per_intent=10_000)
    config = ServeConfig(bundle=fake_bundle_dir, port=0, grace_seconds=2.0, limits=limits)
    texts = ["x" * 900] * 4700  # 4.2 MB
    request = pb.GenerateRequest(
        intents=["card_arrival"], num_records=1, examples=[pb.IntentExamples(intent="card_arrival", texts=texts)]
    )
    with (
        LocalServer(config, timeout=60, engine=FakeEngine(read_manifest(fake_bundle_dir))) as server,
        grpc.insecure_channel(server.target) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        list(pb_grpc.GeneratorStub(channel).Generate(request, timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-request-bytes" in refused.value.details()


def test_the_bundle_generate_block_fills_the_fields_a_request_leaves_unset(fake_bundle_dir, tmp_path):
    """Gretel's `generate` block, in the manifest: GetModelInfo shows it, a request without
    num_records gets the bundle's count, and so does `condgen generate` without --num-records."""
    import shutil

    import pandas as pd

    from condgen.cli import main
    from condgen.server.app import ServeConfig
    from condgen.v1 import generator_pb2 as pb
    from condgen.v1 import generator_pb2_grpc as pb_grpc

    bundle = tmp_path / "bundle"
    shutil.copytree(fake_bundle_dir, bundle)
    manifest_path = bundle / "condgen.json"
    raw = json.loads(manifest_path.read_text())
    raw["generate_defaults"] = {"num_records": 2, "temperature": 0.7, "top_k": 5, "maximum_text_length": 40}
    manifest_path.write_text(json.dumps(raw))
    config = ServeConfig(bundle=bundle, port=0, grace_seconds=2.0)
    with LocalServer(config, timeout=60, engine=FakeEngine(read_manifest(bundle))) as server:
        limits = json.loads(server.model_info().limits_json)
        defaults = limits["defaults"]
        assert (defaults["num_records"], defaults["temperature"], defaults["top_k"]) == (2, 0.7, 5)
        assert defaults["max_new_tokens"] == 40 and limits["bundle_generate_defaults"]["num_records"] == 2
        request = pb.GenerateRequest(intents=["card_arrival"], sampling=pb.SamplingParams(seed=1))
        with grpc.insecure_channel(server.target) as channel:
            responses = list(pb_grpc.GeneratorStub(channel).Generate(request, timeout=30))
        assert sum(r.HasField("record") for r in responses) == 2
        out = tmp_path / "rows.csv"
        assert main(["generate", "--target", server.target, "--intent", "exchange_rate", "--output", str(out)]) == 0
        assert len(pd.read_csv(out)) == 2


def test_a_dp_bundle_states_its_privacy_in_model_info_and_at_start(fake_bundle_dir, tmp_path, caplog):
    """The manifest's `privacy` block (a DP fine-tune) is shown by GetModelInfo and logged when
    serving starts; a bundle without it shows nothing."""
    import logging
    import shutil

    from condgen.server.app import ServeConfig

    bundle = tmp_path / "bundle"
    shutil.copytree(fake_bundle_dir, bundle)
    manifest_path = bundle / "condgen.json"
    raw = json.loads(manifest_path.read_text())
    assert "privacy" not in raw
    privacy = {"epsilon": 7.98, "delta": 1.6e-5, "noise_multiplier": 0.5, "max_grad_norm": 1.0, "unit": "row"}
    raw["privacy"] = privacy
    manifest_path.write_text(json.dumps(raw))
    config = ServeConfig(bundle=bundle, port=0, grace_seconds=2.0)
    engine = FakeEngine(read_manifest(bundle))
    with caplog.at_level(logging.INFO, logger="condgen.server.app"), LocalServer(config, 60, engine=engine) as server:
        assert json.loads(server.model_info().privacy_json) == privacy
    assert "differential privacy: epsilon 7.98 at delta 1.6e-05 per row" in caplog.text
    plain = ServeConfig(bundle=fake_bundle_dir, port=0, grace_seconds=2.0)
    with LocalServer(plain, timeout=60, engine=FakeEngine(read_manifest(fake_bundle_dir))) as server:
        assert server.model_info().privacy_json == ""
