"""Peer methods behind the same interface as AIM: uniform pooling, EVS, FastV / PDrop schedules and their
last-token importance; every registered method maps its knob to valid plans whose cost falls with the knob."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aim_engine import GenerationRequest, ImagePart, ReductionPlan, TextPart, VideoPart
from aim_engine.importance import last_token_scores
from aim_engine.methods import METHODS, REDUCERS
from aim_engine.methods.evs import evs_drop, evs_kept
from aim_engine.methods.pooling import pool_group, pooled_count
from aim_engine.plan import PlanError
from tests.conftest import random_frames, random_image


def test_pooling_averages_square_windows_and_keeps_window_centres():
    x = torch.randn(16, 5)  # a 4x4 grid
    keep, feats, _ = pool_group(x, 4)
    assert keep.tolist() == [0, 2, 8, 10]  # top-left token of each 2x2 window stands for it
    grid = x.reshape(4, 4, 5)
    expected = torch.stack([grid[r:r + 2, c:c + 2].mean(dim=(0, 1)) for r in (0, 2) for c in (0, 2)])
    torch.testing.assert_close(feats, expected)
    assert pooled_count(16, 4) == 4 and pooled_count(16, 6) == 4 and pooled_count(16, 9) == 9
    assert pooled_count(10, 4) == 4  # not square: raster-order pooling hits the target exactly
    keep, feats, _ = pool_group(torch.arange(10.0)[:, None], 5)
    assert feats.flatten().tolist() == [0.5, 2.5, 4.5, 6.5, 8.5] and keep.tolist() == [0, 2, 4, 6, 8]


def _clip(seed: int, frames: int, side: int, d: int = 12, loose: int = 1):
    """Frames of a drifting pattern (some positions still, some changing, one cut) plus `loose` tokens in no
    frame: (features, groups)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(side * side, d, generator=g)
    rows = []
    for t in range(frames):
        frame = base.clone()
        frame[: side * side // 3] += 0.3 * t * torch.randn(side * side // 3, d, generator=g)  # a part moves
        if t == frames // 2:
            base = torch.randn(side * side, d, generator=g)  # a cut
        rows.append(frame)
    features = torch.cat(rows + [torch.randn(loose, d, generator=g)])
    return features, [torch.arange(side * side * t, side * side * (t + 1)) for t in range(frames)]


@pytest.mark.parametrize("reducer", sorted(REDUCERS))
@pytest.mark.parametrize("retention", [0.6, 0.3, 0.1])
@pytest.mark.parametrize("frames,side", [(1, 5), (6, 4), (5, 6)])
def test_members_describe_every_reduction(reducer, retention, frames, side):
    """Each survivor's features are the mean of its members' input rows, so `merged_rows` reduces any tensor with
    the same rows (DeepStack levels) exactly as the features were; sizes and positions agree with them."""
    from aim_engine.merging import merged_rows

    features, groups = _clip(frames * 10 + side, frames, side)
    plan = ReductionPlan(merge_retention=retention, reducer=reducer)
    result = REDUCERS[reducer].reduce(features, groups, plan.merge_target)
    survivor, member = result.members
    assert result.keep.numel() == result.features.shape[0] and torch.all(result.keep[1:] > result.keep[:-1])
    assert set(survivor.tolist()) == set(range(result.keep.numel()))  # every survivor has members
    torch.testing.assert_close(merged_rows(result, features), result.features, atol=1e-5, rtol=1e-5)
    # two levels of other rows at once, as DeepStack's are
    levels = torch.stack([features * 2 + 1, -features])
    torch.testing.assert_close(merged_rows(result, levels), torch.stack([result.features * 2 + 1, -result.features]),
                               atol=1e-5, rtol=1e-5)
    if reducer != "pool":  # pooled windows may overlap; every other reducer assigns each input token once at most
        assert member.unique().numel() == member.numel()
        counts = torch.bincount(survivor, minlength=result.keep.numel()).float()
        if REDUCERS[reducer].sized:
            assert torch.equal(counts, result.sizes.float())
        # a survivor takes the place of one of its own members
        assert all(int(k) in member[survivor == i].tolist() for i, k in enumerate(result.keep))


def test_evs_keeps_the_first_frame_and_the_patches_that_changed():
    torch.manual_seed(0)
    base = torch.randn(9, 8)
    frames = [base.clone() for _ in range(3)]
    frames[1][4] = torch.randn(8)  # patch 4 changes in frame 1
    frames[2][7] = torch.randn(8)  # patch 7 changes in frame 2
    features = torch.cat(frames + [torch.randn(1, 8)])  # plus one token in no frame (a newline)
    groups = [torch.arange(9 * t, 9 * (t + 1)) for t in range(3)]
    out = evs_drop(features, groups, lambda n: 11 // 3)  # budget 3 per frame -> 9 total: frame 0 + 0 more...
    assert out.keep.tolist() == list(range(9)) + [27]  # ...so only frame 0 and the loose token survive
    out = evs_drop(features, groups, lambda n: 11 // 3 + 1 if n == 9 else n)  # 12 total: 3 beyond frame 0
    kept_later = [k for k in out.keep.tolist() if 9 <= k < 27]
    assert {9 + 4, 18 + 7} <= set(kept_later) and len(kept_later) == 3
    torch.testing.assert_close(out.features, features[out.keep])
    assert evs_kept([9, 9, 9], lambda n: 4) == 12 and evs_kept([9], lambda n: 2) == 9  # images are untouched


def test_last_token_scores_are_the_last_rows_attention_probabilities():
    torch.manual_seed(1)
    q, k = torch.randn(4, 10, 16), torch.randn(2, 10, 16)  # grouped-query: 2 KV heads
    scale = 16 ** -0.5
    # independent path: SDPA with V = identity returns the attention matrix itself
    eye = torch.eye(10).expand(4, 10, 10)
    probs = F.scaled_dot_product_attention(q[None], k.repeat_interleave(2, 0)[None], eye[None], is_causal=True,
                                           scale=scale)[0]
    torch.testing.assert_close(last_token_scores(q, k, scale), probs[:, -1].mean(0), atol=1e-6, rtol=1e-5)


def test_staged_plans_validate_and_schedule():
    plan = ReductionPlan(prune_stages=((2, 0.5), (4, 0.125)), importance="last_token")
    assert [plan.keep_ratio_at_layer(layer) for layer in range(6)] == [1, 1, 0.5, 0.5, 0.125, 0.125]
    assert plan.visual_tokens_per_layer(64, 6) == [64, 64, 32, 32, 8, 8]
    assert plan.prunes and "L2:0.5" in plan.describe()
    for bad in [dict(prune_stages=((0, 0.5),)), dict(prune_stages=((3, 0.5), (2, 0.2))),
                dict(prune_stages=((2, 0.2), (3, 0.5))), dict(prune_stages=((2, 1.5),)),
                dict(prune_stages=((2, 0.5),), prune_start=1, prune_end=3), dict(reducer="magic")]:
        with pytest.raises(PlanError):
            ReductionPlan(**bad)
    with pytest.raises(PlanError, match="beyond"):
        ReductionPlan(prune_stages=((9, 0.5),)).check_depth(6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_plan_is_valid_and_cheaper_as_the_knob_falls(engine_for, name):
    engine = engine_for("llava_dinov2", layers=8)
    method = METHODS[name]
    assert method.plan(engine.num_layers, 1.0).is_empty
    request = GenerationRequest([ImagePart(image=random_image(31, (32, 32))),
                                 VideoPart(frames=random_frames(32, 4, (24, 24))), TextPart("How many?")])
    costs = []
    for knob in (1.0,) + method.sweep:
        plan = method.plan(engine.num_layers, knob)
        plan.check_depth(engine.num_layers)
        estimate = engine.estimate(request, plan)
        costs.append(estimate.prefill_flops)
        result = engine.generate(request, plan)  # runs end to end through the engine
        assert result.stats.prefill_flops == estimate.prefill_flops
    assert costs[1] < costs[0] and costs == sorted(costs, reverse=True)


def test_reducers_are_chosen_by_the_plan(engine_for):
    engine = engine_for("llava_dinov2", layers=8)
    request = GenerationRequest([VideoPart(frames=random_frames(33, 4, (24, 24))), TextPart("What moves?")])
    kept = {}
    for reducer in REDUCERS:
        prepared = engine.prepare(request, ReductionPlan(merge_retention=0.5, reducer=reducer))
        kept[reducer] = int(prepared.is_visual.sum())
    # 4 frames of 3x3 = 9 tokens: merge keeps round(4.5) = 4 or 5 per frame; pooling a 2x2 grid; EVS a total
    assert kept["pool"] == 4 * 4 and kept["evs"] == max(9, 4 * round(9 * 0.5)) and kept["merge"] == 4 * round(4.5)
    # the per-frame targets' sum, shared unevenly
    assert kept["vidcom2"] == kept["fastvid"] == kept["holitom"] == 4 * round(4.5)
