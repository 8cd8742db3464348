"""FastVID (methods/fastvid.py): scenes follow the clip's cuts and no merged token spans one; salient tokens are
kept as they are; clusters stand for their members; the budget is exact."""

from __future__ import annotations

import torch

from aim_engine.methods.base import density_peaks, summed_targets
from aim_engine.methods.fastvid import fastvid_merge, scene_cuts
from aim_engine.plan import ReductionPlan


def _clip_with_a_cut(frames: int = 8, tokens: int = 16, cut: int = 5, seed: int = 0):
    """Two shots: frames before `cut` show one scene, from `cut` on another (each with small noise)."""
    g = torch.Generator().manual_seed(seed)
    first, second = torch.randn(tokens, 32, generator=g), torch.randn(tokens, 32, generator=g)
    feats = torch.cat([(first if t < cut else second) + 0.05 * torch.randn(tokens, 32, generator=g)
                       for t in range(frames)])
    return feats, [torch.arange(t * tokens, (t + 1) * tokens) for t in range(frames)], (first, second)


def test_scenes_start_at_the_hard_cut():
    features, groups, _ = _clip_with_a_cut(cut=5)
    cuts = scene_cuts(torch.stack([features[g].mean(0) for g in groups]))
    assert cuts == [0, 5]  # the cut, and no other (MIN_SEGMENTS = 2 is met by it)


def test_no_merged_token_spans_a_cut_and_the_budget_is_exact():
    features, groups, (first, second) = _clip_with_a_cut(cut=5)
    plan = ReductionPlan(merge_retention=0.25, reducer="fastvid")
    result = fastvid_merge(features, groups, plan.merge_target)
    assert result.keep.numel() == summed_targets([16] * 8, plan.merge_target)
    assert torch.equal(result.keep, torch.sort(result.keep).values)
    assert int(result.sizes.sum()) == features.shape[0]  # every token is in exactly one survivor
    # a survivor stands for tokens of its own scene only: its features are nearest to one of that scene's tokens
    bases = torch.cat([first, second])  # (32, d): the first scene's 16 tokens, then the second's
    for index, feature in zip(result.keep.tolist(), result.features):
        nearest = int(torch.argmin(torch.cdist(feature[None], bases)))
        assert (nearest < 16) == (index < 5 * 16), index
    assert bool((result.sizes == 1).any()) and bool((result.sizes > 1).any())  # salient kept, the rest merged


def test_density_peaks_find_one_centre_per_blob():
    g = torch.Generator().manual_seed(2)
    blobs = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([blob + 0.3 * torch.randn(12, 2, generator=g) for blob in blobs])
    centres, cluster = density_peaks(x, 3)
    assert sorted((centres // 12).tolist()) == [0, 1, 2]  # one centre in each blob
    blob_clusters = [set(cluster[i * 12:(i + 1) * 12].tolist()) for i in range(3)]
    assert all(len(c) == 1 for c in blob_clusters) and len(set.union(*blob_clusters)) == 3
