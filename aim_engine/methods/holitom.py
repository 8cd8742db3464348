"""HoliTom — holistic token merging (Shao et al., 2025): merge across the whole clip before the LLM, then merge
inside it. Written from the paper's description and, for facts only, its public code; none of it is used.

Before the LLM (the "holitom" reducer):
1. Global temporal segmentation. A patch position p is static between adjacent frames t, t+1 when its two tokens'
   cosine similarity exceeds STATIC_SIMILARITY. A segment [a, b] of frames can merge every position static at
   all of its steps into one token, which saves (b - a) tokens per such position. The segments are chosen by
   dynamic programming to maximise the tokens saved over the whole clip (not frame pair by pair, as EVS does).
2. Temporal merging. In each segment every static position becomes one token, the mean of its frames' tokens,
   at the segment's first frame's place, standing for the frames it merged (proportional attention uses it).
   Every other token of the segment is dynamic and stays in its frame.
3. Spatial merging to the budget. What is left is shared out in proportion to the segments' static tokens and
   each frame's dynamic tokens. A segment's static tokens are clustered by density peaks (DPC-kNN,
   base.density_peaks), each cluster becoming its members' size-weighted mean at its centre's place; a frame
   keeps its most salient dynamic tokens as they are. The paper ranks salience by the attention a token
   receives in the vision encoder, which the engine's adapters do not expose: distinctness from the frame's mean
   is the substitute, as in FastVID. (The paper's code also blends a cluster with its centre, weight 0.6; here
   a cluster is the plain size-weighted mean, as in every merge of this engine.)
   If temporal merging alone leaves fewer tokens than the budget (a very still clip), the merged frames' tokens
   least like their merged mean are restored to their frames until the budget is met: every plan keeps exactly
   its budget, so a cost estimate from group sizes equals what is spent. The paper would keep fewer.

A single image or frame is one segment of one frame: step 3's salient tokens alone (the paper's code reduces
videos only). Survivors are in their original order.

Inside the LLM, HoliTom merges once more at one layer: the half of the visual tokens the last prompt token
attends to least are averaged into their most similar kept token. That is a plan's `merge_pruned` pruning
(decoder.py) at HOLITOM_LAYER_FRACTION of the depth (layer 18 of 28 in the paper), so `holitom_plan` is the
reducer plus that stage, and the reducer alone combines with AIM's own progressive pruning like any other.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..importance import DEFAULT_SCORE_BUDGET
from ..merging import MergeResult, Survivors
from ..plan import ReductionPlan
from .base import Method, Reducer, TargetFor, cluster_means, loose_tokens, passthrough, summed_targets

STATIC_SIMILARITY = 0.8
HOLITOM_LAYER_FRACTION = 18 / 28
INNER_KEEP = 0.5


def static_masks(frames: list[torch.Tensor]) -> list[torch.Tensor]:
    """frames: T (n_t, d) tensors -> T-1 bool (n_t,) masks, True where position p is static from frame t to t+1
    (frames of different sizes share no positions)."""
    masks = []
    for a, b in zip(frames[:-1], frames[1:]):
        if a.shape != b.shape:
            masks.append(torch.zeros(a.shape[0], dtype=torch.bool, device=a.device))
        else:
            masks.append(F.cosine_similarity(a, b, dim=-1) > STATIC_SIMILARITY)
    return masks


def segment(masks: list[torch.Tensor]) -> list[tuple[int, int]]:
    """The segments (first, last frame) covering T = len(masks) + 1 frames that save the most tokens, where a
    segment [a, b] saves (b - a) x (positions static at every step a..b-1). Ties keep frames apart."""
    frames = len(masks) + 1
    masks = [m.cpu() for m in masks]  # T^2 small reductions below: on the host, no device syncs
    best = [0] * (frames + 1)  # best[i]: the most saved over frames 0..i-1
    start = [0] * (frames + 1)  # the first frame of the last segment in that best split
    for last in range(frames):
        best[last + 1], start[last + 1] = best[last], last  # frame `last` alone
        static = None
        for first in range(last - 1, -1, -1):  # grow the segment [first, last] backwards
            if static is not None and static.shape != masks[first].shape:
                break  # frames of another size: no position is shared with them
            static = masks[first] if static is None else static & masks[first]
            saved = best[first] + (last - first) * int(static.sum())
            if saved > best[last + 1]:
                best[last + 1], start[last + 1] = saved, first
            if not bool(static.any()):
                break
    segments, end = [], frames
    while end > 0:
        segments.append((start[end], end - 1))
        end = start[end]
    return segments[::-1]


def apportion(total: int, sizes: Sequence[int]) -> list[int]:
    """`total` (<= sum(sizes)) shared in proportion to sizes by largest remainders, each at most its size."""
    whole = sum(sizes)
    exact = [total * n / whole for n in sizes]
    shares = [int(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[:total - sum(shares)]:
        shares[i] += 1
    return shares


def holitom_merge(features: torch.Tensor, groups: Sequence[torch.Tensor], target_for: TargetFor) -> MergeResult:
    sizes = [g.numel() for g in groups]
    budget = summed_targets(sizes, target_for)
    if budget >= sum(sizes):
        return passthrough(features)
    x = features.float()
    frames = [F.normalize(x[g], dim=-1) for g in groups]
    masks = static_masks(frames)

    # temporal merging: per segment, its static positions' members (frames x positions) and each frame's dynamic
    static_members, dynamic = [], []  # (first, last, positions (s,)) per segment; (frame, positions) per frame
    for first, last in segment(masks):
        static = torch.zeros(sizes[first], dtype=torch.bool, device=x.device)
        if last > first:
            static = torch.stack(masks[first:last]).all(0)
        static_members.append((first, last, torch.nonzero(static).flatten()))
        dynamic += [(t, torch.nonzero(~static).flatten()) for t in range(first, last + 1)]
    left = sum(p.numel() for *_, p in static_members) + sum(p.numel() for _, p in dynamic)
    restored = _restored(x, groups, frames, static_members, left, budget, max(sizes))
    out = Survivors(features)
    merged = _temporal_means(x, groups, static_members, restored, out)
    _spatial(x, groups, frames, merged, dynamic, left, budget, out)
    out.keep(loose_tokens(features, groups))
    return out.result()


def _restored(x, groups, frames, static_members, left: int, budget: int, width: int) -> torch.Tensor:
    """Restoring (a very still clip): temporal merging alone leaves `left` tokens; the merged members least like
    their mean go back to their frames until the budget is met. restored[t, p]: frame t's token p went back."""
    restored = torch.zeros(len(groups), width, dtype=torch.bool, device=x.device)
    if left >= budget:
        return restored
    distance, frame_of, position_of = [], [], []
    for first, last, positions in static_members:
        if positions.numel():
            mean = F.normalize(sum(x[groups[t][positions]] for t in range(first, last + 1)), dim=-1)
            for t in range(first + 1, last + 1):  # the first frame's member always stays merged
                distance.append(1 - (frames[t][positions] * mean).sum(-1))
                frame_of.append(torch.full_like(positions, t))
                position_of.append(positions)
    order = torch.sort(torch.cat(distance), descending=True, stable=True).indices[:budget - left]
    restored[torch.cat(frame_of)[order], torch.cat(position_of)[order]] = True
    return restored


