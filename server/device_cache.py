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
        self._keep = ort.InferenceSession(graphs.keep_rows(self.names, dtype), options, providers=providers)
        self._join = ort.InferenceSession(graphs.join_two(self.names, dtype), options, providers=providers)
        self._repeat = ort.InferenceSession(graphs.repeat_row(self.names, dtype), options, providers=providers)
        self.passes = 0  # moves run on the device (tests and telemetry)

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

    def join(self, first: dict, first_len: int, second: dict, second_len: int) -> dict:
        """`first`'s rows then `second`'s, each left-padded with zeros to the longer length."""
        length = max(first_len, second_len)
        cache = {f"a.{name}": first[name] for name in self.names} | {f"b.{name}": second[name] for name in self.names}
        small = {"pad_a": _length_pads(length - first_len), "pad_b": _length_pads(length - second_len)}
        return self._run(self._join, cache, small)

    def repeat(self, past: dict, copies: int) -> dict:
        """A one-row cache stacked `copies` times on the row axis."""
        small = {"copies": np.array([copies, 1, 1, 1], dtype=np.int64)}
        return self._run(self._repeat, {name: past[name] for name in self.names}, small)


def _length_pads(missing: int) -> np.ndarray:
    """The Pad op's pads for (rows, heads, length, dim): `missing` zeros before the length axis."""
    return np.array([0, 0, missing, 0, 0, 0, 0, 0], dtype=np.int64)
