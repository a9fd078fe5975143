"""Metrics, request ids and request log lines, against a real server."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request

import grpc
import pytest
from conftest import TEST_INTENTS, ServerThread, serve_config
from prometheus_client.parser import text_string_to_metric_families

from condgen.bench.load import ServerProcess
from condgen.client import Client, RetryPolicy
from condgen.client.client import GenerateError
from condgen.logs import JsonFormatter, TextFormatter
from condgen.server.security import SecurityConfig


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metered_server(bundle):
    thread = ServerThread(serve_config(bundle, metrics_port=0)).start()
    yield thread
    thread.stop()


def test_metrics_move_after_a_request(metered_server):
    port = metered_server.running.metrics_port
    before = scrape(port)
    with Client(metered_server.target, timeout=120) as client:
        frame, summary = client.generate_df([TEST_INTENTS[0]], 4, seed=3, return_summary=True)
    after = scrape(port)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert len(frame) == 4
    assert moved("condgen_requests_total", method="Generate", code="OK") == 1
    assert moved("condgen_records_accepted_total") == 4
    assert moved("condgen_generated_tokens_total") == summary.tokens_generated > 0
    assert moved("condgen_lines_parsed_total") == summary.lines_parsed
    reasons = [field.name for field in summary.rejected.DESCRIPTOR.fields]
    for reason in reasons:
        assert moved("condgen_records_rejected_total", reason=reason) == getattr(summary.rejected, reason), reason
    assert moved("condgen_time_to_first_record_seconds_count") == 1
    assert moved("condgen_record_latency_seconds_count") == 3
    assert moved("condgen_engine_step_seconds_count", phase="decode") > 0
    assert moved("condgen_engine_step_seconds_count", phase="prefill") > 0  # a new server: no cached prompt
    assert moved("condgen_batch_size_count") == moved("condgen_engine_step_seconds_count", phase="decode")
    assert moved("condgen_request_duration_seconds_count", method="Generate") == 1
    assert value(after, "condgen_active_requests") == 0
    assert value(after, "condgen_queue_depth") == 0
    assert value(after, "condgen_running_sequences") == 0


def test_refused_calls_are_counted_by_code(metered_server):
    port = metered_server.running.metrics_port
    before = scrape(port)
    with Client(metered_server.target, timeout=60) as client, pytest.raises(GenerateError) as refused:
        list(client.generate(["no_such_intent"], 2, request_id="bad-intent-7"))
    after = scrape(port)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.request_id == "bad-intent-7"
    assert (
        value(after, "condgen_requests_total", method="Generate", code="INVALID_ARGUMENT")
        - value(before, "condgen_requests_total", method="Generate", code="INVALID_ARGUMENT")
        == 1
    )


def test_expired_deadlines_are_counted_as_such(metered_server):
    port = metered_server.running.metrics_port
    before = scrape(port)
    with (
        Client(metered_server.target, timeout=0.05, retry=RetryPolicy(max_attempts=0)) as client,
        pytest.raises(GenerateError) as expired,
    ):
        list(client.generate(list(TEST_INTENTS), 200, seed=8))
    assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    def counted():
        return value(scrape(port), "condgen_requests_total", method="Generate", code="DEADLINE_EXCEEDED") - value(
            before, "condgen_requests_total", method="Generate", code="DEADLINE_EXCEEDED"
        )

    for _ in range(50):  # the server notices the expiry on its own schedule
        if counted():
            break
        time.sleep(0.1)
    assert counted() == 1
    assert value(scrape(port), "condgen_requests_total", method="Generate", code="CANCELLED") == value(
        before, "condgen_requests_total", method="Generate", code="CANCELLED"
    )


def test_calls_refused_by_the_token_check_are_counted(bundle):
    thread = ServerThread(serve_config(bundle, metrics_port=0, security=SecurityConfig(auth_token="s3cret"))).start()
    try:
        with (
            Client(thread.target, timeout=30, retry=RetryPolicy(max_attempts=0)) as client,
            pytest.raises(GenerateError) as refused,
        ):
            list(client.generate([TEST_INTENTS[0]], 1, request_id="no-token-1"))
        samples = scrape(thread.running.metrics_port)
    finally:
        thread.stop()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and refused.value.request_id == "no-token-1"
    assert value(samples, "condgen_requests_total", method="Generate", code="UNAUTHENTICATED") == 1


def test_request_id_is_honoured_echoed_and_logged(metered_server, caplog):
    caplog.set_level(logging.INFO, logger="condgen.requests")
    with Client(metered_server.target, timeout=120) as client:
        records = list(client.generate([TEST_INTENTS[1]], 2, seed=5, request_id="job-42.a"))
        assert client.last_request_id == "job-42.a"
        list(client.generate([TEST_INTENTS[1]], 1, seed=6))
        generated_id = client.last_request_id
        client.list_intents()
    assert len(records) == 2
    assert generated_id and generated_id != "job-42.a"
    lines = {r.fields["request_id"]: r.fields for r in caplog.records if r.name == "condgen.requests"}
    line = lines["job-42.a"]
    assert line["status"] == "OK" and line["method"] == "Generate"
    assert line["intents"] == [TEST_INTENTS[1]] and line["records_sent"] == 2 and line["tokens"] > 0
    assert line["duration_s"] > 0
    assert lines[generated_id]["records_sent"] == 1
    assert any(f["method"] == "ListIntents" and f["status"] == "OK" for f in lines.values())


def test_a_malformed_request_id_is_replaced(metered_server):
    with Client(metered_server.target, timeout=60) as client:
        list(client.generate([TEST_INTENTS[0]], 1, seed=1, request_id="bad id with spaces; rm -rf"))
        assert client.last_request_id and " " not in client.last_request_id


def _log_record(**fields) -> logging.LogRecord:
    record = logging.LogRecord("condgen.requests", logging.INFO, __file__, 1, "done %s", ("x",), None)
    record.fields = fields
    return record


def test_formatters_carry_the_fields():
    entry = json.loads(JsonFormatter().format(_log_record(request_id="r1", intents=["a", "b"], status="OK")))
    assert entry["message"] == "done x" and entry["level"] == "INFO" and entry["logger"] == "condgen.requests"
    assert entry["request_id"] == "r1" and entry["intents"] == ["a", "b"] and entry["time"].endswith("+00:00")
    text = TextFormatter().format(_log_record(request_id="r1", records_sent=3))
    assert text.endswith('done x request_id="r1" records_sent=3')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_cli_json_logs_and_metrics_port(bundle):
    """`condgen serve --log-format json --metrics-port N` as an operator runs it."""
    metrics_port = _free_port()
    server = ServerProcess(bundle, "--log-format", "json", "--metrics-port", str(metrics_port))
    try:
        with Client(server.target, timeout=120) as client:
            list(client.generate([TEST_INTENTS[2]], 2, seed=2, request_id="cli-run-1"))
        samples = scrape(metrics_port)
        log_text = server.log_text()
    finally:
        server.stop()
    assert value(samples, "condgen_requests_total", method="Generate", code="OK") == 1
    lines = [line for line in log_text.splitlines() if line.strip()]
    assert not [line for line in lines if " INFO condgen" in line]  # no log line in the text format
    entries = [json.loads(line) for line in lines if line.startswith("{")]  # gRPC core may print its own lines
    done = [e for e in entries if e.get("request_id") == "cli-run-1"]
    assert len(done) == 1 and done[0]["status"] == "OK" and done[0]["records_sent"] == 2
    assert done[0]["intents"] == [TEST_INTENTS[2]]