def _temporal_means(x, groups, static_members, restored, out: Survivors) -> list:
    """Every static position of a segment as one token (its unrestored members' mean), at its first frame's
    place; restored members are kept as they are. Per segment: (indices at the first frame (s,), means (s, d),
    sizes (s,), members (2, m)), or None without static positions."""
    merged = []
    for first, last, positions in static_members:
        if not positions.numel():
            merged.append(None)
            continue
        total = torch.zeros(positions.numel(), x.shape[1], device=x.device)
        count = torch.zeros(positions.numel(), device=x.device)
        members = []
        for t in range(first, last + 1):
            stays = ~restored[t, positions]
            total += x[groups[t][positions]] * stays[:, None]
            count += stays
            members.append(torch.stack([torch.nonzero(stays).flatten(), groups[t][positions[stays]]]))
            out.keep(groups[t][positions[~stays]])
        merged.append((groups[first][positions], total / count[:, None], count, torch.cat(members, dim=1)))
    return merged


def _spatial(x, groups, frames, merged, dynamic, left: int, budget: int, out: Survivors) -> None:
    """Spatial merging to the budget: what temporal merging left, shared out among the segments' static tokens
    and the frames' dynamic tokens (all of it when restoring)."""
    units = [0 if m is None else m[0].numel() for m in merged] + [p.numel() for _, p in dynamic]
    shares = units if left <= budget else apportion(budget, units)
    for m, share in zip(merged, shares[:len(merged)]):
        if m is None or share == 0:
            continue
        index, mean, count, members = m
        if share >= index.numel():
            out.add(index, mean, count, members)
            continue
        means, weight, centres, cluster = cluster_means(mean, count, share)
        out.add(index[centres], means, weight, torch.stack([cluster[members[0]], members[1]]))
    for (t, positions), share in zip(dynamic, shares[len(merged):]):
        if share == 0:
            continue
        if share < positions.numel():
            closeness = frames[t][positions] @ F.normalize(x[groups[t]].mean(0), dim=-1)
            positions = positions[torch.sort(closeness, stable=True).indices[:share]]  # most distinct first
        out.keep(groups[t][positions])


