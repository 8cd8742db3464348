"""The decision: which rung of the quality ladder a request gets. A pure function of its inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from aim_engine.plan import DEFAULT_MERGE_RETENTION, ReductionPlan, default_prune_range


@dataclass(frozen=True)
class Level:
    name: str
    plan: ReductionPlan

    @property
    def retention(self) -> float:
        """Visual-token retention after merging (the quality proxy)."""
        return self.plan.merge_retention if self.plan.merge_retention is not None else 1.0


def default_ladder(num_layers: int) -> list[Level]:
    """From the untouched model to maximum saving, along the paper's Pareto points (aim-method.md §4):
    merging to 50% and 25% costs ~no accuracy; pruning l1..l2 on top is the paper's default; 12.5% merge with an
    earlier prune range is the most aggressive point we offer."""
    l1, l2 = default_prune_range(num_layers)
    return [
        Level("full", ReductionPlan()),
        Level("merge-50", ReductionPlan(merge_retention=0.5)),
        Level("merge-25", ReductionPlan(merge_retention=DEFAULT_MERGE_RETENTION)),
        Level("aim-default", ReductionPlan.default_for_depth(num_layers)),
        Level("max-saving", ReductionPlan(merge_retention=0.125, prune_start=max(1, num_layers // 4),
                                          prune_end=max(max(1, num_layers // 4) + 1, l1))),
    ]


@dataclass(frozen=True)
class Features:
    budget_s: float  # min(the request's SLO, its remaining deadline)
    min_retention: float  # quality floor
    predicted_s: Sequence[float | None]  # predicted latency (queue wait included) at each ladder level
    margin: float = 1.2  # predicted x margin must fit the budget


@dataclass(frozen=True)
class Decision:
    level: int
    predicted_s: float | None
    reason: str
    fits: bool


def decide(ladder: Sequence[Level], features: Features) -> Decision:
    """The highest-quality level whose predicted latency x margin fits the budget, never below the quality
    floor. If none fits, the cheapest allowed level with fits=False (the caller serves best-effort or rejects)."""
    allowed = [i for i, level in enumerate(ladder) if level.retention >= features.min_retention]
    if not allowed:
        return Decision(0, features.predicted_s[0], "no level meets the quality floor; serving the full model", False)
    if features.predicted_s[allowed[0]] is None:
        return Decision(allowed[0], None, "no latency data yet: highest quality allowed", True)
    for i in allowed:
        predicted = features.predicted_s[i]
        if predicted is not None and predicted * features.margin <= features.budget_s:
            why = "fits the budget at full quality" if i == allowed[0] else \
                f"{ladder[i - 1].name if i > 0 else 'full'} would exceed the budget"
            return Decision(i, predicted, f"{ladder[i].name}: {why} "
                            f"({predicted:.3f}s x {features.margin:.2f} <= {features.budget_s:.3f}s)", True)
    last = allowed[-1]
    return Decision(last, features.predicted_s[last],
                    f"{ladder[last].name}: no level fits {features.budget_s:.3f}s "
                    f"(cheapest predicted {features.predicted_s[last]:.3f}s x {features.margin:.2f})", False)
