"""Admission of a model's requests, at arrival, before any work:
- `max_batch + max_queue` requests already in the system (decoding media, waiting or running) -> resource_exhausted;
- a deadline that cannot cover the expected queue wait plus the fastest recent service time -> deadline_exceeded.
(A request whose KV need exceeds the whole pool is refused later, by the scheduler, once its shape is known.)"""

from __future__ import annotations

from collections import deque

from .types import ServiceError

SERVICE_TIME_WINDOW = 32  # recent service times (on a worker, queueing excluded) used to predict queue waits


class Admission:
    """The requests in the system (admitted and not yet answered) and the recent service times."""

    def __init__(self, name: str, loop, max_queue: int):
        self.name, self.loop, self.max_queue = name, loop, max_queue
        self.in_system = 0
        self.service_times: deque[float] = deque(maxlen=SERVICE_TIME_WINDOW)

    @property
    def running(self) -> int:
        """Sequences in the running batch."""
        return self.loop.num_running

    @property
    def waiting(self) -> int:
        """Admitted requests not in the running batch (decoding media, or waiting for a place or KV memory)."""
        return max(0, self.in_system - self.running)

    def expected_queue_wait(self) -> float:
        """A newcomer waits only when the batch is full: then for its share of the requests ahead."""
        if not self.service_times:
            return 0.0
        max_batch = self.loop.max_batch
        ahead = self.in_system - max_batch + 1
        if ahead <= 0:
            return 0.0
        return ahead * (sum(self.service_times) / len(self.service_times)) / max_batch

    def admit(self, deadline: float | None, now: float) -> None:
        """Raises ServiceError when the request may not enter (it has not entered: `enter` counts it)."""
        max_batch = self.loop.max_batch
        if self.in_system >= max_batch + self.max_queue:
            raise ServiceError("resource_exhausted",
                               f"model {self.name} has {self.running} requests running and {self.waiting} waiting "
                               f"(limit {max_batch} + {self.max_queue}); retry with backoff")
        if deadline is not None and self.service_times:
            needed = self.expected_queue_wait() + min(self.service_times)
            if deadline - now < needed:
                raise ServiceError("deadline_exceeded",
                                   f"the deadline ({deadline - now:.3f}s left) cannot cover the expected queue wait "
                                   f"and service time ({needed:.3f}s); raise the deadline or retry later")
