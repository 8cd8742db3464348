"""The decision: which rung of the quality ladder a request gets. A pure function of its inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Sequence

from aim_engine.plan import DEFAULT_MERGE_RETENTION, PLAN_FILE, ReductionPlan, default_prune_range

from .whatif import EngineRules, Job, finish_times


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


MAX_UPCOMING = 16  # requests expected next that a decision leaves room for (whatif jobs: bounds its cost)
# The requests expected next come as independent callers send them, in clusters and lulls around the recent rate,
# not one every gap: each is placed where a Poisson stream at that rate has brought it 9 times in 10
# (poisson_arrival), so that a level whose pace the stream only just allows, which evenly spaced arrivals let
# through, is not taken before the cluster that chance brings next (the burst scenario: after a 2.7 s lull inside
# the burst, merge-25 and merge-50 were taken at a rate merge-25 cannot serve, and the next 10 arrivals in 2.3 s
# were refused or late at maximum saving).
ARRIVAL_QUANTILE = 0.1
_ARRIVAL_Z = NormalDist().inv_cdf(ARRIVAL_QUANTILE)

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
    """What one decision sees: the request at each ladder level and the engine it would join, as the engine will run
    them (whatif.py)."""

    budget_s: float  # min(the request's SLO, its remaining deadline), from now
    min_retention: float  # quality floor
    candidates: Sequence[Job | None]  # the request at each ladder level (None: its rates are not known yet)
    admitted: Sequence[Job] = ()  # the requests the engine holds: running, then waiting, each with its due time
    # their finish times with nothing new, finish_times(admitted, rules), where the caller has played it already
    # (None: decide plays it)
    admitted_finish: Sequence[float] | None = None
    rules: EngineRules = EngineRules(max_batch=1, step_a=0.0)  # the scheduler's limits and the decode step's rates
    margin: float = 1.2  # the feedback loop's safety margin: every predicted duration x margin
    min_level: int = 0  # no level of higher quality than this (memory pressure: KV pool or device allocator)
    priority: str = "normal"  # one of PRIORITIES: scales the margin (margin_for_priority)
    # seconds between requests at the recent arrival rate (None: none expected). A level must leave the requests
    # expected within this one's budget room: arriving as a Poisson stream of this gap would (poisson_arrival), at
    # the level weighed, each still makes its budget (at most MAX_UPCOMING of them).
    arrival_gap_s: float | None = None
    # the budgets the expected requests are given, in their order of arrival, repeated as needed: the recent
    # requests' own, tightest first, so that a loose request leaves room for the tight ones arriving beside it
    # (empty: this request's budget)
    upcoming_budgets: Sequence[float] = ()
    # the time the request itself asked for, from now: the earlier of its SLO and deadline (inf: it gave neither;
    # None: the budget is its own). It is refused when even its cheapest level cannot make this: the server's
    # default SLO steers the choice and refuses nobody.
    own_time_s: float | None = None

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")


@dataclass(frozen=True)
class Decision:
    level: int  # index into the ladder; -1 when rejected
    predicted_s: float | None  # when the request's answer is complete, from now, at face value (no margin)
    reason: str
    fits: bool
    rejected: bool = False
    cause: str = ""  # why it was rejected: "floor" (quality floor vs memory cap), "late" (its own budget), "harm"
    cheapest: int = -1  # rejected for "late" or "harm": the level it was judged at (what an estimate reports)
    expected: int = 0  # the requests expected next it was weighed with (0: none, the engine empty or no rate yet)
    # served: how much later each admitted request (Features.admitted, in order) finishes with it, on the work known
    # now (at face value): what moves a forecast that expected nobody (controller.in_flight_error)
    delays: tuple[float, ...] = ()

    @property
    def outcome(self) -> str:
        """Bounded label for metrics."""
        if self.rejected:
            return "rejected"
        if self.predicted_s is None:
            return "no_data"
        return "fits" if self.fits else "best_effort"


def decide(ladder: Sequence[Level], features: Features) -> Decision:
    """The highest-quality level at which, with every predicted duration x the margin (the feedback margin scaled
    by the request's priority), the engine finishes this request within its budget, every admitted request that
    would have finished within its due time still does, and so does every request expected next (a Poisson stream
    of mean gap `arrival_gap_s`, as it comes 9 times in 10): the scheduler's rules played forward (whatif.py) with
    and without it. Never below the quality floor nor above the memory cap.

    The requests expected next will be decided by this same rule, so each level is weighed with them at that level
    too: a level is taken only if the stream, every request at it, can keep its budgets (an expected request counts
    late whatever makes it late, the work already admitted included). Forecast at the cheapest level instead, each
    decision counted on the next to be cheap, and under a rising load decision after decision took the full model
    while the backlog grew. (Whether requests are expected at all is the controller's call: none on an empty engine,
    and a caller that waits for each answer is no stream; see controller.arrival_gap_s.)

    If no level fits with the margin, the cheapest allowed level (the least predicted work, not necessarily the
    ladder's last), best-effort (fits=False), provided it fits at face value. Otherwise the request is rejected now
    rather than failed late (Clockwork's rule): even its cheapest level would miss its own budget (cause "late";
    only within the time the request itself asked for: `own_time_s`), or would push two or more admitted requests
    past their due time ("harm": a refusal is a miss too, so it is refused where serving it costs more misses than
    refusing it). If the floor and the cap leave no level at all, rejected ("floor")."""
    allowed = [i for i, level in enumerate(ladder)
               if i >= features.min_level and level.retention >= features.min_retention]
    if not allowed:
        why = f"the quality floor {features.min_retention:.3g} cannot be met"
        if features.min_level:
            why += f" while memory pressure caps quality at {ladder[features.min_level].name}"
        return Decision(-1, None, why, False, rejected=True, cause="floor")
    capped = f" (memory pressure caps quality at {ladder[features.min_level].name})" if features.min_level else ""
    margin = margin_for_priority(features.margin, features.priority)
    times = f"x {margin:.2f}" + (f" ({features.priority} priority)" if features.priority != "normal" else "")
    if features.candidates[allowed[0]] is None:
        return Decision(allowed[0], None, f"{ladder[allowed[0]].name}: no latency data yet{capped}", True)
    admitted = list(features.admitted)
    load = f"{sum(j.admitted for j in admitted)} running, {sum(not j.admitted for j in admitted)} waiting"
    budget = features.budget_s
    known = [i for i in allowed if features.candidates[i] is not None]
    last = _cheapest(features.candidates, known)
    first_miss = ""
    outcomes: dict[int, _Outcome] = {}
    # the admitted requests' finish with nothing new: what every level weighed without expected requests, and the
    # last resort, measure harm against
    alone = list(features.admitted_finish) if features.admitted_finish is not None else \
        finish_times(admitted, features.rules)
    for i in known:
        outcome = outcomes[i] = _judge(admitted, features.candidates[i],
                                       _upcoming(features, features.candidates[i], margin), features.rules, margin,
                                       alone)
        if outcome.fits(margin, budget):
            why = "fits the budget" if i == allowed[0] else first_miss
            ahead = f"; {outcome.expected} expected next, one every {features.arrival_gap_s:.2f}s on average" \
                if outcome.expected else ""
            return Decision(i, outcome.own, f"{ladder[i].name}: {why} ({outcome.own:.3f}s {times} <= {budget:.3f}s; "
                            f"{load}{ahead}){capped}", True, expected=outcome.expected,
                            delays=_delays(_known(admitted, features.candidates[i], features.rules, outcome), alone))
        if not first_miss:
            first_miss = (f"{ladder[i].name} would exceed the budget" if margin * outcome.own > budget else
                          f"{ladder[i].name} would push {outcome.harm} admitted request(s) past their due time"
                          if outcome.harm else
                          f"{ladder[i].name} would leave no room for the {outcome.expected} request(s) expected next "
                          f"at it")
    # Whether to serve it at all is judged on the work known to be there, at face value: the requests expected next
    # are a forecast, and a refusal on a forecast would refuse the very arrivals it forecasts. Weighed without
    # any, the cheapest level's outcome already is that judgement.
    after = _known(admitted, features.candidates[last], features.rules, outcomes[last])
    harmed = _pushed(admitted, alone, after[:-1], 1.0) if outcomes[last].expected else outcomes[last].harm_at_face
    decision = _last_resort(ladder[last].name, last, after[-1], harmed, features, f"{times}; {load}", load, capped)
    return decision if decision.rejected else replace(decision, delays=_delays(after, alone),
                                                      expected=outcomes[last].expected)


@dataclass(frozen=True)
class _Outcome:
    """One level weighed against one forecast: this request's finish (seconds from now, at face value), the
    admitted requests it would push past their due time (with the margin, and at face value) and the expected ones
    it would leave late (with the margin), and how many were expected."""

    own: float
    harm: int
    harm_at_face: int
    crowded: int
    expected: int
    after: list[float]  # every admitted request's finish, then this one's, with the expected ones

    def fits(self, margin: float, budget: float) -> bool:
        return margin * self.own <= budget and not self.harm and not self.crowded


def _judge(admitted: list[Job], candidate: Job, upcoming: list[Job], rules: EngineRules, margin: float,
           alone: list[float]) -> _Outcome:
    """`candidate` joining `admitted`, with `upcoming` arriving after it (`alone`: the admitted requests' finish
    times with neither). An expected request counts late whatever makes it late (the work already admitted
    included): the level it is forecast at is one the stream cannot sustain."""
    held = len(admitted)
    base = finish_times([*admitted, *upcoming], rules)[:held] if upcoming else alone
    after = finish_times([*admitted, candidate, *upcoming], rules)
    late = sum(margin * a > job.due_s for job, a in zip(upcoming, after[held + 1:]))
    others = after[:held]
    return _Outcome(after[held], _pushed(admitted, base, others, margin), _pushed(admitted, base, others, 1.0), late,
                    len(upcoming), after[:held + 1])


def _known(admitted: list[Job], candidate: Job, rules: EngineRules, outcome: _Outcome) -> list[float]:
    """The admitted requests' finish times, then `candidate`'s, with it joining them on the work known now, no
    request expected next: the outcome's own when it expected none."""
    return outcome.after if not outcome.expected else finish_times([*admitted, candidate], rules)


def _delays(after: list[float], alone: list[float]) -> tuple[float, ...]:
    """Decision.delays of a request served, from `after` (_known) and `alone` (the admitted requests' finish times
    without it)."""
    return tuple(a - b if math.isfinite(a - b) else 0.0 for a, b in zip(after[:-1], alone))


def _cheapest(candidates: Sequence[Job | None], known: list[int]) -> int:
    """Of the allowed levels whose work is `known`, the one of least predicted work: usually the last, but not where
    a level's fixed costs (scoring the attention it prunes by) outweigh the FLOPs it saves on this machine."""
    return min(reversed(known), key=lambda i: candidates[i].prefill_s)


def _upcoming(features: Features, level: Job, margin: float) -> list[Job]:
    """The requests expected next: this request at `level`, the k-th arriving after poisson_arrival(k) gaps (those
    within the budget, at least one), each with a recent request's budget (upcoming_budgets). They are part of the
    world every prediction plays out in (their prefill slices come between the decode steps of those ahead); a
    level must also leave them room.

    The margin scales predicted work, not the clock: a finish time x the margin is compared with the due time, so
    each arrival is placed at its time / the margin (the what-if's durations all scale with its rates), and an
    expected request is judged on its own wait and work x the margin, wherever in the budget it arrives."""
    gap, budget = features.arrival_gap_s, features.budget_s
    if not gap or not math.isfinite(budget) or budget <= 0:
        return []
    times = [gap * poisson_arrival(k) for k in range(1, MAX_UPCOMING + 1)]
    times = [t for t in times if t <= budget] or times[:1]
    budgets = list(features.upcoming_budgets) or [budget]
    return [replace(level, arrives_s=t / margin, due_s=t + budgets[k % len(budgets)], admitted=False)
            for k, t in enumerate(times)]


def poisson_arrival(k: int) -> float:
    """When the requests expected next are placed, in mean gaps: the k-th by the time a Poisson stream has brought
    k with probability 1 - ARRIVAL_QUANTILE (the ARRIVAL_QUANTILE quantile of Gamma(k, 1), by Wilson and
    Hilferty's cube root: within 7 % of the exact one at k = 1, 1 % from k = 4)."""
    nu = 2.0 * k
    c = 2.0 / (9.0 * nu)
    return 0.5 * nu * max(0.0, 1.0 - c + _ARRIVAL_Z * math.sqrt(c)) ** 3


def _pushed(jobs: list[Job], before: list[float], after: list[float], scale: float) -> int:
    """Requests that finish within their due time without this one at face value, and that it would take past
    their due time with every duration x `scale` (or, if they are past it so scaled already, further past)."""
    return sum(b <= job.due_s and scale * a > max(job.due_s, scale * b + 1e-9)
               for job, b, a in zip(jobs, before, after))


def _last_resort(name: str, last: int, own: float, harmed: int, features: Features, times_load: str, load: str,
                 capped: str) -> Decision:
    """No level fits with the margin: level `last` (`name`) best-effort, or a refusal (see `decide`); `own`: its
    finish at face value on the known work, `harmed`: the admitted requests it would push past their due time."""
    budget = features.budget_s
    limit = budget if features.own_time_s is None else features.own_time_s
    late = own > limit
    # A refusal is a miss too: refused for harm only where serving it would cost more misses than refusing it.
    if not late and harmed <= 1:
        return Decision(last, own, f"{name}: no level fits {budget:.3f}s with the margin (cheapest predicted "
                        f"{own:.3f}s {times_load}){capped}", False)
    if late:
        alone = " alone (the engine holds no other request)" if not features.admitted else ""
        why = f"even {name}{alone} is predicted to take {own:.3f}s, past the {limit:.3f}s it asked for ({load})"
        return Decision(-1, own, why + capped, False, rejected=True, cause="late", cheapest=last)
    why = f"serving it, even at {name}, would push {harmed} admitted requests past their due time ({load})"
    return Decision(-1, own, why + capped, False, rejected=True, cause="harm", cheapest=last)


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
