"""Moves of a KV cache that lives on the device (IO binding): rows leave, batches join, one
prefill is shared by n sequences, each as one ONNX Runtime pass of a small graph
(server/graphs.py) on the model's device, so the cache never goes through host memory."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from condgen.server import graphs


class CacheMoves:
    """Keep, join and repeat cache rows with OrtValues in and out, on `device_type`."""

    def __init__(self, names: list[str], dtype, providers: list[str], device_type: str, options: ort.SessionOptions):
        self.names = list(names)
        self.device_type = device_type
        self.dtype = dtype
        self._providers, self._options = providers, options
        self._keep = self._session(graphs.keep_rows(self.names, dtype))
        self._repeat = self._session(graphs.repeat_row(self.names, dtype))
        self._joins: dict[int, ort.InferenceSession] = {}  # by the number of batches joined
        self.passes = 0  # moves run on the device (tests and telemetry)

    def _session(self, model: bytes) -> ort.InferenceSession:
        return ort.InferenceSession(model, self._options, providers=self._providers)

    def _run(self, session: ort.InferenceSession, cache: dict[str, object], small: dict[str, np.ndarray]) -> dict:
        binding = session.io_binding()
        for name, value in cache.items():
            binding.bind_ortvalue_input(name, self.on_device(value))
        for name, value in small.items():
            binding.bind_cpu_input(name, value)
        for name in self.names:
            binding.bind_output(f"{name}.out", self.device_type)
        session.run_with_iobinding(binding)
        self.passes += 1
        return dict(zip(self.names, binding.get_outputs()))

    def on_device(self, value) -> ort.OrtValue:
        """An OrtValue on the device: as it is, or copied there once (a cache from the host)."""
        if isinstance(value, np.ndarray):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device_type)
        return value

    def keep(self, past: dict, rows: list[int], start: int) -> dict:
        """The cache of `rows` (indices, in order), from length column `start` on."""
        small = {"rows": np.asarray(rows, dtype=np.int64), "start": np.array([start], dtype=np.int64)}
        return self._run(self._keep, {name: past[name] for name in self.names}, small)

    def join(self, parts: list[tuple[dict, int]]) -> dict:
        """The rows of every (cache, length) part in order, each left-padded with zeros to the
        longest length, in one pass (a graph per number of parts, built when first needed)."""
        count = len(parts)
        if count not in self._joins:
            self._joins[count] = self._session(graphs.join(self.names, self.dtype, count))
        length = max(part_len for _, part_len in parts)
        cache = {f"{i}.{name}": past[name] for i, (past, _) in enumerate(parts) for name in self.names}
        small = {f"pad.{i}": _length_pads(length - part_len) for i, (_, part_len) in enumerate(parts)}
        return self._run(self._joins[count], cache, small)

    def repeat(self, past: dict, copies: int) -> dict:
        """A one-row cache stacked `copies` times on the row axis."""
        small = {"copies": np.array([copies, 1, 1, 1], dtype=np.int64)}
        return self._run(self._repeat, {name: past[name] for name in self.names}, small)


def _length_pads(missing: int) -> np.ndarray:
    """The Pad op's pads for (rows, heads, length, dim): `missing` zeros before the length axis."""
    return np.array([0, 0, missing, 0, 0, 0, 0, 0], dtype=np.int64)
