"""The budget controller of one served model: turns signals into a margin and memory cap, and requests into
ladder levels through the pure `policy.decide`.

Per request (`choose`, once its media are decoded): budget = min(SLO, remaining deadline) - time already spent;
the work it brings at each level and the work the engine holds (aim_engine/serving/load.py) in seconds of the
online cost model's rates, and the gap between requests at the recent rate of independent arrivals (none on an
empty engine; a request sent right after an answer is its caller's next, not more work); `policy.decide` plays the
engine's rules forward over them (whatif.py) and picks the highest level that keeps this request and every
admitted one within its time, or rejects it. Memory pressure above the threshold caps quality at
`memory_cap_level`. Memory pressure is what the serving engine can still use, read by the `memory` callable the
service supplies (its KV pool's reserved share and the device allocator's headroom), not NVML's "used", which
stays high after one large request once the allocator has cached the memory.

Every outcome reaches the latency window (`observe` for answers, `observe_outcome` for requests cut off by their
deadline — counted at the deadline —, rejected — counted at their SLO — or cancelled — at the time they ran).
Every `feedback.interval_s` (`tick`: on finished requests, decisions and status reads), each SLO class's loop
(slo.py: requests that give no SLO are the "default" class) steps its own safety margin from the p95 of its own
requests' latency as a share of their SLO against the target share (see feedback.py for the law and its recovery
bound): a tenant whose tight SLOs are missed raises its class's margin, and the other classes decide with theirs.
A class decides with the default class's margin until its first request has finished. No class decides below
the prediction's recent error (`prediction_margin`: the worst observed / forecast latency of the last answers it
decided), which follows a machine slower than its fitted rates within a few answers, nor below how far the
requests still in the engine are behind their forecasts (`in_flight_error`), which shows the same at the next
decision. A forecast is the decision's prediction, with the requests it expected next; one that expected nobody
(an empty engine, or no rate yet) is moved later by each request decided after it, by the delay the what-if
predicts it causes (policy.Decision.delays): expecting nobody is a rule, not a forecast of the arrivals, so they
are known work, not its error. (Held to its prediction, the first of a cluster on a fresh server read the cluster
as an error of 2-3x, and every request for the next 30 s went to the cheapest level. A forecast that expected a
stream keeps the error of arrivals beyond it: moved by them too, the margin stayed at its floor through bursts
and ramps, and retention fell; side by side in docs/performance.md.) The windows
hold latency / SLO; a fresh Prometheus value (the configured query's, which must be that p95 of latency / SLO, by
`slo_class` label or one series for all: the default reads the service's aim_request_latency_slo_ratio histogram
by class) is taken as it is, over every replica.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from aim_engine.serving.load import EngineLoad, SequenceLoad

from .cost_model import CostModel, Observation
from .feedback import FeedbackConfig, FeedbackState, SinceIncrease, step
from .policy import Decision, Features, Level, decide
from .whatif import EngineRules, finish_times
from .signals import GpuSampler, LatencyWindow, PromQLReader, arrival_gap
from .slo import DEFAULT_CLASS, slo_class

# The p95 of latency / SLO over the requests the controller steers by, failures included, per SLO class, over the
# last minute: what each class's own window holds (LatencyWindow, 60 s), read from every replica
# (service/metrics.py: aim_request_latency_slo_ratio). The placeholder {model} is replaced by the model's name.
DEFAULT_P95_QUERY = ('histogram_quantile(0.95, sum by (le, slo_class) '
                     '(rate(aim_request_latency_slo_ratio_bucket{model="{model}"}[1m])))')
ARRIVAL_WINDOW_S = 10.0  # decisions older than this say nothing of the arrival rate
RATE_ARRIVALS = 8  # the most recent decisions the arrival rate is read from
# A request that arrives within this many seconds after an answer (or a refusal) is taken for that caller's next
# request: a caller that waits for each answer before it sends again (a closed loop) sends at our own pace, so its
# requests are no forecast of more work; counted, a caller sending one request after another at maximum saving
# would be expected at maximum saving's pace and held there. Independent arrivals land this close to an answer by
# chance (at 2 answers a second, one in ten), which makes the expected rate that much lower.
CALLER_TURNAROUND_S = 0.05
# The prediction's own error: observed / forecast latency of the last PREDICTION_ANSWERS answers the controller
# decided, within PREDICTION_WINDOW_S. The worst of them is a floor under every class's margin, so that a
# model that under-predicts (the machine slower than its fitted rates: on a CPU, media decoding on the engine's
# cores) is corrected within a few answers, before the latency / SLO loop sees a p95 near the SLO.
PREDICTION_ANSWERS = 16
PREDICTION_WINDOW_S = 30.0


@dataclass(frozen=True)
class ControllerConfig:
    slo_s: float = 10.0  # the SLO of requests that give none, and the feedback loop's target
    memory_threshold: float = 0.9  # GPU memory used fraction above which quality is capped
    memory_cap_level: int = 3  # the highest-quality level allowed under memory pressure (the AIM default)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)


@dataclass
class ClassLoop:
    """One SLO class's feedback loop: the latency / SLO of its controlled requests, and its margin."""

    window: LatencyWindow
    feedback: FeedbackState  # starts at the least margin
    p95: tuple[float | None, str] = (None, "none")  # what its last step acted on, and where it came from


