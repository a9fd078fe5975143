"""The OpenVINO engine: the bundle's OpenVINO graph with paged attention, on the CPU.

On CPUs that compute bf16 (AMX, or AVX-512 BF16) OpenVINO's CPU plugin runs the model much
faster than ONNX Runtime's CPU provider, which has no bf16 GEMM on x86. The bundle's OpenVINO
graph (`condgen export --runtime openvino`, optimum-intel's export) is turned at load into
OpenVINO's paged-attention form, the graph OpenVINO GenAI's continuous batching runs: each
layer's cache is a pool of blocks set on the infer request once and written in place, and a
pass takes every row's new tokens back to back, without padding, with the rows' block tables
(server/paged_batch.py). A new `logits_indices` input computes the LM head only for the
positions asked for: each row's last token when decoding, a window of them when scoring.

It offers what the scheduler, the label check and the line keeper use of `Engine`
(server/engine.py): prefill, step, forward, score, position logits, the prefix cache. No torch
or transformers here; `openvino` is an optional dependency (`pip install condgen[openvino]`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from condgen.bundle import TOKENIZER_NAME, Manifest
from condgen.server import graphs
from condgen.server.engine import (
    SHARED_CONTEXT_MIN,
    EngineBase,
    EngineConfig,
    EngineError,
    _add_timings,
    _take_means,
    session_options,
)
from condgen.server.paged_batch import BLOCK_TOKENS, BlockPool, PagedBatch
from condgen.server.prefix_cache import PrefixCache
from condgen.server.sampling import WINDOW, TokenWindows

log = logging.getLogger(__name__)
INITIAL_BLOCKS = 128  # 4,096 tokens; the pool doubles when it runs out


def add_logits_indices(model) -> None:
    """Compute the LM head only at the positions named by a new input `logits_indices`, as
    OpenVINO GenAI does: a Gather before the head's MatMul."""
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


def compile_paged(model_path: Path, precision: str = "auto", threads: int = 0):
    """The bundle's OpenVINO graph in paged-attention form, compiled for the CPU. `precision`:
    auto (the CPU plugin's default: bf16 where the CPU computes it) or f32 (compute and cache)."""
    import openvino as ov
    from openvino._offline_transformations import paged_attention_transformation

    core = ov.Core()
    model = core.read_model(str(model_path))
    paged_attention_transformation(model, False, False)
    add_logits_indices(model)
    properties: dict = {}
    if precision == "f32":
        properties.update({"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"})
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    return core.compile_model(model, "CPU", properties)


@dataclass
class _Pass:
    """The paged graph's inputs for one pass, and where each row's logits come back."""

    feed: dict
    rows_taken: list[int]  # logits rows per batch row (its last min(keep, new) positions)


