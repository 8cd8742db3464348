"""AIM (aim-method.md): (a) merge each frame's tokens by similarity before the LLM to the knob's share, then
(b) prune progressively by PageRank importance over the depth's default range [l1, l2). The knob is the merge
retention; knob 0.25 is the paper's default plan."""

from __future__ import annotations

from ..plan import DEFAULT_MERGE_RETENTION, ReductionPlan, default_prune_range
from .base import Method


def aim_plan(num_layers: int, retention: float) -> ReductionPlan:
    if retention >= 1.0:
        return ReductionPlan()
    l1, l2 = default_prune_range(num_layers)
    return ReductionPlan(merge_retention=retention, prune_start=l1, prune_end=l2)


METHOD = Method("aim", "merge by similarity to the knob's share, then prune progressively by PageRank",
                aim_plan, sweep=(0.5, DEFAULT_MERGE_RETENTION, 0.125))
