"""The real gRPC server and Python client over the fake engine: the serving path end to end
in seconds (`make test-fast`); tests/test_rpc.py runs the same path over a real model."""

from __future__ import annotations

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
