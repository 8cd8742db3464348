"""AIM (a): similarity merging of each frame / crop before the LLM (the algorithm lives in aim_engine.merging)."""

from __future__ import annotations

from ..merging import merge_groups
from .base import Reducer, summed_targets

REDUCER = Reducer("merge", reduce=merge_groups, kept=summed_targets, sized=True)
