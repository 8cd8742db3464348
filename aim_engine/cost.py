"""What a request costs under a plan, by arithmetic alone: token counts per layer, LLM prefill FLOPs (the one
formula in flops.py), and the KV cache it can hold. The engine, the scheduler's admission and the controller's
predictions all read these."""

from __future__ import annotations

from dataclasses import dataclass

from .flops import LLMShape, prefill_flops
from .methods import REDUCERS
from .plan import ReductionPlan


@dataclass
class CostEstimate:
    """What a request would cost under a plan, computed without running any model."""

    visual_tokens_in: int
    visual_tokens_merged: int
    text_tokens: int
    prefill_flops_baseline: float
    prefill_flops: float
    visual_tokens_per_layer: list[int]


@dataclass
class RequestShape:
    """Per media item (merge-group sizes, tokens in no group), and the prompt's text tokens."""

    media: list[tuple[list[int], int]]
    text_tokens: int

    @property
    def visual_tokens_in(self) -> int:
        """Visual tokens before any reduction."""
        return sum(sum(groups) + loose for groups, loose in self.media)


def cost(llm: LLMShape, shape: RequestShape, plan: ReductionPlan) -> CostEstimate:
    """Token counts and LLM prefill FLOPs of a request of this shape under `plan`."""
    kept = REDUCERS[plan.reducer].kept if plan.merges else (lambda sizes, _: sum(sizes))
    visual_in = shape.visual_tokens_in
    visual_merged = sum(kept(groups, plan.merge_target) + loose for groups, loose in shape.media)
    text = shape.text_tokens
    per_layer = plan.visual_tokens_per_layer(visual_merged, llm.layers)
    return CostEstimate(
        visual_tokens_in=visual_in, visual_tokens_merged=visual_merged, text_tokens=text,
        prefill_flops_baseline=prefill_flops(llm, [text + visual_in] * llm.layers),
        prefill_flops=prefill_flops(llm, [text + v for v in per_layer]),
        visual_tokens_per_layer=per_layer,
    )


def kv_tokens(estimate: CostEstimate, max_new_tokens: int) -> list[int]:
    """Per layer, the most tokens a request holds in the KV cache: its prompt after merging and the plan's
    pruning, plus max_new_tokens - 1 generated ones (the last sampled token is never fed back)."""
    return [estimate.text_tokens + v + max_new_tokens - 1 for v in estimate.visual_tokens_per_layer]
