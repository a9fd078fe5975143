"""Small ONNX graphs the engine runs beside the model, on the model's device.

- `sampling_head`: last-position logits -> each row's `width` most likely tokens (ids and
  logits, most likely first) and its log-normaliser at its own temperature. Sampling then needs
  a few KB per step instead of the whole (rows x vocabulary) logits.
- `keep_rows`, `join`, `repeat_row`: the KV cache's row moves (keep some rows, join batches,
  copy one row n times) as ONNX Runtime passes, so that under IO binding a cache living on the
  GPU is moved there instead of through host memory.

They are built at start-up with the `onnx` helpers (no file in the bundle), so every bundle,
old or new, gets them. No torch or transformers here.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 18
IR_VERSION = 9  # what ONNX Runtime >= 1.16 reads
_ELEMENT = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def _model(nodes, inputs, outputs, initializers=()) -> bytes:
    graph = helper.make_graph(nodes, "condgen_helper", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="condgen")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _int64s(name: str, values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def sampling_head(width: int, dtype=np.float32) -> bytes:
    """logits (rows, positions, vocab), temperature (rows,) float32 ->
    top_logits (rows, width) float32, top_ids (rows, width) int64, most likely first (ties: the
    lower id first, as numpy's argmax), and log_norm (rows,) = logsumexp(logits / temperature)
    over the whole vocabulary, in float32. Only the last position is read."""
    element = _ELEMENT[np.dtype(dtype)]
    nodes = [
        helper.make_node("Gather", ["logits", "last"], ["last_logits"], axis=1),  # (rows, vocab)
        helper.make_node("Cast", ["last_logits"], ["float_logits"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["temperature", "axis1"], ["column"]),
        helper.make_node("Div", ["float_logits", "column"], ["scaled"]),
        helper.make_node("ReduceLogSumExp", ["scaled", "axis1"], ["log_norm"], keepdims=0),
        helper.make_node("TopK", ["float_logits", "width"], ["top_logits", "top_ids"], axis=-1, largest=1, sorted=1),
    ]
    inputs = [
        helper.make_tensor_value_info("logits", element, ["rows", "positions", "vocab"]),
        helper.make_tensor_value_info("temperature", TensorProto.FLOAT, ["rows"]),
    ]
    outputs = [
        helper.make_tensor_value_info("top_logits", TensorProto.FLOAT, ["rows", width]),
        helper.make_tensor_value_info("top_ids", TensorProto.INT64, ["rows", width]),
        helper.make_tensor_value_info("log_norm", TensorProto.FLOAT, ["rows"]),
    ]
    constants = [
        helper.make_tensor("last", TensorProto.INT64, [], [-1]),
        _int64s("axis1", [1]),
        _int64s("width", [width]),
    ]
    return _model(nodes, inputs, outputs, constants)


def keep_rows(names: list[str], dtype) -> bytes:
    """Every cache tensor (rows, heads, length, dim) -> its rows `rows` (int64 (n,)), from
    column `start` (int64 (1,)) on: the rows that stay when others leave, with the leading
    columns that are padding in all of them dropped."""
    element = _ELEMENT[np.dtype(dtype)]
    nodes, inputs, outputs = [], [], []
    for name in names:
        nodes += [
            helper.make_node("Gather", [name, "rows"], [f"{name}.rows"], axis=0),
            helper.make_node("Slice", [f"{name}.rows", "start", "end", "axis2"], [f"{name}.out"]),
        ]
        inputs.append(helper.make_tensor_value_info(name, element, ["n", "heads", "length", "dim"]))
        outputs.append(helper.make_tensor_value_info(f"{name}.out", element, ["kept", "heads", "new_length", "dim"]))
    inputs += [
        helper.make_tensor_value_info("rows", TensorProto.INT64, ["kept"]),
        helper.make_tensor_value_info("start", TensorProto.INT64, [1]),
    ]
    return _model(nodes, inputs, outputs, [_int64s("end", [2**62]), _int64s("axis2", [2])])


def join(names: list[str], dtype, count: int) -> bytes:
    """Every cache tensor of `count` batches, `<i>.<name>` for i < count -> one tensor `<name>.out`
    with their rows in order, each left-padded with zeros by its `pad.<i>` (int64 (8,), the Pad
    op's pads: only the length axis is padded) to the same length."""
    element = _ELEMENT[np.dtype(dtype)]
    nodes, inputs, outputs = [], [], []
    for name in names:
        padded = []
        for i in range(count):
            nodes.append(helper.make_node("Pad", [f"{i}.{name}", f"pad.{i}"], [f"{i}.{name}.padded"]))
            inputs.append(
                helper.make_tensor_value_info(f"{i}.{name}", element, [f"rows_{i}", "heads", f"length_{i}", "dim"])
            )
            padded.append(f"{i}.{name}.padded")
        nodes.append(helper.make_node("Concat", padded, [f"{name}.out"], axis=0))
        outputs.append(helper.make_tensor_value_info(f"{name}.out", element, ["rows", "heads", "length", "dim"]))
    inputs += [helper.make_tensor_value_info(f"pad.{i}", TensorProto.INT64, [8]) for i in range(count)]
    return _model(nodes, inputs, outputs)


def repeat_row(names: list[str], dtype) -> bytes:
    """Every cache tensor of a one-row batch (1, heads, length, dim) -> `copies` (int64 (4,):
    n, 1, 1, 1) of it stacked on the row axis: one prefill shared by n sequences."""
    element = _ELEMENT[np.dtype(dtype)]
    nodes, inputs, outputs = [], [], []
    for name in names:
        nodes.append(helper.make_node("Tile", [name, "copies"], [f"{name}.out"]))
        inputs.append(helper.make_tensor_value_info(name, element, [1, "heads", "length", "dim"]))
        outputs.append(helper.make_tensor_value_info(f"{name}.out", element, ["n", "heads", "length", "dim"]))
    inputs.append(helper.make_tensor_value_info("copies", TensorProto.INT64, [4]))
    return _model(nodes, inputs, outputs)
