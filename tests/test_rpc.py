"""The real gRPC server on a loopback port, driven through the client."""

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from condgen.bundle import read_manifest
from condgen.client import AsyncClient, GenerateError
from condgen.v1 import generator_pb2 as pb
from condgen.v1 import generator_pb2_grpc as pb_grpc

# The overfit model knows few lines: let the tests share them (no cross-request dedup).
SETTINGS = dict(
    seed=3,
    temperature=1.0,
    max_new_tokens=48,
    num_prompt_examples=4,
    allow_training_copies=True,
    avoid_recent_duplicates=False,
)


def training_texts(bundle):
    import json as _json

    examples = _json.loads((bundle / "examples.json").read_text())
    return {t for texts in examples.values() for t in texts}


def test_generate_streams_real_records_for_two_intents(client, bundle):
    intents = ["card_arrival", "exchange_rate"]
    records = list(client.generate(intents, 4, **SETTINGS))
    summary = client.last_summary
    assert sorted(r.intent for r in records) == sorted(intents * 4)
    for intent in intents:
        assert sorted(r.index for r in records if r.intent == intent) == [0, 1, 2, 3]
    assert all(r.text.strip() for r in records)
    # The overfit model writes real lines: some records are verbatim training texts.
    assert any(r.text in training_texts(bundle) for r in records)
    assert summary.records_accepted == 8 and summary.complete
    assert summary.lines_parsed >= 8 and summary.tokens_generated > 0 and summary.rounds >= 2


def test_generate_df_has_the_columns_and_counts(client):
    frame, summary = client.generate_df(["lost_or_stolen_card", "card_arrival"], 3, return_summary=True, **SETTINGS)
    assert list(frame.columns) == ["intent", "text"]
    assert frame["intent"].value_counts().to_dict() == {"lost_or_stolen_card": 3, "card_arrival": 3}
    assert summary.records_accepted == 6


def test_the_same_seed_gives_the_same_records(client):
    first = list(client.generate(["exchange_rate"], 3, **SETTINGS))
    second = list(client.generate(["exchange_rate"], 3, **SETTINGS))
    assert first == second


def test_training_copies_are_rejected_by_default(client, bundle):
    settings = {**SETTINGS, "allow_training_copies": False, "seed": 11, "max_rounds": 6}
    records = list(client.generate(["card_arrival"], 2, **settings))
    assert not {r.text for r in records} & training_texts(bundle)
    assert client.last_summary.rejected.training_copy > 0  # the overfit model mostly recites


def test_recent_duplicates_are_rejected_across_requests(client):
    settings = {**SETTINGS, "avoid_recent_duplicates": True, "seed": 21, "max_rounds": 8}
    first = {r.text for r in client.generate(["lost_or_stolen_card"], 2, **settings)}
    second = {r.text for r in client.generate(["lost_or_stolen_card"], 2, **settings)}
    assert not first & second
    assert client.last_summary.rejected.duplicate > 0  # the same seed proposed the same lines again


def test_records_carry_fidelity_and_min_fidelity_filters(client):
    records = list(client.generate(["exchange_rate", "card_arrival"], 3, **SETTINGS))
    assert all(0.0 <= r.fidelity <= 1.0 and r.predicted_intent for r in records)
    strict = list(client.generate(["exchange_rate"], 2, min_fidelity=0.5, **{**SETTINGS, "seed": 5}))
    assert all(r.fidelity >= 0.5 for r in strict)
    frame = client.generate_df(["card_arrival"], 2, with_scores=True, **SETTINGS)
    assert list(frame.columns) == ["intent", "text", "fidelity", "predicted_intent", "label_margin"]


def test_health_reports_serving(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "condgen.v1.Generator"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_list_intents_matches_the_bundle(client, bundle):
    assert client.list_intents() == read_manifest(bundle).intents


def test_model_info(client, bundle):
    info = client.model_info()
    assert info.device == "CPUExecutionProvider"
    assert info.num_intents == 3 and info.format_version == 2
    assert json.loads(info.onnx_json)["parity_max_abs_diff"] < 1e-3
    assert json.loads(info.training_config_json)["steps"] == 250
    assert json.loads(info.limits_json)["max_batch_size"] == 32
    assert json.loads(info.limits_json)["label_check"]["rivals"] == 3
    assert json.loads(info.scheduler_json)["running_sequences"] == 0


def test_unknown_intent_gets_invalid_argument_with_close_matches(client):
    with pytest.raises(GenerateError) as info:
        list(client.generate(["card_arival"], 1))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "card_arrival" in info.value.details


@pytest.mark.parametrize(
    "request_kwargs, field",
    [
        (dict(intents=["card_arrival"], num_records=0), "num_records"),
        (dict(intents=[], num_records=1), "intents"),
        (dict(intents=["card_arrival", "card_arrival"], num_records=1), "twice"),
        (dict(intents=["card_arrival"], num_records=1, sampling=pb.SamplingParams(temperature=9.0)), "temperature"),
        (dict(intents=["card_arrival"], num_records=1, sampling=pb.SamplingParams(top_p=0.0)), "top_p"),
        (
            dict(intents=["card_arrival"], num_records=1, sampling=pb.SamplingParams(max_new_tokens=100000)),
            "max_new_tokens",
        ),
        (dict(intents=["card_arrival"], num_records=1, sequences_per_round=0), "sequences_per_round"),
        (dict(intents=["card_arrival"], num_records=1, min_fidelity=1.5), "min_fidelity"),
    ],
)
def test_bad_values_get_invalid_argument_naming_the_field(server, request_kwargs, field):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(**request_kwargs), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_server_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "condgen.v1.Generator" in names


def test_async_client_and_concurrent_requests_share_the_server(server):
    async def run():
        async with AsyncClient(server.target, timeout=120) as client:
            frames = await asyncio.gather(
                *[
                    client.generate_df([intent], 2, **SETTINGS)
                    for intent in ("card_arrival", "exchange_rate", "lost_or_stolen_card")
                ]
            )
            intents = await client.list_intents()
        return frames, intents

    frames, intents = asyncio.run(run())
    assert [len(f) for f in frames] == [2, 2, 2]
    assert len(intents) == 3


def test_cancelled_stream_leaves_nothing_running(server, client):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        call = stub.Generate(
            pb.GenerateRequest(intents=["card_arrival"], num_records=500, sampling=pb.SamplingParams(seed=1)),
            timeout=60,
        )
        next(call)
        call.cancel()
    for _ in range(100):
        state = json.loads(client.model_info().scheduler_json)
        if state["running_sequences"] == 0 and state["active_requests"] == 0:
            break
        import time

        time.sleep(0.05)
    assert state == {**state, "running_sequences": 0, "active_requests": 0}
