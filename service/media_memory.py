"""Decoded media held by a model's requests, under one budget, and each request's share of it (its slot, which
also carries its stop signal and deadline)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from aim_engine.errors import Cancelled

from .types import ServiceError


@dataclass
class RequestSlot:
    """Shared between a request's handler and its worker thread."""

    stop: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic()
    media_bytes: int = 0  # decoded media reserved in the runtime's MediaMemory and not yet given back
    closed: bool = False  # the request has ended: nothing more may be reserved for it
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hold_media(self, nbytes: int) -> bool:
        """Counts reserved media bytes against the request; False (hold nothing) once it has ended."""
        with self.lock:
            if self.closed:
                return False
            self.media_bytes += nbytes
            return True

    def release_media(self, keep: int = 0) -> int:
        """What it holds beyond `keep` bytes, to release: its media decoded into less than was reserved for them,
        or through the vision tower (keep 0)."""
        with self.lock:
            given = max(0, self.media_bytes - keep)
            self.media_bytes -= given
            return given

    def close(self) -> int:
        """Ends the request: the media bytes it held, to release (once)."""
        with self.lock:
            self.closed = True
            held, self.media_bytes = self.media_bytes, 0
            return held

    def should_stop(self) -> bool:
        return self.stop.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)


class MediaMemory:
    """Bytes of decoded media held by the requests in the system, under one budget per model. A request reserves
    its whole need (from its media's headers) at once before decoding, waiting on the event loop while the budget
    is full (its should_stop still polled), so that no request holds a part while it waits for the rest (two
    could then wait on each other for ever) and none waits inside a worker thread. It gives back what its media
    did not take once decoded, and the rest once they are through the vision tower, or when it ends. Together
    with the per-request limit (MediaLimits.max_decoded_bytes <= the budget) no request, however crafted, makes
    the server hold more."""

    POLL_S = 0.05  # how often a waiter looks at its should_stop (a release wakes it at once)

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.waiting = 0  # requests waiting for room (tests and metrics read it)
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def acquire(self, nbytes: int, should_stop) -> None:
        """Reserves `nbytes`, waiting for room; Cancelled once `should_stop()` while it waits."""
        if nbytes > self.capacity_bytes:
            raise ServiceError("resource_exhausted", f"the request's media need {nbytes} bytes decoded; the server's "
                                                     f"media memory is {self.capacity_bytes} bytes")
        if nbytes <= 0:
            return
        loop = asyncio.get_running_loop()
        waiter = None
        try:
            while True:
                with self._lock:
                    if self.used_bytes + nbytes <= self.capacity_bytes:
                        self.used_bytes += nbytes
                        return
                    if waiter is None:
                        waiter = (loop, asyncio.Event())
                        self._waiters.append(waiter)
                        self.waiting += 1
                    waiter[1].clear()
                if should_stop():
                    raise Cancelled()
                try:
                    await asyncio.wait_for(waiter[1].wait(), self.POLL_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            if waiter is not None:
                with self._lock:
                    self._waiters.remove(waiter)
                    self.waiting -= 1

    def release(self, nbytes: int) -> None:
        """From any thread (the engine's gives back what the vision tower has consumed)."""
        if nbytes <= 0:
            return
        with self._lock:
            self.used_bytes -= nbytes
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # its loop has closed: nobody is waiting there any more
                pass
