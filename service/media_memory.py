"""Decoded media held by a model's requests, under one budget, and each request's share of it (its slot, which
also carries its stop signal and deadline)."""

from __future__ import annotations

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
    media_bytes: int = 0  # decoded media reserved in the runtime's MediaMemory, released when the request ends
    closed: bool = False  # the request has ended: nothing more may be reserved for it
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hold_media(self, nbytes: int) -> bool:
        """Counts reserved media bytes against the request; False (hold nothing) once it has ended."""
        with self.lock:
            if self.closed:
                return False
            self.media_bytes += nbytes
            return True

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
    each item's decoded size (known from its header) before decoding it, and waits while the budget is full (its
    should_stop still polled); everything is released when the request ends. Together with the per-request limit
    (MediaLimits.max_decoded_bytes <= the budget) no request, however crafted, makes the server hold more."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._cond = threading.Condition()

    def reserve(self, nbytes: int, should_stop) -> None:
        if nbytes > self.capacity_bytes:
            raise ServiceError("resource_exhausted", f"the request's media need {nbytes} bytes decoded; the server's "
                                                     f"media memory is {self.capacity_bytes} bytes")
        with self._cond:
            while self.used_bytes + nbytes > self.capacity_bytes:
                if should_stop():
                    raise Cancelled()
                self._cond.wait(0.05)
            self.used_bytes += nbytes

    def release(self, nbytes: int) -> None:
        if nbytes:
            with self._cond:
                self.used_bytes -= nbytes
                self._cond.notify_all()
