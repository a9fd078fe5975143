"""The OpenVINO runtime: export, the paged engine against ONNX Runtime's, the cache moves on
its block pool, the runtime choice, and a live server running on it.

The export needs optimum-intel, which lives in its own environment (`make .venv-openvino/.installed`;
`.ci/run` builds it and sets CONDGEN_REQUIRE_OPENVINO=1, so there these tests fail instead of
skipping when it is missing). The tiny model's graph is real; so is OpenVINO's CPU plugin.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

from condgen.bundle import read_manifest
from condgen.server.engine import Engine, EngineConfig, EngineError

AMX_CPU = "processor: 0\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16 amx_int8\n"
BF16_CPU = "processor: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
PLAIN_CPU = "processor: 0\nflags\t\t: fpu sse avx2 avx512f\n"


def _openvino_ready() -> bool:
    from condgen.server.runtime import openvino_available
    from condgen.training.export import ExportError
    from condgen.training.export_openvino import converter_python

    try:
        converter_python()
    except ExportError:
        return False
    return openvino_available()


needs_openvino = pytest.mark.skipif(
    not _openvino_ready() and not os.environ.get("CONDGEN_REQUIRE_OPENVINO"),
    reason="optimum-intel's environment (make .venv-openvino/.installed) or the openvino package is missing",
)


@pytest.fixture(scope="module")
def ov_bundle(workdir, checkpoint) -> Path:
    from condgen.training.export import export_bundle

    return export_bundle(checkpoint, workdir / "bundle-openvino", runtime="openvino").bundle_dir


@pytest.fixture(scope="module")
def engines(ov_bundle):
    """(ONNX Runtime fp32, OpenVINO f32, OpenVINO at the CPU's default precision) on one bundle."""
    from condgen.server.openvino_engine import OpenVINOEngine

    manifest = read_manifest(ov_bundle)
    return (
        Engine(ov_bundle, manifest),
        OpenVINOEngine(ov_bundle, manifest, EngineConfig(runtime="openvino", openvino_precision="f32")),
        OpenVINOEngine(ov_bundle, manifest, EngineConfig(runtime="openvino")),
    )


def _prompt(engine, text: str) -> list[int]:
    return engine.encode(text)


def _greedy(engine, batch, first_logits, count: int) -> list[list[int]]:
    """Greedy tokens of every row of `batch` (whose last logits are `first_logits`)."""
    chosen = np.asarray(first_logits).argmax(-1)
    out = [[int(t)] for t in chosen]
    while len(out[0]) < count:
        batch.set_next([row[-1] for row in out])
        chosen = engine.forward(batch).argmax(-1)
        for row, token in zip(out, chosen):
            row.append(int(token))
    return out


# ---- the runtime choice (no graph needed) ------------------------------------------------------
def _manifest(with_graph: bool):
    from types import SimpleNamespace

    return SimpleNamespace(openvino={"file": "openvino/openvino_model.xml"} if with_graph else None)


@pytest.mark.fast
@pytest.mark.parametrize(
    "cpuinfo, graph, cuda, installed, expected",
    [
        (AMX_CPU, True, False, True, "openvino"),
        (BF16_CPU, True, False, True, "openvino"),
        (PLAIN_CPU, True, False, True, "onnxruntime"),
        (AMX_CPU, False, False, True, "onnxruntime"),
        (AMX_CPU, True, True, True, "onnxruntime"),
        (AMX_CPU, True, False, False, "onnxruntime"),
    ],
)
def test_auto_takes_openvino_only_on_bf16_cpus_with_a_graph_and_no_gpu(cpuinfo, graph, cuda, installed, expected):
    from condgen.server.runtime import choose_runtime

    runtime, why = choose_runtime("auto", _manifest(graph), cuda, cpuinfo, installed)
    assert runtime == expected and why


@pytest.mark.fast
def test_forcing_a_runtime_the_bundle_or_the_machine_lacks_is_refused_with_the_fix():
    from condgen.server.runtime import choose_runtime

    with pytest.raises(EngineError, match="condgen export --runtime openvino"):
        choose_runtime("openvino", _manifest(False), False, AMX_CPU, True)
    with pytest.raises(EngineError, match="condgen\\[openvino\\]"):
        choose_runtime("openvino", _manifest(True), False, AMX_CPU, False)
    assert choose_runtime("onnxruntime", _manifest(True), False, AMX_CPU, True)[0] == "onnxruntime"
    with pytest.raises(EngineError, match="runtime 'tensorrt'"):
        EngineConfig(runtime="tensorrt")


def test_serve_refuses_openvino_for_a_bundle_without_its_graph(bundle, capsys):
    from condgen.cli import main

    assert main(["serve", "--bundle", str(bundle), "--port", "0", "--runtime", "openvino"]) == 2
    err = capsys.readouterr().err
    assert "condgen export --runtime openvino" in err and "Traceback" not in err


# ---- export and parity ---------------------------------------------------------------------------
@needs_openvino
def test_export_adds_an_openvino_graph_checked_against_pytorch(ov_bundle):
    manifest = read_manifest(ov_bundle)  # verifies every file's checksum, the new ones too
    info = manifest.openvino
    assert (ov_bundle / info["file"]).is_file() and (ov_bundle / "openvino" / "openvino_model.bin").is_file()
    assert "openvino/openvino_model.bin" in manifest.files
    assert info["parity_max_abs_diff_f32"] <= info["parity_tolerance"]
    assert info["parity_top1_agreement_f32"] == 1.0
    assert info["parity_top1_agreement"] >= 0.9 and 0.0 <= info["parity_greedy_match"] <= 1.0
    assert (ov_bundle / "model.onnx").is_file()  # the ONNX graph stays: the bundle carries both


@needs_openvino
def test_the_openvino_engine_matches_onnx_runtime(engines):
    ort_engine, ov_f32, ov_default = engines
    text = "card_arrival,when will my card arrive\ncard_arrival,"
    ids = _prompt(ort_engine, text)
    expected = ort_engine.position_logits(ids)
    assert np.abs(ov_f32.position_logits(ids) - expected).max() < 1e-3
    assert (ov_default.position_logits(ids).argmax(-1) == expected.argmax(-1)).mean() >= 0.9
    prompts = [ids, _prompt(ort_engine, "exchange_rate,"), _prompt(ort_engine, "lost_or_stolen_card,i lost")]
    ours = []
    for engine in (ort_engine, ov_f32):
        results = engine.prefill([0, 1, 2], prompts)
        ours.append([_greedy(engine, batch, logits[None], 12)[0] for batch, logits in results])
    assert ours[0] == ours[1]
    contexts = [ids, ids, _prompt(ort_engine, "card_arrival,")]
    continuations = [_prompt(ort_engine, t) for t in ("where is my card\n", "what rate\n", "hello\n")]
    np.testing.assert_allclose(
        ov_f32.score(contexts, continuations), ort_engine.score(contexts, continuations), atol=1e-3
    )


@needs_openvino
def test_cache_moves_on_the_block_pool_keep_every_rows_tokens_and_return_their_blocks(engines):
    from condgen.server.paged_batch import PagedBatch

    _, engine, _ = engines
    gc.collect()
    used_before = engine.pool.used
    prompts = [
        _prompt(engine, "card_arrival,when will my card arrive\ncard_arrival,"),
        _prompt(engine, "exchange_rate,"),
        _prompt(engine, "lost_or_stolen_card,i lost my card\nlost_or_stolen_card,"),
        _prompt(engine, "card_arrival,"),
    ]
    plain_batch = engine.prompts_batch([0, 1, 2, 3], prompts)
    plain = _greedy(engine, plain_batch, engine.forward(plain_batch), 40)  # crosses a 32-token block
    del plain_batch
    # rows 0-2 decode; row 1 leaves; row 3, prefilled alone, joins; row 0 forks twice
    batch = engine.prompts_batch([0, 1, 2], prompts[:3])
    tokens = {s: [int(t)] for s, t in zip([0, 1, 2], engine.forward(batch).argmax(-1))}
    batch = batch.filter([0, 2], consume=True)
    (newcomer, logits), *_ = engine.prefill([3], [prompts[3]])
    tokens[3] = [int(logits.argmax())]
    single = batch.filter([0])
    forked = single.fork([10, 11])
    del single
    tokens[10], tokens[11] = list(tokens[0]), list(tokens[0])
    batch = PagedBatch.concatenate([batch, newcomer, forked], consume=True)
    for _ in range(39):
        batch.set_next([tokens[s][-1] for s in batch.seq_ids])
        for seq, token in zip(batch.seq_ids, engine.forward(batch).argmax(-1)):
            tokens[seq].append(int(token))
    assert [tokens[s] for s in (0, 2, 3, 10, 11)] == [plain[0], plain[2], plain[3], plain[0], plain[0]]
    assert engine.pool.used > used_before
    del batch, newcomer, forked
    gc.collect()
    assert engine.pool.used == used_before


@needs_openvino
def test_a_shared_partial_block_is_copied_before_a_row_writes_into_it(engines):
    _, engine, _ = engines
    prompt = _prompt(engine, "card_arrival,")  # fewer than 32 tokens: one partly filled block
    (parent, logits), *_ = engine.prefill([0], [prompt])
    frozen = parent.frozen()  # what the prefix cache keeps
    children = parent.fork([1, 2])
    assert children.tables[0][-1] == frozen.tables[0][-1]  # shared until written
    children.set_next_rows([[int(logits.argmax())], [5]])  # the two rows go different ways
    engine.forward(children)
    assert len({children.tables[0][-1], children.tables[1][-1], frozen.tables[0][-1]}) == 3
    again = frozen.renamed(7)
    again.set_next([int(logits.argmax())])
    expected = engine.prompts_batch([9], [prompt + [int(logits.argmax())]])
    np.testing.assert_allclose(engine.forward(again), engine.forward(expected), atol=1e-4)


@needs_openvino
def test_the_pool_grows_when_its_blocks_run_out(ov_bundle):
    from condgen.server.openvino_engine import OpenVINOEngine

    manifest = read_manifest(ov_bundle)
    config = EngineConfig(runtime="openvino", openvino_precision="f32")
    small = OpenVINOEngine(ov_bundle, manifest, config, initial_blocks=2)
    large = OpenVINOEngine(ov_bundle, manifest, config)
    prompts = [_prompt(small, "card_arrival,when will my card arrive\ncard_arrival,where is it\ncard_arrival,")] * 3
    results = []
    for engine in (small, large):
        batch = engine.prompts_batch([0, 1, 2], prompts)
        results.append(_greedy(engine, batch, engine.forward(batch), 30))
    assert small.pool.size > 2 and results[0] == results[1]


# ---- serving --------------------------------------------------------------------------------------
@needs_openvino
def test_a_live_server_runs_on_openvino_with_the_label_check(ov_bundle):
    from conftest import ServerThread, serve_config

    from condgen.client import Client

    config = serve_config(ov_bundle, engine=EngineConfig(runtime="openvino"))
    thread = ServerThread(config).start()
    try:
        with Client(thread.target, timeout=120) as client:
            info = client.model_info()
            assert info.runtime == "openvino" and info.device.startswith("OpenVINO CPU")
            assert '"parity_greedy_match"' in info.openvino_json
            frame = client.generate_df(["card_arrival", "exchange_rate"], 6, seed=3, label_check=True)
        assert len(frame) == 12 and set(frame["intent"]) == {"card_arrival", "exchange_rate"}
        assert frame["text"].str.len().min() > 0
    finally:
        thread.stop()


@pytest.mark.fast
def test_export_without_optimum_intel_says_how_to_get_it_before_exporting(tmp_path, monkeypatch, capsys):
    from condgen.cli import main

    monkeypatch.setenv("CONDGEN_OPENVINO_PYTHON", str(tmp_path / "no-such-python"))
    code = main(["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "b"), "--runtime", "openvino"])
    err = capsys.readouterr().err
    assert code == 2 and "make .venv-openvino/.installed" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()  # nothing exported
