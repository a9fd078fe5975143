"""Interoperability: a client in another language, and the .proto as the served contract.

The Node.js example (client/examples/node) loads protos/ at run time and streams records
from the real server; its requests must mean what the Python client's mean. The server's
reflection must serve exactly the descriptor that protos/ compiles to today.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import pytest
from conftest import ROOT, ServerThread, serve_config
from google.protobuf import descriptor_pb2, text_format

NODE_DIR = ROOT / "client" / "examples" / "node"
NODE_SCRIPT = NODE_DIR / "generate.js"
NODE = shutil.which("node")
PROTOS = ROOT / "protos"
PROTO_FILE = "condgen/v1/generator.proto"
INTENTS = ["card_arrival", "exchange_rate"]
# As in test_rpc: the overfit model knows few lines, so let requests share them.
NODE_SETTINGS = [
    "--seed",
    "3",
    "--temperature",
    "1.0",
    "--max-new-tokens",
    "48",
    "--num-prompt-examples",
    "4",
    "--allow-training-copies",
    "--allow-recent-duplicates",
]
PY_SETTINGS = dict(
    seed=3,
    temperature=1.0,
    max_new_tokens=48,
    num_prompt_examples=4,
    allow_training_copies=True,
    avoid_recent_duplicates=False,
)

needs_node = pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
    reason="the Node example needs `node` on PATH and its packages: run `npm ci --prefix client/examples/node`",
)


def run_node(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # Run from outside the repository: the default protos/ path must not depend on the working directory.
    return subprocess.run(
        [NODE, str(NODE_SCRIPT), *args], check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT.parent
    )


def csv_rows(stdout: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(stdout, newline="")))


# --- the Node.js client ---------------------------------------------------------------------------------------


@needs_node
def test_node_client_streams_csv_records_for_each_intent(server):
    result = run_node(
        "--target",
        server.target,
        *[a for i in INTENTS for a in ("--intent", i)],
        "--num-records",
        "3",
        "--request-id",
        "interop-node-1",
        *NODE_SETTINGS,
    )
    assert result.returncode == 0, result.stderr
    rows = csv_rows(result.stdout)
    assert all(len(row) == 2 and row[0] in INTENTS and row[1].strip() for row in rows), rows
    assert Counter(row[0] for row in rows) == {intent: 3 for intent in INTENTS}
    assert re.search(r"^summary: 6 records accepted, \d+ lines parsed, .*, complete$", result.stderr, re.MULTILINE), (
        result.stderr
    )
    assert "records per intent: card_arrival=3 exchange_rate=3" in result.stderr


@needs_node
def test_node_and_python_clients_get_the_same_records_for_the_same_request(server, client):
    """Every setting the Node client sends (seed, sampling, flags) reaches the server as the Python one's do."""
    result = run_node(
        "--target",
        server.target,
        "--intent",
        "exchange_rate",
        "--intent",
        "lost_or_stolen_card",
        "--num-records",
        "3",
        "--header",
        *NODE_SETTINGS,
    )
    assert result.returncode == 0, result.stderr
    header, *rows = csv_rows(result.stdout)
    assert header == ["intent", "text"]
    from_node = defaultdict(list)
    for intent, text in rows:
        from_node[intent].append(text)
    from_python = defaultdict(list)
    for record in sorted(
        client.generate(["exchange_rate", "lost_or_stolen_card"], 3, **PY_SETTINGS), key=lambda r: (r.intent, r.index)
    ):
        from_python[record.intent].append(record.text)
    assert from_node == from_python


@needs_node
def test_node_client_sends_examples_of_a_new_intent_and_label_settings(server, client):
    """--example INTENT=TEXT and the label check flags reach the server as the Python client's do."""
    texts = ["Can I get a refund on my crypto purchase?", "I want my bitcoin money back", "Refund my ethereum"]
    result = run_node(
        "--target",
        server.target,
        "--intent",
        "crypto_refund",
        "--intent",
        "card_arrival",
        "--num-records",
        "2",
        *[a for t in texts for a in ("--example", f"crypto_refund={t}")],
        "--label-check",
        "--label-margin=-50",
        *NODE_SETTINGS,
    )
    assert result.returncode == 0, result.stderr
    from_node = sorted(tuple(row) for row in csv_rows(result.stdout))
    from_python = sorted(
        (r.intent, r.text)
        for r in client.generate(
            ["crypto_refund", "card_arrival"],
            2,
            examples={"crypto_refund": texts},
            label_check=True,
            label_margin=-50.0,
            **PY_SETTINGS,
        )
    )
    assert from_node == from_python and Counter(i for i, _ in from_node) == {"crypto_refund": 2, "card_arrival": 2}
    unlisted = run_node("--target", server.target, "--intent", "card_arrival", "--example", "other=a text")
    assert unlisted.returncode == 1 and "INVALID_ARGUMENT" in unlisted.stderr and "add it there" in unlisted.stderr
    assert run_node("--intent", "card_arrival", "--example", "no-equals-sign").returncode == 2


