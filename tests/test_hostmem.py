"""fsvfm_jax.hostmem: trimming the heap gives freed memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import pytest

from fsvfm_jax import hostmem


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap and /proc are Linux-only")
def test_trim_returns_freed_heap_blocks():
    """Many small malloc blocks (heap, not mmap) freed below a live one stay resident until trimmed."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(16 * 1024) for _ in range(12_000)]  # ~190 MB
    for b in blocks:
        ctypes.memset(b, 1, 16 * 1024)  # touch the pages
    pin = libc.malloc(64)  # keeps the top of the heap in use, so free() alone cannot shrink it
    for b in blocks:
        libc.free(b)
    before = _rss_bytes()
    assert hostmem.release_freed_heap()
    released = before - _rss_bytes()
    libc.free(pin)
    assert released > 100 * 2**20, f"only {released / 2**20:.0f} MiB returned"
