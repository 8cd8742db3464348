"""Signals the controller reads, each sampled in the background so no request ever waits on them.

- GpuSampler: NVML (package nvidia-ml-py, module `pynvml`) utilisation and memory per device. Without a GPU or
  driver it reports unavailable, says so once in the log, and the controller works on the other signals.
- PromQLReader: one PromQL query (e.g. the p95 of the service's latency histogram for an SLO class) over
  Prometheus's HTTP API, refreshed with a timeout; a value older than `stale_after_s` counts as missing.
- LatencyWindow: the service's own sliding window of request latencies — the fallback when Prometheus is
  unreachable or stale.
- arrival_gap: the mean gap between arrivals, from the recent ones, read from a rise in their rate where they show
  one.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.parse
import urllib.request
from collections import deque
from typing import TYPE_CHECKING
from dataclasses import dataclass, field, replace

if TYPE_CHECKING:
    from .feedback import Fresh

log = logging.getLogger("aim.controller")


@dataclass(frozen=True)
class GpuSnapshot:
    available: bool
    utilization: float | None = None  # busiest device, [0, 1]
    memory_used_fraction: float | None = None  # fullest device, [0, 1]
    reason: str = ""


class GpuSampler:
    """Samples NVML every `interval_s` seconds on a daemon thread. `nvml` is the pynvml module (or an object
    with the same functions, for tests on machines without a GPU)."""

    def __init__(self, interval_s: float = 1.0, nvml=None, expect_gpu: bool = True):
        """`expect_gpu`: whether the models run on a GPU; if not, a missing NVML is expected and logged as info."""
        self.interval_s = interval_s
        self._nvml = nvml
        self._snapshot = GpuSnapshot(False, reason="not sampled yet")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles = []
        try:
            if self._nvml is None:
                import pynvml as nvml_module

                self._nvml = nvml_module
            self._nvml.nvmlInit()
            count = self._nvml.nvmlDeviceGetCount()
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            if not self._handles:
                raise RuntimeError("NVML reports no GPU")
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
            self._snapshot = GpuSnapshot(False, reason=f"{type(exc).__name__}: {exc}")
            log.log(logging.WARNING if expect_gpu else logging.INFO,
                    "GPU signal unavailable (%s); the controller works on latency and load alone",
                    self._snapshot.reason)
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def snapshot(self) -> GpuSnapshot:
        return self._snapshot

    def sample_once(self) -> GpuSnapshot:
        if not self._handles:
            return self._snapshot
        try:
            utils, mems = [], []
            for handle in self._handles:
                utils.append(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                mems.append(mem.used / mem.total if mem.total else 0.0)
            self._snapshot = GpuSnapshot(True, max(utils), max(mems))
        except Exception as exc:  # a device that vanished or a driver error: keep serving, report it
            self._snapshot = GpuSnapshot(False, reason=f"{type(exc).__name__}: {exc}")
        return self._snapshot

    def start(self) -> "GpuSampler":
        if self._handles and self._thread is None:
            self.sample_once()
            self._thread = threading.Thread(target=self._run, name="aim-nvml", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def stop(self) -> None:
        self._stop.set()


@dataclass(frozen=True)
class Reading:
    value: float | None  # a scalar, the one series, or the largest of the series by SLO class
    at: float | None  # time.monotonic() of the sample
    error: str = ""
    by_class: dict = field(default_factory=dict)  # slo_class label -> value, for series that carry one
    unlabelled: float | None = None  # a series without an slo_class label (or a scalar): it stands for every class


class PromQLReader:
    """Evaluates `query` every `interval_s` seconds: a scalar, or an instant vector whose series carry an
    `slo_class` label (one value per class) or not (one value for all)."""

    def __init__(self, base_url: str, query: str, interval_s: float = 5.0, timeout_s: float = 2.0,
                 stale_after_s: float = 30.0, clock=time.monotonic):
        self.base_url = base_url.rstrip("/")
        self.query = query
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._reading = Reading(None, None, "not queried yet")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    def fetch(self) -> Reading:
        url = f"{self.base_url}/api/v1/query?" + urllib.parse.urlencode({"query": self.query})
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                body = json.loads(response.read())
            if body.get("status") != "success":
                raise RuntimeError(body.get("error", "query failed"))
            data = body["data"]
            by_class, unlabelled = {}, None
            if data["resultType"] == "scalar":
                unlabelled = _number(data["result"][1])
            else:  # no series yet (no traffic) is a valid answer meaning "unknown"
                for series in data["result"]:
                    value = _number(series["value"][1])
                    name = series.get("metric", {}).get("slo_class")
                    if name is None:
                        unlabelled = value
                    elif value is not None:
                        by_class[name] = value
            known = [v for v in (unlabelled, *by_class.values()) if v is not None]
            self._reading = Reading(max(known) if known else None, self.clock(), by_class=by_class,
                                    unlabelled=unlabelled)
            self._warned = False
        except Exception as exc:  # unreachable, timeout, bad query: keep the last value until it is stale
            self._reading = replace(self._reading, error=f"{type(exc).__name__}: {exc}")
            if not self._warned:
                log.warning("Prometheus query failed (%s); falling back to the service's own latency window",
                            self._reading.error)
                self._warned = True
        return self._reading

    def latest(self) -> Reading:
        """The last reading, or one with no value if there is none or it is older than stale_after_s."""
        r = self._reading
        if r.at is None or self.clock() - r.at > self.stale_after_s:
            return Reading(None, r.at, r.error or "stale")
        return r

    def start(self) -> "PromQLReader":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="aim-promql", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.fetch()
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()


def _number(raw) -> float | None:
    value = float(raw)
    return None if math.isnan(value) else value


class LatencyWindow:
    """Latencies of the requests that finished in the last `window_s` seconds (bounded)."""

    def __init__(self, window_s: float = 60.0, max_items: int = 4096, clock=time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._items: deque[tuple[float, float]] = deque(maxlen=max_items)
        self._lock = threading.Lock()

    def add(self, latency_s: float) -> None:
        with self._lock:
            self._items.append((self.clock(), latency_s))

    def fresh(self, since: float | None) -> "Fresh":
        """The latencies added after `since` (all of them if None): how many, the largest, the newest's time."""
        from .feedback import Fresh

        with self._lock:
            recent = [(t, v) for t, v in self._items if since is None or t > since]
        if not recent:
            return Fresh()
        return Fresh(len(recent), max(v for _, v in recent), max(t for t, _ in recent))

    def quantile(self, q: float, since: float | None = None) -> tuple[float | None, int]:
        """(the q-quantile of recent latencies or None, how many there are); `since`: only those added after."""
        now = self.clock()
        with self._lock:
            while self._items and now - self._items[0][0] > self.window_s:
                self._items.popleft()
            values = sorted(v for t, v in self._items if since is None or t > since)
        if not values:
            return None, 0
        rank = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
        return values[rank], len(values)


