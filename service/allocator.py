"""The C allocator of a long-running server process (glibc). Freed memory otherwise creeps into resident size:
glibc raises its mmap threshold each time a large block is freed, after which buffers of that size (decoded
frames, prompt tensors) come from heaps; and the many small blocks of one huge request (a tokenised 1 MB prompt)
leave free pages inside those heaps that are not returned. Both are measured in tests/service/test_faults.py.
Without glibc (macOS, musl) everything here is a no-op."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # fixed: large buffers stay in mmap and go back to the system when freed
TRIM_INTERVAL_S = 2.0  # at most one malloc_trim per this many seconds

_lock = threading.Lock()
_last_trim = 0.0


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def tune() -> bool:
    """Fixes the mmap threshold; call once at server start. False without glibc."""
    return bool(_LIBC is not None and _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_free_memory(idle: bool = False) -> bool:
    """Returns free heap pages to the system (malloc_trim); call when a request ends. When the server is `idle`
    (that was the last request in it) always, else at most once per TRIM_INTERVAL_S, so a busy server spends
    next to nothing on it. True if it trimmed now."""
    global _last_trim
    if _LIBC is None:
        return False
    now = time.monotonic()
    with _lock:
        if not idle and now - _last_trim < TRIM_INTERVAL_S:
            return False
        _last_trim = now
    _LIBC.malloc_trim(0)
    return True
