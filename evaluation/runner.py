"""Runs a dataset under a list of plans and measures, per plan: exact-match accuracy (overall and per question
type), LLM prefill FLOPs (the engine's own accounting) and latency.

Plans come from the methods registry (aim_engine.methods). "Matched" plans solve for a peer method's knob so
that its prefill FLOPs ratio equals the default AIM plan's, separately for image and video items (EVS cannot
reduce a single image, and images and videos have different token budgets), by bisection on the analytic
cost — no model run is needed to match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from aim_engine.engine import AimEngine
from aim_engine.methods import METHODS
from aim_engine.plan import ReductionPlan, parse_plan, plan_to_dict
from .datasets import Dataset, EvalItem


@dataclass
class PlanSpec:
    method: str  # "none", or a METHODS name
    label: str
    plans: dict[str, ReductionPlan]  # by item kind; "*" for every kind
    knobs: dict[str, float] = field(default_factory=dict)
    is_default: bool = False
    matched_to: str | None = None

    def plan_for(self, item: EvalItem) -> ReductionPlan:
        return self.plans.get(item.kind, self.plans.get("*"))

    def describe(self) -> str:
        kinds = {k: p.describe() for k, p in self.plans.items()}
        if len(set(kinds.values())) == 1:
            return next(iter(kinds.values()))
        return "; ".join(f"{k}: {d}" for k, d in kinds.items())


@dataclass
class ItemResult:
    uid: str
    qtype: str
    kind: str
    reply: str
    correct: bool
    prefill_flops: float
    prefill_flops_baseline: float
    seconds: float


@dataclass
class SpecResult:
    spec: PlanSpec
    items: list[ItemResult]

    @staticmethod
    def _accuracy(rows: list[ItemResult]) -> float:
        return sum(r.correct for r in rows) / len(rows) if rows else float("nan")

    @staticmethod
    def _ratio(rows: list[ItemResult]) -> float:
        actual = sum(r.prefill_flops for r in rows)
        return sum(r.prefill_flops_baseline for r in rows) / actual if actual else float("inf")

    @property
    def accuracy(self) -> float:
        return self._accuracy(self.items)

    @property
    def flops_ratio(self) -> float:
        return self._ratio(self.items)

    def by(self, key: str) -> dict[str, list[ItemResult]]:
        groups: dict[str, list[ItemResult]] = {}
        for r in self.items:
            groups.setdefault(getattr(r, key), []).append(r)
        return groups

    def accuracy_by_type(self) -> dict[str, float]:
        return {t: self._accuracy(rows) for t, rows in self.by("qtype").items()}

    def flops_ratio_by_kind(self) -> dict[str, float]:
        return {k: self._ratio(rows) for k, rows in self.by("kind").items()}

    @property
    def median_seconds(self) -> float:
        return statistics.median(r.seconds for r in self.items)


def flops_ratio(engine: AimEngine, shapes, plan: ReductionPlan) -> float:
    """Σ baseline / Σ actual LLM prefill FLOPs of `plan` over request `shapes` (analytic; no model run)."""
    costs = [engine.cost(s, plan) for s in shapes]
    return sum(c.prefill_flops_baseline for c in costs) / sum(c.prefill_flops for c in costs)


def match_knob(engine: AimEngine, plan_of: Callable[[float], ReductionPlan], shapes, target_ratio: float,
               lo: float = 1e-3) -> float:
    """The knob in [lo, 1] at which `plan_of(knob)`'s FLOPs ratio over `shapes` equals `target_ratio` (the ratio
    falls as the knob rises). If even `lo` does not reach the target, `lo`."""
    if flops_ratio(engine, shapes, plan_of(lo)) < target_ratio:
        return lo
    hi = 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if flops_ratio(engine, shapes, plan_of(mid)) >= target_ratio:
            lo = mid
        else:
            hi = mid
    return lo  # the largest knob still at or above the target saving


# In a custom plan, "merge_retention=match": the retention that gives AIM-default's FLOPs (per item kind, as peers
# are matched), so any combination (a peer's reducer with AIM's pruning, say) is compared at the same cost.
MATCH = "merge_retention=match"


def custom_plan(text: str, default: ReductionPlan) -> tuple[ReductionPlan, bool]:
    """"key=value,..." (plan.parse_plan) on the empty plan, or on `default` when `text` starts with "default";
    and whether its merge retention is to be matched (MATCH among the items; the plan then has none)."""
    items = [item.strip() for item in text.split(",")]
    matched = MATCH in items
    items = [item for item in items if item != MATCH]
    if items and items[0] == "default":
        plan = parse_plan(",".join(items[1:]), default)
    else:
        plan = parse_plan(",".join(items))
    if matched:
        plan = dataclasses.replace(plan, merge_tokens=None, merge_retention=None)
    return plan, matched


def build_specs(engine: AimEngine, dataset: Dataset, methods: list[str], sweep: list[str] | None = None,
                match: bool = True, custom: dict[str, str] | None = None) -> list[PlanSpec]:
    """The empty plan, AIM's default, the knob sweep of each method in `sweep` (default: all of `methods`),
    with `match` every peer method at AIM-default's FLOPs, and the `custom` plans: label -> "key=value,..."
    (custom_plan), where a leading "default" starts from the model's default plan and "merge_retention=match"
    matches the plan's merge retention to AIM-default's FLOPs."""
    layers = engine.num_layers
    default = engine.default_plan()
    default_spec = PlanSpec("aim", "AIM default", {"*": default}, is_default=True)
    specs = [PlanSpec("none", "no reduction", {"*": ReductionPlan()}), default_spec]
    shapes_by_kind: dict[str, list] = {}
    for item in dataset.items:
        shapes_by_kind.setdefault(item.kind, []).append(engine.shape_of(item.request()))

    def matched(plan_of: Callable[[float], ReductionPlan]) -> tuple[dict, dict]:
        plans, knobs = {}, {}
        for kind, shapes in shapes_by_kind.items():
            knobs[kind] = match_knob(engine, plan_of, shapes, flops_ratio(engine, shapes, default))
            plans[kind] = plan_of(knobs[kind])
        return plans, knobs

    for label, text in (custom or {}).items():
        plan, match_it = custom_plan(text, default)
        plan.check_depth(layers)
        if match_it:
            plans, knobs = matched(lambda r, plan=plan: dataclasses.replace(plan, merge_retention=r))
            specs.append(PlanSpec("custom", label, plans, knobs, matched_to="aim-default"))
        else:
            specs.append(PlanSpec("custom", label, {"*": plan}))
    for name in methods if sweep is None else sweep:
        for knob in METHODS[name].sweep:
            plan = METHODS[name].plan(layers, knob)
            if plan != default:
                specs.append(PlanSpec(name, f"{name} {knob:g}", {"*": plan}, knobs={"*": knob}))
            elif name == default_spec.method:  # the default is a point of this sweep (not a calibrated plan)
                default_spec.knobs["*"] = knob
    if match:
        for name in methods:
            if name == "aim":
                continue
            plans, knobs = matched(lambda k, name=name: METHODS[name].plan(layers, k))
            specs.append(PlanSpec(name, f"{name} @ AIM-default FLOPs", plans, knobs, matched_to="aim-default"))
    return specs


def model_identity(path: Path, device: str = "cpu", dtype: str = "float32") -> str:
    """What an answer depends on besides the item and the plan: the checkpoint's content (a hash of its weights and
    config, so a retrained or rebuilt model under the same name is a different model), the device and the dtype."""
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        digest.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return f"{path.name}@{digest.hexdigest()[:16]}/{device}/{dtype}"


_EMPTY_PLAN = plan_to_dict(ReductionPlan())


def plan_key(plan: ReductionPlan) -> str:
    """A plan in a journal's keys: the fields that differ from the empty plan's, so a field added to the plan later
    (whose default changes nothing) leaves every answer already journaled valid."""
    return json.dumps({k: v for k, v in plan_to_dict(plan).items() if v != _EMPTY_PLAN[k]}, sort_keys=True)


def evaluate(engine: AimEngine, dataset: Dataset, specs: list[PlanSpec],
             on_item: Callable[[], None] | None = None, journal: Path | None = None,
             model_id: str | None = None) -> list[SpecResult]:
    """Runs every item under every spec. With a `journal` (JSONL), each answer is appended as it is produced and
    answers already there (same `model_id` (model_identity; default the engine's name), dataset, item and plan)
    are reused: an interrupted evaluation resumes."""
    done: dict[tuple, ItemResult] = {}
    if journal is not None and journal.is_file():
        for line in journal.read_text().splitlines():
            row = json.loads(line)
            key = tuple(row.pop("key"))
            done[key] = ItemResult(**row)
    sink = open(journal, "a") if journal is not None else None
    results = []
    try:
        for spec in specs:
            rows = []
            for item in dataset.items:
                plan = spec.plan_for(item)
                key = (model_id or engine.name, dataset.name, item.uid, plan_key(plan))
                row = done.get(key)
                if row is None:
                    result = engine.generate(item.request(), plan)
                    stats = result.stats
                    row = ItemResult(item.uid, item.qtype, item.kind, result.text, item.is_correct(result.text),
                                     stats.prefill_flops, stats.prefill_flops_baseline, stats.timings.total_s)
                    if sink is not None:
                        sink.write(json.dumps({"key": list(key), **asdict(row)}) + "\n")
                        sink.flush()
                rows.append(row)
                if on_item:
                    on_item()
            results.append(SpecResult(spec, rows))
    finally:
        if sink is not None:
            sink.close()
    return results