class OpenVINOEngine(EngineBase):
    """Runs passes of the bundle's OpenVINO graph over `PagedBatch`es."""

    runtime = "openvino"
    device_type = "cpu"
    io_binding = False
    can_score = True  # logits_indices takes any positions

    def __init__(
        self,
        bundle_dir: str | Path,
        manifest: Manifest,
        config: EngineConfig = EngineConfig(),
        initial_blocks: int = INITIAL_BLOCKS,
    ):
        if manifest.openvino is None:
            raise EngineError("this bundle has no OpenVINO graph; export it with `condgen export --runtime openvino`")
        if config.device == "cuda":
            raise EngineError("--device cuda: the OpenVINO engine runs on the CPU; use --runtime onnxruntime")
        bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.info = manifest.openvino
        try:
            self.compiled = compile_paged(bundle_dir / self.info["file"], config.openvino_precision, config.threads)
        except Exception as error:  # OpenVINO raises plain RuntimeErrors
            raise EngineError(f"OpenVINO could not load {self.info['file']}: {error}") from error
        self.request = self.compiled.create_infer_request()
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.provider = f"OpenVINO CPU ({self.precision})"
        self.cache_names = [
            p.get_any_name()
            for p in self.compiled.inputs
            if p.get_any_name().startswith(("key_cache.", "value_cache."))
        ]
        self.tensors: dict = {}
        self._allocate(initial_blocks)
        self.pool = BlockPool(initial_blocks, self._allocate, self._copy_block)
        self.cache_bytes_per_token = sum(t.byte_size for t in self.tensors.values()) // (initial_blocks * BLOCK_TOKENS)
        self.tokenizer = Tokenizer.from_file(str(bundle_dir / TOKENIZER_NAME))
        self.vocab_size = int(self.compiled.outputs[0].get_partial_shape()[-1].get_length())
        self.newline_tokens = self._tokens_containing("\n")
        self.contexts = PrefixCache(config.context_cache_tokens)
        self.head = None
        if config.sampling_head == "on":
            head_model = graphs.sampling_head(min(WINDOW, self.vocab_size), np.float32)
            self.head = ort.InferenceSession(head_model, session_options(1), providers=["CPUExecutionProvider"])
        log.info("engine on %s: %d cache tensors, KV %s", self.provider, len(self.cache_names), self.cache_type)

    @property
    def cache_type(self) -> str:
        return next(iter(self.tensors.values())).element_type.to_string()

    # ---- the block pool's tensors ------------------------------------------------------------
    def _allocate(self, blocks: int) -> None:
        """Cache tensors of `blocks` blocks, holding the old ones' blocks, set on the request."""
        import openvino as ov

        for port in self.compiled.inputs:
            name = port.get_any_name()
            if name not in self.cache_names:
                continue
            shape = port.get_partial_shape()
            dims = [blocks] + [shape[i].get_length() for i in range(1, shape.rank.get_length())]
            tensor = ov.Tensor(port.get_element_type(), ov.Shape(dims))
            new = _raw(tensor)
            old = self.tensors.get(name)
            if old is not None:
                kept = _raw(old)
                new[: len(kept)] = kept
                new[len(kept) :] = 0
            else:
                new[...] = 0
            self.request.set_tensor(name, tensor)  # every pass writes into these
            self.tensors[name] = tensor

    def _copy_block(self, source: int, target: int) -> None:
        for tensor in self.tensors.values():
            data = _raw(tensor)
            data[target] = data[source]

    def free_device_bytes(self) -> int | None:
        return None

    # ---- batches -----------------------------------------------------------------------------
    def prompts_batch(self, seq_ids: list[int], prompts: list[list[int]]) -> PagedBatch:
        return PagedBatch.for_prompts(self.pool, seq_ids, prompts)

    def prefill_groups(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Prompts go back to back, without padding: at most `max_tokens` a pass, in order."""
        return _token_groups(prompts, max_tokens)

    # ---- passes ------------------------------------------------------------------------------
    def _inputs(self, batch: PagedBatch, keep: int) -> _Pass:
        batch.prepare()
        ids: list[int] = []
        positions: list[int] = []
        indices: list[int] = []
        table: list[int] = []
        taken: list[int] = []
        begins, table_begins = [0], [0]
        for row, new in enumerate(batch.pending):
            if not new:
                raise EngineError("a row of the batch has no token to feed")
            cached = int(batch.lengths[row])
            ids += new
            positions += range(cached, cached + len(new))
            begins.append(begins[-1] + len(new))
            table += batch.tables[row]
            table_begins.append(len(table))
            count = min(keep, len(new))
            indices += range(begins[-1] - count, begins[-1])
            taken.append(count)
        feed = {
            "input_ids": np.array(ids, np.int64),
            "position_ids": np.array(positions, np.int64),
            "past_lens": batch.lengths.astype(np.int32),
            "subsequence_begins": np.array(begins, np.int32),
            "block_indices": np.array(table, np.int32),
            "block_indices_begins": np.array(table_begins, np.int32),
            "max_context_len": np.array(int((batch.lengths + np.diff(begins)).max()), np.int32),
            "logits_indices": np.array(indices, np.int64),
        }
        return _Pass(feed, taken)

    def _run(self, batch: PagedBatch, keep: int = 1) -> np.ndarray:
        """One pass; returns the logits of each row's last `keep` new positions, right-aligned,
        (rows, keep, vocab) (positions a row does not have are zeros)."""
        paged = self._inputs(batch, keep)
        self.request.infer(paged.feed)
        batch.advance()
        flat = self.request.get_output_tensor(0).data.reshape(-1, self.vocab_size)
        if keep == 1:
            return flat.reshape(len(batch), 1, self.vocab_size).astype(np.float32, copy=True)
        logits = np.zeros((len(batch), keep, self.vocab_size), dtype=np.float32)
        start = 0
        for row, count in enumerate(paged.rows_taken):
            logits[row, keep - count :] = flat[start : start + count]
            start += count
        return logits

    def forward(self, batch: PagedBatch) -> np.ndarray:
        """Run the batch's pending tokens; last-position logits (rows, vocab)."""
        return self._run(batch)[:, -1, :]

    def step(self, batch: PagedBatch, temperatures: np.ndarray, timings: dict | None = None) -> TokenWindows:
        """As `Engine.step`: what sampling needs of each row (through the sampling head on the host)."""
        started = time.perf_counter()
        logits = self._run(batch)  # (rows, 1, vocab)
        ran = time.perf_counter()
        if self.head is None:
            windows = TokenWindows.from_logits(logits[:, -1, :], temperatures)
        else:
            windows = self._head_windows(logits, temperatures)
        _add_timings(timings, started, ran)
        return windows

    def position_logits(self, token_ids: list[int]) -> np.ndarray:
        """The logits after every prefix of `token_ids`, (len, vocab): one pass, nothing kept."""
        return self._run(self.prompts_batch([0], [list(token_ids)]), len(token_ids))[0]

    def score(self, contexts: list[list[int]], continuations: list[list[int]], max_tokens: int = 1024) -> np.ndarray:
        """Mean log-probability per token of each continuation after its context, (rows,).
        A context of SHARED_CONTEXT_MIN tokens or more is prefilled once and kept (the prefix
        cache, `self.contexts`); its rows share its blocks and feed only its last token and
        their own. Shorter contexts go whole. Passes hold at most `max_tokens` new tokens."""
        means = np.zeros(len(contexts), dtype=np.float64)
        shared = [i for i, context in enumerate(contexts) if len(context) >= SHARED_CONTEXT_MIN]
        prefixes = {i: tuple(contexts[i][:-1]) for i in shared}
        cached = self._context_batches(sorted(set(prefixes.values()), key=len, reverse=True), max_tokens)
        rows, feeds = [], []
        for index, context in enumerate(contexts):
            if index in prefixes:
                rows.append(cached[prefixes[index]].fork([index]))
                feeds.append([context[-1], *continuations[index]])
            else:
                rows.append(self.prompts_batch([index], [list(context) + list(continuations[index])]))
                feeds.append(list(context) + list(continuations[index]))
        for group in _token_groups(feeds, max_tokens):
            batch = PagedBatch.concatenate([rows[i] for i in group], consume=True)
            batch.set_next_rows([feeds[i] for i in group])
            keep = max(len(continuations[i]) for i in group) + 1
            _take_means(self._run(batch, keep), keep, group, continuations, means)
            for i in group:
                rows[i] = None  # its blocks go back with the pass's batch
        return means


def _raw(tensor) -> np.ndarray:
    """A cache tensor's memory as (blocks, bytes per block) uint8, a view (bf16 tensors come to
    numpy as float16 arrays of the right size: only their bytes are moved here)."""
    data = tensor.data
    return data.view(np.uint8).reshape(data.shape[0], -1)


def _token_groups(rows: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Indices of `rows` in order, cut into groups of at most `max_tokens` tokens in all (no
    padding in a paged pass; a longer row goes alone)."""
    groups: list[list[int]] = []
    total = 0
    for index, row in enumerate(rows):
        if groups and total + len(row) <= max_tokens:
            groups[-1].append(index)
            total += len(row)
        else:
            groups.append([index])
            total = len(row)
    return groups
