"""y = c0 + c1 x1 + ... + ck xk by exponentially weighted least squares, no coefficient below zero.

The cost model's stage times are such sums of non-negative parts (a fixed cost, a cost per FLOP, per sequence,
per KV token read), so a negative coefficient is never the truth, only noise or a missing spread: a decode step
fitted as costing less than nothing when the batch is small made the what-if run away. The fit is exact
non-negative least squares: the optimum is the unconstrained least-squares fit on its own set of terms, so every
set of terms is solved (a model has 2 or 3, so at most 7 sets) and the best one with no negative coefficient wins.
Where the points cannot tell terms apart (no spread in an x yet, or two xs that moved together), equally good
fits tie; the one with fewer terms wins, then the one whose terms come first in `prefer`.

Only weighted sums are kept (the normal equations), so an update and a fit cost the same however many points were
seen; the newest point has weight 1 and every older one decays by (1 - smoothing) per point.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Sequence

SINGULAR = 1e-9  # a pivot of the scaled normal equations below this: the points cannot determine those terms
TIE = 1e-9  # fits whose squared error differs by less than this share of the total are equally good


@dataclass(frozen=True)
class LinearFit:
    size: int  # coefficients: the intercept (term 0) and one per x
    prefer: tuple[int, ...]  # terms, most preferred first, for fits the points cannot tell apart
    smoothing: float = 0.2
    weight: float = 0.0
    xx: tuple[float, ...] = field(default=())  # sum w x x^T, row-major, x = (1, x1, ..., xk)
    xy: tuple[float, ...] = field(default=())  # sum w x y
    yy: float = 0.0  # sum w y^2

    def add(self, xs: Sequence[float], y: float) -> "LinearFit":
        x = (1.0, *xs)
        if len(x) != self.size:
            raise ValueError(f"expected {self.size - 1} xs, got {len(xs)}")
        keep = 1 - self.smoothing
        xx = self.xx or (0.0,) * self.size ** 2
        xy = self.xy or (0.0,) * self.size
        return replace(self, weight=keep * self.weight + 1.0,
                       xx=tuple(keep * old + x[i // self.size] * x[i % self.size] for i, old in enumerate(xx)),
                       xy=tuple(keep * old + xi * y for old, xi in zip(xy, x)), yy=keep * self.yy + y * y)

    def coefficients(self) -> tuple[float, ...] | None:
        """(c0, ..., ck), each >= 0; None before any point. Solved once per fit (a fit is immutable), since the
        what-if reads it for every job of every decision and the engine's step budget at every step."""
        return self._solved

    @cached_property
    def _solved(self) -> tuple[float, ...] | None:
        if self.weight <= 0:
            return None
        fits = []
        for count in range(1, self.size + 1):
            for terms in itertools.combinations(range(self.size), count):
                solved = self._solve(terms)
                if solved is not None:
                    fits.append((self._error(terms, solved), count, sorted(self.prefer.index(t) for t in terms),
                                 terms, solved))
        if not fits:
            return (0.0,) * self.size
        best = min(f[0] for f in fits)
        tied = [f for f in fits if f[0] <= best + TIE * max(self.yy, 1e-300)]
        _, _, _, terms, solved = min(tied, key=lambda f: (f[1], f[2]))
        out = [0.0] * self.size
        for t, c in zip(terms, solved):
            out[t] = c
        return tuple(out)

    def _solve(self, terms: tuple[int, ...]) -> list[float] | None:
        """The least-squares coefficients of these terms alone; None if singular or any is negative."""
        n = self.size
        diag = [self.xx[t * n + t] for t in terms]
        if any(d <= 0 for d in diag):
            return None
        scale = [d ** 0.5 for d in diag]
        # the normal equations, scaled to a unit diagonal so that FLOPs (1e11) and batch sizes (1e1) compare
        a = [[self.xx[ti * n + tj] / (scale[i] * scale[j]) for j, tj in enumerate(terms)] + [self.xy[ti] / scale[i]]
             for i, ti in enumerate(terms)]
        m = len(terms)
        for col in range(m):
            pivot = max(range(col, m), key=lambda r: abs(a[r][col]))
            if abs(a[pivot][col]) < SINGULAR:
                return None
            a[col], a[pivot] = a[pivot], a[col]
            for r in range(m):
                if r != col:
                    f = a[r][col] / a[col][col]
                    a[r] = [v - f * p for v, p in zip(a[r], a[col])]
        coefficients = [a[i][m] / a[i][i] / scale[i] for i in range(m)]
        return None if any(c < 0 for c in coefficients) else coefficients

    def _error(self, terms: tuple[int, ...], c: list[float]) -> float:
        """Weighted squared error of these coefficients: yy - 2 c.xy + c^T XX c."""
        n = self.size
        cross = sum(ci * self.xy[t] for ci, t in zip(c, terms))
        quad = sum(ci * cj * self.xx[ti * n + tj] for ci, ti in zip(c, terms) for cj, tj in zip(c, terms))
        return max(0.0, self.yy - 2 * cross + quad)