@needs_node
def test_node_client_reports_invalid_argument_for_an_unknown_intent(server):
    result = run_node("--target", server.target, "--intent", "card_arival", "--num-records", "1")
    assert result.returncode != 0
    assert "INVALID_ARGUMENT" in result.stderr and "card_arival" in result.stderr
    assert result.stdout == ""


@needs_node
def test_node_client_sends_the_bearer_token(bundle):
    from condgen.server.security import SecurityConfig

    guarded = ServerThread(serve_config(bundle, security=SecurityConfig(auth_token="s3cret"))).start()
    try:
        refused = run_node(
            "--target",
            guarded.target,
            "--intent",
            "card_arrival",
            "--num-records",
            "1",
            "--token",
            "wrong",
            *NODE_SETTINGS,
        )
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
        accepted = run_node(
            "--target",
            guarded.target,
            "--intent",
            "card_arrival",
            "--num-records",
            "1",
            "--token",
            "s3cret",
            *NODE_SETTINGS,
        )
        assert accepted.returncode == 0, accepted.stderr
        assert [row[0] for row in csv_rows(accepted.stdout)] == ["card_arrival"]
    finally:
        guarded.stop()


@needs_node
def test_node_csv_quoting_matches_pythons_csv_writer():
    texts = ["plain", "with, comma", 'say "hi"', "two\nlines", "", "trailing space ", "'single'"]
    script = (
        "const {csvLine} = require(process.argv[1]);"
        "const texts = JSON.parse(process.argv[2]);"
        "process.stdout.write(texts.map((t) => csvLine(['card_arrival', t])).join(''));"
    )
    result = subprocess.run(
        [NODE, "-e", script, str(NODE_SCRIPT), json.dumps(texts)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    expected = io.StringIO()
    csv.writer(expected, lineterminator="\n").writerows(["card_arrival", t] for t in texts)
    assert result.stdout == expected.getvalue()
    assert csv_rows(result.stdout) == [["card_arrival", t] for t in texts]


@needs_node
def test_node_client_usage_errors_exit_2(tmp_path):
    result = run_node("--num-records", "3")
    assert result.returncode == 2 and "--intent" in result.stderr
    result = run_node("--intent", "card_arrival", "--protos", str(tmp_path))
    assert result.returncode == 2 and "--protos" in result.stderr and str(tmp_path) in result.stderr


@needs_node
def test_node_client_takes_the_protos_folder_from_condgen_protos(server, tmp_path):
    shutil.copytree(PROTOS, tmp_path / "api")
    env = {**os.environ, "CONDGEN_PROTOS": str(tmp_path / "api"), "CONDGEN_TARGET": server.target}
    result = subprocess.run(
        [NODE, str(NODE_SCRIPT), "--intent", "exchange_rate", "--num-records", "2", *NODE_SETTINGS],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert [row[0] for row in csv_rows(result.stdout)] == ["exchange_rate", "exchange_rate"]


# --- the .proto is the contract ------------------------------------------------------------------------------


def compile_protos(protos: Path, out: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """protoc over every .proto under `protos` (imports included), by file name."""
    protoc = pytest.importorskip(
        "grpc_tools.protoc",
        reason="compiling protos/ needs grpcio-tools (pip install grpcio-tools, the build requirement of setup.py)",
    )
    well_known = Path(protoc.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    descriptor_set = out / "descriptors.pb"
    status = protoc.main(
        [
            "protoc",
            f"-I{protos}",
            f"-I{well_known}",
            "--include_imports",
            f"--descriptor_set_out={descriptor_set}",
            *files,
        ]
    )
    assert status == 0, f"protoc failed on {files}"
    compiled = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    return {f.name: f for f in compiled.file}


def served_file(target: str, symbol: str) -> tuple[list[str], dict[str, descriptor_pb2.FileDescriptorProto]]:
    """The services the server lists, and the files it serves for `symbol` (with dependencies)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol),
    ]
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed, files = list(stub.ServerReflectionInfo(iter(requests), timeout=30))
    assert not listed.HasField("error_response") and not files.HasField("error_response"), (listed, files)
    services = [s.name for s in listed.list_services_response.service]
    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in files.file_descriptor_response.file_descriptor_proto
    ]
    return services, {p.name: p for p in protos}


def _default_json_name(field_name: str) -> str:
    """protoc's lowerCamelCase of a field name (what json_name is when the .proto does not set it)."""
    out, upper_next = [], False
    for char in field_name:
        if char == "_":
            upper_next = True
        else:
            out.append(char.upper() if upper_next else char)
            upper_next = False
    return "".join(out)


def canonical(proto: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """`proto` without derived json_names: protoc writes them into descriptor sets, generated code
    embeds only those the .proto sets explicitly. Everything else is compared as is."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(proto.SerializeToString())

    def strip(fields):
        for field in fields:
            if field.json_name == _default_json_name(field.name):
                field.ClearField("json_name")

    def walk(messages):
        for message in messages:
            strip(message.field)
            strip(message.extension)
            walk(message.nested_type)

    walk(proto.message_type)
    strip(proto.extension)
    return proto


def differences(expected: descriptor_pb2.FileDescriptorProto, actual: descriptor_pb2.FileDescriptorProto) -> str:
    """'' when equal; otherwise a line diff of the two in text format."""
    import difflib

    expected, actual = canonical(expected), canonical(actual)
    if expected == actual:
        return ""

    def lines(p):
        return text_format.MessageToString(p).splitlines()

    return "\n".join(
        difflib.unified_diff(lines(expected), lines(actual), "compiled from protos/", "served", n=2, lineterm="")
    )


def test_served_descriptor_is_the_one_protos_compiles_to(server, tmp_path):
    compiled = compile_protos(PROTOS, tmp_path)
    services, served = served_file(server.target, "condgen.v1.Generator")
    assert "condgen.v1.Generator" in services and "grpc.health.v1.Health" in services
    assert PROTO_FILE in served, f"reflection served {sorted(served)}"
    diff = differences(compiled[PROTO_FILE], served[PROTO_FILE])
    assert not diff, f"the server serves a condgen.v1 API other than protos/ (stale stubs? rebuild):\n{diff}"
    # Spelled out as well, so that a failure names the part of the contract that moved.
    service = served[PROTO_FILE].service[0]
    assert service.name == "Generator"
    assert {m.name: (m.input_type, m.output_type, m.server_streaming) for m in service.method} == {
        "Generate": (".condgen.v1.GenerateRequest", ".condgen.v1.GenerateResponse", True),
        "ListIntents": (".condgen.v1.ListIntentsRequest", ".condgen.v1.ListIntentsResponse", False),
        "GetModelInfo": (".condgen.v1.GetModelInfoRequest", ".condgen.v1.ModelInfo", False),
    }
    for name, proto in served.items():  # dependencies, if the API ever imports any
        assert name in compiled and not differences(compiled[name], proto), name


def test_the_contract_check_catches_a_changed_proto(server, tmp_path):
    """The comparison above is not vacuous: a proto with one more field no longer matches what is served."""
    changed = tmp_path / "protos"
    shutil.copytree(PROTOS, changed)
    path = changed / PROTO_FILE
    source = path.read_text()
    anchor = "  string predicted_intent = 5;\n"
    assert anchor in source, "Record.predicted_intent moved: update this test"
    path.write_text(source.replace(anchor, anchor + "  string source_model = 7;\n"))
    compiled = compile_protos(changed, tmp_path)
    _, served = served_file(server.target, "condgen.v1.Record")
    diff = differences(compiled[PROTO_FILE], served[PROTO_FILE])
    assert "source_model" in diff


def test_reflection_descriptor_database_resolves_the_generate_method(server):
    """What grpcurl-like tools do: rebuild the API from reflection alone and find Generate's types."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("condgen.v1.Generator").methods_by_name["Generate"]
        request = method.input_type
        assert [f.name for f in request.fields][:3] == ["intents", "num_records", "sampling"]
        assert method.output_type.oneofs_by_name["item"].fields[0].message_type.full_name == "condgen.v1.Record"
