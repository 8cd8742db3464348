"""Visual token merging before the LLM (aim-method.md §1).

Per frame / image crop: iterative bipartite matching on the cosine similarity of the projector outputs.
Each round splits the current tokens into alternating sets A (even) and B (odd) in raster order; every A
token finds its most similar B token; the r A tokens with the highest best-similarity are folded into their
partners. Unlike the paper we keep a size per token (how many original tokens it stands for) and average
weighted by size, so repeated merges stay unbiased, and survivors keep their original order.

A survivor "is" the B token (or unmerged A token) it stands for: its index, and so its position, is that
token's original one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class MergeResult:
    keep: torch.Tensor  # (k,) int64, ascending indices into the input of the surviving tokens
    features: torch.Tensor  # (k, d) size-weighted means of the tokens each survivor stands for
    sizes: torch.Tensor  # (k,) how many original tokens each survivor stands for


def merge_frame_tokens(
    features: torch.Tensor, target: int, sizes: torch.Tensor | None = None
) -> MergeResult:
    """Merge one frame's tokens (n, d) down to `target` tokens (1 <= target <= n)."""
    n = features.shape[0]
    if not 1 <= target <= n:
        raise ValueError(f"merge target must be in 1..{n}, got {target}")
    keep = torch.arange(n, device=features.device)
    x = features
    size = torch.ones(n, dtype=torch.float32, device=features.device) if sizes is None else sizes.float()
    while x.shape[0] > target:
        x, size, keep = _merge_round(x, size, keep, x.shape[0] - target)
    return MergeResult(keep=keep, features=x, sizes=size)


def _merge_round(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor, excess: int):
    a_idx = torch.arange(0, x.shape[0], 2, device=x.device)
    b_idx = torch.arange(1, x.shape[0], 2, device=x.device)
    r = min(excess, a_idx.numel(), max(b_idx.numel(), 0))
    if r == 0:  # a single token left cannot merge further
        return x, size, keep
    # Cosine similarity in fp32: the ranking must not depend on the serving dtype.
    xf = x.float()
    xn = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = xn[a_idx] @ xn[b_idx].T  # (|A|, |B|)
    best_sim, best_b = sim.max(dim=-1)
    # Stable descending order: ties go to the earlier A token, so the result is deterministic.
    order = torch.sort(best_sim, descending=True, stable=True).indices
    merged_a, kept_a = order[:r], order[r:]

    b_size = size[b_idx].clone()
    b_sum = xf[b_idx] * b_size[:, None]
    src = a_idx[merged_a]
    dst = best_b[merged_a]
    b_sum.index_add_(0, dst, xf[src] * size[src][:, None])
    b_size.index_add_(0, dst, size[src])
    b_feat = b_sum / b_size[:, None]

    survivors = torch.cat([a_idx[kept_a], b_idx])
    feats = torch.cat([xf[a_idx[kept_a]], b_feat])
    sizes = torch.cat([size[a_idx[kept_a]], b_size])
    order_back = torch.argsort(survivors)
    survivors = survivors[order_back]
    return feats[order_back].to(x.dtype), sizes[order_back], keep[survivors]


def merge_groups(
    features: torch.Tensor, groups: Sequence[torch.Tensor], target_for: "callable[[int], int]"
) -> MergeResult:
    """Merge each group (frame / crop: index tensors into `features`) separately; tokens in no group
    (e.g. row-newline embeddings) pass through untouched. Returns survivors in their original order."""
    n = features.shape[0]
    in_group = torch.zeros(n, dtype=torch.bool, device=features.device)
    keeps, feats, sizes = [], [], []
    for idx in groups:
        in_group[idx] = True
        res = merge_frame_tokens(features[idx], target_for(idx.numel()))
        keeps.append(idx[res.keep])
        feats.append(res.features)
        sizes.append(res.sizes)
    loose = torch.nonzero(~in_group).flatten()
    keeps.append(loose)
    feats.append(features[loose])
    sizes.append(torch.ones(loose.numel(), device=features.device))
    keep = torch.cat(keeps)
    order = torch.argsort(keep)
    return MergeResult(keep=keep[order], features=torch.cat(feats)[order], sizes=torch.cat(sizes)[order])