# A rise in the arrival rate is believed when splitting the recent arrivals into two Poisson rates, the later one
# higher, is at least this much more likely (log-likelihood ratio) than one rate over all of them, with at least
# RISE_ARRIVALS after the split. Simulated (Poisson arrivals, windows of 8 within 10 s): a burst at 15x a trickle
# is read within a median 3 of its arrivals (the mean over the window, diluted by the trickle's, took 6: a burst's
# first requests were decided as if the trickle went on); under a steady rate, the share of decisions reading
# over 1.5x the true rate goes from 17 to 20 %.
RATE_RISE_LLR = 3.0
RISE_ARRIVALS = 2


def arrival_gap(times, now: float) -> float | None:
    """Mean seconds between arrivals, given the recent arrival times (ascending, all <= `now`): over all of them,
    span from the first to now per arrival; or, where the rate has risen (RATE_RISE_LLR), over those since the most
    likely rise. None for fewer than two arrivals."""
    times = list(times)
    count = len(times)
    if count < 2:
        return None
    span = now - times[0]
    gap = span / count
    if span <= 0:
        return gap
    one = _log_likelihood(count, span)
    best = RATE_RISE_LLR
    for split in range(1, count - RISE_ARRIVALS + 1):
        before, after = times[split] - times[0], now - times[split]
        late = count - split
        if before <= 0 or after <= 0 or late / after <= split / before:
            continue
        gain = _log_likelihood(split, before) + _log_likelihood(late, after) - one
        if gain >= best:
            best, gap = gain, after / late
    return gap


def _log_likelihood(count: int, span: float) -> float:
    """A Poisson process's log-likelihood of `count` arrivals in `span` at its best rate, less the terms every split
    shares (the rates' exposure sums to the same count)."""
    return count * math.log(count / span)
