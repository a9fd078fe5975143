"""Rewrites of optimum's decoder graph that make it cheaper to serve, applied at export.

All keep the model's function (the export's parity check against PyTorch runs on the
rewritten graph) and each is skipped, with a log line, where the graph does not have the
shape it expects:

- `last_position_logits`: the engine only ever reads each row's last logits, but optimum's
  graph projects every position onto the vocabulary. A Slice of the hidden states before the
  LM head makes `logits` (batch, 1, vocab): at prefill that saves (batch, prompt_len, vocab)
  floats (200 MB for a 1,024-token pass of a 49k vocabulary) and the head's multiply-adds.
  How many positions it keeps is the graph input `num_logits_to_keep` (int64 [1]), an
  initializer that defaults to 1: the label check (server/label_check.py) feeds it a larger
  window to score every token of a line in one pass (`logits_window` in the manifest).
- `grouped_query_attention`: for models with fewer KV heads than query heads (Llama, SmolLM2)
  the exported attention repeats every layer's whole KV cache to the query heads at every step
  (Unsqueeze -> Expand -> Reshape, and scales the repeated keys), which on a CPU costs more than
  the weights' multiply-adds once the cache is a few hundred tokens long. The rewrite folds
  the query heads of a group into the sequence axis instead,
  q (batch, heads, seq, dim) -> (batch, kv_heads, group * seq, dim), so both attention
  MatMuls read the cache as it is; the key scale moves onto the (small) queries.
- `append_only_cache` (after the previous one; not for fp16 GPU bundles, whose cache stays on
  the device): the exported graph concatenates past and new keys/values into `present.*` at
  every step, a single-threaded copy of the whole cache that was most of a CPU decode step.
  Rewritten, attention reads `past_key_values.*` and the new entries side by side (scores
  concatenated, probabilities split) and `present.*` holds only the new entries
  (batch, kv_heads, new_len, head_dim); the engine writes them into its own cache buffers in
  place (`Batch.advance`). The past input may then have spare, masked slots at its end.
- `shared_attention_bias`: every layer slices the same causal/padding mask to the same key
  length and turns it into an additive bias of 0 / -inf, then guards the softmax against the
  NaN that -inf gives a fully masked row (a left-padded prompt's padding positions). One bias
  now serves all layers, with the dtype's lowest finite value instead of -inf, so a fully masked
  row gets a finite (never used) average and the 2 x layers IsNaN/Where guards go.
- `fused_rotary_embedding`: the exported graph rotates every layer's queries and keys with
  seven small kernels each (two Slices, Neg, Concat, two Muls, Add: "rotate half"), 420 kernel
  launches per step for a 30-layer model. Each becomes one `RotaryEmbedding` (com.microsoft)
  that looks the angles up by `position_ids` in cos/sin tables. The tables are computed at
  export by running the graph's own rotary subgraph over positions 0..max_positions - 1, so
  whatever frequencies and scaling the model uses are kept as exported.

- `ragged_attention` (`--cache ragged`, the CPU default; instead of the three attention rewrites
  above and the rotary fusion): each layer's attention, from its q/k/v projections to its o_proj
  input, rotary embedding included (cos/sin tables as for the fusion), becomes one
  com.microsoft `GroupQueryAttention`. It takes each row's length from the right-padded
  attention mask (`seqlens_k`, `total_sequence_length`), reads only those positions, and writes
  the new entries after them into `present.*`, which the engine binds to the very buffers it
  feeds as `past_key_values.*` (server/ragged_batch.py). `position_ids` goes (positions follow
  from the lengths), and the last-position Slice becomes a gather at each row's own last
  positions, `num_logits_to_keep` a required input (IO binding cannot override an initializer).

Two rewrites serve the weight-only variants (`w8`, `w4`; training/export.py) and change the
weights, so their parity is judged as theirs is: `fold_weight_transposes` (a tied LM head's
Transpose of the embedding folded into a constant MatMulNBits can quantise) and
`quantize_embedding_tables` (the embedding's Gather in 8 bits, GatherBlockQuantized).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from condgen.bundle import (
    APPEND_ONLY_CACHE,
    FUSED_ROTARY_EMBEDDING,
    GROUPED_QUERY_ATTENTION,
    LAST_POSITION_LOGITS,
    LOGITS_TO_KEEP,
    LOGITS_WINDOW,
    RAGGED_ATTENTION,
    SHARED_ATTENTION_BIAS,
)

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    """Lookups over an onnx GraphProto that the rewrites keep up to date."""

    graph: Any  # onnx.GraphProto (protobuf: untyped)

    def producer(self, name: str):
        return next((n for n in self.graph.node if name in n.output), None)

    def consumers(self, name: str) -> list:
        return [n for n in self.graph.node if name in n.input]

    def only_consumer(self, name: str, op_type: str):
        users = self.consumers(name)
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def scalar(self, name: str) -> float | None:
        """The value of a one-element constant (initializer or Constant node), else None."""
        from onnx import numpy_helper

        for tensor in self.graph.initializer:
            if tensor.name == name:
                value = numpy_helper.to_array(tensor)
                return float(value.reshape(-1)[0]) if value.size == 1 else None
        node = self.producer(name)
        if node is not None and node.op_type == "Constant":
            if node.attribute[0].name != "value":
                return None
            array = numpy_helper.to_array(node.attribute[0].t)
            return float(array.reshape(-1)[0]) if array.size == 1 else None
        return None

    def constant(self, name: str, values, dtype=np.int64) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=dtype), name))
        return name

    def insert_before(self, anchor, nodes: list) -> None:
        position = list(self.graph.node).index(anchor)
        for offset, node in enumerate(nodes):
            self.graph.node.insert(position + offset, node)

    def remove_dead_nodes(self) -> int:
        """Drop nodes none of whose outputs are used; returns how many went."""
        removed = 0
        while True:
            used = {name for node in self.graph.node for name in node.input}
            used |= {output.name for output in self.graph.output}
            dead = [n for n in self.graph.node if not any(o in used for o in n.output)]
            if not dead:
                return removed
            for node in dead:
                self.graph.node.remove(node)
            removed += len(dead)


def fold_weight_transposes(model) -> int:
    """Transpose of a constant weight -> the transposed constant, in place; returns how many.
    A model whose LM head is tied to its embedding can export as MatMul(h, Transpose(table)): folded,
    the head has a constant weight MatMulNBits quantises, and the table is the embedding's alone."""
    from onnx import numpy_helper

    graph = _Graph(model.graph)
    tables = _constant_tables(model.graph)
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in tables:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        weights = numpy_helper.to_array(tables[node.input[0]])
        transposed = np.ascontiguousarray(weights.transpose(perm))
        model.graph.initializer.append(numpy_helper.from_array(transposed, node.output[0]))
        model.graph.node.remove(node)
        folded += 1
    for name, table in tables.items():
        if not graph.consumers(name):
            model.graph.initializer.remove(table)
    return folded


