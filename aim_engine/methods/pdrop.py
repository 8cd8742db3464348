"""PyramidDrop (Xing et al., 2024): the LLM is split into four stages of equal depth; at the start of stages 2,
3 and 4 the visual tokens are cut to lambda times what the previous stage had (lambda^1, ^2, ^3 of the
original), ranked by the attention the last instruction token pays them (in a chat prompt the last prompt token
closes the instruction). The paper's setting is lambda = 0.5. The knob is lambda."""

from __future__ import annotations

from ..plan import ReductionPlan
from .base import Method


def pdrop_plan(num_layers: int, lam: float) -> ReductionPlan:
    if lam >= 1.0:
        return ReductionPlan()
    layers = sorted({max(1, min(num_layers - 1, round(num_layers * s / 4))) for s in (1, 2, 3)})
    return ReductionPlan(prune_stages=tuple((layer, lam ** (i + 1)) for i, layer in enumerate(layers)),
                         importance="last_token")


METHOD = Method("pdrop", "keep lambda^s of the visual tokens in LLM stage s (4 stages) by last-token attention",
                pdrop_plan, sweep=(0.5, 0.35, 0.2))
