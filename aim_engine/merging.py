"""Visual token merging before the LLM (aim-method.md §1).

Per frame / image crop: iterative bipartite matching on the cosine similarity of the projector outputs.
Each round splits the current tokens into alternating sets A (even) and B (odd) in raster order; every A
token finds its most similar B token; the r A tokens with the highest best-similarity are folded into their
partners. Unlike the paper we keep a size per token (how many original tokens it stands for) and average
weighted by size, so repeated merges stay unbiased, and survivors keep their original order.

A round folds at most ROUND_SHARE of A, its most similar tokens. The paper's rounds fold all of A whenever the
target is at most half the tokens (196 -> 98 -> 49), so every A token is merged whatever its similarity: an object
that covers one patch in A is averaged into a neighbour. With the cap, similarity alone decides what merges; a
frame takes more rounds (64 -> 12 tokens: 6 instead of 3), each a few batched kernels.

A survivor "is" the B token (or unmerged A token) it stands for: its index, and so its position, is that
token's original one.

Frames of equal size (every frame of a video) are merged together as one batch: the rounds are the same
tensor operations with a leading frame dimension, so the cost is a few kernels per round, not per frame.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# The largest share of set A one round may fold into B (see the module docstring); 1.0 is the paper's rule.
ROUND_SHARE = 0.5


@dataclass
class MergeResult:
    """What a reduction before the LLM (AIM's merge or a peer's) kept of one media item's n tokens."""

    keep: torch.Tensor  # (k,) int64, ascending indices into the input of the surviving tokens
    features: torch.Tensor  # (k, d) size-weighted means of the tokens each survivor stands for
    sizes: torch.Tensor  # (k,) how many original tokens each survivor stands for
    # (2, m) int64 pairs (survivor row, input row): each survivor's features are the mean of its members' rows (a
    # token kept as it is is its own only member). The one description of the reduction that other tensors with
    # the same rows (Qwen3-VL's DeepStack levels) are reduced by: `merged_rows`.
    members: torch.Tensor


def merged_rows(result: MergeResult, rows: torch.Tensor) -> torch.Tensor:
    """rows (..., n, d), one per input token as the reduced features were, reduced the same way: (..., k, d), each
    survivor the mean of its members' rows."""
    survivor, member = result.members
    k = result.keep.numel()
    if survivor.numel() == k:  # every survivor one token (kept as it is, or the only member of its group)
        return rows.index_select(-2, member[torch.argsort(survivor)])
    count = torch.zeros(k, device=rows.device).index_add_(0, survivor, torch.ones_like(survivor, dtype=torch.float32))
    flat = rows.reshape(-1, *rows.shape[-2:])
    out = torch.empty(flat.shape[0], k, rows.shape[-1], dtype=rows.dtype, device=rows.device)
    for level in range(flat.shape[0]):  # one (n, d) at a time in fp32: no copy of every level at once
        total = torch.zeros(k, rows.shape[-1], device=rows.device).index_add_(0, survivor, flat[level, member].float())
        out[level] = (total / count[:, None]).to(rows.dtype)
    return out.reshape(*rows.shape[:-2], k, rows.shape[-1])


def kept_as_is(count: int, device) -> torch.Tensor:
    """Members of `count` survivors that are each one input token: (2, count) pairs (i, i)."""
    rows = torch.arange(count, device=device)
    return torch.stack([rows, rows])


class Survivors:
    """A reduction's survivors, collected piece by piece in any order and returned in input order. Each piece gives
    its survivors' input indices (the token whose position each takes), features, sizes and members (survivor
    rows numbered within the piece)."""

    def __init__(self, features: torch.Tensor):
        self.features = features
        self.pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, index: torch.Tensor, features: torch.Tensor, sizes: torch.Tensor, members: torch.Tensor) -> None:
        self.pieces.append((index, features, sizes.float(), members))

    def keep(self, index: torch.Tensor) -> None:
        """Input tokens kept as they are."""
        self.add(index, self.features[index], torch.ones(index.numel(), device=index.device),
                 torch.stack([torch.arange(index.numel(), device=index.device), index]))

    def result(self) -> MergeResult:
        """Every reducer ends with `keep(tokens in no group)`, so there is at least one piece."""
        index, features, sizes, members = zip(*self.pieces)
        keep = torch.cat(index)
        order = torch.argsort(keep)
        rank = torch.empty_like(order)  # a survivor's row in input order, by its row in `keep`
        rank[order] = torch.arange(order.numel(), device=order.device)
        start = 0
        renumbered = []
        for piece, pairs in zip(index, members):
            renumbered.append(torch.stack([rank[start + pairs[0]], pairs[1]]))
            start += piece.numel()
        features = torch.cat([f.to(self.features.dtype) for f in features])
        return MergeResult(keep[order], features[order], torch.cat(sizes)[order], torch.cat(renumbered, dim=1))


def merge_frame_tokens(features: torch.Tensor, target: int) -> MergeResult:
    """Merge one frame's tokens (n, d) down to `target` tokens (1 <= target <= n)."""
    keep, feats, sizes, owner = merge_frames(features[None], target)
    return MergeResult(keep[0], feats[0], sizes[0],
                       torch.stack([owner[0], torch.arange(features.shape[0], device=features.device)]))