def quantize_embedding_tables(model, block: int) -> int:
    """Gather over a constant fp32 table (the token embedding) -> com.microsoft GatherBlockQuantized
    with 8-bit weights (symmetric, zero point 128, one scale per `block` of a row), in place;
    returns how many. MatMulNBits leaves the table in fp32; for SmolLM2-135M it is 113 MB, read a
    few rows per step: 8 bits cut it to 30 MB of the server's memory."""
    from onnx import helper, numpy_helper

    graph = _Graph(model.graph)
    tables = _constant_tables(model.graph)
    replaced = 0
    for node in list(model.graph.node):
        table = tables.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or axis != 0 or len(graph.consumers(table.name)) != 1:
            continue
        weights = numpy_helper.to_array(table)
        if weights.dtype != np.float32 or weights.ndim != 2 or weights.shape[1] % block:
            continue
        rows, columns = weights.shape
        blocks = weights.reshape(rows, columns // block, block)
        scales = np.abs(blocks).max(axis=-1) / 127.0
        scales[scales == 0] = 1.0
        quantized = np.clip(np.rint(blocks / scales[..., None]), -127, 127) + 128
        names = [f"{table.name}_q8", f"{table.name}_scales", f"{table.name}_zero_points"]
        model.graph.initializer.remove(table)
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(quantized.astype(np.uint8).reshape(rows, columns), names[0]),
                numpy_helper.from_array(scales.astype(np.float32), names[1]),
                numpy_helper.from_array(np.full(scales.shape, 128, dtype=np.uint8), names[2]),
            ]
        )
        gather = helper.make_node(
            "GatherBlockQuantized",
            [names[0], node.input[1], names[1], names[2]],
            list(node.output),
            name=f"{node.name or table.name}_q8",
            domain="com.microsoft",
            bits=8,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        )
        graph.insert_before(node, [gather])
        model.graph.node.remove(node)
        replaced += 1
    if replaced:
        log.info("8-bit embedding tables: %d Gather(s) -> GatherBlockQuantized", replaced)
    return replaced


def _constant_tables(graph) -> dict:
    """Initializers that are not also graph inputs (those a caller may override)."""
    inputs = {i.name for i in graph.input}
    return {t.name: t for t in graph.initializer if t.name not in inputs}


