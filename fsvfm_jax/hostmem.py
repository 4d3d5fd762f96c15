"""Hand the host heap that compilation freed back to the operating system.

XLA's compiler allocates and frees many small blocks; glibc keeps the freed ones in its heap,
so the process's resident memory stays at the compiler's peak. The train step's temporaries are
then allocated on top of that. Trimming the heap between compiling and running lowers the peak
resident memory of a CPU run by a few hundred MB (docs/performance.md). Elsewhere (no glibc) it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def release_freed_heap() -> bool:
    """``malloc_trim(0)``: True when glibc returned memory to the system."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return False
