"""Which plan a request gets: none, its own explicit plan, or, for `auto`, the controller's decision over the
quality ladder with each level's latency predicted for the batch the request joins. The decision and the level
go to the metrics."""

from __future__ import annotations

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
               running: int, waiting: int, record: bool = True) -> AppliedPlan:
        """The plan. `running` / `waiting`: the model's load now (`waiting` counts this request). `record=False`
        (a cost estimate): the controller and its metrics are left as they were."""
        if reduction.kind == "none":
            return AppliedPlan(ReductionPlan(), "none", "the request asked for no reduction")
        if reduction.kind == "plan":
            reduction.plan.check_depth(self.engine.num_layers)
            return AppliedPlan(reduction.plan, "explicit", "the request gave the plan")
        ladder = self.controller.ladder
        now = time.monotonic()
        budget = (reduction.slo_s or self.default_slo_s) - (now - arrival)
        if deadline is not None:
            budget = min(budget, deadline - now)
        predicted = [self.predict(request, level.plan, running, media=not record) for level in ladder]
        # the requests waiting with this one: `waiting` counts this one too (it is in the system, not running)
        decision = self.controller.choose(predicted, budget, reduction.min_retention,
                                          queue_depth=max(0, waiting - 1), priority=reduction.priority,
                                          record=record, slo_s=reduction.slo_s)
        if record:
            level_name = ladder[decision.level].name if decision.level >= 0 else "none"
            self.metrics.controller_decisions.labels(self.name, level_name, decision.outcome).inc()
        if decision.rejected:
            raise ServiceError("resource_exhausted", f"cannot serve now: {decision.reason}; lower min_retention "
                                                     "or retry later")
        if record:
            self.metrics.controller_level.labels(self.name).set(decision.level)
        if not decision.fits and deadline is not None and decision.predicted_s is not None \
                and decision.predicted_s > deadline - now:
            raise ServiceError("deadline_exceeded", f"cannot finish before the deadline: {decision.reason}")
        reason = decision.reason if decision.fits else f"best effort: {decision.reason}"
        return AppliedPlan(ladder[decision.level].plan, "auto", reason, decision.predicted_s,
                           ladder[decision.level].name)

    def predict(self, request: IngestedRequest, plan: ReductionPlan, running: int, queue_wait_s: float = 0.0,
                media: bool = False) -> float | None:
        """Predicted latency from now; its media are decoded (`media=False`: their time is spent, and the budget
        it is compared with has already paid for it) unless `media`."""
        est = self.engine.cost(request.shape, plan)
        batch = min(self.engine.loop.max_batch, running + 1)  # it joins the running batch
        sampling = request.sampling
        predicted = self.controller.predict(est.visual_tokens_in, est.prefill_flops, sampling.max_new_tokens,
                                            batch, media=media, ignore_eos=sampling.ignore_eos)
        return None if predicted is None else predicted + queue_wait_s
