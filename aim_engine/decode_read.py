"""What one layer's decode attention reads from the KV pool: the rule the gather attends by (kv_pool.PagedLayer), in
one place, so that the engine's accounting, its step budget and the controller's what-if count the same keys.

Without a paged kernel, a decode step gathers each layer's keys for its rows padded to the longest row: all rows
together while rows x the longest fit the workspace, else in groups by length (`pack`). So a step reads rows x
the longest of each group, not the sum of the rows' lengths: seven short answers beside one 32-frame prompt read
the prompt's length each. (On the reference model's mixed work, the padded count was 2.7-3.2x the sum at the
median step; docs/performance.md, "The decode step's KV term", has what each count predicts.) A paged kernel
reads the sum; where one is used, this rule is what changes.

Pure Python (no torch): the controller's what-if plays it over predicted jobs.
"""

from __future__ import annotations

import math
from typing import Sequence


def pack(lengths: Sequence[float], limit: float) -> list[list[int]] | None:
    """Rows (indices into `lengths`) grouped as one layer's gather attends them: None when all go together (their
    padded keys, rows x the longest, fit `limit` tokens, or there is one row); else by length, longest first,
    each group growing while its rows x its longest stay within the limit (a row longer than it alone), indices
    ascending within a group."""
    count = len(lengths)
    if count <= 1 or count * max(lengths) <= limit:
        return None
    order = sorted(range(count), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    groups, start = [], 0
    while start < count:
        widest, end = lengths[order[start]], start + 1
        while end < count and (end - start + 1) * widest <= limit:
            end += 1
        groups.append(sorted(order[start:end]))
        start = end
    return groups


def tokens_read(lengths: Sequence[float], limit: float = math.inf) -> float:
    """Keys one layer's decode attention reads for rows of these lengths, padding included: each group's rows x
    its longest (`pack`); 0 for no rows."""
    if not len(lengths):
        return 0.0
    groups = pack(lengths, limit)
    if groups is None:
        return float(len(lengths) * max(lengths))
    return float(sum(len(g) * max(lengths[i] for i in g) for g in groups))


__all__ = ["pack", "tokens_read"]
