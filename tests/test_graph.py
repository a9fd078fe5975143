"""The export's graph rewrites (condgen.training.graph): applied to the tiny Llama (4 query
heads, 2 KV heads), they keep PyTorch's logits and change the graph the way they claim."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from condgen.bundle import read_manifest
from condgen.training.graph import (
    APPEND_ONLY_CACHE,
    FUSED_ROTARY_EMBEDDING,
    GROUPED_QUERY_ATTENTION,
    LAST_POSITION_LOGITS,
    LOGITS_WINDOW,
    SHARED_ATTENTION_BIAS,
    optimise_graph,
)

ALL = [
    LAST_POSITION_LOGITS,
    LOGITS_WINDOW,
    SHARED_ATTENTION_BIAS,
    GROUPED_QUERY_ATTENTION,
    APPEND_ONLY_CACHE,
    FUSED_ROTARY_EMBEDDING,
]
WHOLE_CACHE = [
    LAST_POSITION_LOGITS,
    LOGITS_WINDOW,
    SHARED_ATTENTION_BIAS,
    GROUPED_QUERY_ATTENTION,
    FUSED_ROTARY_EMBEDDING,
]
MAX_POSITIONS = 2048  # the tiny Llama's context
SLICED_ONLY = [LAST_POSITION_LOGITS, LOGITS_WINDOW, SHARED_ATTENTION_BIAS]


def run(model_path, info, ids: np.ndarray, mask: np.ndarray | None = None, past: dict | None = None):
    """One pass: `mask` covers past slots then `ids`; positions count the real tokens before."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    mask = np.ones_like(ids) if mask is None else mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1] :]
    past = past or {
        n: np.zeros((ids.shape[0], info.num_kv_heads, 0, info.head_dim), np.float32) for n in info.past_key_names
    }
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
    return session.run(None, {k: v for k, v in feed.items() if k in info.inputs})


def rewritten_copy(tmp_path, plain_graph, info, **options) -> tuple:
    path = tmp_path / "model.onnx"
    shutil.copy(plain_graph, path)
    options.setdefault("max_positions", MAX_POSITIONS)
    return path, optimise_graph(path, heads=4, kv_heads=2, head_dim=info.head_dim, layers=info.num_layers, **options)


@pytest.fixture(scope="module")
def plain_graph(workdir, checkpoint):
    """The tiny checkpoint exported by optimum, without condgen's rewrites."""
    from optimum.exporters.onnx import main_export

    folder = workdir / "plain-onnx"
    if not (folder / "model.onnx").is_file():
        main_export(
            str(checkpoint), output=str(folder), task="text-generation-with-past", device="cpu", do_validation=False
        )
    return folder / "model.onnx"


def test_export_applies_every_rewrite_and_never_copies_the_cache(append_bundle):
    bundle = append_bundle
    info = read_manifest(bundle).onnx
    assert info.rewrites == ALL
    graph = onnx.load(str(bundle / "model.onnx")).graph
    presents, pasts = set(info.present_key_names), set(info.past_key_names)
    assert {n.op_type for n in graph.node if presents & set(n.output)} == {"Identity"}  # new entries only
    readers = {n.op_type for n in graph.node if pasts & set(n.input)}
    assert readers <= {"Transpose", "MatMul", "Shape"}, "the cache is repeated or concatenated"
    logits = next(o for o in graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_param == "logits_positions"  # 1 unless a window is fed
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    assert run(bundle / "model.onnx", info, ids)[0].shape[1] == 1
    empty = {n: np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32) for n in info.past_key_names}
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None], **empty}
    window = session.run(["logits"], {**feed, "num_logits_to_keep": np.array([3])})[0]
    assert window.shape[1] == 3
    np.testing.assert_allclose(window[:, -1], run(bundle / "model.onnx", info, ids)[0][:, -1], atol=1e-5)


def test_whole_cache_export_repeats_nothing_but_concatenates(whole_cache_bundle):
    info = read_manifest(whole_cache_bundle).onnx
    assert info.rewrites == WHOLE_CACHE
    graph = onnx.load(str(whole_cache_bundle / "model.onnx")).graph
    presents = set(info.present_key_names)
    assert {n.op_type for n in graph.node if presents & set(n.output)} == {"Concat"}
    readers = [n for n in graph.node if presents & set(n.input)]
    assert {n.op_type for n in readers} <= {"Transpose", "MatMul", "Shape"}, "the KV cache is still repeated"


