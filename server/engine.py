"""The inference engine: one ONNX Runtime session over the bundle's graph, with KV cache.

`Engine.forward(batch)` runs one pass for every row of a `Batch` (a prefill or a decode
step), moves the returned `present.*` cache into the batch and returns the logits of each
row's last position. CUDA is used through onnxruntime-gpu where present, else the CPU.
With IO binding (on by default under CUDA) the cache outputs stay on the device as
OrtValues and are bound as the next step's inputs, so only token ids, masks and the
last logits cross the bus. A bundle exported with the append-only cache (the default on CPUs,
training/graph.py) returns only each step's new entries, which `Batch.advance` writes into
host buffers in place: no step copies the cache. A ragged bundle (the CPU default) runs its
attention over right-padded host buffers (`RaggedBatch`) bound as both past and present, so the
graph itself appends in place and reads each row's own tokens only; it runs on the CPU.
No torch or transformers here.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from condgen.bundle import (
    APPEND_ONLY_CACHE,
    LAST_POSITION_LOGITS,
    LOGITS_TO_KEEP,
    LOGITS_WINDOW,
    RAGGED_ATTENTION,
    TOKENIZER_NAME,
    Manifest,
)
from condgen.errors import CondgenError
from condgen.server import graphs
from condgen.server.batch import Batch
from condgen.server.device_cache import CacheMoves
from condgen.server.prefix_cache import PrefixCache
from condgen.server.ragged_batch import RaggedBatch
from condgen.server.sampling import WINDOW, TokenWindows, log_normalizer

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")
RUNTIMES = ("auto", "onnxruntime", "openvino")  # server/runtime.py chooses
OPENVINO_PRECISIONS = ("auto", "f32")
SHARED_CONTEXT_MIN = 8  # context tokens from which scoring computes a context's cache once and shares it
# The same under ragged attention, whose rows after a kept context each take a pass of their own
# (several new tokens after a cache go to one row at a time): worth it only for longer contexts.
SHARED_CONTEXT_MIN_RAGGED = 32


class EngineError(CondgenError, RuntimeError):
    """The engine could not be started as asked."""


@dataclass(frozen=True)
class EngineConfig:
    """How to run the graph."""

    device: str = "auto"
    threads: int = 0  # 0: one per core
    io_binding: str = "auto"  # auto: on under CUDA; on; off
    sampling_head: str = "on"  # on: top tokens picked on the model's device (graphs.sampling_head); off: host
    # Scoring: the cache of contexts of at least SHARED_CONTEXT_MIN tokens is computed once and
    # kept (LRU, at most this many tokens); lines scored after them feed only their own tokens.
    context_cache_tokens: int = 8192
    # auto: OpenVINO where the bundle has its graph and the CPU computes bf16 (server/runtime.py)
    runtime: str = "auto"
    # the OpenVINO engine's compute and cache: auto (the CPU plugin's default, bf16 where the CPU
    # computes it) or f32
    openvino_precision: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise EngineError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.runtime not in RUNTIMES:
            raise EngineError(f"runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.openvino_precision not in OPENVINO_PRECISIONS:
            raise EngineError(
                f"openvino precision {self.openvino_precision!r} is not one of {', '.join(OPENVINO_PRECISIONS)}"
            )
        if self.io_binding not in ("auto", "on", "off"):
            raise EngineError(f"io_binding {self.io_binding!r} is not one of auto, on, off")
        if self.context_cache_tokens < 0:
            raise EngineError(f"context_cache_tokens {self.context_cache_tokens}: give 0 (no cache) or more")
        if self.sampling_head not in ("on", "off"):
            raise EngineError(f"sampling_head {self.sampling_head!r} is not one of on, off")


def choose_providers(device: str) -> list[str]:
    """Execution providers for `device`; `auto` takes CUDA when onnxruntime-gpu sees a GPU."""
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise EngineError(
            "--device cuda: this onnxruntime has no CUDAExecutionProvider; "
            "install onnxruntime-gpu on a machine with an NVIDIA GPU"
        )
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA / cuDNN libraries installed as nvidia-* wheels
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def helper_providers(providers: list[str]) -> list:
    """Providers for the small graphs beside the model: under CUDA their memory arena grows by
    what each run asks for, not in doubling chunks, so cache-sized blocks are not held twice."""
    return [
        ("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})
        if name == "CUDAExecutionProvider"
        else name
        for name in providers
    ]


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Every step has a new cache length: an arena would keep (and fragment) a block per shape
    # and grow to several GB; plain allocations give the memory back.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    # Errors only: ORT warns at every load that `num_logits_to_keep` (an input with a default,
    # by design) is not folded as a constant.
    options.log_severity_level = 3
    return options


class EngineBase:
    """What every runtime's engine shares: the bundle's tokenizer, the scoring contexts kept in
    the prefix cache, the prefill loop and the sampling head over host logits. Subclasses set
    `tokenizer`, `vocab_size`, `contexts` and `head`, and implement `prompts_batch`, `forward`
    and `prefill_groups`."""

    tokenizer: Tokenizer
    vocab_size: int
    contexts: PrefixCache
    head: ort.InferenceSession | None = None

    def _head_windows(self, logits: np.ndarray, temperatures: np.ndarray) -> TokenWindows:
        """What sampling needs of each row from host logits (rows, positions, vocab), through the
        sampling head: the top tokens and a normaliser per row; the full logits stay here."""
        assert self.head is not None
        temperatures = np.ascontiguousarray(temperatures, dtype=np.float32)
        top_logits, top_ids, log_norm = self.head.run(None, {"logits": logits, "temperature": temperatures})
        return TokenWindows(
            top_ids,
            top_logits,
            log_norm.astype(np.float64),
            temperatures.astype(np.float64),
            self.vocab_size,
            lambda: _last_position(logits),  # fetched once per step, only if a draw needs it
        )

    def prompts_batch(self, seq_ids: list[int], prompts: list[list[int]]) -> Any:
        raise NotImplementedError

    def forward(self, batch) -> np.ndarray:
        raise NotImplementedError

    def prefill_groups(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Indices of `prompts` that share a prefill pass."""
        raise NotImplementedError

    def prefill(
        self, seq_ids: list[int], prompts: list[list[int]], max_tokens: int = 1024
    ) -> list[tuple[Any, np.ndarray]]:
        """Prefill prompts, several per pass (`prefill_groups`, at most `max_tokens` a pass); one
        (one-row batch, last logits) per prompt, in the order given."""
        results: list = [None] * len(prompts)
        for group in self.prefill_groups(prompts, max_tokens):
            batch = self.prompts_batch([seq_ids[i] for i in group], [prompts[i] for i in group])
            logits = self.forward(batch)
            for row, index in enumerate(group):
                results[index] = (batch.filter([seq_ids[index]]), logits[row])
        return results

    def _tokens_containing(self, text: str) -> np.ndarray:
        """Boolean mask over the vocabulary: tokens whose decoded text contains `text`."""
        size = self.tokenizer.get_vocab_size()
        decoded = self.tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
        mask = np.zeros(max(size, self.vocab_size), dtype=bool)
        mask[:size] = [text in piece for piece in decoded]
        return mask

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def new_batch(self, seq_id: int, token_ids: list[int]) -> Any:
        """A one-row batch that will prefill `token_ids`."""
        return self.prompts_batch([seq_id], [token_ids])

    def _context_batches(self, prefixes: list[tuple[int, ...]], max_tokens: int) -> dict[tuple[int, ...], Any]:
        """A one-row batch holding each context's cache: kept from before, or prefilled now."""
        found: dict[tuple[int, ...], Any] = {}
        for prefix in prefixes:
            hit = self.contexts.lookup(list(prefix), 0)
            if hit is not None:
                found[prefix] = hit[0]
        missing = [p for p in prefixes if p not in found]
        if missing:
            results = self.prefill(list(range(len(missing))), [list(p) for p in missing], max_tokens)
            for prefix, (batch, logits) in zip(missing, results):
                self.contexts.store(list(prefix), batch, logits)
                found[prefix] = batch
        return found