def keep_last_position_logits(graph: _Graph) -> bool:
    """Slice the hidden states to the last position before the LM head's MatMul."""
    from onnx import helper

    head = graph.producer("logits")
    if head is None or head.op_type != "MatMul":
        log.warning("no MatMul produces `logits`; the graph keeps logits for every position")
        return False
    from onnx import TensorProto

    hidden, last = head.input[0], head.input[0] + "/last_position"
    # An input with a default: feeding it overrides the initializer of the same name.
    graph.constant(LOGITS_TO_KEEP, [1])
    graph.graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    starts = "/condgen/last/starts"
    names = [
        graph.constant(f"/condgen/last/{key}", [value])
        for key, value in (("ends", np.iinfo(np.int64).max), ("axes", 1))
    ]
    graph.insert_before(
        head,
        [
            helper.make_node("Neg", [LOGITS_TO_KEEP], [starts], name="/condgen/last/Neg"),
            helper.make_node("Slice", [hidden, starts, *names], [last], name="/condgen/last/Slice"),
        ],
    )
    head.input[0] = last
    output = next(o for o in graph.graph.output if o.name == "logits")
    dim = output.type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_param = "logits_positions"  # (batch, num_logits_to_keep, vocab); 1 unless fed
    return True


def _repeated_cache(graph: _Graph, present: str) -> list | None:
    """The Unsqueeze -> Expand -> Reshape chain that repeats `present` to the query heads."""
    unsqueeze = next((n for n in graph.consumers(present) if n.op_type == "Unsqueeze"), None)
    expand = unsqueeze and graph.only_consumer(unsqueeze.output[0], "Expand")
    reshape = expand and graph.only_consumer(expand.output[0], "Reshape")
    return [unsqueeze, expand, reshape] if reshape else None


def _move_shape_reads(graph: _Graph, repeated: str, present: str) -> bool:
    """Point `Shape` reads of the repeated cache at `present` itself. They only take its batch,
    length or dim (Gather of a constant index other than 1, the heads axis), which both have."""
    shapes = [n for n in graph.consumers(repeated) if n.op_type == "Shape"]
    for shape in shapes:
        for gather in graph.consumers(shape.output[0]):
            index = graph.scalar(gather.input[1]) if gather.op_type == "Gather" else None
            if index is None or int(index) in (1, -3):
                return False
    for shape in shapes:
        shape.input[0] = present
    return True