def holitom_plan(num_layers: int, retention: float) -> ReductionPlan:
    """The reducer to `retention` and, inside the LLM, half of what is left merged away at the paper's depth."""
    if retention >= 1.0:
        return ReductionPlan()
    layer = max(1, min(num_layers - 1, round(HOLITOM_LAYER_FRACTION * num_layers)))
    return ReductionPlan(merge_retention=retention, reducer="holitom", prune_stages=((layer, INNER_KEEP),),
                         importance="last_token", merge_pruned=True)


REDUCER = Reducer("holitom", reduce=holitom_merge, kept=summed_targets, sized=True)
METHOD = Method("holitom", "global temporal merging of still patches and spatial merging before the LLM, then "
                "half the visual tokens merged into their nearest at 64% depth", holitom_plan,
                sweep=(0.5, 0.25, 0.125, 0.0625))


# ---- inside the LLM (a plan's merge_pruned, which the prefill applies at each pruning step) ----------------
def merge_into_kept(hidden: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor, key_bias: torch.Tensor | None,
                    budget: int = DEFAULT_SCORE_BUDGET
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """A plan's merge_pruned: every visual token not in `keep` is averaged into the kept visual token whose hidden
    state is most like its own (cosine). A kept token becomes the mean of itself and what it absorbs, weighted by how
    many input tokens each stands for (exp(key_bias); all 1 under plain attention), and under proportional
    attention its bias becomes the log of their total.
    hidden (1, n, d), visual (n,), keep (k,) ascending. Returns (rows of the changed tokens within `keep`, their
    new states, their new key bias or None), or None when nothing merges. Similarities are formed a block of
    dropped rows at a time, at most `budget` elements at once."""
    present = torch.zeros_like(visual)
    present[keep] = True
    dropped = torch.nonzero(visual & ~present).flatten()
    kept = torch.nonzero(visual & present).flatten()
    if dropped.numel() == 0 or kept.numel() == 0:
        return None
    size = torch.ones(visual.numel(), device=hidden.device) if key_bias is None else key_bias.float().exp()
    states, absorbed = hidden[0, kept].float(), hidden[0, dropped].float()
    keys = F.normalize(states, dim=-1)
    per_block = max(1, budget // kept.numel())
    nearest = torch.cat([torch.argmax(F.normalize(block, dim=-1) @ keys.T, dim=-1)
                         for block in absorbed.split(per_block)])
    total = (states * size[kept, None]).index_add_(0, nearest, absorbed * size[dropped, None])
    weight = size[kept].index_add_(0, nearest, size[dropped])
    return (torch.searchsorted(keep, kept), (total / weight[:, None]).to(hidden.dtype),
            None if key_bias is None else weight.log())
