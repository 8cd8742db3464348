import pytest
import torch

from aim_engine.merging import ROUND_SHARE, merge_frame_tokens, merge_groups


def frame(n=196, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


@pytest.mark.parametrize("n,target", [(196, 98), (196, 49), (196, 13), (196, 1), (17, 5), (2, 1)])
def test_exact_counts_and_sizes_sum_to_input(n, target):
    res = merge_frame_tokens(frame(n), target)
    assert res.features.shape == (target, 16)
    assert res.keep.shape == (target,)
    assert res.sizes.sum().item() == n


def test_size_weighted_sum_is_preserved_over_repeated_merges():
    x = frame()
    res = merge_frame_tokens(x, 7)  # many rounds
    torch.testing.assert_close((res.features * res.sizes[:, None]).sum(0), x.sum(0), atol=1e-4, rtol=1e-5)


def test_full_retention_is_the_identity_bit_exact():
    x = frame()
    res = merge_frame_tokens(x, 196)
    assert torch.equal(res.features, x) and torch.equal(res.keep, torch.arange(196))


def test_survivors_keep_original_order_and_are_deterministic():
    x = frame(seed=3)
    a, b = merge_frame_tokens(x, 49), merge_frame_tokens(x.clone(), 49)
    assert torch.all(a.keep[1:] > a.keep[:-1])
    assert torch.equal(a.keep, b.keep) and torch.equal(a.features, b.features)


def test_duplicates_merge_first_and_average_by_size():
    # tokens 0 and 1 identical, 2..5 distinct: one round of r=1 must fold token 0 into token 1
    x = torch.eye(6)
    x[0] = x[1]
    res = merge_frame_tokens(x, 5)
    assert res.keep.tolist() == [1, 2, 3, 4, 5]
    assert res.sizes.tolist() == [2, 1, 1, 1, 1]
    torch.testing.assert_close(res.features[0], x[1])


def test_a_round_folds_only_the_most_similar_share_of_a():
    # 196 -> 98 in one paper round would fold every A token; ours folds at most ROUND_SHARE of A per round, so
    # a distinctive token at an A index (even) survives alone among near-duplicates of the background
    g = torch.Generator().manual_seed(1)
    x = torch.ones(196, 16) + 0.01 * torch.randn(196, 16, generator=g)
    x[10] = -torch.ones(16)
    for target in (98, 49, 13):
        res = merge_frame_tokens(x, target)
        assert res.keep.numel() == target and 10 in res.keep.tolist()
        assert res.sizes[res.keep.tolist().index(10)].item() == 1
    assert ROUND_SHARE < 1.0


def test_groups_merge_separately_and_loose_tokens_pass_through():
    x = frame(9, 4)
    groups = [torch.arange(0, 4), torch.arange(4, 8)]  # token 8 (e.g. a newline) in no group
    res = merge_groups(x, groups, lambda n: 2)
    assert res.keep.numel() == 5 and res.keep[-1].item() == 8
    assert torch.equal(res.features[-1], x[8])
    assert set(res.keep[:2].tolist()) <= {0, 1, 2, 3} and set(res.keep[2:4].tolist()) <= {4, 5, 6, 7}


def test_bad_target_is_rejected():
    with pytest.raises(ValueError):
        merge_frame_tokens(frame(10), 0)
    with pytest.raises(ValueError):
        merge_frame_tokens(frame(10), 11)


def test_batched_frames_merge_exactly_like_one_frame_at_a_time():
    from aim_engine.merging import merge_frames

    frames = torch.stack([frame(seed=s) for s in range(5)])
    keep, feats, sizes, owner = merge_frames(frames, 13)
    for g in range(5):
        single = merge_frame_tokens(frames[g], 13)
        assert torch.equal(keep[g], single.keep) and torch.equal(sizes[g], single.sizes)
        assert torch.equal(owner[g], single.members[0])
        torch.testing.assert_close(feats[g], single.features, atol=1e-6, rtol=1e-6)


def test_groups_of_different_sizes_batch_by_size():
    x = frame(40, 8, seed=4)
    groups = [torch.arange(0, 12), torch.arange(12, 20), torch.arange(20, 32), torch.arange(32, 39)]
    res = merge_groups(x, groups, lambda n: max(1, n // 4))
    expected = []
    for idx in groups:
        single = merge_frame_tokens(x[idx], max(1, idx.numel() // 4))
        expected += idx[single.keep].tolist()
    assert res.keep.tolist() == sorted(expected + [39])