def _rewrite_layer(graph: _Graph, layer: int, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Rewrite one layer's two attention MatMuls to read present.{layer}.key/value directly."""
    from onnx import helper

    key, value = f"present.{layer}.key", f"present.{layer}.value"
    key_chain, value_chain = _repeated_cache(graph, key), _repeated_cache(graph, value)
    if key_chain is None or value_chain is None:
        return False
    if not (
        _move_shape_reads(graph, key_chain[-1].output[0], key)
        and _move_shape_reads(graph, value_chain[-1].output[0], value)
    ):
        return False
    transpose = graph.only_consumer(key_chain[-1].output[0], "Transpose")
    key_scale = transpose and graph.only_consumer(transpose.output[0], "Mul")
    scores = key_scale and graph.only_consumer(key_scale.output[0], "MatMul")
    weighted = graph.only_consumer(value_chain[-1].output[0], "MatMul")
    if scores is None or weighted is None or list(transpose.attribute[0].ints) != [0, 1, 3, 2]:
        return False
    scale_input = next((i for i in key_scale.input if i != transpose.output[0]), None)
    if scale_input is None or graph.scalar(scale_input) is None or scores.input[1] != key_scale.output[0]:
        return False
    if weighted.input[1] != value_chain[-1].output[0]:
        return False
    p = f"/condgen/gqa/{layer}"
    grouped = graph.constant(f"{p}/grouped_shape", [0, kv_heads, -1, head_dim])
    by_head = graph.constant(f"{p}/by_head_shape", [0, heads, -1, 0])
    grouped_probs = graph.constant(f"{p}/grouped_probs_shape", [0, kv_heads, -1, 0])
    out_by_head = graph.constant(f"{p}/out_by_head_shape", [0, heads, -1, head_dim])
    query = scores.input[0]
    graph.insert_before(
        scores,
        [
            helper.make_node("Mul", [query, scale_input], [f"{p}/q_scaled"], name=f"{p}/q_scale"),
            # (batch, heads, seq, dim) -> (batch, kv_heads, group * seq, dim)
            helper.make_node("Reshape", [f"{p}/q_scaled", grouped], [f"{p}/q_grouped"], name=f"{p}/q_group"),
            helper.make_node("Transpose", [key], [f"{p}/k_t"], perm=[0, 1, 3, 2], name=f"{p}/k_transpose"),
            # (batch, kv_heads, group * seq, past_len) -> (batch, heads, seq, past_len)
            helper.make_node("MatMul", [f"{p}/q_grouped", f"{p}/k_t"], [f"{p}/scores_grouped"], name=f"{p}/qk"),
            helper.make_node("Reshape", [f"{p}/scores_grouped", by_head], [scores.output[0]], name=f"{p}/scores"),
        ],
    )
    graph.graph.node.remove(scores)
    probs = weighted.input[0]
    graph.insert_before(
        weighted,
        [
            helper.make_node("Reshape", [probs, grouped_probs], [f"{p}/probs_grouped"], name=f"{p}/probs_group"),
            helper.make_node("MatMul", [f"{p}/probs_grouped", value], [f"{p}/out_grouped"], name=f"{p}/pv"),
            # (batch, kv_heads, group * seq, dim) -> (batch, heads, seq, dim)
            helper.make_node("Reshape", [f"{p}/out_grouped", out_by_head], [weighted.output[0]], name=f"{p}/out"),
        ],
    )
    graph.graph.node.remove(weighted)
    return True


def _every_layer(graph: _Graph, rewrite_layer, layers: int) -> bool:
    """`rewrite_layer(layer)` for every layer, or none: a partly matched graph is restored."""
    import copy

    backup = copy.deepcopy(graph.graph.node)
    if all(rewrite_layer(layer) for layer in range(layers)):
        graph.remove_dead_nodes()
        return True
    del graph.graph.node[:]
    graph.graph.node.extend(backup)
    return False


def group_query_attention(graph: _Graph, heads: int, kv_heads: int, head_dim: int, layers: int) -> bool:
    """Rewrite every layer's attention, or none."""
    if heads == kv_heads or heads % kv_heads:
        return False
    if _every_layer(graph, lambda layer: _rewrite_layer(graph, layer, heads, kv_heads, head_dim), layers):
        log.info("grouped-query attention: %d layers read the KV cache without repeating it", layers)
        return True
    log.warning("the attention does not have the expected shape; the KV cache is repeated as exported")
    return False


def _total_shape(graph: _Graph, past: str, new: str, prefix: str) -> tuple[list, str]:
    """Nodes computing the shape that concat(past, new) on axis 2 would have."""
    from onnx import helper

    axis2 = graph.constant(f"{prefix}/axis2_only", [0, 0, 1, 0])
    nodes = [
        helper.make_node("Shape", [past], [f"{prefix}/past_shape"], name=f"{prefix}/past_shape"),
        helper.make_node("Shape", [new], [f"{prefix}/new_shape"], name=f"{prefix}/new_shape"),
        helper.make_node("Mul", [f"{prefix}/new_shape", axis2], [f"{prefix}/new_len"], name=f"{prefix}/new_len"),
        helper.make_node(
            "Add",
            [f"{prefix}/past_shape", f"{prefix}/new_len"],
            [f"{prefix}/total_shape"],
            name=f"{prefix}/total_shape",
        ),
    ]
    return nodes, f"{prefix}/total_shape"


def _append_only_layer(graph: _Graph, layer: int) -> bool:
    """Attention of one (already grouped) layer over past and new entries without concatenating them."""
    from onnx import helper

    p = f"/condgen/gqa/{layer}"
    nodes = {n.name: n for n in graph.graph.node if n.name.startswith(p + "/")}
    concats = [graph.producer(f"present.{layer}.{kind}") for kind in ("key", "value")]
    if any(c is None or c.op_type != "Concat" or len(c.input) != 2 for c in concats) or f"{p}/qk" not in nodes:
        return False
    (past_k, new_k), (past_v, new_v) = (list(c.input) for c in concats)
    for concat in concats:  # present.* become the new entries only
        past, new = concat.input
        kind = concat.output[0].rsplit(".", 1)[1]
        replaced = [helper.make_node("Identity", [new], [concat.output[0]], name=f"{p}/{kind}_new_only")]
        for number, shape in enumerate(n for n in graph.consumers(concat.output[0]) if n.op_type == "Shape"):
            shape_nodes, total = _total_shape(graph, past, new, f"{p}/{kind}_shape{number}")
            replaced += shape_nodes
            for user in graph.consumers(shape.output[0]):
                user.input[list(user.input).index(shape.output[0])] = total
        graph.insert_before(concat, replaced)
        graph.graph.node.remove(concat)
    qk, pv = nodes[f"{p}/qk"], nodes[f"{p}/pv"]
    query, probs = qk.input[0], pv.input[0]
    graph.insert_before(
        qk,
        [
            helper.make_node("Transpose", [past_k], [f"{p}/past_k_t"], perm=[0, 1, 3, 2], name=f"{p}/past_k_t"),
            helper.make_node("Transpose", [new_k], [f"{p}/new_k_t"], perm=[0, 1, 3, 2], name=f"{p}/new_k_t"),
            helper.make_node("MatMul", [query, f"{p}/past_k_t"], [f"{p}/scores_past"], name=f"{p}/qk_past"),
            helper.make_node("MatMul", [query, f"{p}/new_k_t"], [f"{p}/scores_new"], name=f"{p}/qk_new"),
            # (batch, kv_heads, group * seq, past_capacity + new_len)
            helper.make_node(
                "Concat", [f"{p}/scores_past", f"{p}/scores_new"], [qk.output[0]], axis=-1, name=f"{p}/scores_concat"
            ),
        ],
    )
    graph.graph.node.remove(qk)
    axis, start, end, length_axis = (
        graph.constant(f"{p}/{k}", [v])
        for k, v in (("last_axis", 3), ("zero", 0), ("to_end", np.iinfo(np.int64).max), ("length_axis", 2))
    )
    graph.insert_before(
        pv,
        [
            helper.make_node("Shape", [past_v], [f"{p}/past_v_shape"], name=f"{p}/past_v_shape"),
            helper.make_node(
                "Gather", [f"{p}/past_v_shape", length_axis], [f"{p}/past_len"], axis=0, name=f"{p}/past_len"
            ),
            helper.make_node(
                "Slice", [probs, start, f"{p}/past_len", axis], [f"{p}/probs_past"], name=f"{p}/probs_past"
            ),
            helper.make_node("Slice", [probs, f"{p}/past_len", end, axis], [f"{p}/probs_new"], name=f"{p}/probs_new"),
            helper.make_node("MatMul", [f"{p}/probs_past", past_v], [f"{p}/out_past"], name=f"{p}/pv_past"),
            helper.make_node("MatMul", [f"{p}/probs_new", new_v], [f"{p}/out_new"], name=f"{p}/pv_new"),
            helper.make_node("Add", [f"{p}/out_past", f"{p}/out_new"], [pv.output[0]], name=f"{p}/pv_sum"),
        ],
    )
    graph.graph.node.remove(pv)
    return True


def append_only_cache(graph: _Graph, layers: int) -> bool:
    """Rewrite every layer's cache output, or none."""
    if _every_layer(graph, lambda layer: _append_only_layer(graph, layer), layers):
        log.info("append-only cache: present.* hold only the new entries of each step")
        return True
    log.warning("the cache concatenation does not have the expected shape; present.* stay whole")
    return False


def _attention_bias(graph: _Graph, softmax) -> tuple | None:
    """(Add, its bias input's Where, that Where's Slice) in front of one layer's Softmax."""
    add = graph.producer(softmax.input[0])
    if add is None or add.op_type != "Add":
        return None
    for bias_input in add.input:
        where = graph.producer(bias_input)
        if (
            where is not None
            and where.op_type == "Where"
            and graph.scalar(where.input[1]) == 0.0
            and graph.scalar(where.input[2]) == float("-inf")
        ):
            sliced = graph.producer(where.input[0])
            if sliced is not None and sliced.op_type == "Slice":
                return add, where, sliced
    return None


def _slice_signature(graph: _Graph, sliced) -> tuple | None:
    """What a mask Slice takes, less its end (the key length, equal for every layer)."""
    constants = tuple(graph.scalar(name) for name in sliced.input[3:])
    starts = graph.scalar(sliced.input[1])
    if starts is None or any(c is None for c in constants):
        return None
    return (sliced.input[0], starts, *constants)


def _nan_guard(graph: _Graph, softmax):
    """The Where that zeroes a Softmax's NaN outputs (via IsNaN), or None."""
    users = graph.consumers(softmax.output[0])
    isnan = next((n for n in users if n.op_type == "IsNaN"), None)
    where = next((n for n in users if n.op_type == "Where"), None)
    if len(users) != 2 or isnan is None or where is None or where.input[0] != isnan.output[0]:
        return None
    return where


def share_attention_bias(graph: _Graph) -> bool:
    """One finite additive mask for every layer; the softmax NaN guards removed. All or nothing."""
    from onnx import helper

    softmaxes = [n for n in graph.graph.node if n.op_type == "Softmax"]
    maybe_found = [_attention_bias(graph, s) for s in softmaxes]
    maybe_guards = [_nan_guard(graph, s) for s in softmaxes]
    found = [f for f in maybe_found if f is not None]
    guards = [g for g in maybe_guards if g is not None]
    if not softmaxes or len(found) < len(softmaxes) or len(guards) < len(softmaxes):
        return False
    signatures = {_slice_signature(graph, sliced) for _, _, sliced in found}
    if len(signatures) != 1 or None in signatures:
        return False
    first_add, first_where, _ = found[0]
    lowest = graph.constant("/condgen/bias/lowest", np.finfo(np.float32).min, dtype=np.float32)
    shared = helper.make_node(
        "Where",
        [first_where.input[0], first_where.input[1], lowest],
        ["/condgen/bias/shared"],
        name="/condgen/bias/Where",
    )
    graph.insert_before(first_where, [shared])
    for add, where, _ in found:
        add.input[list(add.input).index(where.output[0])] = shared.output[0]
    for softmax, guard in zip(softmaxes, guards):
        for user in graph.consumers(guard.output[0]):
            user.input[list(user.input).index(guard.output[0])] = softmax.output[0]
    log.info("shared attention bias: %d layers, %d nodes dropped", len(softmaxes), graph.remove_dead_nodes())
    return True


def _rotate_half_pattern(graph: _Graph, neg) -> tuple | None:
    """Around a Neg: x * cos + concat(-x[..., half:], x[..., :half]) * sin, as
    (x, cos, sin, the Add). Both Slices must read the same x as the first Mul."""
    upper = graph.producer(neg.input[0])
    concat = graph.only_consumer(neg.output[0], "Concat")
    if upper is None or upper.op_type != "Slice" or concat is None or list(concat.input)[0] != neg.output[0]:
        return None
    lower = graph.producer(concat.input[1]) if len(concat.input) == 2 else None
    rotated = graph.only_consumer(concat.output[0], "Mul")
    add = rotated and graph.only_consumer(rotated.output[0], "Add")
    if lower is None or lower.op_type != "Slice" or add is None or lower.input[0] != upper.input[0]:
        return None
    x = upper.input[0]
    sin = next(name for name in rotated.input if name != concat.output[0])
    straight = graph.producer(next(name for name in add.input if name != rotated.output[0]))
    if straight is None or straight.op_type != "Mul" or x not in straight.input:
        return None
    cos = next(name for name in straight.input if name != x)
    return x, cos, sin, add


def _angle_tables(graph: _Graph, cos: str, sin: str, max_positions: int, opset: int) -> tuple | None:
    """The graph's cos and sin (batch, positions, 1, head_dim) evaluated for positions
    0..max_positions - 1, as (max_positions, head_dim / 2) tables; None when they depend on
    anything but `position_ids`."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    wanted, found, seen = [cos, sin], {}, set()
    initializers = {t.name: t for t in graph.graph.initializer}
    while wanted:
        name = wanted.pop()
        if name in seen or name in initializers or name == "":
            continue
        seen.add(name)
        node = graph.producer(name)
        if node is None:
            if name != "position_ids":
                return None
            continue
        if id(node) not in found:  # by identity: proto equality compares whole nodes
            found[id(node)] = node
            wanted += list(node.input)
    nodes = [n for n in graph.graph.node if id(n) in found]  # in graph (topological) order
    used = {name for n in nodes for name in n.input}
    sub = helper.make_graph(
        nodes,
        "rotary_angles",
        [helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, ["batch", "positions"])],
        # the rewrites run on the exported fp32 graph (variants are converted afterwards)
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in (cos, sin)],
        initializer=[t for name, t in initializers.items() if name in used],
    )
    model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    positions = np.arange(max_positions, dtype=np.int64)[None, :]
    tables = []
    for value in session.run([cos, sin], {"position_ids": positions}):
        value = value.reshape(max_positions, -1)  # (1, positions, 1, head_dim) -> (positions, head_dim)
        half = value.shape[1] // 2
        if not np.array_equal(value[:, :half], value[:, half:]):  # "rotate half" repeats the angles
            return None
        tables.append(np.ascontiguousarray(value[:, :half]))
    return tuple(tables)


ROTARY_TABLES = ("/condgen/rotary/cos_cache", "/condgen/rotary/sin_cache")


def _rotations(graph: _Graph, max_positions: int, opset: int) -> tuple[list, tuple] | str:
    """Every "rotate half" rotation of the graph and their shared (cos, sin) tables over
    positions 0..max_positions - 1; or why there are none to take."""
    found = [m for n in list(graph.graph.node) if n.op_type == "Neg" and (m := _rotate_half_pattern(graph, n))]
    if not found or max_positions < 1:
        return "no rotary embedding of the expected shape"
    if len({(cos, sin) for _, cos, sin, _ in found}) != 1:
        return "the rotary embeddings do not share their angles"
    tables = _angle_tables(graph, found[0][1], found[0][2], max_positions, opset)
    if tables is None:
        return "the rotary angles depend on more than the positions"
    return found, tables


def _add_rotary_tables(graph: _Graph, tables: tuple) -> None:
    from onnx import numpy_helper

    for name, table in zip(ROTARY_TABLES, tables):
        graph.graph.initializer.append(numpy_helper.from_array(table, name))


def fuse_rotary_embedding(graph: _Graph, max_positions: int, opset: int) -> bool:
    """Replace every layer's "rotate half" queries and keys by one RotaryEmbedding each."""
    from onnx import helper

    rotations = _rotations(graph, max_positions, opset)
    if isinstance(rotations, str):
        log.warning("%s; the graph keeps it as exported", rotations)
        return False
    found, tables = rotations
    _add_rotary_tables(graph, tables)
    for number, (x, _, _, add) in enumerate(found):
        fused = helper.make_node(
            "RotaryEmbedding",
            [x, "position_ids", *ROTARY_TABLES],
            list(add.output),
            name=f"/condgen/rotary/RotaryEmbedding_{number}",
            domain="com.microsoft",
            interleaved=0,
        )
        graph.insert_before(add, [fused])
        graph.graph.node.remove(add)
    removed = graph.remove_dead_nodes()
    log.info("fused rotary embedding: %d rotations, %d nodes dropped", len(found), removed)
    return True


def _import_microsoft_opset(model) -> None:
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def optimise_graph(
    model_path: Path,
    heads: int,
    kv_heads: int,
    head_dim: int,
    layers: int,
    append_only: bool = True,
    max_positions: int = 0,
    ragged: bool = False,
) -> list[str]:
    """Apply the rewrites to the graph at `model_path` in place; returns the names of those applied.
    `max_positions` (the model's context length) sizes the rotary tables; 0 keeps the rotary
    embedding as exported."""
    import onnx

    external = model_path.with_name(model_path.name + "_data")
    model = onnx.load(str(model_path))
    graph = _Graph(model.graph)
    applied = []
    if keep_last_position_logits(graph):
        applied += [LAST_POSITION_LOGITS, LOGITS_WINDOW]
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=18)
    if ragged and ragged_attention(graph, heads, kv_heads, layers, max_positions, opset):
        _import_microsoft_opset(model)
        applied.append(RAGGED_ATTENTION)
    elif share_attention_bias(graph):
        applied.append(SHARED_ATTENTION_BIAS)
    if RAGGED_ATTENTION not in applied and group_query_attention(graph, heads, kv_heads, head_dim, layers):
        applied.append(GROUPED_QUERY_ATTENTION)
        if append_only and append_only_cache(graph, layers):
            applied.append(APPEND_ONLY_CACHE)
    if RAGGED_ATTENTION not in applied and max_positions and fuse_rotary_embedding(graph, max_positions, opset):
        _import_microsoft_opset(model)
        applied.append(FUSED_ROTARY_EMBEDDING)
    if applied:
        if external.exists():  # over 2 GB: the weights stay beside the graph
            onnx.save(model, str(model_path), save_as_external_data=True, location=external.name)
        else:
            onnx.save(model, str(model_path))
    return applied


