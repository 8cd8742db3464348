"""VidCom2 (methods/vidcom2.py): what it promises — every frame keeps a token, a frame unlike the rest of the clip
keeps more, each frame keeps its most unique tokens, and the clip keeps exactly the budget the estimate counts."""

from __future__ import annotations

import random

import torch

from aim_engine.methods.base import summed_targets
from aim_engine.methods.vidcom2 import frame_budgets, vidcom2_drop
from aim_engine.plan import ReductionPlan


def test_frame_budgets_share_exactly_the_total_with_at_least_one_token_a_frame():
    rng = random.Random(0)
    for _ in range(500):
        sizes = [rng.randint(1, 12) for _ in range(rng.randint(1, 10))]
        total = rng.randint(len(sizes), sum(sizes))
        weights = [rng.random() ** 4 for _ in sizes]  # skewed: some frames weigh almost nothing
        budgets = frame_budgets(weights, sizes, total)
        assert sum(budgets) == total and all(1 <= b <= n for b, n in zip(budgets, sizes)), (sizes, total, budgets)


def _clip(frames: int, tokens: int, distinct: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`frames` frames of the same scene (small noise), except frame `distinct`, another scene."""
    g = torch.Generator().manual_seed(seed)
    scene, other = torch.randn(tokens, 16, generator=g), torch.randn(tokens, 16, generator=g)
    feats = torch.cat([(other if t == distinct else scene) + 0.05 * torch.randn(tokens, 16, generator=g)
                       for t in range(frames)])
    return feats, [torch.arange(t * tokens, (t + 1) * tokens) for t in range(frames)]


def test_a_frame_unlike_the_clip_keeps_more_and_every_frame_keeps_one():
    features, groups = _clip(frames=6, tokens=9, distinct=4)
    plan = ReductionPlan(merge_retention=0.2, reducer="vidcom2")
    result = vidcom2_drop(features, groups, plan.merge_target)
    per_frame = [int(((result.keep >= g[0]) & (result.keep <= g[-1])).sum()) for g in groups]
    assert sum(per_frame) == summed_targets([9] * 6, plan.merge_target) == result.keep.numel()
    assert min(per_frame) >= 1
    assert per_frame[4] == max(per_frame) and per_frame[4] > per_frame[0]
    torch.testing.assert_close(result.features, features[result.keep])  # kept as they were, nothing merged


def test_each_frame_keeps_its_most_unique_tokens():
    base = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    frame = base.repeat(9, 1)
    frame[6] = -base[0]  # one token unlike the rest of its frame
    result = vidcom2_drop(frame, [torch.arange(9)], lambda n: 1)
    assert result.keep.tolist() == [6]
