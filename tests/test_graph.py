"""The export's graph rewrites (condgen.training.graph): applied to the tiny Llama (4 query
heads, 2 KV heads), they keep PyTorch's logits and change the graph the way they claim."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from condgen.bundle import read_manifest
from condgen.training.graph import GROUPED_QUERY_ATTENTION, LAST_POSITION_LOGITS, optimise_graph


def run_prefill(model_path, info, ids: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None].repeat(ids.shape[0], 0)}
    feed.update({n: np.zeros((ids.shape[0], info.num_kv_heads, 0, info.head_dim), np.float32)
                 for n in info.past_key_names})
    return session.run(None, {k: v for k, v in feed.items() if k in info.inputs})


@pytest.fixture(scope="module")
def plain_graph(workdir, checkpoint):
    """The tiny checkpoint exported by optimum, without condgen's rewrites."""
    from optimum.exporters.onnx import main_export

    folder = workdir / "plain-onnx"
    if not (folder / "model.onnx").is_file():
        main_export(str(checkpoint), output=str(folder), task="text-generation-with-past", device="cpu",
                    do_validation=False)
    return folder / "model.onnx"


def test_export_applies_both_rewrites_and_keeps_the_cache_unrepeated(bundle):
    info = read_manifest(bundle).onnx
    assert info.rewrites == [LAST_POSITION_LOGITS, GROUPED_QUERY_ATTENTION]
    graph = onnx.load(str(bundle / "model.onnx")).graph
    presents = set(info.present_key_names)
    readers = [n for n in graph.node if presents & set(n.input)]
    assert {n.op_type for n in readers} <= {"Transpose", "MatMul", "Shape"}, "the KV cache is still repeated"
    logits = next(o for o in graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1


def test_rewritten_graph_gives_the_plain_graphs_last_logits_and_cache(tmp_path, bundle, plain_graph):
    info = read_manifest(bundle).onnx
    rewritten = tmp_path / "model.onnx"
    shutil.copy(plain_graph, rewritten)
    applied = optimise_graph(rewritten, heads=4, kv_heads=2, head_dim=info.head_dim, layers=info.num_layers)
    assert applied == [LAST_POSITION_LOGITS, GROUPED_QUERY_ATTENTION]
    ids = np.random.default_rng(0).integers(5, 300, size=(3, 17)).astype(np.int64)
    plain, new = run_prefill(plain_graph, info, ids), run_prefill(rewritten, info, ids)
    assert new[0].shape == (3, 1, plain[0].shape[-1])
    np.testing.assert_allclose(new[0][:, 0], plain[0][:, -1], atol=1e-5)
    for before, after in zip(plain[1:], new[1:]):  # present.* unchanged
        np.testing.assert_allclose(after, before, atol=1e-6)


def test_a_graph_without_grouped_heads_keeps_its_attention(tmp_path, bundle, plain_graph):
    info = read_manifest(bundle).onnx
    rewritten = tmp_path / "model.onnx"
    shutil.copy(plain_graph, rewritten)
    # Told the heads are not grouped (as for GPT-2): only the logits are sliced.
    assert optimise_graph(rewritten, heads=2, kv_heads=2, head_dim=info.head_dim,
                          layers=info.num_layers) == [LAST_POSITION_LOGITS]
    presents = set(info.present_key_names)
    assert "Unsqueeze" in {n.op_type for n in onnx.load(str(rewritten)).graph.node if presents & set(n.input)}


def test_a_graph_of_another_shape_is_left_whole(tmp_path, bundle, plain_graph):
    info = read_manifest(bundle).onnx
    rewritten = tmp_path / "model.onnx"
    shutil.copy(plain_graph, rewritten)
    before = len(onnx.load(str(rewritten)).graph.node)
    # One layer more than the graph has: the last one cannot match, so no layer is rewritten.
    assert optimise_graph(rewritten, heads=4, kv_heads=2, head_dim=info.head_dim,
                          layers=info.num_layers + 1) == [LAST_POSITION_LOGITS]
    assert len(onnx.load(str(rewritten)).graph.node) == before + 1  # the Slice only
