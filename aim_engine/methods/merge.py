"""AIM (a): similarity merging of each frame / crop before the LLM (the algorithm lives in aim_engine.merging)."""

from __future__ import annotations

from ..merging import merge_groups
from .base import Reducer

REDUCER = Reducer("merge", reduce=merge_groups, kept=lambda sizes, target_for: sum(target_for(n) for n in sizes),
                  sized=True)
