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
    keep: torch.Tensor  # (k,) int64, ascending indices into the input of the surviving tokens
    features: torch.Tensor  # (k, d) size-weighted means of the tokens each survivor stands for
    sizes: torch.Tensor  # (k,) how many original tokens each survivor stands for


def merge_frame_tokens(features: torch.Tensor, target: int) -> MergeResult:
    """Merge one frame's tokens (n, d) down to `target` tokens (1 <= target <= n)."""
    keep, feats, sizes = merge_frames(features[None], target)
    return MergeResult(keep[0], feats[0], sizes[0])


def merge_frames(x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge each of G frames (G, n, d) down to `target` tokens. Returns keep (G, k) ascending indices,
    features (G, k, d) and sizes (G, k)."""
    groups, n, _ = x.shape
    if not 1 <= target <= n:
        raise ValueError(f"merge target must be in 1..{n}, got {target}")
    keep = torch.arange(n, device=x.device).expand(groups, n)
    size = torch.ones(groups, n, dtype=torch.float32, device=x.device)
    # Similarities and averages in fp32: the ranking must not depend on the serving dtype.
    xf = x.float()
    while xf.shape[1] > target:
        before = xf.shape[1]
        xf, size, keep = _merge_round(xf, size, keep, before - target)
        if xf.shape[1] == before:  # a single token left cannot merge further
            break
    return keep, xf.to(x.dtype), size


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
        return x, size, keep
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
    return _gather_rows(feats, back), sizes.gather(1, back), keep.gather(1, survivors)


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
    keeps, feats, sizes = [], [], []
    for group_size, members in by_size.items():
        index = torch.stack(members)  # (G, group_size)
        keep, merged, size = merge_frames(features[index], target_for(group_size))
        keeps.append(index.gather(1, keep).flatten())
        feats.append(merged.flatten(0, 1))
        sizes.append(size.flatten())
    loose = torch.nonzero(~in_group).flatten()
    keeps.append(loose)
    feats.append(features[loose])
    sizes.append(torch.ones(loose.numel(), device=features.device))
    keep = torch.cat(keeps)
    order = torch.argsort(keep)
    return MergeResult(keep=keep[order], features=torch.cat(feats)[order], sizes=torch.cat(sizes)[order])
