"""A real gRPC server on loopback, in a background thread with its own event loop, serving tiny models."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest

from aim_engine import AimEngine
from service.metrics import ServiceMetrics
from service.server import start_server
from service.settings import Settings


class ServerThread:
    def __init__(self, settings: Settings, engines: dict[str, AimEngine]):
        self.loop = asyncio.new_event_loop()
        self.metrics = ServiceMetrics()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.running = self.loop.run_until_complete(start_server(settings, engines, self.metrics))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(60)
        self.port = self.running.port
        self.metrics_port = self.running.metrics_port
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.5) -> None:
        if self.loop.is_running():
            self.call(self.running.drain_and_stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


# min_slo_ms=1: tests reach the controller's best-effort path with SLOs no request meets (1 ms); the minimum's own
# tests set it (tests/service/test_outcomes.py)
BASE = Settings(models=["unused"], port=0, metrics_port=0, max_queue=4, min_slo_ms=1)

# A held answer: ignore_eos and far more tokens than any test lets it produce, so it runs until the test cancels it
# (prompt + HOLD_TOKENS stays within the tiny models' 4096 positions). The server's max_new_tokens must allow it.
HOLD_TOKENS = 3000


def hold(client, prompt: str = "Keep talking.", **request):
    """Starts a streamed answer that runs until cancelled and returns its stream once the server is decoding it
    (the first delta arrived). `events.cancel()` releases it."""
    events = client.stream_events(prompt, max_new_tokens=HOLD_TOKENS, ignore_eos=True, **request)
    next(events)
    return events


POLL_S = 0.005  # between two reads of the state waited on: not a bound on anything


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    """Waits for observable state to hold, reading it every POLL_S (yielding the CPU between reads). The timeout
    only guards against a hang; it is not a bound on how fast anything runs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_S)


def metric_value(srv: ServerThread, metric: str, **labels) -> float:
    """A sample of the server's metrics: the first of `metric` whose labels include `labels` (0 if none)."""
    for family in srv.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def server(tiny_engines):
    srv = ServerThread(BASE, tiny_engines)
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tiny_engines):
    started = []

    def make(**overrides) -> ServerThread:
        srv = ServerThread(replace(BASE, **overrides), tiny_engines)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