def merge_frames(x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge each of G frames (G, n, d) down to `target` tokens. Returns keep (G, k) ascending indices,
    features (G, k, d), sizes (G, k) and owner (G, n): the survivor each input token is folded into (or is)."""
    groups, n, _ = x.shape
    if not 1 <= target <= n:
        raise ValueError(f"merge target must be in 1..{n}, got {target}")
    keep = torch.arange(n, device=x.device).expand(groups, n)
    owner = keep
    size = torch.ones(groups, n, dtype=torch.float32, device=x.device)
    # Similarities and averages in fp32: the ranking must not depend on the serving dtype.
    xf = x.float()
    while xf.shape[1] > target:
        before = xf.shape[1]
        xf, size, keep, moved = _merge_round(xf, size, keep, before - target)
        owner = moved.gather(1, owner)
        if xf.shape[1] == before:  # a single token left cannot merge further
            break
    return keep, xf.to(x.dtype), size, owner


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (G, n, ...) indexed per frame by index (G, m) -> (G, m, ...)."""
    if t.dim() == 2:
        return t.gather(1, index)
    return t.gather(1, index[..., None].expand(*index.shape, t.shape[-1]))


def _merge_round(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, excess: int):
    groups, n, d = x.shape
    a_idx = torch.arange(0, n, 2, device=x.device)
    b_idx = torch.arange(1, n, 2, device=x.device)
    r = min(excess, math.ceil(ROUND_SHARE * a_idx.numel()), b_idx.numel())
    if r == 0:
        return x, size, keep, torch.arange(n, device=x.device).expand(groups, n)
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = xn[:, a_idx] @ xn[:, b_idx].transpose(1, 2)  # (G, |A|, |B|)
    best_sim, best_b = sim.max(dim=-1)  # (G, |A|)
    # Stable descending order: ties go to the earlier A token, so the result is deterministic.
    order = torch.sort(best_sim, dim=-1, descending=True, stable=True).indices
    merged_a, kept_a = order[:, :r], order[:, r:]

    src = a_idx[merged_a]  # (G, r) token indices of the A tokens folded away
    dst = best_b.gather(1, merged_a)  # (G, r) their partners, as indices into B
    b_size = size[:, b_idx].clone()
    b_sum = x[:, b_idx] * b_size[..., None]
    src_size = size.gather(1, src)
    b_sum.scatter_add_(1, dst[..., None].expand(groups, r, d), _gather_rows(x, src) * src_size[..., None])
    b_size.scatter_add_(1, dst, src_size)

    kept_a_tokens = a_idx[kept_a]  # (G, |A| - r)
    survivors = torch.cat([kept_a_tokens, b_idx.expand(groups, -1)], dim=1)
    feats = torch.cat([_gather_rows(x, kept_a_tokens), b_sum / b_size[..., None]], dim=1)
    sizes = torch.cat([size.gather(1, kept_a_tokens), b_size], dim=1)
    back = torch.argsort(survivors, dim=1)
    survivors = survivors.gather(1, back)
    # where each of this round's n tokens went: its entry in `survivors` before the sort (a folded A token: its
    # partner's), then that entry's place after it
    kept_count = kept_a_tokens.shape[1]
    entry = torch.empty(groups, n, dtype=torch.long, device=x.device)
    entry.scatter_(1, kept_a_tokens, torch.arange(kept_count, device=x.device).expand(groups, -1))
    entry[:, b_idx] = kept_count + torch.arange(b_idx.numel(), device=x.device)
    entry.scatter_(1, src, kept_count + dst)
    place = torch.empty_like(back)
    place.scatter_(1, back, torch.arange(back.shape[1], device=x.device).expand(groups, -1))
    return _gather_rows(feats, back), sizes.gather(1, back), keep.gather(1, survivors), place.gather(1, entry)


def merge_groups(features: torch.Tensor, groups: Sequence[torch.Tensor], target_for: Callable[[int], int]
                 ) -> MergeResult:
    """Merge each group (frame / crop: index tensors into `features`) separately, batching groups of equal
    size; tokens in no group (e.g. row-newline embeddings) pass through untouched. Survivors keep their
    original order."""
    n = features.shape[0]
    in_group = torch.zeros(n, dtype=torch.bool, device=features.device)
    by_size: dict[int, list[torch.Tensor]] = defaultdict(list)
    for idx in groups:
        in_group[idx] = True
        by_size[idx.numel()].append(idx)
    out = Survivors(features)
    for group_size, members in by_size.items():
        index = torch.stack(members)  # (G, group_size)
        keep, merged, size, owner = merge_frames(features[index], target_for(group_size))
        k = keep.shape[1]
        survivor = owner + k * torch.arange(index.shape[0], device=features.device)[:, None]
        out.add(index.gather(1, keep).flatten(), merged.flatten(0, 1), size.flatten(),
                torch.stack([survivor.flatten(), index.flatten()]))
    out.keep(torch.nonzero(~in_group).flatten())
    return out.result()
