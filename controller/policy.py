"""The decision: which rung of the quality ladder a request gets. A pure function of its inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from aim_engine.plan import DEFAULT_MERGE_RETENTION, PLAN_FILE, ReductionPlan, default_prune_range


@dataclass(frozen=True)
class Level:
    name: str
    plan: ReductionPlan

    def __post_init__(self) -> None:
        if self.plan.merge_tokens is not None:
            raise ValueError(
                f"level {self.name!r} gives merge_tokens ({self.plan.merge_tokens} per frame or crop): the share of "
                "visual tokens that keeps depends on each request's frame size, so the quality floor (min_retention) "
                "could not be checked against it; give the level a merge_retention (a share) instead")

    @property
    def retention(self) -> float:
        """Visual-token retention after merging (the quality proxy, what min_retention floors): the plan's
        merge_retention, 1.0 without merging. Pruning inside the LLM is not counted, as in RequestStats.retention."""
        return self.plan.merge_retention if self.plan.merge_retention is not None else 1.0


def default_ladder(num_layers: int, default: ReductionPlan | None = None) -> list[Level]:
    """From the untouched model to maximum saving, along the paper's Pareto points (aim-method.md §4):
    merging to 50% and 25% costs ~no accuracy; pruning l1..l2 on top is the paper's default (or `default`, the
    model's own calibrated plan); 12.5% merge with an earlier prune range is the most aggressive point we offer.
    Every rung that merges uses the default's position rule and attention rule: calibration chose them for this
    model."""
    default = default or ReductionPlan.default_for_depth(num_layers)
    if default.merge_tokens is not None:
        raise ValueError(f"the model's default plan (its {PLAN_FILE}) gives merge_tokens, so the ladder's aim-default "
                         "level could not be checked against a quality floor: give that plan a merge_retention, or "
                         "the server a ladder file")
    how = dict(positions=default.positions, proportional_attention=default.proportional_attention)
    l1, _ = default_prune_range(num_layers)
    start = max(1, num_layers // 4)
    return [
        Level("full", ReductionPlan()),
        Level("merge-50", ReductionPlan(merge_retention=0.5, **how)),
        Level("merge-25", ReductionPlan(merge_retention=DEFAULT_MERGE_RETENTION, **how)),
        Level("aim-default", default),
        Level("max-saving", ReductionPlan(merge_retention=0.125, prune_start=start, prune_end=max(start + 1, l1),
                                          **how)),
    ]


# A request's priority sets the safety margin of its decision: "high" takes predictions at face value (the
# feedback margin capped at 1), so under load it keeps more visual tokens; "low" multiplies the feedback margin
# by LOW_PRIORITY_MARGIN_FACTOR, so it steps down the ladder before "normal" requests do.
PRIORITIES = ("low", "normal", "high")
LOW_PRIORITY_MARGIN_FACTOR = 1.5


def margin_for_priority(margin: float, priority: str) -> float:
    """The safety margin a request of `priority` is decided with, given the feedback loop's `margin`."""
    if priority == "high":
        return min(margin, 1.0)
    if priority == "low":
        return margin * LOW_PRIORITY_MARGIN_FACTOR
    return margin


@dataclass(frozen=True)
class Features:
    budget_s: float  # min(the request's SLO, its remaining deadline)
    min_retention: float  # quality floor
    predicted_s: Sequence[float | None]  # predicted latency (queue wait included) at each ladder level
    margin: float = 1.2  # the feedback loop's safety margin: predicted x margin must fit the budget
    min_level: int = 0  # no level of higher quality than this (memory pressure: KV pool or device allocator)
    queue_depth: int = 0  # requests waiting behind this one: each waits for its service time too
    priority: str = "normal"  # one of PRIORITIES: scales the margin (margin_for_priority)

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")


@dataclass(frozen=True)
class Decision:
    level: int  # index into the ladder; -1 when rejected
    predicted_s: float | None
    reason: str
    fits: bool
    rejected: bool = False

    @property
    def outcome(self) -> str:
        """Bounded label for metrics."""
        if self.rejected:
            return "rejected"
        if self.predicted_s is None:
            return "no_data"
        return "fits" if self.fits else "best_effort"


def decide(ladder: Sequence[Level], features: Features) -> Decision:
    """The highest-quality level whose predicted latency x margin (the feedback margin scaled by the request's
    priority) fits the budget — shared with the requests waiting behind — never below the quality floor nor
    above the memory cap. If none fits, the cheapest allowed level with fits=False (the caller serves
    best-effort or rejects). If the floor and the cap leave no level at all, rejected."""
    allowed = [i for i, level in enumerate(ladder)
               if i >= features.min_level and level.retention >= features.min_retention]
    if not allowed:
        why = f"the quality floor {features.min_retention:.3g} cannot be met"
        if features.min_level:
            why += f" while memory pressure caps quality at {ladder[features.min_level].name}"
        return Decision(-1, None, why, False, rejected=True)
    capped = f" (memory pressure caps quality at {ladder[features.min_level].name})" if features.min_level else ""
    # The budget is shared with the queue behind: this request's service time delays every waiting one.
    budget = features.budget_s / (1 + features.queue_depth)
    shared = f" / (1 + {features.queue_depth} waiting)" if features.queue_depth else ""
    margin = margin_for_priority(features.margin, features.priority)
    times = f"x {margin:.2f}" + (f" ({features.priority} priority)" if features.priority != "normal" else "")
    if features.predicted_s[allowed[0]] is None:
        return Decision(allowed[0], None, f"{ladder[allowed[0]].name}: no latency data yet{capped}", True)
    for i in allowed:
        predicted = features.predicted_s[i]
        if predicted is not None and predicted * margin <= budget:
            why = "fits the budget" if i == allowed[0] else f"{ladder[allowed[0]].name} would exceed the budget"
            return Decision(i, predicted, f"{ladder[i].name}: {why} ({predicted:.3f}s {times} "
                            f"<= {features.budget_s:.3f}s{shared}){capped}", True)
    last = allowed[-1]
    return Decision(last, features.predicted_s[last],
                    f"{ladder[last].name}: no level fits {features.budget_s:.3f}s{shared} "
                    f"(cheapest predicted {features.predicted_s[last]:.3f}s {times}){capped}", False)


def load_ladder(path, num_layers: int) -> list[Level]:
    """A ladder from a TOML or JSON file: a list `level` of tables with `name` and ReductionPlan fields,
    ordered from the highest quality to the most saving. `prune_start`/`prune_end` may be given as fractions
    of depth (< 1), so one file serves models of any depth. A level must merge by merge_retention, not
    merge_tokens (see Level). Raises ValueError naming the file and the level."""
    import json
    import tomllib
    from pathlib import Path

    path = Path(path)
    data = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    levels = []
    for entry in data.get("level", []):
        entry = dict(entry)
        name = entry.pop("name")
        for key in ("prune_start", "prune_end"):
            if key in entry and isinstance(entry[key], float) and entry[key] < 1:
                entry[key] = max(1, round(entry[key] * num_layers))
        try:
            plan = ReductionPlan(**entry)
        except ValueError as err:
            raise ValueError(f"{path}: level {name!r}: {err}") from err
        try:
            levels.append(Level(name, plan))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
    if not levels:
        raise ValueError(f"{path}: no [[level]] entries")
    if levels[0].plan.merges or levels[0].plan.prunes:
        raise ValueError(f"{path}: the first level must be the untouched model")
    return levels
