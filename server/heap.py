"""The server process's C heap: a fixed glibc mmap threshold and a background trim.

ONNX Runtime (its arena is off, see engine.session_options) and numpy allocate and free
buffers of many sizes every decode step and prefill pass. Left alone, glibc raises its mmap
threshold after it frees a large mapped block, so later buffers of up to 32 MB come from the
heap. Their freed pages stay resident, scattered between live blocks, and the process's peak
memory depends on the order in which a run happened to allocate: the same 64-stream load
peaked anywhere between 1.3 and 1.8 GB. A fixed threshold sends blocks above it to their own
mappings, which go back to the system when freed; `malloc_trim` every second hands back the
free pages between the smaller heap blocks. Both are glibc features; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # glibc refuses larger values on 64-bit systems


@dataclass(frozen=True)
class HeapConfig:
    """0 leaves a setting as glibc has it."""

    mmap_threshold_bytes: int = 4 << 20  # blocks at least this big get their own mapping
    trim_interval_seconds: float = 1.0  # how often free heap pages go back to the system

    def __post_init__(self) -> None:
        if not 0 <= self.mmap_threshold_bytes <= GLIBC_MAX_MMAP_THRESHOLD:
            raise ValueError(
                f"mmap threshold {_describe_bytes(self.mmap_threshold_bytes)}: give 0 (glibc's own) "
                f"up to {_describe_bytes(GLIBC_MAX_MMAP_THRESHOLD)}"
            )
        if self.trim_interval_seconds < 0:
            raise ValueError(f"heap trim interval {self.trim_interval_seconds} s: give 0 (never) or more")


def _glibc():
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


class HeapKeeper:
    """Applies a HeapConfig to this process and runs its trim thread until `stop`."""

    def __init__(self, config: HeapConfig = HeapConfig()):
        self.config = config
        self.trims = 0
        self._libc = _glibc()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._libc is not None

    def start(self) -> HeapKeeper:
        if not self.available:
            log.info("heap tuning skipped: the C library is not glibc")
            return self
        if self.config.mmap_threshold_bytes and not self._libc.mallopt(
            M_MMAP_THRESHOLD, self.config.mmap_threshold_bytes
        ):
            log.warning("glibc refused mmap threshold %d", self.config.mmap_threshold_bytes)
        if self.config.trim_interval_seconds:
            self._thread = threading.Thread(target=self._trim_until_stopped, name="condgen-heap-trim", daemon=True)
            self._thread.start()
        log.info(
            "heap: mmap threshold %s, trim every %s",
            _describe_bytes(self.config.mmap_threshold_bytes),
            f"{self.config.trim_interval_seconds:g} s" if self.config.trim_interval_seconds else "never",
        )
        return self

    def _trim_until_stopped(self) -> None:
        while not self._stop.wait(self.config.trim_interval_seconds):
            self._libc.malloc_trim(0)  # ctypes releases the GIL for the call
            self.trims += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _describe_bytes(count: int) -> str:
    return f"{count / (1 << 20):g} MiB" if count else "glibc's own"
