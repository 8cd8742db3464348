"""Giving freed memory back in a long-running server process (glibc). Freed buffers stay in glibc's heaps: after
one huge request (a tokenised 1 MB prompt, many decoded frames) the process keeps its peak resident size, and a
hostile client could ratchet it up (measured in tests/service/test_faults.py). Two measures, measured against the fault corpus (a round of its 69 requests):
- `tune()` at server start caps glibc at 2 heaps (arenas) instead of 8 per core: fewer heaps, less memory
  stranded in them (+20 MiB over 9 rounds instead of +70), no measurable cost to a request.
- when a request ends and the heaps hold more than TRIM_MIN_FREE_BYTES free, they are trimmed (malloc_trim). Not
  after every request: trimming hands back pages the next request must fault in again (1.02x the time per
  request of the demo model, `python bench/allocator.py`: small, but ordinary requests need not pay it); a small
  fixed mmap threshold, the other usual cure, made CPU inference 1.60x slower in the same run.
The check and the trim run on a thread of their own (a trim of a large heap takes milliseconds, and the requests'
ends are on the event loop). Without glibc (macOS, musl) everything here is a no-op."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
ARENAS = 2
TRIM_MIN_FREE_BYTES = 64 * 1024 * 1024  # free bytes in the heaps worth giving back
TRIM_INTERVAL_S = 1.0  # at most one check per this many seconds while busy


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "malloc_trim") and hasattr(libc, "mallinfo2")):  # mallinfo2: glibc >= 2.33
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


_LIBC = _libc()


class _Trimmer:
    """One daemon thread that checks the heaps when asked, at most once per TRIM_INTERVAL_S unless the server has
    gone idle, and trims them when they hold more than TRIM_MIN_FREE_BYTES free. Asking never blocks."""

    def __init__(self):
        self._asked = threading.Condition()
        self._pending: bool | None = None  # None: nothing asked; else: whether an ask said idle
        self._last_check = 0.0
        self.trims = 0  # trims done (tests read it)
        self.checks = 0
        self._thread: threading.Thread | None = None

    def ask(self, idle: bool) -> None:
        with self._asked:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="aim-malloc-trim", daemon=True)
                self._thread.start()
            self._pending = bool(self._pending) or idle
            self._asked.notify()

    def _run(self) -> None:
        while True:
            with self._asked:
                while self._pending is None:
                    self._asked.wait()
                idle, self._pending = self._pending, None
            now = time.monotonic()
            if not idle and now - self._last_check < TRIM_INTERVAL_S:
                continue
            self._last_check = now
            self.checks += 1
            if _LIBC.mallinfo2().fordblks >= TRIM_MIN_FREE_BYTES:
                _LIBC.malloc_trim(0)
                self.trims += 1


_TRIMMER = _Trimmer()


def tune() -> bool:
    """Caps the number of heaps; call once at server start, before its threads allocate. False without glibc."""
    return bool(_LIBC is not None and _LIBC.mallopt(M_ARENA_MAX, ARENAS))


def free_heap_bytes() -> int | None:
    """Bytes free inside the malloc heaps, every arena together (what trimming could give back); None without
    glibc."""
    return None if _LIBC is None else int(_LIBC.mallinfo2().fordblks)


def release_free_memory(idle: bool = False) -> None:
    """Call when a request ends: asks the trimming thread to look at the heaps (always when the server is `idle`,
    that was its last request; else at most once per TRIM_INTERVAL_S). Returns at once."""
    if _LIBC is not None:
        _TRIMMER.ask(idle)
