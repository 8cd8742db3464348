"""The budget controller of one served model: turns signals into a margin and memory cap, and requests into
ladder levels through the pure `policy.decide`.

Per request (`choose`): budget = min(SLO, remaining deadline) - time already spent; predicted latency per level
from the online cost model (plus expected queue wait, supplied by the caller); GPU memory above the threshold
caps quality at `memory_cap_level`.
Every `feedback.interval_s` (`tick`, driven by finished requests): the p95 of latency as a share of each request's
own SLO — so requests of different SLO classes share one loop — against the target share steps the safety
margin. The service's own window holds these shares; a fresh Prometheus p95 (seconds, from the configured
query) is divided by the default SLO, so point the query at the SLO class that default stands for.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from .cost_model import CostModel, Observation
from .feedback import FeedbackConfig, FeedbackState, step
from .policy import Decision, Features, Level, decide
from .signals import GpuSampler, LatencyWindow, PromQLReader

# The p95 of the service's own end-to-end latency histogram for one model, over the last minute. The
# placeholder {model} is replaced by the served model's name.
DEFAULT_P95_QUERY = ('histogram_quantile(0.95, sum by (le) '
                     '(rate(aim_request_duration_seconds_bucket{model="{model}"}[1m])))')


@dataclass(frozen=True)
class ControllerConfig:
    slo_s: float = 10.0  # the SLO of requests that give none, and the feedback loop's target
    memory_threshold: float = 0.9  # GPU memory used fraction above which quality is capped
    memory_cap_level: int = 3  # the highest-quality level allowed under memory pressure (the AIM default)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)


@dataclass
class ControllerStatus:
    """What the controller last did, for metrics and logs."""

    margin: float
    level: int | None
    p95_ratio: float | None  # p95 latency / SLO
    p95_source: str  # "prometheus" | "window" | "none"
    gpu_available: bool
    prometheus_up: bool | None  # None when not configured
    last_action: str


class BudgetController:
    def __init__(self, ladder: Sequence[Level], config: ControllerConfig = ControllerConfig(),
                 gpu: GpuSampler | None = None, prometheus: PromQLReader | None = None, clock=time.monotonic):
        self.ladder = list(ladder)
        self.config = config
        self.gpu = gpu
        self.prometheus = prometheus
        self.clock = clock
        self.window = LatencyWindow(clock=clock)
        self.cost_model = CostModel()
        self.feedback = FeedbackState(margin=1.2)
        self.last_level: int | None = None
        self._p95: tuple[float | None, str] = (None, "none")
        self._lock = threading.Lock()

    # ---- per request --------------------------------------------------------------------------
    def memory_cap(self) -> int:
        snap = self.gpu.snapshot() if self.gpu is not None else None
        if snap is not None and snap.available and snap.memory_used_fraction is not None \
                and snap.memory_used_fraction > self.config.memory_threshold:
            return min(self.config.memory_cap_level, len(self.ladder) - 1)
        return 0

    def choose(self, predicted_s: Sequence[float | None], budget_s: float, min_retention: float,
               queue_depth: int = 0, priority: str = "normal") -> Decision:
        decision = decide(self.ladder, Features(budget_s=budget_s, min_retention=min_retention,
                                                predicted_s=predicted_s, margin=self.feedback.margin,
                                                min_level=self.memory_cap(), queue_depth=queue_depth,
                                                priority=priority))
        if not decision.rejected:
            self.last_level = decision.level
        return decision

    def predict(self, visual_tokens_in: int, prefill_flops: float, new_tokens: int, batch: float = 1.0
                ) -> float | None:
        """Predicted latency when decoding in a batch of `batch` sequences."""
        return self.cost_model.predict(visual_tokens_in, prefill_flops, new_tokens, batch)

    # ---- feedback -----------------------------------------------------------------------------
    def observe(self, latency_s: float, observation: Observation | None = None, slo_s: float | None = None,
                controlled: bool = True) -> None:
        """A finished request: its end-to-end latency and SLO (None = the default), and its stage timings. Every
        request teaches the cost model; only those the controller decided (`controlled`) steer the margin."""
        with self._lock:
            if controlled:
                self.window.add(latency_s / (slo_s or self.config.slo_s))
            if observation is not None:
                self.cost_model = self.cost_model.observe(observation)
        self.tick()

    def p95(self) -> tuple[float | None, str, int]:
        """(p95 latency / SLO, where it came from, samples behind it). Prometheus wins when it has a fresh value."""
        local, samples = self.window.quantile(0.95)
        if self.prometheus is not None:
            reading = self.prometheus.latest()
            if reading.value is not None:
                return reading.value / self.config.slo_s, "prometheus", max(samples, self.config.feedback.min_samples)
        return local, ("window" if local is not None else "none"), samples

    def tick(self) -> FeedbackState:
        p95, source, samples = self.p95()
        with self._lock:
            self.feedback = step(self.feedback, p95, 1.0, samples, self.clock(), self.config.feedback)
            self._p95 = (p95, source)
        return self.feedback

    def status(self) -> ControllerStatus:
        return ControllerStatus(
            margin=self.feedback.margin, level=self.last_level, p95_ratio=self._p95[0], p95_source=self._p95[1],
            gpu_available=self.gpu is not None and self.gpu.available,
            prometheus_up=None if self.prometheus is None else self.prometheus.latest().value is not None
            or not self.prometheus.latest().error,
            last_action=self.feedback.last_action)

    def close(self) -> None:
        for signal in (self.gpu, self.prometheus):
            if signal is not None:
                signal.stop()
