"""VidCom2 — Video Compression Commander (Liu et al., 2025; vLLM's `--video-pruning-method vidcom2`), before the
LLM, from the projector's embeddings alone (so it works with any attention kernel). Written from the paper's
description; no code of it is used.

1. Frame budgets by frame uniqueness. A frame is summarised by the mean of its tokens, the clip by the mean of
   the frames; a frame's uniqueness is 1 - cos(frame, clip). The clip's budget (the plan's per-frame targets,
   summed) is shared out in proportion to softmax of the standardised uniqueness, so a frame unlike the rest of
   the clip keeps more tokens, and every frame keeps at least one.
2. Tokens by uniqueness within the frame. A token's uniqueness is minus its mean cosine similarity to its frame's
   summary and to the clip's; each frame keeps its most unique tokens. Survivors keep their own features and
   positions (nothing is merged).

A single image or frame gets its own target (step 1 has nothing to share) and step 2 alone.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch
import torch.nn.functional as F

from ..merging import MergeResult
from .base import Reducer, TargetFor, loose_tokens, passthrough, pre_llm_method, selected, summed_targets


def frame_budgets(weights: Sequence[float], sizes: Sequence[int], total: int) -> list[int]:
    """`total` tokens over the frames in proportion to `weights` (highest averages, D'Hondt), each frame at least
    one and at most its size. Needs len(sizes) <= total <= sum(sizes)."""
    budgets = [1] * len(sizes)
    heap = [(-w / 2, i) for i, (w, n) in enumerate(zip(weights, sizes)) if n > 1]
    heapq.heapify(heap)
    for _ in range(total - len(sizes)):
        _, i = heapq.heappop(heap)
        budgets[i] += 1
        if budgets[i] < sizes[i]:
            heapq.heappush(heap, (-weights[i] / (budgets[i] + 1), i))
    return budgets


def vidcom2_drop(features: torch.Tensor, groups: Sequence[torch.Tensor], target_for: TargetFor) -> MergeResult:
    sizes = [g.numel() for g in groups]
    total = summed_targets(sizes, target_for)
    if total >= sum(sizes):
        return passthrough(features)
    frames = [F.normalize(features[g].float(), dim=-1) for g in groups]
    summaries = F.normalize(torch.stack([f.mean(0) for f in frames]), dim=-1)  # (T, d)
    clip = F.normalize(summaries.mean(0), dim=-1)
    if len(groups) > 1:
        uniqueness = 1 - summaries @ clip  # (T,)
        z = (uniqueness - uniqueness.mean()) / (uniqueness.std() + 1e-6)
        budgets = frame_budgets(torch.softmax(z, 0).tolist(), sizes, total)
    else:
        budgets = [total]
    kept = []
    for group, tokens, summary, budget in zip(groups, frames, summaries, budgets):
        similarity = (tokens @ summary + tokens @ clip) / 2  # (n,)
        order = torch.sort(similarity, stable=True).indices  # least similar (most unique) first
        kept.append(group[order[:budget]])
    keep = torch.sort(torch.cat([*kept, loose_tokens(features, groups)])).values
    return selected(features, keep)


REDUCER = Reducer("vidcom2", reduce=vidcom2_drop, kept=summed_targets)
METHOD = pre_llm_method("vidcom2", "vidcom2", "per-frame budgets by frame uniqueness, then each frame's most unique "
                        "tokens, before the LLM (vLLM's built-in)", sweep=(0.5, 0.25, 0.125, 0.0625))
