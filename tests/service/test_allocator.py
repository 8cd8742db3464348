"""The heap trim runs on its own thread: a request's end (on the event loop) only asks for it."""

from __future__ import annotations

import threading

from service import allocator
from tests.service.conftest import wait_until


class FakeLibc:
    """glibc's mallinfo2 / malloc_trim, recording the thread each trim ran on (the real ones cannot show it)."""

    def __init__(self, free_bytes: int):
        self.free_bytes, self.trimmed_on = free_bytes, []

    def mallinfo2(self):
        info = allocator._MallInfo2()
        info.fordblks = self.free_bytes
        return info

    def malloc_trim(self, pad: int) -> int:
        self.trimmed_on.append(threading.current_thread().name)
        return 1


def test_a_trim_runs_on_the_trimming_thread_never_the_caller(monkeypatch):
    libc = FakeLibc(free_bytes=allocator.TRIM_MIN_FREE_BYTES)
    monkeypatch.setattr(allocator, "_LIBC", libc)
    trimmer = allocator._Trimmer()
    monkeypatch.setattr(allocator, "_TRIMMER", trimmer)
    allocator.release_free_memory(idle=True)
    wait_until(lambda: trimmer.trims == 1, "the trim")
    assert libc.trimmed_on == ["aim-malloc-trim"]


def test_heaps_with_little_free_are_not_trimmed(monkeypatch):
    libc = FakeLibc(free_bytes=allocator.TRIM_MIN_FREE_BYTES - 1)
    monkeypatch.setattr(allocator, "_LIBC", libc)
    trimmer = allocator._Trimmer()
    monkeypatch.setattr(allocator, "_TRIMMER", trimmer)
    allocator.release_free_memory(idle=True)
    wait_until(lambda: trimmer.checks == 1, "the check")
    assert libc.trimmed_on == [] and trimmer.trims == 0