@dataclass
class ControllerStatus:
    """What the controller last did, for metrics and logs."""

    margin: float  # the default class's (requests that give no SLO)
    level: int | None
    p95_ratio: float | None  # p95 latency / SLO
    p95_source: str  # "prometheus" | "window" | "none"
    gpu_available: bool
    prometheus_up: bool | None  # None when not configured
    last_action: str
    margins: dict[str, float] = field(default_factory=dict)  # per SLO class with a loop: what it decides with
    prediction_margin: float = 1.0  # the floor under them from the prediction's recent error


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
        self.window = LatencyWindow(clock=clock)  # every class's controlled requests: what status reports
        self.loops: dict[str, ClassLoop] = {}  # SLO class -> its feedback loop (classes are few: slo.py)
        self.cost_model = CostModel()
        self.last_level: int | None = None
        self._p95: tuple[float | None, str] = (None, "none")
        # the last decisions: when each was made, the budget its request had, and whether it arrived right after an
        # answer (CALLER_TURNAROUND_S); and when the last answers and refusals went out
        self._arrived: deque[tuple[float, float, bool]] = deque(maxlen=RATE_ARRIVALS)
        self._answered: deque[float] = deque(maxlen=64)
        self._errors = LatencyWindow(PREDICTION_WINDOW_S, PREDICTION_ANSWERS, clock)  # observed / forecast
        self._lock = threading.Lock()
        self._loop(DEFAULT_CLASS)

    def _loop(self, name: str) -> ClassLoop:
        loop = self.loops.get(name)
        if loop is None:
            loop = self.loops[name] = ClassLoop(LatencyWindow(clock=self.clock),
                                                FeedbackState(margin=self.config.feedback.min_margin))
        return loop

    @property
    def feedback(self) -> FeedbackState:
        """The default class's loop (requests that give no SLO)."""
        return self.loops[DEFAULT_CLASS].feedback

    def margin_for(self, slo_s: float | None) -> float:
        """The margin a request of SLO `slo_s` decides with (class_margin of its class)."""
        return self.class_margin(slo_class(slo_s))

    def class_margin(self, name: str) -> float:
        """The margin SLO class `name` decides with: its loop's (the default class's until it has its own), never
        below the prediction's recent error (prediction_margin)."""
        loop = self.loops.get(name) or self.loops[DEFAULT_CLASS]
        return max(loop.feedback.margin, self.prediction_margin())

    def prediction_margin(self) -> float:
        """The worst observed / forecast latency of the recent answers (1 with fewer than the feedback's
        min_samples), within [min_margin, max_margin]. The worst, not a quantile: a request decided at its limit
        misses whenever its prediction was short by more than the margin, and 99% within SLO leaves no room for
        the one in ten a p90 would let through (measured on the reference model's ramp: 92.5% with a p90 floor)."""
        config = self.config.feedback
        worst, count = self._errors.quantile(1.0)
        if count < config.min_samples:
            return config.min_margin
        return min(config.max_margin, max(config.min_margin, worst))

    # ---- per request --------------------------------------------------------------------------
    def memory_cap(self) -> int:
        used = self.memory() if self.memory is not None else None
        if used is not None and used > self.config.memory_threshold:
            return min(self.config.memory_cap_level, len(self.ladder) - 1)
        return 0

    def choose(self, levels: Sequence[SequenceLoad], engine: EngineLoad, budget_s: float, min_retention: float,
               priority: str = "normal", record: bool = True, slo_s: float | None = None,
               own_time_s: float | None = None, arrived_at: float | None = None) -> Decision:
        """The level for one request of SLO `slo_s` (None: the default), with its class's margin: `levels[i]` is
        the work it brings at ladder level i, `engine` what the engine holds now; `own_time_s`: the time it asked
        for itself (policy.Features); `arrived_at`: when it reached the server, on this controller's clock (None:
        unknown). `record=False` (a cost estimate, not a request): nothing about the controller changes."""
        if record:
            self.tick()
        with self._lock:
            model = self.cost_model
        features = self.features(levels, engine, budget_s, min_retention, priority, slo_s, model)
        decision = decide(self.ladder, replace(features, own_time_s=own_time_s))
        if record:
            if not decision.rejected:
                self.last_level = decision.level
            with self._lock:  # every decided request is an arrival, rejected or not
                self._arrived.append((self.clock(), budget_s, self._follows_an_answer(arrived_at)))
        return decision

    def features(self, levels: Sequence[SequenceLoad], engine: EngineLoad, budget_s: float, min_retention: float,
                 priority: str, slo_s: float | None, model: CostModel) -> Features:
        """What `decide` sees: the request at each level and the engine's jobs, in seconds of the fitted rates. On an
        empty engine no request is expected next: the arrivals have not been outrunning it (a caller that sends one
        request after another finds it empty every time, however fast it sends)."""
        admitted = [model.job(s) for s in engine.sequences] if model.ready else []
        line = model.step_line() or (0.0, 0.0, 0.0)
        rules = EngineRules(max_batch=engine.max_batch, step_a=line[0], step_b=line[1], step_c=line[2],
                            step_multiple=engine.step_multiple, free_kv_blocks=engine.free_kv_blocks,
                            workspace_tokens=engine.workspace_tokens)
        projected = tuple(finish_times(admitted, rules))  # once: the in-flight error and the decision both read it
        margin = max(self.margin_for(slo_s), self.in_flight_error(engine, projected))
        return Features(budget_s=budget_s, min_retention=min_retention, candidates=[model.job(l) for l in levels],
                        admitted=admitted, admitted_finish=projected, rules=rules, margin=margin,
                        min_level=self.memory_cap(), priority=priority,
                        arrival_gap_s=self.arrival_gap_s() if engine.sequences else None,
                        upcoming_budgets=self.recent_budgets())

    def in_flight_error(self, engine: EngineLoad, projected: Sequence[float]) -> float:
        """How far the requests still in the engine are behind their forecasts: the worst, over those with a
        forecast (SequenceLoad.forecast_s; see the module's docstring), of (seconds since it was made + their finish
        as the engine's rules project it now) / the forecast, within [min_margin, max_margin]. What a forecast
        could not know, more requests than it expected and a machine slower than its fits, shows here as soon as it
        happens, where the answers' error (prediction_margin) sees it only when they finish, about an SLO later.
        `projected`: the engine's sequences' finish times as the rules project them now (none before the rates
        are known)."""
        config = self.config.feedback
        if not projected or all(s.forecast_s is None for s in engine.sequences):
            return config.min_margin
        worst = max(((s.forecast_age_s + f) / s.forecast_s for s, f in zip(engine.sequences, projected)
                     if s.forecast_s and math.isfinite(f)), default=config.min_margin)
        return min(config.max_margin, max(config.min_margin, worst))

    def finish_time(self, request: SequenceLoad, engine: EngineLoad) -> float | None:
        """Seconds from now until `request` is answered if it joined `engine` now, with the work known to be there
        (None: rates not known yet)."""
        with self._lock:
            model = self.cost_model
        features = self.features([request], engine, math.inf, 0.0, "normal", None, model)
        if features.candidates[0] is None:
            return None
        return finish_times([*features.admitted, features.candidates[0]], features.rules)[-1]

    def _follows_an_answer(self, arrived_at: float | None) -> bool:
        """Whether a request that arrived at `arrived_at` came within CALLER_TURNAROUND_S after an answer or a
        refusal not yet matched to another arrival (each is matched once). Call with the lock held."""
        if arrived_at is None:
            return False
        for at in self._answered:
            if 0.0 <= arrived_at - at <= CALLER_TURNAROUND_S:
                self._answered.remove(at)
                return True
        return False

    def arrival_gap_s(self) -> float | None:
        """Mean seconds between independent requests (signals.arrival_gap): over the last RATE_ARRIVALS decisions
        within ARRIVAL_WINDOW_S that did not arrive right after an answer (a caller's next request:
        CALLER_TURNAROUND_S), or those since a rise in their rate (None: fewer than two), so that a burst's rate is
        seen within a few of its requests and an idle server, or one serving callers that each wait for their
        answer, expects nobody."""
        now = self.clock()
        with self._lock:
            recent = [t for t, _, follows in self._arrived if t >= now - ARRIVAL_WINDOW_S and not follows]
        gap = arrival_gap(recent, now)
        return None if gap is None else max(1e-3, gap)

    def recent_budgets(self) -> tuple[float, ...]:
        """The budgets of the requests decided within ARRIVAL_WINDOW_S (the last RATE_ARRIVALS), tightest first:
        what the requests expected next are given (policy.Features.upcoming_budgets)."""
        now = self.clock()
        with self._lock:
            return tuple(sorted(b for t, b, _ in self._arrived if t >= now - ARRIVAL_WINDOW_S and math.isfinite(b)))

    # ---- feedback -----------------------------------------------------------------------------
    def observe(self, latency_s: float, observation: Observation | None = None, slo_s: float | None = None,
                controlled: bool = True, prediction_ratio: float | None = None) -> None:
        """A finished request: its end-to-end latency and SLO (None = the default), its stage timings, and its
        observed / forecast latency (None: no forecast). Every request teaches the cost model; only those the
        controller decided (`controlled`) steer the margins."""
        with self._lock:
            self._answered.append(self.clock())  # its caller may send its next request now
            if controlled and prediction_ratio is not None and prediction_ratio > 0:
                self._errors.add(prediction_ratio)
            if controlled:
                ratio = latency_s / (slo_s or self.config.slo_s)
                self.window.add(ratio)
                self._loop(slo_class(slo_s)).window.add(ratio)
            if observation is not None:
                self.cost_model = self.cost_model.observe(observation)
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

    def p95(self, name: str | None = None) -> tuple[float | None, str, int]:
        """(p95 latency / SLO, where it came from, samples behind it) of SLO class `name`, or of every class (None).
        Prometheus wins when it has a fresh value: its series for the class, or one without a class label."""
        window = self.window if name is None else self._loop(name).window
        local, samples = window.quantile(0.95)
        if self.prometheus is not None:
            reading = self.prometheus.latest()
            value = reading.value if name is None else reading.by_class.get(name, reading.unlabelled)
            if value is not None:
                return value, "prometheus", max(samples, self.config.feedback.min_samples)
        return local, ("window" if local is not None else "none"), samples

    def tick(self) -> FeedbackState:
        """Steps every class's loop with its own window's evidence (each at most once per interval); returns the
        default class's state."""
        for name in list(self.loops):
            p95, source, samples = self.p95(name)
            with self._lock:
                loop = self.loops[name]
                state = loop.feedback
                fresh = loop.window.fresh(state.last_step_at)
                recent_p95, recent = loop.window.quantile(0.95, since=state.last_increase_at)
                loop.feedback = step(state, p95, 1.0, samples, self.clock(), self.config.feedback, fresh,
                                     SinceIncrease(recent, recent_p95))
                loop.p95 = (p95, source)
        p95, source, _ = self.p95()
        self._p95 = (p95, source)
        return self.feedback

    def status(self) -> ControllerStatus:
        self.tick()  # an idle server's margin relaxes with time, and what it reports shows it
        return ControllerStatus(
            margin=self.class_margin(DEFAULT_CLASS), level=self.last_level, p95_ratio=self._p95[0],
            p95_source=self._p95[1],
            gpu_available=self.gpu is not None and self.gpu.available,
            prometheus_up=None if self.prometheus is None else self.prometheus.latest().value is not None
            or not self.prometheus.latest().error,
            last_action=self.feedback.last_action,
            margins={name: self.class_margin(name) for name in self.loops},
            prediction_margin=self.prediction_margin())

    def close(self) -> None:
        for signal in (self.gpu, self.prometheus):
            if signal is not None:
                signal.stop()
