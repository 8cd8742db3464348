"""HoliTom (methods/holitom.py): the segmentation saves the most tokens any segmentation could; a still clip's
content ends in one frame's tokens; segments follow a hard cut; no token is counted twice and the budget is
exact, also when temporal merging alone would go below it. The inner merge (`merge_pruned`) is
proven against a masked reference in test_pruning.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from aim_engine.methods.base import summed_targets
from aim_engine.methods.holitom import holitom_merge, holitom_plan, segment, static_masks
from aim_engine.plan import ReductionPlan


def _frames(count: int, tokens: int, shots, seed: int = 0, noise: float = 0.01):
    """A clip whose frame t shows shots[t] (an index into random scenes), each token with a little noise."""
    g = torch.Generator().manual_seed(seed)
    scenes = [torch.randn(tokens, 32, generator=g) for _ in range(max(shots) + 1)]
    feats = torch.cat([scenes[shots[t]] + noise * torch.randn(tokens, 32, generator=g) for t in range(count)])
    return feats, [torch.arange(t * tokens, (t + 1) * tokens) for t in range(count)], scenes


def _saved(masks, segments) -> int:
    total = 0
    for first, last in segments:
        if last > first:
            total += (last - first) * int(torch.stack(masks[first:last]).all(0).sum())
    return total


def _all_segmentations(frames: int):
    for cuts in itertools.product((False, True), repeat=frames - 1):
        starts = [0] + [t + 1 for t, cut in enumerate(cuts) if cut]
        yield [(a, b - 1) for a, b in zip(starts, starts[1:] + [frames])]


@pytest.mark.parametrize("seed", range(20))
def test_the_segmentation_saves_the_most_tokens_any_segmentation_could(seed):
    g = torch.Generator().manual_seed(seed)
    frames = 2 + seed % 5
    masks = [torch.rand(6, generator=g) < 0.7 for _ in range(frames - 1)]
    chosen = segment(masks)
    assert [a for a, _ in chosen] == sorted(a for a, _ in chosen) and chosen[0][0] == 0
    assert chosen[-1][1] == frames - 1 and all(b + 1 == a for (_, b), (a, _) in zip(chosen, chosen[1:]))
    assert _saved(masks, chosen) == max(_saved(masks, s) for s in _all_segmentations(frames))


def test_segments_follow_a_hard_cut():
    features, groups, _ = _frames(6, 16, [0, 0, 0, 1, 1, 1])
    frames = [torch.nn.functional.normalize(features[g], dim=-1) for g in groups]
    assert segment(static_masks(frames)) == [(0, 2), (3, 5)]


def test_a_still_clips_content_ends_in_one_frames_tokens():
    features, groups, (scene,) = _frames(4, 16, [0, 0, 0, 0])
    plan = ReductionPlan(merge_retention=0.25, reducer="holitom")  # 4 x 4 = 16 tokens: one frame's worth
    result = holitom_merge(features, groups, plan.merge_target)
    assert torch.equal(result.keep, groups[0])  # the first frame's places
    assert torch.equal(result.sizes, torch.full((16,), 4.0))  # each stands for its patch in all four frames
    torch.testing.assert_close(result.features, torch.stack([features[g] for g in groups]).mean(0))
    torch.testing.assert_close(result.features, scene, atol=0.02, rtol=0)


@pytest.mark.parametrize("retention", [0.5, 0.25, 0.125, 0.05])
@pytest.mark.parametrize("shots", [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 2], [0, 1, 2, 3, 4, 5]],
                         ids=["still", "three-shots", "all-different"])
def test_the_budget_is_exact_and_no_token_is_counted_twice(retention, shots):
    features, groups, _ = _frames(6, 16, shots, seed=len(set(shots)))
    features = torch.cat([features, torch.randn(2, 32)])  # two loose tokens (a family's separators)
    plan = ReductionPlan(merge_retention=retention, reducer="holitom")
    result = holitom_merge(features, groups, plan.merge_target)
    assert result.keep.numel() == summed_targets([16] * 6, plan.merge_target) + 2
    assert torch.equal(result.keep, torch.unique(result.keep))  # ascending, no place twice
    # merged tokens stand for their members; dynamic tokens beyond a frame's share are dropped, as in the paper
    assert int(result.sizes.sum()) <= features.shape[0]
    if len(set(shots)) == 1:  # nothing dynamic: every token is in exactly one survivor
        assert int(result.sizes.sum()) == features.shape[0]
    assert set(result.keep[-2:].tolist()) == {96, 97}  # loose tokens kept as they are
    torch.testing.assert_close(result.features[-2:], features[96:])


def test_a_still_clip_with_budget_to_spare_restores_its_frames_least_like_the_mean():
    features, groups, _ = _frames(4, 16, [0, 0, 0, 0])
    changed = [(2, 5), (1, 7), (3, 9), (2, 11)]  # still by the threshold, but the most changed of their patches
    for t, p in changed:
        features[groups[t][p]] += 0.3
    plan = ReductionPlan(merge_retention=5 / 16, reducer="holitom")  # 20 tokens: one frame and 4 restored
    result = holitom_merge(features, groups, plan.merge_target)
    assert result.keep.numel() == 20 and int(result.sizes.sum()) == 64
    keep = result.keep.tolist()
    for t, p in changed:
        at = keep.index(int(groups[t][p]))  # restored to its own frame, as itself
        torch.testing.assert_close(result.features[at], features[groups[t][p]])
        assert result.sizes[keep.index(int(groups[0][p]))] == 3  # the rest of its patch is still one token
        rest = [int(groups[u][p]) for u in range(4) if u != t]
        torch.testing.assert_close(result.features[keep.index(int(groups[0][p]))], features[rest].mean(0))


def test_a_single_image_keeps_its_most_distinct_tokens():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(16, 32, generator=g) * 0.01 + 1.0  # near-identical tokens ...
    features[[3, 9]] = torch.randn(2, 32, generator=g)  # ... but two
    result = holitom_merge(features, [torch.arange(16)], lambda n: 2)
    assert result.keep.tolist() == [3, 9] and torch.equal(result.sizes, torch.ones(2))


def test_the_method_merges_half_the_rest_inside_the_llm_at_the_papers_depth():
    plan = holitom_plan(28, 0.1)
    assert plan.reducer == "holitom" and plan.merge_retention == 0.1 and plan.merge_pruned
    assert plan.prune_stages == ((18, 0.5),) and plan.importance == "last_token"
    assert holitom_plan(28, 1.0).is_empty


def test_groups_of_different_sizes_share_no_positions():
    """An image's crops (or a thumbnail beside tiles) are groups of other sizes: never merged across them."""
    g = torch.Generator().manual_seed(5)
    small, large = torch.randn(4, 32, generator=g), torch.randn(6, 32, generator=g)
    features = torch.cat([small, large, large + 0.01 * torch.randn(6, 32, generator=g), large])
    groups = [torch.arange(0, 4), torch.arange(4, 10), torch.arange(10, 16), torch.arange(16, 22)]
    assert segment(static_masks([torch.nn.functional.normalize(features[i], dim=-1) for i in groups])) == \
        [(0, 0), (1, 3)]
    result = holitom_merge(features, groups, lambda n: n // 2)
    assert result.keep.numel() == 2 + 3 * 3 and int(result.sizes.sum()) <= 22


def test_restoring_spans_segments_and_keeps_the_budget():
    features, groups, _ = _frames(6, 16, [0, 0, 0, 1, 1, 1])
    result = holitom_merge(features, groups, lambda n: 6)  # 36: two segments' 32 merged tokens and 4 restored
    assert result.keep.numel() == 36 and int(result.sizes.sum()) == 96
    firsts = set(groups[0].tolist()) | set(groups[3].tolist())
    assert sum(k in firsts for k in result.keep.tolist()) == 32  # every patch of both segments still merged
