"""The one small interface every token-reduction method sits behind (AIM's own and the peer baselines).

A method is a family of ReductionPlans indexed by one knob in (0, 1] — roughly the share of visual work kept —
so an evaluation can sweep it or solve for the knob that matches another method's FLOPs. What a plan does is
carried out by the engine: before the LLM by the plan's `reducer` (a `Reducer`: AIM's merge or a peer's), inside
it by the pruning schedule, importance scorer and what becomes of the pruned (dropped, or merged into the kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..merging import MergeResult
from ..plan import ReductionPlan

# DPC-kNN (FastVID, HoliTom): a token's density is over its NEIGHBOURS nearest tokens.
NEIGHBOURS = 5

TargetFor = Callable[[int], int]  # tokens a group (frame / crop) of n tokens should keep


@dataclass(frozen=True)
class Reducer:
    """Visual-token reduction before the LLM. `reduce` keeps (ascending indices, features) per media item;
    `kept` counts what `reduce` would keep, from group sizes alone (for cost estimates without encoding).
    `sized`: its survivors can stand for several input tokens (MergeResult.sizes > 1), which proportional
    attention weighs; for the others that plan flag changes nothing."""

    name: str
    reduce: Callable[[torch.Tensor, Sequence[torch.Tensor], TargetFor], MergeResult]
    kept: Callable[[Sequence[int], TargetFor], int]
    sized: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    plan: Callable[[int, float], ReductionPlan]  # (LLM layers, knob in (0, 1]) -> plan; knob 1 = no reduction
    sweep: tuple[float, ...]  # knobs an evaluation runs by default


def summed_targets(sizes: Sequence[int], target_for: TargetFor) -> int:
    """What a reducer that meets the plan's per-group targets in total keeps (AIM's merge, VidCom2, FastVID,
    HoliTom share them out differently, but keep exactly their sum)."""
    return sum(target_for(n) for n in sizes)


def passthrough(features: torch.Tensor) -> MergeResult:
    return selected(features, torch.arange(features.shape[0], device=features.device))


def selected(features: torch.Tensor, keep: torch.Tensor) -> MergeResult:
    """The tokens `keep` (ascending) kept as they are, the rest dropped (a reducer that only selects)."""
    return MergeResult(keep, features[keep], torch.ones(keep.numel(), device=features.device),
                       torch.stack([torch.arange(keep.numel(), device=keep.device), keep]))


def loose_tokens(features: torch.Tensor, groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """Indices of the tokens in no group (e.g. a family's separator tokens): every reducer keeps them as they are."""
    in_group = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    for g in groups:
        in_group[g] = True
    return torch.nonzero(~in_group).flatten()


def density_peaks(x: torch.Tensor, centres: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering (DPC-kNN): a token's density is exp(-(mean distance to its k nearest
    neighbours)^2); a peak is a token far from any denser one; the `centres` highest density x distance tokens
    are the centres and every other token joins its nearest centre.
    x (m, d) -> (the centres' indices (centres,), each token's cluster (m,) as an index into the centres)."""
    m = x.shape[0]
    distance = torch.cdist(x, x)  # (m, m)
    k = min(NEIGHBOURS, m - 1)
    if k > 0:
        knn = torch.topk(distance, k + 1, largest=False).values[:, 1:]  # without itself
        density = torch.exp(-(knn.mean(-1) ** 2))
    else:
        density = torch.ones(m, device=x.device)
    order = torch.sort(density, descending=True, stable=True).indices  # ties by index: a strict order
    rank = torch.empty(m, dtype=torch.long, device=x.device)
    rank[order] = torch.arange(m, device=x.device)
    denser = rank[None, :] < rank[:, None]  # (i, j): j is denser than i
    apart = torch.where(denser, distance, torch.full_like(distance, float("inf"))).min(-1).values
    apart[order[0]] = distance[order[0]].max()  # the densest token: its farthest distance
    chosen = torch.sort(torch.topk(density * apart, centres).indices).values
    cluster = torch.argmin(distance[:, chosen], dim=-1)
    cluster[chosen] = torch.arange(centres, device=x.device)  # a centre is in its own cluster
    return chosen, cluster


def cluster_means(x: torch.Tensor, sizes: torch.Tensor, centres: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (m, d), each row standing for `sizes` (m,) input tokens, in `centres` density-peak clusters as merged
    tokens: (their size-weighted means (centres, d), the sizes they stand for (centres,), the centres' indices
    into x (centres,), each row's cluster (m,))."""
    chosen, cluster = density_peaks(x, centres)
    weight = torch.zeros(centres, device=x.device).index_add_(0, cluster, sizes)
    total = torch.zeros(centres, x.shape[1], device=x.device).index_add_(0, cluster, x * sizes[:, None])
    return total / weight[:, None], weight, chosen, cluster


def pre_llm_method(name: str, reducer: str, summary: str, sweep: tuple[float, ...] = (0.5, 0.25, 0.125)) -> Method:
    """A method that only reduces before the LLM, with the plan's merge retention as its knob."""
    def plan(num_layers: int, knob: float) -> ReductionPlan:
        return ReductionPlan() if knob >= 1.0 else ReductionPlan(merge_retention=knob, reducer=reducer)

    return Method(name, summary, plan, sweep)
