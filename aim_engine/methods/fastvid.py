"""FastVID (Shen et al., 2025), before the LLM: cut the clip into scenes, then in each scene keep salient tokens
as they are and merge the rest by density into spatio-temporal clusters. Written from the paper's description;
no code of it is used.

1. Dynamic segmentation. Adjacent frames are compared by the cosine similarity of their mean tokens; the clip is
   cut wherever it falls below SCENE_CUT_SIMILARITY, and at the MIN_SEGMENTS - 1 lowest similarities whatever
   their value, so a long shot is still split. Tokens never merge across a cut.
2. Per scene, its budget (the plan's per-frame targets over its frames, summed) is split: SALIENT_SHARE of it goes
   to salient tokens, each frame's most distinct from its scene (the paper ranks by the vision encoder's [CLS]
   attention, which the engine's adapters do not expose: distinctness from the scene's mean is the substitute).
3. The rest of the scene's tokens are clustered by density peaks (DPC-kNN): a token's density is
   exp(-(mean distance to its k nearest neighbours)^2); a peak is a token far from any denser one; the highest
   density x distance tokens are the centres, every other token joins its nearest centre, and a cluster becomes
   its members' mean, at its centre's position, standing for its size (proportional attention uses it).

A single image or frame is one scene of one frame. Survivors are in their original order.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..merging import MergeResult, Survivors
from .base import (Reducer, TargetFor, cluster_means, loose_tokens, passthrough, pre_llm_method,
                   summed_targets)

SCENE_CUT_SIMILARITY = 0.9
MIN_SEGMENTS = 2
SALIENT_SHARE = 0.3


def scene_cuts(frames: torch.Tensor) -> list[int]:
    """frames (T, d), one summary per frame -> the indices t where a new scene starts (0 first)."""
    if frames.shape[0] < 2:
        return [0]
    similarity = F.cosine_similarity(frames[1:], frames[:-1], dim=-1)  # (T-1,): frame t+1 against frame t
    cuts = set((torch.nonzero(similarity < SCENE_CUT_SIMILARITY).flatten() + 1).tolist())
    lowest = torch.sort(similarity, stable=True).indices[:MIN_SEGMENTS - 1] + 1
    cuts |= set(lowest.tolist())
    return [0, *sorted(cuts)]


def fastvid_merge(features: torch.Tensor, groups: Sequence[torch.Tensor], target_for: TargetFor) -> MergeResult:
    sizes = [g.numel() for g in groups]
    if summed_targets(sizes, target_for) >= sum(sizes):
        return passthrough(features)
    x = features.float()
    summaries = torch.stack([x[g].mean(0) for g in groups])
    cuts = scene_cuts(summaries) + [len(groups)]
    out = Survivors(features)
    for start, end in zip(cuts[:-1], cuts[1:]):
        scene = list(range(start, end))
        budget = sum(target_for(sizes[t]) for t in scene)
        members = torch.cat([groups[t] for t in scene])
        if budget >= members.numel():
            out.keep(members)
            continue
        salient_total = int(round(SALIENT_SHARE * budget))
        mean = F.normalize(x[members].mean(0), dim=-1)
        salient = []
        for t in scene:  # each frame's share of the salient budget, by its share of the scene's tokens
            share = round(salient_total * sizes[t] / members.numel())
            if share:
                closeness = F.normalize(x[groups[t]], dim=-1) @ mean
                salient.append(groups[t][torch.sort(closeness, stable=True).indices[:share]])
        salient = (torch.cat(salient) if salient else members[:0])[:budget - 1]  # at least one cluster
        rest = members[~torch.isin(members, salient)]
        merged, counts, centres, cluster = cluster_means(x[rest], torch.ones(rest.numel(), device=x.device),
                                                         budget - salient.numel())
        out.keep(salient)
        out.add(rest[centres], merged, counts, torch.stack([cluster, rest]))
    out.keep(loose_tokens(features, groups))
    return out.result()


REDUCER = Reducer("fastvid", reduce=fastvid_merge, kept=summed_targets, sized=True)
METHOD = pre_llm_method("fastvid", "fastvid", "scenes by frame similarity; per scene salient tokens kept and the rest "
                        "merged by density peaks, before the LLM", sweep=(0.5, 0.25, 0.125, 0.0625))
