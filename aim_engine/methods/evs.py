"""EVS — Efficient Video Sampling (Bagherinezhad et al., 2025), before the LLM: a token whose patch has not
changed since the previous frame carries little new information. Every patch of frames 1..T-1 is scored by
1 - cos(x_t[i], x_{t-1}[i]) (same patch, previous frame); the least changed are dropped, across all those
frames at once, down to the plan's total budget. The first frame is always kept whole (there is nothing to
compare it with), so a single image or frame is never reduced. Survivors keep their positions."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..merging import MergeResult
from .base import Reducer, TargetFor, loose_tokens, passthrough, pre_llm_method, selected


def evs_kept(sizes: Sequence[int], target_for: TargetFor) -> int:
    if len(sizes) < 2 or len(set(sizes)) != 1:
        return sum(sizes)
    return max(sizes[0], sum(target_for(n) for n in sizes))


def evs_drop(features: torch.Tensor, groups: Sequence[torch.Tensor], target_for: TargetFor) -> MergeResult:
    sizes = [g.numel() for g in groups]
    budget = evs_kept(sizes, target_for)
    if budget >= sum(sizes):
        return passthrough(features)
    frames = torch.stack([features[g].float() for g in groups])  # (T, n, d)
    change = 1 - F.cosine_similarity(frames[1:], frames[:-1], dim=-1)  # (T-1, n)
    later = torch.stack(list(groups[1:]))  # their indices into `features`
    # stable order: among equal changes the earlier token is dropped first
    order = torch.sort(change.flatten(), descending=True, stable=True).indices
    survivors = later.flatten()[order[: budget - sizes[0]]]
    keep = torch.sort(torch.cat([groups[0], survivors, loose_tokens(features, groups)])).values
    return selected(features, keep)


REDUCER = Reducer("evs", reduce=evs_drop, kept=evs_kept)
METHOD = pre_llm_method("evs", "evs", "drop the patches least changed since the previous frame, before the LLM")
