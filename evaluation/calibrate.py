"""Calibrates a model's own default AIM plan on held-out data.

The paper's prune range (l1, l2) was chosen for 7B LLMs of 28 and 32 layers; other depths get it scaled
(plan.default_prune_range). A different model may still read visual tokens where the scaled range already
prunes them. Calibration keeps the paper default's LLM prefill FLOPs and asks how best to spend them: for each
candidate prune range (or none) and each pre-LLM reducer asked for (AIM's merge by default; any peer's, so a
peer's reducer under AIM's pruning is a candidate too) it solves the merge retention that gives the same FLOPs
ratio over the calibration data (analytically, as peers are matched in runner.py), measures accuracy, and keeps
the best. The paper default is
the first candidate and wins ties. The winner is written to the checkpoint's PLAN_FILE, which the engine
then uses as its default plan (AimEngine.default_plan): the service, the controller's "aim-default" rung and
`eval` all follow it.

Calibrate on a validation split and report on a disjoint test split.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aim_engine.engine import AimEngine
from aim_engine.methods import REDUCERS
from aim_engine.plan import POSITION_RULES, ReductionPlan, default_prune_range, plan_to_dict
from .datasets import Dataset
from .runner import PlanSpec, evaluate, flops_ratio, match_knob

# Candidate first pruning layers, as fractions of depth; each is paired with the paper's scaled l2 and with
# "the last layer" (l2 = L: the last layer keeps nothing).
START_FRACTIONS = (0.5, 0.7)
MIN_RETENTION = 0.02  # merging below this leaves ~1 token per frame: not a candidate


@dataclass
class Candidate:
    label: str
    plan: ReductionPlan
    flops_ratio: float
    reachable: bool = True  # False: even MIN_RETENTION does not reach the target FLOPs; not evaluated
    accuracy: float | None = None


def candidates(engine: AimEngine, shapes, target_ratio: float, reducers: tuple[str, ...] = ("merge",)
               ) -> list[Candidate]:
    """The paper default first, then for each of `reducers` each prune range of the grid (the paper's among them)
    and the reducer alone, under each position rule (1-D RoPE models only; M-RoPE has one) and each attention rule
    (plain or proportional; proportional only for reducers whose survivors carry sizes), each with the merge
    retention that matches `target_ratio`. Those that cannot reach it even at MIN_RETENTION are marked
    unreachable."""
    unknown = [r for r in reducers if r not in REDUCERS]
    if unknown or not reducers:
        raise ValueError(f"reducers: unknown {unknown}; known: {sorted(REDUCERS)}")
    layers = engine.num_layers
    paper = ReductionPlan.default_for_depth(layers)
    out = [Candidate("paper default", paper, flops_ratio(engine, shapes, paper))]
    _, paper_l2 = default_prune_range(layers)
    ranges = sorted({(max(1, round(f * layers)), l2) for f in START_FRACTIONS for l2 in (paper_l2, layers)
                     if l2 > max(1, round(f * layers))})
    families: list[tuple[str, Callable[[float], ReductionPlan]]] = [
        (f"prune {l1}-{l2}", lambda r, l1=l1, l2=l2: ReductionPlan(merge_retention=r, prune_start=l1, prune_end=l2))
        for l1, l2 in ranges]
    families.append(("merge only", lambda r: ReductionPlan(merge_retention=r)))
    rules = ("consecutive",) if engine.adapter.uses_mrope else POSITION_RULES
    for reducer, (label, family) in itertools.product(reducers, families):
        attention_rules = (False, True) if REDUCERS[reducer].sized else (False,)
        if label == "merge only":
            label = f"{reducer} only"
        for rule, proportional in itertools.product(rules, attention_rules):
            def plan_of(r: float, family=family, reducer=reducer, rule=rule, proportional=proportional
                        ) -> ReductionPlan:
                return dataclasses.replace(family(r), reducer=reducer, positions=rule,
                                           proportional_attention=proportional)

            retention = match_knob(engine, plan_of, shapes, target_ratio, lo=MIN_RETENTION)
            plan = plan_of(math.floor(retention * 1e4) / 1e4)  # rounded down: the saving stays >= the target
            ratio = flops_ratio(engine, shapes, plan)
            if dataclasses.replace(plan, merge_retention=paper.merge_retention) == paper and \
                    ratio == out[0].flops_ratio:
                continue  # the paper default itself, up to the knob's rounding
            attention = ", proportional attention" if proportional else ""
            out.append(Candidate(f"{label}, {reducer} {plan.merge_retention:g}, {rule} positions{attention}", plan,
                                 ratio, reachable=ratio >= 0.99 * target_ratio))
    return out


def calibrate(engine: AimEngine, dataset: Dataset, target_ratio: float | None = None,
              on_item: Callable[[], None] | None = None, reducers: tuple[str, ...] = ("merge",)) -> dict:
    """Runs the candidates on `dataset`; returns the PLAN_FILE content: the chosen default plan and the
    evidence (every candidate's accuracy and FLOPs ratio)."""
    shapes = [engine.shape_of(item.request()) for item in dataset.items]
    paper = ReductionPlan.default_for_depth(engine.num_layers)
    target = target_ratio or flops_ratio(engine, shapes, paper)
    pool = candidates(engine, shapes, target, reducers)
    runnable = [c for c in pool if c.reachable]
    results = evaluate(engine, dataset, [PlanSpec("aim", c.label, {"*": c.plan}) for c in runnable], on_item=on_item)
    for cand, result in zip(runnable, results):
        cand.accuracy = result.accuracy
    best = max(runnable, key=lambda c: c.accuracy)  # max keeps the first of equals: the paper default
    return {
        "default_plan": plan_to_dict(best.plan),
        "describe": best.plan.describe(),
        "calibration": {
            "dataset": dataset.name, "questions": len(dataset.items), "target_flops_ratio": round(target, 4),
            "chosen": best.label,
            "candidates": [{"label": c.label, "plan": c.plan.describe(), "flops_ratio": round(c.flops_ratio, 4),
                            "accuracy": None if c.accuracy is None else round(c.accuracy, 4)} for c in pool],
        },
    }


def write_plan_file(content: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path
