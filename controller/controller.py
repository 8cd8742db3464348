"""The budget controller of one served model: turns signals into a margin and memory cap, and requests into
ladder levels through the pure `policy.decide`.

Per request (`choose`): budget = min(SLO, remaining deadline) - time already spent; predicted latency per level
from the online cost model (plus expected queue wait, supplied by the caller; media time left out once the
media are decoded, since the budget already paid for it); memory pressure above the threshold caps quality at
`memory_cap_level`. Memory pressure is what the serving engine can still use, read by the `memory` callable the
service supplies (its KV pool's reserved share and the device allocator's headroom), not NVML's "used", which
stays high after one large request once the allocator has cached the memory.
Every outcome reaches the latency window (`observe` for answers, `observe_outcome` for requests cut off by their
deadline — counted at the deadline —, rejected — counted at their SLO — or cancelled — at the time they ran).
Every `feedback.interval_s` (`tick`: on finished requests, decisions and status reads): the p95 of latency as a
share of each request's own SLO — so requests of different SLO classes share one loop — against the target share
steps the safety margin (see feedback.py for the law and its recovery bound). The service's own window holds these
shares; a fresh Prometheus value (the configured query's, which must be that same p95 of latency / SLO: the
default reads the service's aim_request_latency_slo_ratio histogram) is taken as it is, over every replica.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .cost_model import CostModel, Observation
from .feedback import FeedbackConfig, FeedbackState, SinceIncrease, step
from .policy import Decision, Features, Level, decide
from .signals import GpuSampler, LatencyWindow, PromQLReader

# The p95 of latency / SLO over the requests the controller steers by, failures included, across SLO classes, over
# the last minute: what its own window holds (LatencyWindow, 60 s), read from every replica (service/metrics.py:
# aim_request_latency_slo_ratio). The placeholder {model} is replaced by the served model's name.
DEFAULT_P95_QUERY = ('histogram_quantile(0.95, sum by (le) '
                     '(rate(aim_request_latency_slo_ratio_bucket{model="{model}"}[1m])))')


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
                 gpu: GpuSampler | None = None, prometheus: PromQLReader | None = None, clock=time.monotonic,
                 memory: Callable[[], float | None] | None = None):
        self.ladder = list(ladder)
        self.config = config
        self.gpu = gpu
        self.memory = memory  # -> share of the engine's memory in use, [0, 1], or None when unknown
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
        used = self.memory() if self.memory is not None else None
        if used is not None and used > self.config.memory_threshold:
            return min(self.config.memory_cap_level, len(self.ladder) - 1)
        return 0

    def choose(self, predicted_s: Sequence[float | None], budget_s: float, min_retention: float,
               queue_depth: int = 0, priority: str = "normal", record: bool = True) -> Decision:
        """The level for one request. `record=False` (a cost estimate, not a request): nothing about the
        controller changes."""
        if record:
            self.tick()
        decision = decide(self.ladder, Features(budget_s=budget_s, min_retention=min_retention,
                                                predicted_s=predicted_s, margin=self.feedback.margin,
                                                min_level=self.memory_cap(), queue_depth=queue_depth,
                                                priority=priority))
        if record and not decision.rejected:
            self.last_level = decision.level
        return decision

    def predict(self, visual_tokens_in: int, prefill_flops: float, max_new_tokens: int, batch: float = 1.0,
                media: bool = True, ignore_eos: bool = False) -> float | None:
        """Predicted latency when decoding in a batch of `batch` sequences, for the answer length this model's
        requests actually reach; `media=False` once the request's media are decoded (their time is spent)."""
        return self.cost_model.predict(visual_tokens_in, prefill_flops, max_new_tokens, batch, media=media,
                                       ignore_eos=ignore_eos)

    # ---- feedback -----------------------------------------------------------------------------
    def observe(self, latency_s: float, observation: Observation | None = None, slo_s: float | None = None,
                controlled: bool = True, prediction: tuple[float, float] | None = None) -> None:
        """A finished request: its end-to-end latency and SLO (None = the default), and its stage timings. Every
        request teaches the cost model; only those the controller decided (`controlled`) steer the margin, and
        their `prediction` (observed seconds, predicted seconds, over the same span) corrects its bias."""
        with self._lock:
            if controlled:
                self.window.add(latency_s / (slo_s or self.config.slo_s))
            if observation is not None:
                self.cost_model = self.cost_model.observe(observation)
            if controlled and prediction is not None:
                self.cost_model = self.cost_model.correct(*prediction)
        self.tick()

    def learn(self, observation: Observation) -> None:
        """A warm-up request's stage timings: they teach the cost model and steer nothing."""
        with self._lock:
            self.cost_model = self.cost_model.observe(observation)

    def observe_outcome(self, latency_s: float, slo_s: float | None = None, controlled: bool = True) -> None:
        """A request that ended without an answer: its latency as the caller saw it (the deadline for one cut off
        by it, the SLO for one rejected, the time it ran for one cancelled). It steers the margin like an answer;
        it teaches the cost model nothing."""
        self.observe(latency_s, None, slo_s, controlled)

    def p95(self) -> tuple[float | None, str, int]:
        """(p95 latency / SLO, where it came from, samples behind it). Prometheus wins when it has a fresh value."""
        local, samples = self.window.quantile(0.95)
        if self.prometheus is not None:
            reading = self.prometheus.latest()
            if reading.value is not None:
                return reading.value, "prometheus", max(samples, self.config.feedback.min_samples)
        return local, ("window" if local is not None else "none"), samples

    def tick(self) -> FeedbackState:
        p95, source, samples = self.p95()
        with self._lock:
            state = self.feedback
            fresh = self.window.fresh(state.last_step_at)
            recent_p95, recent = self.window.quantile(0.95, since=state.last_increase_at)
            self.feedback = step(state, p95, 1.0, samples, self.clock(), self.config.feedback, fresh,
                                 SinceIncrease(recent, recent_p95))
            self._p95 = (p95, source)
        return self.feedback

    def status(self) -> ControllerStatus:
        self.tick()  # an idle server's margin relaxes with time, and what it reports shows it
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
