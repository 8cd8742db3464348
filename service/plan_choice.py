"""Which plan a request gets: none, its own explicit plan, or, for `auto`, the controller's decision over the
quality ladder, with what the request brings at each level and what the engine holds now. A decision the
controller rejects fails the request now (resource_exhausted, or deadline_exceeded when its deadline is what it
cannot make). The decision and the level go to the metrics."""

from __future__ import annotations

import math
import time

from aim_engine import AimEngine, ReductionPlan
from aim_engine.prepare import IngestedRequest
from controller.controller import BudgetController

from .metrics import ServiceMetrics
from .types import AppliedPlan, Reduction, ServiceError


class PlanChoice:
    def __init__(self, name: str, engine: AimEngine, controller: BudgetController, metrics: ServiceMetrics,
                 default_slo_s: float):
        self.name, self.engine, self.controller, self.metrics = name, engine, controller, metrics
        self.default_slo_s = default_slo_s

    def choose(self, request: IngestedRequest, reduction: Reduction, deadline: float | None, arrival: float,
               record: bool = True) -> AppliedPlan:
        """The plan. For `auto`, the controller's decision over what the engine holds now (call it where no other
        decision can slip in before this request joins the engine: the runtime's admission lock). `record=False`
        (a cost estimate): the controller and its metrics are left as they were."""
        if reduction.kind == "none":
            return AppliedPlan(ReductionPlan(), "none", "the request asked for no reduction")
        if reduction.kind == "plan":
            reduction.plan.check_depth(self.engine.num_layers)
            return AppliedPlan(reduction.plan, "explicit", "the request gave the plan")
        ladder = self.controller.ladder
        now = time.monotonic()
        slo_left = (reduction.slo_s or self.default_slo_s) - (now - arrival)
        budget = slo_left if deadline is None else min(slo_left, deadline - now)
        # what the request asked for itself (the server's default SLO steers the choice, it refuses nobody)
        asked = [t for t in (None if reduction.slo_s is None else slo_left,
                             None if deadline is None else deadline - now) if t is not None]
        levels = [self.engine.pending_load(request, level.plan, budget) for level in ladder]
        held = self.engine.loop.load(now)
        decision = self.controller.choose(levels, held, budget, reduction.min_retention,
                                          priority=reduction.priority, record=record, slo_s=reduction.slo_s,
                                          own_time_s=min(asked) if asked else math.inf, arrived_at=arrival)
        if record:
            level_name = ladder[decision.level].name if decision.level >= 0 else "none"
            self.metrics.controller_decisions.labels(self.name, level_name, decision.outcome).inc()
        if decision.rejected and not record and decision.cheapest >= 0:  # an estimate says what a request would get
            level = ladder[decision.cheapest]
            return AppliedPlan(level.plan, "auto", f"a request now would be refused: {decision.reason}",
                               decision.predicted_s, level.name)
        if decision.rejected:
            if decision.cause == "late" and deadline is not None and (reduction.slo_s is None
                                                                       or deadline - now <= slo_left):
                raise ServiceError("deadline_exceeded", f"cannot finish before the deadline: {decision.reason}; "
                                                        "allow more time or retry later")
            raise ServiceError("resource_exhausted", f"cannot serve now: {decision.reason}; "
                               + ("lower min_retention or retry later" if decision.cause == "floor"
                                  else "retry later with backoff, or allow more time"))
        if record:
            self.metrics.controller_level.labels(self.name).set(decision.level)
            # the requests it joins whose forecasts expected nobody finish this much later: known work, not their
            # forecasts' error
            self.engine.loop.extend_forecasts({s.seq_id: d for s, d in zip(held.sequences, decision.delays) if d > 0})
        reason = decision.reason if decision.fits else f"best effort: {decision.reason}"
        return AppliedPlan(ladder[decision.level].plan, "auto", reason, decision.predicted_s,
                           ladder[decision.level].name, forecast_moves=not decision.expected)

    def predict(self, request: IngestedRequest, plan: ReductionPlan) -> float | None:
        """Seconds from now until its answer under `plan` if it joined the engine now (its media decoded)."""
        return self.controller.finish_time(self.engine.pending_load(request, plan),
                                           self.engine.loop.load(time.monotonic()))
