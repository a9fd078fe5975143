"""The server's heap keeper: its settings are validated, and its trim thread hands free heap
pages back to the system (glibc only)."""

import ctypes
import re
import time
from pathlib import Path

import pytest

from condgen.server.heap import HeapConfig, HeapKeeper

pytestmark = pytest.mark.fast

STATUS = Path("/proc/self/status")
glibc_only = pytest.mark.skipif(not HeapKeeper().available or not STATUS.exists(), reason="needs glibc and /proc")


def rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", STATUS.read_text()).group(1)) / 1024


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"trim_interval_seconds": -1}, "trim interval"),
        ({"mmap_threshold_bytes": 64 << 20}, "up to 32 MiB"),
        ({"mmap_threshold_bytes": -1}, "mmap threshold"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HeapConfig(**kwargs)


def test_no_trim_thread_when_trimming_is_off():
    keeper = HeapKeeper(HeapConfig(mmap_threshold_bytes=0, trim_interval_seconds=0)).start()
    assert keeper._thread is None
    keeper.stop()


@glibc_only
def test_trim_thread_returns_freed_heap_pages_and_stops():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 << 10) for _ in range(1600)]  # 100 MiB of heap blocks below any mmap threshold
    for block in blocks:
        ctypes.memset(block, 1, 64 << 10)  # make every page resident
    pin = libc.malloc(64 << 10)  # a live block after them keeps glibc from shrinking the heap on free
    for block in blocks:
        libc.free(block)
    before = rss_mib()
    keeper = HeapKeeper(HeapConfig(mmap_threshold_bytes=0, trim_interval_seconds=0.05)).start()
    try:
        deadline = time.monotonic() + 10
        while keeper.trims < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = rss_mib()
    finally:
        keeper.stop()
        libc.free(pin)
    assert keeper.trims >= 2
    assert before - after > 50, f"RSS {before:.0f} -> {after:.0f} MiB"
    assert not keeper._thread.is_alive()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--heap-trim-seconds", "-1", "trim interval -1.0 s"),
        ("--mmap-threshold-mib", "64", "mmap threshold 64 MiB"),
    ],
)
def test_serve_refuses_bad_heap_flags_in_one_line(tmp_path, capsys, flag, value, message):
    from condgen.cli import main

    assert main(["serve", "--bundle", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