class Engine(EngineBase):
    """Runs forward passes of the bundle's model over batches."""

    runtime = "onnxruntime"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, config: EngineConfig = EngineConfig()):
        bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.info = manifest.onnx
        providers = self._providers(config.device)
        self.session = ort.InferenceSession(
            str(bundle_dir / self.info.file), session_options(config.threads), providers=providers
        )
        self.provider = self.session.get_providers()[0]
        self.device_type = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        # An append-only graph returns only new cache entries, written into host buffers in place.
        self.append_only = APPEND_ONLY_CACHE in self.info.rewrites
        # A ragged graph writes each pass's entries into the host buffers bound as past and present.
        self.ragged = RAGGED_ATTENTION in self.info.rewrites
        self.io_binding = (
            not self.append_only
            and not self.ragged
            and (config.io_binding == "on" or (config.io_binding == "auto" and self.device_type == "cuda"))
        )
        if self.append_only and self.device_type == "cuda":
            log.warning(
                "this bundle's cache is append-only (host buffers): under CUDA every step sends the "
                "cache to the GPU; export with `--variant fp16` or `--cache whole` to keep it there"
            )
        self.tokenizer = Tokenizer.from_file(str(bundle_dir / TOKENIZER_NAME))
        self.dtype = np.float16 if self.info.dtype == "float16" else np.float32
        # keys and values of every layer for one token: what the KV budget counts
        self.cache_bytes_per_token = (
            2 * self.info.num_layers * self.info.num_kv_heads * self.info.head_dim * np.dtype(self.dtype).itemsize
        )
        # Under IO binding rows join and leave on the device (small graphs beside the model).
        self.moves = (
            CacheMoves(
                self.info.past_key_names, self.dtype, helper_providers(providers), self.device_type, session_options(1)
            )
            if self.io_binding
            else None
        )
        self.input_names = set(self.info.inputs)
        self.session_inputs = {i.name for i in self.session.get_inputs()} | {
            i.name for i in self.session.get_overridable_initializers()
        }
        self.output_names = ["logits", *self.info.present_key_names]
        self.token_inputs = sorted(self.input_names.difference(self.info.past_key_names))  # ragged passes bind these
        self._bound: tuple | None = None  # (buffer layout, IO binding) of the last ragged pass
        self.logits_dtype = np.float16 if "float16" in self.session.get_outputs()[0].type else np.float32
        self.vocab_size = self.session.get_outputs()[0].shape[-1]
        if not isinstance(self.vocab_size, int):
            self.vocab_size = self.tokenizer.get_vocab_size()
        self.newline_tokens = self._tokens_containing("\n")
        # Scoring a line needs the logits of its every token: a graph that keeps all positions,
        # or one whose last-position slice takes a window (`num_logits_to_keep`).
        self.can_score = LOGITS_WINDOW in self.info.rewrites or LAST_POSITION_LOGITS not in self.info.rewrites
        self.contexts = PrefixCache(config.context_cache_tokens)
        self.head = None
        if config.sampling_head == "on":
            head_model = graphs.sampling_head(min(WINDOW, self.vocab_size), self.dtype)
            # One thread on the CPU: a second thread pool would spin against the model's own. The
            # head runs where the logits are: on the device under IO binding, else on the host.
            head_providers = helper_providers(providers) if self.io_binding else ["CPUExecutionProvider"]
            threads = config.threads if self.io_binding and self.device_type == "cuda" else 1
            self.head = ort.InferenceSession(head_model, session_options(threads), providers=head_providers)
        log.info(
            "engine on %s: %d layers, %d KV heads of %d, vocab %d",
            self.provider,
            self.info.num_layers,
            self.info.num_kv_heads,
            self.info.head_dim,
            self.vocab_size,
        )

    def _providers(self, device: str) -> list[str]:
        """`choose_providers`, but a ragged bundle runs on the CPU: its cache buffers are host
        memory that the graph writes in place."""
        if RAGGED_ATTENTION not in self.info.rewrites:
            return choose_providers(device)
        if device == "cuda":
            raise EngineError(
                "--device cuda: this bundle's ragged cache lives in host memory (CPU bundles); "
                "export it with `--variant fp16` (or `--cache whole`) for the GPU"
            )
        if device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers():
            log.warning(
                "this bundle has a ragged (host) cache: it runs on the CPU; export `--variant fp16` for the GPU"
            )
        return ["CPUExecutionProvider"]

    def free_device_bytes(self) -> int | None:
        """Free memory of the CUDA device now (None on the CPU, or where it cannot be read)."""
        return cuda_free_bytes() if self.device_type == "cuda" else None

    def prompts_batch(self, seq_ids: list[int], prompts: list[list[int]]) -> Batch | RaggedBatch:
        """A batch that prefills several prompts in one pass (left-padded; right-padded for a
        ragged graph)."""
        if self.ragged:
            return RaggedBatch.for_prompts(
                seq_ids, prompts, self.info.past_key_names, self.info.num_kv_heads, self.info.head_dim, self.dtype
            )
        return Batch.for_prompts(
            seq_ids,
            prompts,
            self.info.past_key_names,
            self.info.num_kv_heads,
            self.info.head_dim,
            self.dtype,
            self.append_only,
            self.moves,
        )

    def prefill_groups(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Prompts of similar lengths share a pass (longest first), so little of a pass is left
        padding; at most `max_tokens` padded tokens a pass bound its activations."""
        return _length_groups(prompts, max_tokens)

    def score(self, contexts: list[list[int]], continuations: list[list[int]], max_tokens: int = 1024) -> np.ndarray:
        """Mean log-probability per token of each continuation after its context, (rows,).

        Rows go in passes of similar lengths, at most `max_tokens` padded tokens each (no cache
        kept); the graph returns logits for the last len(continuation) + 1 positions only, so a
        pass holds at most max_tokens x vocab floats of logits. A context of SHARED_CONTEXT_MIN
        tokens or more (examples before an intent's prefix) is run once and its cache kept
        (`self.contexts`, LRU): its rows feed only the context's last token and their own (under
        ragged attention from SHARED_CONTEXT_MIN_RAGGED tokens, one row per pass)."""
        self._require_all_positions()
        means = np.zeros(len(contexts), dtype=np.float64)
        least = SHARED_CONTEXT_MIN_RAGGED if self.ragged else SHARED_CONTEXT_MIN
        shared = [i for i, context in enumerate(contexts) if len(context) >= least]
        whole = [i for i, context in enumerate(contexts) if len(context) < least]
        rows = [list(contexts[i]) + list(continuations[i]) for i in whole]
        for group in _length_groups(rows, max_tokens):
            members = [whole[g] for g in group]
            keep = max(len(continuations[i]) for i in members) + 1
            batch = self.prompts_batch(list(range(len(group))), [rows[g] for g in group])
            _take_means(self._window_logits(batch, keep), keep, members, continuations, means)
        if shared:
            self._score_after_cached(shared, contexts, continuations, max_tokens, means)
        return means

    def _score_after_cached(self, indices, contexts, continuations, max_tokens: int, means: np.ndarray) -> None:
        """`score` for rows whose context's cache (all but its last token) is computed once."""
        prefixes = {i: tuple(contexts[i][:-1]) for i in indices}
        cached = self._context_batches(sorted(set(prefixes.values()), key=len, reverse=True), max_tokens)
        suffixes = {i: [contexts[i][-1], *continuations[i]] for i in indices}
        # Passes of rows in order of (context, suffix length); a pass holds rows x (longest
        # context + longest suffix) tokens of at most max_tokens.
        ordered = sorted(indices, key=lambda i: (len(prefixes[i]), prefixes[i], len(suffixes[i])))
        passes: list[list[int]] = []
        for index in ordered:
            width = len(prefixes[index]) + len(suffixes[index])
            if passes and not self.ragged:  # ragged: one row per pass after a cache
                members = passes[-1] + [index]
                widest = max(len(prefixes[i]) for i in members) + max(len(suffixes[i]) for i in members)
                if len(members) * widest <= max(max_tokens, width):
                    passes[-1].append(index)
                    continue
            passes.append([index])
        for members in passes:
            parts, seq = [], 0
            for prefix, rows in itertools.groupby(members, key=prefixes.__getitem__):  # grouped by context
                count = len(list(rows))
                parts.append(cached[prefix].fork(list(range(seq, seq + count))))
                seq += count
            batch = type(parts[0]).concatenate(parts)
            batch.set_next_rows([suffixes[i] for i in members])
            keep = max(len(continuations[i]) for i in members) + 1
            _take_means(self._window_logits(batch, keep), keep, members, continuations, means)

    def _require_all_positions(self) -> None:
        if not self.can_score:
            raise EngineError(
                "this bundle's graph returns last-position logits only; re-export it with this "
                "version of condgen to score lines"
            )

    def position_logits(self, token_ids: list[int]) -> np.ndarray:
        """The logits after every prefix of `token_ids`, (len, vocab): one pass, no cache kept."""
        self._require_all_positions()
        return self._window_logits(self.prompts_batch([0], [list(token_ids)]), len(token_ids))[0]

    def _window_logits(self, batch: Batch | RaggedBatch, keep: int) -> np.ndarray:
        if isinstance(batch, RaggedBatch):
            return self._run_ragged(batch, keep)
        feed = {k: v for k, v in batch.feed().items() if k in self.input_names}
        if LOGITS_TO_KEEP in self.session_inputs:
            feed[LOGITS_TO_KEEP] = np.array([keep], dtype=np.int64)
        logits = self.session.run(["logits"], feed)[0]  # (batch, keep or all positions, vocab)
        return logits[:, -keep:, :]

    def forward(self, batch: Batch) -> np.ndarray:
        """Run `batch.next_ids` through the model; return last-position logits (batch, vocab)."""
        logits = self._run(batch, logits_on_device=False)
        return np.ascontiguousarray(logits[:, -1, :])  # (batch, vocab); frees the prefill's full logits

    def step(self, batch: Batch, temperatures: np.ndarray, timings: dict | None = None) -> TokenWindows:
        """Run `batch.next_ids` through the model; return what sampling needs of each row
        (`temperatures`: each row's, > 0). With the sampling head only the top tokens and a
        normaliser per row come to the host; the full logits stay where they are, fetched only
        for the rare draw beyond the window. `timings` (benchmarks): adds the seconds spent in
        the model pass (`model`, cache moves included) and in the head or host ranking (`head`)."""
        started = time.perf_counter()
        if self.head is None:
            logits = self.forward(batch)
            ran = time.perf_counter()
            windows = TokenWindows.from_logits(logits, temperatures)
            _add_timings(timings, started, ran)
            return windows
        logits = self._run(batch, logits_on_device=self.io_binding)
        ran = time.perf_counter()
        if isinstance(logits, np.ndarray):
            windows = self._head_windows(logits, temperatures)
        else:
            windows = self._device_head_windows(logits, temperatures)
        _add_timings(timings, started, ran)
        return windows

    def _device_head_windows(self, logits, temperatures: np.ndarray) -> TokenWindows:
        """`_head_windows` for logits left on the device (an OrtValue): the head reads them there."""
        assert self.head is not None
        temperatures = np.ascontiguousarray(temperatures, dtype=np.float32)
        binding = self.head.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_cpu_input("temperature", temperatures)
        for name in ("top_logits", "top_ids", "log_norm"):
            binding.bind_output(name, "cpu")
        self.head.run_with_iobinding(binding)
        top_logits, top_ids, log_norm = (value.numpy() for value in binding.get_outputs())
        return TokenWindows(
            top_ids,
            top_logits,
            log_norm.astype(np.float64),
            temperatures.astype(np.float64),
            self.vocab_size,
            lambda: _last_position(logits),  # fetched once per step, only if a draw needs it
        )

    def _run(self, batch: Batch, logits_on_device: bool):
        """One pass; the cache moves into `batch`. Returns the logits (batch, positions, vocab):
        numpy, or an OrtValue left on the device (`logits_on_device`, IO binding only)."""
        if isinstance(batch, RaggedBatch):
            return self._run_ragged(batch)
        feed = {k: v for k, v in batch.feed().items() if k in self.input_names}
        if self.io_binding:
            logits, present = self._run_bound(feed, logits_on_device)
        else:
            outputs = self.session.run(self.output_names, feed)
            logits, present = outputs[0], outputs[1:]
        batch.advance(dict(zip(self.info.past_key_names, present)))
        return logits

    def _run_ragged(self, batch: RaggedBatch, keep: int = 1) -> np.ndarray:
        """One pass of a ragged graph: each cache buffer is bound as both the layer's past input
        and its present output, so the attention appends the new entries in place; returns the
        logits of each row's last `keep` positions (batch, keep, vocab)."""
        feed = batch.feed()
        binding = self._cache_binding(feed)
        for name in self.token_inputs:
            value = feed[name] if name != LOGITS_TO_KEEP else np.array([keep], dtype=np.int64)
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        # Written straight into this array (no copy of ORT's output): (batch, keep, vocab)
        logits = np.empty((len(batch), keep, self.vocab_size), dtype=self.logits_dtype)
        binding.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        batch.advance()
        return logits

    def _cache_binding(self, feed: dict) -> ort.IOBinding:
        """An IO binding with every layer's buffer bound as its past input and present output.
        It is kept and reused while the buffers stay put (same addresses and shapes: steps between
        joins, leaves and regrowths), and only the token inputs and the logits are bound anew:
        binding 2 x layers buffers a pass took ~0.7 ms, 8% of a w8 step at batch 1."""
        buffers = [feed[name] for name in self.info.past_key_names]  # (rows, kv_heads, capacity, head_dim)
        layout = tuple((buffer.ctypes.data, buffer.shape) for buffer in buffers)
        if self._bound is not None and self._bound[0] == layout:
            return self._bound[1]
        binding = self.session.io_binding()
        for buffer, past, present in zip(buffers, self.info.past_key_names, self.info.present_key_names):
            assert buffer.flags.c_contiguous  # the first rows of the batch's buffer
            shape, address = list(buffer.shape), buffer.ctypes.data
            binding.bind_input(past, "cpu", 0, self.dtype, shape, address)
            binding.bind_output(present, "cpu", 0, self.dtype, shape, address)
        self._bound = (layout, binding)
        return binding

    def _run_bound(self, feed: dict, logits_on_device: bool = False) -> tuple:
        """One run with IO binding: cache inputs/outputs stay on the device as OrtValues."""
        binding = self.session.io_binding()
        for name, value in feed.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self.device_type if logits_on_device else "cpu")
        for name in self.info.present_key_names:
            binding.bind_output(name, self.device_type)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0] if logits_on_device else outputs[0].numpy()
        return logits, list(outputs[1:])


