"""Uniform pooling: each frame / crop's square token grid is average-pooled to about the target count
(side round(sqrt(target))), the baseline of LLaVA-OneVision's video pooling and of most token-reduction papers.
Each pooled token takes the position of the token at its window's centre. A group that is not a square grid
(e.g. an unpadded high-resolution crop grid) is pooled in raster order instead."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..merging import MergeResult, Survivors, kept_as_is
from .base import Reducer, TargetFor, pre_llm_method


def _side(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n else None


def pooled_count(n: int, target: int) -> int:
    if target >= n:
        return n
    side = _side(n)
    if side is None:
        return target
    out = max(1, min(side, round(math.sqrt(target))))
    return out * out


def pool_group(x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (n, d) -> (kept index (k,), pooled features (k, d), members (2, m): (window, token) pairs) with
    k = pooled_count(n, target). Adaptive pooling's windows may overlap by a token."""
    n, d = x.shape
    k = pooled_count(n, target)
    if k == n:
        return torch.arange(n, device=x.device), x, kept_as_is(n, x.device)
    side = _side(n)
    if side is None:  # raster-order 1-D pooling
        feats = F.adaptive_avg_pool1d(x.float().t()[None], k)[0].t()
        edges = [(i * n // k, -(-(i + 1) * n // k)) for i in range(k)]
        centre = torch.tensor([(a + b - 1) // 2 for a, b in edges], device=x.device)
        pairs = [(i, t) for i, (a, b) in enumerate(edges) for t in range(a, b)]
        return centre, feats.to(x.dtype), torch.tensor(pairs, device=x.device).t()
    out = math.isqrt(k)
    grid = x.float().t().reshape(1, d, side, side)
    feats = F.adaptive_avg_pool2d(grid, out)[0].reshape(d, k).t()
    # adaptive pooling window i covers [floor(i*s/o), ceil((i+1)*s/o)); its centre token stands for it
    spans = [(i * side // out, -(-(i + 1) * side // out)) for i in range(out)]
    rows = [(a + b - 1) // 2 for a, b in spans]
    centre = torch.tensor([r * side + c for r in rows for c in rows], device=x.device)
    pairs = [(i * out + j, r * side + c) for i, (r0, r1) in enumerate(spans) for j, (c0, c1) in enumerate(spans)
             for r in range(r0, r1) for c in range(c0, c1)]
    return centre, feats.to(x.dtype), torch.tensor(pairs, device=x.device).t()


def pool_groups(features: torch.Tensor, groups: Sequence[torch.Tensor], target_for: TargetFor) -> MergeResult:
    """Each survivor reports size 1 (what its window averaged is not weighed by proportional attention)."""
    n = features.shape[0]
    in_group = torch.zeros(n, dtype=torch.bool, device=features.device)
    out = Survivors(features)
    for idx in groups:
        in_group[idx] = True
        centre, pooled, members = pool_group(features[idx], target_for(idx.numel()))
        out.add(idx[centre], pooled, torch.ones(centre.numel(), device=features.device),
                torch.stack([members[0], idx[members[1]]]))
    out.keep(torch.nonzero(~in_group).flatten())
    return out.result()


REDUCER = Reducer("pool", reduce=pool_groups,
                  kept=lambda sizes, target_for: sum(pooled_count(n, target_for(n)) for n in sizes))
METHOD = pre_llm_method("pool", "pool", "average-pool each frame's token grid to the knob's share, before the LLM")