def test_append_only_graph_matches_the_plain_graph_with_spare_slots(tmp_path, append_bundle, plain_graph):
    info = read_manifest(append_bundle).onnx
    rewritten, applied = rewritten_copy(tmp_path, plain_graph, info)
    assert applied == ALL
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 300, size=(2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # row 1 left-padded
    plain, new = run(plain_graph, info, ids, mask), run(rewritten, info, ids, mask)
    np.testing.assert_allclose(new[0][:, 0], plain[0][:, -1], atol=1e-5)
    real = mask.astype(bool)  # entries at padding positions are masked everywhere: never read
    for before, after in zip(plain[1:], new[1:]):  # from an empty past: the new entries are the cache
        np.testing.assert_allclose(after.transpose(0, 2, 1, 3)[real], before.transpose(0, 2, 1, 3)[real], atol=1e-5)
    # A decode step: the plain graph gets the exact past; the rewritten one the same past with
    # 5 spare slots at its end (masked), and returns the step's entries only.
    step_ids = np.array([[7], [9]], dtype=np.int64)
    step_mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    exact = dict(zip(info.past_key_names, plain[1:]))
    spare = {
        n: np.concatenate([v, np.zeros(v.shape[:2] + (5, v.shape[3]), np.float32)], axis=2) for n, v in exact.items()
    }
    spare_mask = np.concatenate([mask, np.zeros((2, 5), dtype=np.int64), np.ones((2, 1), dtype=np.int64)], axis=1)
    plain_step, new_step = (
        run(plain_graph, info, step_ids, step_mask, exact),
        run(rewritten, info, step_ids, spare_mask, spare),
    )
    np.testing.assert_allclose(new_step[0][:, 0], plain_step[0][:, -1], atol=1e-5)
    for whole, appended in zip(plain_step[1:], new_step[1:]):
        assert appended.shape[2] == 1
        np.testing.assert_allclose(appended, whole[:, :, -1:], atol=1e-5)


def test_rewritten_graph_gives_the_plain_graphs_last_logits_and_cache(tmp_path, append_bundle, plain_graph):
    info = read_manifest(append_bundle).onnx
    rewritten, applied = rewritten_copy(tmp_path, plain_graph, info, append_only=False)
    assert applied == WHOLE_CACHE
    ids = np.random.default_rng(0).integers(5, 300, size=(3, 17)).astype(np.int64)
    plain, new = run(plain_graph, info, ids), run(rewritten, info, ids)
    assert new[0].shape == (3, 1, plain[0].shape[-1])
    np.testing.assert_allclose(new[0][:, 0], plain[0][:, -1], atol=1e-5)
    for before, after in zip(plain[1:], new[1:]):  # present.* unchanged (the fused rotation rounds its own way)
        np.testing.assert_allclose(after, before, atol=1e-5)


def test_a_graph_without_grouped_heads_keeps_its_attention(tmp_path, append_bundle, plain_graph):
    info = read_manifest(append_bundle).onnx
    rewritten = tmp_path / "model.onnx"
    shutil.copy(plain_graph, rewritten)
    # Told the heads are not grouped (as for GPT-2): only the logits are sliced.
    assert optimise_graph(rewritten, heads=2, kv_heads=2, head_dim=info.head_dim, layers=info.num_layers) == SLICED_ONLY
    presents = set(info.present_key_names)
    assert "Unsqueeze" in {n.op_type for n in onnx.load(str(rewritten)).graph.node if presents & set(n.input)}


def test_a_graph_of_another_shape_is_left_whole(tmp_path, append_bundle, plain_graph):
    info = read_manifest(append_bundle).onnx
    rewritten = tmp_path / "model.onnx"
    shutil.copy(plain_graph, rewritten)
    # One layer more than the graph has: the last one cannot match, so no layer is rewritten.
    assert (
        optimise_graph(
            rewritten, heads=4, kv_heads=2, head_dim=info.head_dim, layers=info.num_layers + 1, append_only=False
        )
        == SLICED_ONLY
    )
    nodes = onnx.load(str(rewritten)).graph.node
    assert "Expand" in {n.op_type for n in nodes}  # the cache is still repeated
    assert not any(n.name.startswith("/condgen/gqa/") for n in nodes)


def test_one_finite_attention_bias_serves_every_layer(append_bundle):
    bundle = append_bundle
    graph = onnx.load(str(bundle / "model.onnx")).graph
    softmax_inputs = {n.input[0] for n in graph.node if n.op_type == "Softmax"}
    adds = [n for n in graph.node if n.op_type == "Add" and n.output[0] in softmax_inputs]
    assert len(adds) == read_manifest(bundle).onnx.num_layers
    assert {a.input[1] for a in adds} == {"/condgen/bias/shared"}
    assert "IsNaN" not in {n.op_type for n in graph.node}


def test_an_append_cache_the_graph_cannot_take_is_said_not_silent():
    import logging

    from condgen.bundle import APPEND_ONLY_CACHE, GROUPED_QUERY_ATTENTION, RAGGED_ATTENTION
    from condgen.training.export import cache_note

    level, message = cache_note("append", True, [GROUPED_QUERY_ATTENTION])
    assert level == logging.WARNING and "whole cache" in message
    assert cache_note("auto", True, [])[0] == logging.INFO
    assert cache_note("append", True, [GROUPED_QUERY_ATTENTION, APPEND_ONLY_CACHE]) is None
    assert cache_note("whole", False, []) is None
    level, message = cache_note("ragged", True, [GROUPED_QUERY_ATTENTION, APPEND_ONLY_CACHE])
    assert level == logging.WARNING and "ragged cache does not apply" in message
    assert cache_note("auto", True, [RAGGED_ATTENTION]) is None


def test_rotary_embedding_is_one_fused_node_per_rotation_with_the_same_angles(tmp_path, append_bundle, plain_graph):
    info = read_manifest(append_bundle).onnx
    nodes = onnx.load(str(append_bundle / "model.onnx")).graph.node
    rotations = [n for n in nodes if n.op_type == "RotaryEmbedding"]
    assert len(rotations) == 2 * info.num_layers and {n.domain for n in rotations} == {"com.microsoft"}
    assert [n.name for n in nodes if n.op_type == "Neg"] == ["/condgen/last/Neg"]  # no "rotate half" left
    # Only this rewrite, on the plain graph: same logits and cache at positions well past the
    # prompt's (a left-padded row, then a decode step at position 1,500).
    rewritten = tmp_path / "model.onnx"
    shutil.copy(plain_graph, rewritten)
    applied = optimise_graph(
        rewritten, heads=2, kv_heads=2, head_dim=info.head_dim, layers=info.num_layers, max_positions=MAX_POSITIONS
    )
    assert applied == SLICED_ONLY + [FUSED_ROTARY_EMBEDDING]
    ids = np.random.default_rng(2).integers(5, 300, size=(2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    plain, new = run(plain_graph, info, ids, mask), run(rewritten, info, ids, mask)
    np.testing.assert_allclose(new[0][:, 0], plain[0][:, -1], atol=1e-5)
    real = mask.astype(bool)
    for before, after in zip(plain[1:], new[1:]):
        np.testing.assert_allclose(after.transpose(0, 2, 1, 3)[real], before.transpose(0, 2, 1, 3)[real], atol=1e-5)
    far = np.concatenate([np.zeros((2, 1490), dtype=np.int64), mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    past = {
        n: np.concatenate([np.zeros(v.shape[:2] + (1490, v.shape[3]), np.float32), v], axis=2)
        for n, v in zip(info.past_key_names, plain[1:])
    }
    far[:, :1490] = 1  # 1,490 attended (zero) slots before the prompt: the step is at position ~1,500
    step = np.array([[7], [9]], dtype=np.int64)
    np.testing.assert_allclose(
        run(rewritten, info, step, far, past)[0][:, 0], run(plain_graph, info, step, far, past)[0][:, -1], atol=1e-4
    )
