"""FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2"): once, at layer K, drop the share R
of visual tokens that receive the least attention from the last prompt token at the layer before; nothing
before the LLM. The paper's setting is K = 2, R = 50%. The knob is 1 - R."""

from __future__ import annotations

from ..plan import ReductionPlan
from .base import Method

FASTV_LAYER = 2


def fastv_plan(num_layers: int, keep: float) -> ReductionPlan:
    if keep >= 1.0:
        return ReductionPlan()
    return ReductionPlan(prune_stages=((min(FASTV_LAYER, num_layers - 1), keep),), importance="last_token")


METHOD = Method("fastv", "prune once at layer 2 by last-token attention", fastv_plan,
                sweep=(0.5, 0.25, 0.1))