def _projection(graph: _Graph, layer: int, name: str):
    """The MatMul optimum names /model/layers.{layer}/self_attn/{name}/MatMul, or None."""
    wanted = f"/model/layers.{layer}/self_attn/{name}/MatMul"
    return next((n for n in graph.graph.node if n.name == wanted and n.op_type == "MatMul"), None)


def _ragged_lengths(graph: _Graph, anchor) -> tuple[str, str]:
    """Nodes (before `anchor`) deriving GroupQueryAttention's `seqlens_k` (each row's real
    tokens minus one, int32) and `total_sequence_length` (the mask's width, an int32 scalar)
    from the right-padded `attention_mask`."""
    from onnx import TensorProto, helper

    p = "/condgen/ragged"
    seqlens, total = f"{p}/seqlens_k", f"{p}/total_sequence_length"
    graph.insert_before(
        anchor,
        [
            helper.make_node(
                "ReduceSum",
                ["attention_mask", graph.constant(f"{p}/axis", [1])],
                [f"{p}/real"],
                keepdims=0,
                name=f"{p}/real",
            ),
            helper.make_node("Sub", [f"{p}/real", graph.constant(f"{p}/one", 1)], [f"{p}/last"], name=f"{p}/last"),
            helper.make_node("Cast", [f"{p}/last"], [seqlens], to=TensorProto.INT32, name=f"{p}/seqlens_k"),
            helper.make_node("Shape", ["attention_mask"], [f"{p}/mask_shape"], name=f"{p}/mask_shape"),
            helper.make_node(
                "Gather",
                [f"{p}/mask_shape", graph.constant(f"{p}/width_axis", 1)],
                [f"{p}/width"],
                axis=0,
                name=f"{p}/width",
            ),
            helper.make_node("Cast", [f"{p}/width"], [total], to=TensorProto.INT32, name=f"{p}/total"),
        ],
    )
    return seqlens, total


def _ragged_layer(graph: _Graph, layer: int, heads: int, kv_heads: int, lengths: tuple[str, str]) -> bool:
    """One GroupQueryAttention (rotary included) from the layer's q/k/v projections to o_proj."""
    from onnx import helper

    q, k, v, o = (_projection(graph, layer, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    key, value = f"present.{layer}.key", f"present.{layer}.value"
    old = [graph.producer(key), graph.producer(value)]
    if None in (q, k, v, o, *old):
        return False
    for node in old:  # their outputs are the GroupQueryAttention's now; what fed them dies
        graph.graph.node.remove(node)
    attended = f"/condgen/ragged/{layer}/attention"
    graph.insert_before(
        o,
        [
            helper.make_node(
                "GroupQueryAttention",
                [
                    q.output[0],
                    k.output[0],
                    v.output[0],
                    f"past_key_values.{layer}.key",
                    f"past_key_values.{layer}.value",
                    *lengths,
                    *ROTARY_TABLES,
                ],
                [attended, key, value],
                name=f"/condgen/ragged/{layer}/GroupQueryAttention",
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                do_rotary=1,
                rotary_interleaved=0,
            )
        ],
    )
    o.input[0] = attended
    return True


def _ragged_last_positions(graph: _Graph) -> bool:
    """Turn `keep_last_position_logits`'s Slice (the last `num_logits_to_keep` positions of every
    row) into a gather of each row's own last positions: in a right-padded pass a row's last
    real token is at min(seqlens_k, new_len - 1), not at the end."""
    from onnx import helper

    sliced = next((n for n in graph.graph.node if n.name == "/condgen/last/Slice"), None)
    if sliced is None:
        return False
    p, hidden = "/condgen/ragged/last", sliced.input[0]
    nodes = [
        helper.make_node(
            "Reshape", [LOGITS_TO_KEEP, f"{p}/scalar_shape"], [LOGITS_TO_KEEP + "_scalar"], name=f"{p}/keep_scalar"
        ),
        helper.make_node(
            "ReduceSum", ["attention_mask", "/condgen/ragged/axis"], [f"{p}/real"], keepdims=1, name=f"{p}/real"
        ),  # (batch, 1)
        helper.make_node("Shape", ["input_ids"], [f"{p}/ids_shape"], name=f"{p}/ids_shape"),
        helper.make_node(
            "Gather", [f"{p}/ids_shape", "/condgen/ragged/width_axis"], [f"{p}/new_len"], axis=0, name=f"{p}/new_len"
        ),
        helper.make_node("Min", [f"{p}/real", f"{p}/new_len"], [f"{p}/end"], name=f"{p}/end"),  # last + 1
        helper.make_node(
            "Range", [f"{p}/zero", LOGITS_TO_KEEP + "_scalar", "/condgen/ragged/one"], [f"{p}/steps"], name=f"{p}/steps"
        ),
        helper.make_node("Sub", [f"{p}/end", LOGITS_TO_KEEP], [f"{p}/start"], name=f"{p}/start"),
        helper.make_node("Add", [f"{p}/start", f"{p}/steps"], [f"{p}/positions"], name=f"{p}/positions"),
        helper.make_node("Max", [f"{p}/positions", f"{p}/zero"], [f"{p}/clipped"], name=f"{p}/clipped"),
        helper.make_node("Unsqueeze", [f"{p}/clipped", f"{p}/last_axis"], [f"{p}/index"], name=f"{p}/index"),
        helper.make_node("Shape", [hidden], [f"{p}/hidden_shape"], start=2, name=f"{p}/hidden_width"),
        helper.make_node(
            "Concat", [f"{p}/ones", f"{p}/hidden_shape"], [f"{p}/index_shape"], axis=0, name=f"{p}/index_shape"
        ),
        helper.make_node("Expand", [f"{p}/index", f"{p}/index_shape"], [f"{p}/indices"], name=f"{p}/indices"),
        # (batch, new_len, hidden) -> (batch, num_logits_to_keep, hidden)
        helper.make_node(
            "GatherElements", [hidden, f"{p}/indices"], list(sliced.output), axis=1, name=f"{p}/GatherElements"
        ),
    ]
    graph.constant(f"{p}/zero", 0)
    graph.constant(f"{p}/last_axis", [2])
    graph.constant(f"{p}/ones", [1, 1])
    graph.constant(f"{p}/scalar_shape", np.zeros(0, dtype=np.int64))
    graph.insert_before(sliced, nodes)
    graph.graph.node.remove(sliced)
    for unused in [t for t in graph.graph.initializer if t.name in sliced.input[2:]]:  # the Slice's ends, axes
        graph.graph.initializer.remove(unused)
    return True


def ragged_attention(graph: _Graph, heads: int, kv_heads: int, layers: int, max_positions: int, opset: int) -> bool:
    """Every layer's attention, rotary embedding included, as one com.microsoft
    GroupQueryAttention over a right-padded cache; or none (the graph is left as it was)."""
    import copy

    if heads % kv_heads:
        return False
    rotations = _rotations(graph, max_positions, opset)
    if isinstance(rotations, str):
        log.warning("%s: the attention stays padded", rotations)
        return False
    _, tables = rotations
    backup = copy.deepcopy(graph.graph)
    first = _projection(graph, 0, "q_proj")
    lengths = _ragged_lengths(graph, first) if first is not None else ("", "")
    if first is None or not all(_ragged_layer(graph, layer, heads, kv_heads, lengths) for layer in range(layers)):
        graph.graph.CopyFrom(backup)
        log.warning("the attention does not have the expected shape: it stays padded")
        return False
    _add_rotary_tables(graph, tables)
    if LOGITS_TO_KEEP in {i.name for i in graph.graph.input} and _ragged_last_positions(graph):
        # A required input: IO binding (which the shared cache needs) cannot override an initializer.
        default = next(t for t in graph.graph.initializer if t.name == LOGITS_TO_KEEP)
        graph.graph.initializer.remove(default)
    removed = graph.remove_dead_nodes()
    unused = [i for i in graph.graph.input if not graph.consumers(i.name)]
    for value in unused:  # position_ids: the attention derives positions from the lengths
        graph.graph.input.remove(value)
    log.info("ragged attention: %d layers, %d nodes dropped", layers, removed)
    return True
