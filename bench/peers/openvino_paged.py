"""The OpenVINO engine spike (issue 33): condgen-style decoding on OpenVINO's paged-attention graph.

OpenVINO GenAI's continuous batching runs the model after `paged_attention_transformation`: each
layer's KV cache is a pool of fixed-size blocks passed in as an input tensor and written in place,
and every pass takes the sequences' new tokens back to back (no padding) with their block tables.
Here the block tables live on the host, in Python, so the scheduler's cache moves cost no copy:
a row that leaves returns its blocks (filter), a prefilled row joins by appending its table
(join), a fork shares the parent's full blocks and copies only the last, partly filled one, and
a prefix cache would share full blocks the same way.

`bench/peers/run_peer.py openvino` measures it beside GenAI's own pipeline on the same exported
model and token ids (`make bench` reports it as `openvino_paged_*`). It runs in .venv-openvino
and imports nothing of condgen.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

BLOCK_TOKENS = 32  # the CPU plugin's block size for the paged KV cache


def add_logits_indices(model) -> None:
    """Compute logits only for the tokens named by a new input `logits_indices` (each
    sequence's last new token), as GenAI does before the LM head's MatMul."""
    import openvino as ov
    from openvino import opset13 as ops

    node = model.get_results()[0].input_value(0).get_node()
    while node.get_type_name() != "MatMul":
        node = node.input_value(0).get_node()
    indices = ops.parameter([-1], ov.Type.i64, name="logits_indices")
    indices.output(0).get_tensor().set_names({"logits_indices"})
    node.input(0).replace_source_output(ops.gather(node.input_value(0), indices, ops.constant(0)).output(0))
    model.add_parameters([indices])
    model.validate_nodes_and_infer_types()


class Sequence:
    """One row: how many of its tokens are in the cache, and the blocks holding them."""

    def __init__(self) -> None:
        self.cached = 0
        self.blocks: list[int] = []


class PagedModel:
    """An optimum-intel OpenVINO export, compiled with paged attention and a block pool."""

    def __init__(self, folder: Path, properties: dict, blocks: int = 1024):
        import openvino as ov
        from openvino._offline_transformations import paged_attention_transformation

        core = ov.Core()
        model = core.read_model(str(folder / "openvino_model.xml"))
        paged_attention_transformation(model, False, False)
        add_logits_indices(model)
        self.compiled = core.compile_model(model, "CPU", properties)
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.request = self.compiled.create_infer_request()
        self.caches = {}
        for port in self.compiled.inputs:
            name = port.get_any_name()
            if name.startswith(("key_cache.", "value_cache.")):
                shape = port.get_partial_shape()
                dims = [blocks] + [shape[i].get_length() for i in range(1, shape.rank.get_length())]
                tensor = ov.Tensor(port.get_element_type(), ov.Shape(dims))
                np.asarray(tensor.data)[...] = 0
                self.request.set_tensor(name, tensor)  # set once: every pass writes into these
                self.caches[name] = tensor
        self.cache_type = str(next(iter(self.caches.values())).element_type)
        self.free = list(range(blocks - 1, -1, -1))

    def run(self, rows: list[Sequence], chunks: list[list[int]]) -> np.ndarray:
        """One pass: `chunks[i]` are row i's new tokens (a whole prompt, or one token). Returns
        the logits of each row's last new token, (rows, vocab)."""
        ids: list[int] = []
        positions: list[int] = []
        begins, table, table_begins = [0], [], [0]
        for row, new in zip(rows, chunks):
            while len(row.blocks) * BLOCK_TOKENS < row.cached + len(new):
                row.blocks.append(self.free.pop())
            ids += new
            positions += range(row.cached, row.cached + len(new))
            begins.append(begins[-1] + len(new))
            table += row.blocks
            table_begins.append(len(table))
        self.request.infer(
            {
                "input_ids": np.array(ids, np.int64),
                "position_ids": np.array(positions, np.int64),
                "past_lens": np.array([row.cached for row in rows], np.int32),
                "subsequence_begins": np.array(begins, np.int32),
                "block_indices": np.array(table, np.int32),
                "block_indices_begins": np.array(table_begins, np.int32),
                "max_context_len": np.array(max(r.cached + len(n) for r, n in zip(rows, chunks)), np.int32),
                "logits_indices": np.array(begins[1:], np.int64) - 1,
            }
        )
        for row, new in zip(rows, chunks):
            row.cached += len(new)
        return self.request.get_output_tensor(0).data.reshape(len(rows), -1)

    def release(self, rows: list[Sequence]) -> None:
        """Filter: the rows' blocks go back to the pool; nothing is copied."""
        for row in rows:
            self.free += row.blocks
            row.blocks = []

    def fork(self, parent: Sequence) -> Sequence:
        """A copy of `parent` sharing its full blocks; only the partly filled last one is copied."""
        child = Sequence()
        child.cached = parent.cached
        child.blocks = parent.blocks[:-1] + [self.free.pop()]
        for tensor in self.caches.values():
            data = np.asarray(tensor.data)
            data[child.blocks[-1]] = data[parent.blocks[-1]]
        return child

    def greedy(self, prompts: list[list[int]], count: int) -> list[list[int]]:
        """Prefill all prompts in one pass (back to back, no padding), then decode greedily."""
        rows = [Sequence() for _ in prompts]
        try:
            chosen = self.run(rows, [list(p) for p in prompts]).argmax(-1)
            produced = [[int(t)] for t in chosen]
            for _ in range(count - 1):
                chosen = self.run(rows, [[int(t)] for t in chosen]).argmax(-1)
                for out, token in zip(produced, chosen):
                    out.append(int(token))
            return produced
        finally:
            self.release(rows)


def scheduler_moves(model: PagedModel, prompts: list[list[int]], new_tokens: int = 16) -> dict:
    """The scheduler's cache moves on this design, timed, and checked against a plain run:
    15 rows decode; 4 leave (filter); a 16th prompt, prefilled alone, joins; row 0 forks; decoding
    goes on. `moves_keep_tokens` is 1.0 when every row's tokens equal the plain batch's."""
    plain = model.greedy(prompts[:16], new_tokens)
    rows = [Sequence() for _ in prompts[:15]]
    chosen = model.run(rows, [list(p) for p in prompts[:15]]).argmax(-1)
    produced = [[int(t)] for t in chosen]
    started = time.perf_counter()
    model.release(rows[11:])
    rows, chosen, produced = rows[:11], chosen[:11], produced[:11]
    filter_ms = (time.perf_counter() - started) * 1e3
    newcomer = Sequence()
    first = model.run([newcomer], [list(prompts[15])]).argmax(-1)
    started = time.perf_counter()
    rows, chosen, produced = rows + [newcomer], np.concatenate([chosen, first]), produced + [[int(first[0])]]
    join_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    rows.append(model.fork(rows[0]))
    fork_ms = (time.perf_counter() - started) * 1e3
    chosen, produced = np.concatenate([chosen, chosen[:1]]), produced + [list(produced[0])]
    steps = []
    while len(produced[0]) < new_tokens:
        started = time.perf_counter()
        chosen = model.run(rows, [[int(t)] for t in chosen]).argmax(-1)
        steps.append(time.perf_counter() - started)
        for out, token in zip(produced, chosen):
            out.append(int(token))
    model.release(rows)
    expected = plain[:11] + [plain[15], plain[0]]
    return {
        "filter_ms": filter_ms,
        "join_ms": join_ms,
        "fork_ms": fork_ms,
        "decode_ms_after_moves": float(np.median(steps) * 1e3),
        "moves_keep_tokens": float(produced == expected),
    }