def _add_timings(timings: dict | None, started: float, ran: float) -> None:
    if timings is not None:
        timings["model"] = timings.get("model", 0.0) + ran - started
        timings["head"] = timings.get("head", 0.0) + time.perf_counter() - ran


def cuda_free_bytes() -> int | None:
    """Free memory of the current CUDA device, from `cudaMemGetInfo` of the CUDA runtime that
    onnxruntime-gpu loaded; None where no runtime answers."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if runtime.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
            return int(free.value)
    return None


def _last_position(logits) -> np.ndarray:
    """(rows, vocab) host logits of the last position of numpy or OrtValue (rows, positions, vocab)."""
    values = logits if isinstance(logits, np.ndarray) else logits.numpy()
    return np.ascontiguousarray(values[:, -1, :])


def _take_means(logits: np.ndarray, keep: int, members: list[int], continuations, means: np.ndarray) -> None:
    """Each member's mean log-probability of its continuation from a pass's window of logits
    (members' rows right-aligned: position keep-1-n+i predicts continuation token i)."""
    for row, index in enumerate(members):
        tokens = np.asarray(continuations[index], dtype=np.int64)
        if not len(tokens):
            continue
        window = logits[row, keep - 1 - len(tokens) : keep - 1].astype(np.float64)  # (n, vocab)
        means[index] = float((window[np.arange(len(tokens)), tokens] - log_normalizer(window)).mean())


def _length_groups(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Indices of `prompts`, longest first, cut into groups of at most `max_tokens` padded tokens
    (a prompt longer than that goes alone)."""
    groups: list[list[int]] = []
    for index in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        if groups and (len(groups[-1]) + 1) * len(prompts[groups[-1][0]]) <= max_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups
