"""Token-reduction methods behind one interface (base.py), one small file each: AIM's own (merge.py, aim.py) and
the peer baselines written from their papers (fastv.py, pdrop.py, evs.py, pooling.py, vidcom2.py,
fastvid.py, holitom.py). Chosen by name."""

from __future__ import annotations

from ..plan import PRE_LLM_METHODS
from . import aim, evs, fastv, fastvid, holitom, merge, pdrop, pooling, vidcom2
from .base import Method, Reducer


REDUCERS: dict[str, Reducer] = {r.name: r for r in (merge.REDUCER, pooling.REDUCER, evs.REDUCER, vidcom2.REDUCER,
                                                      fastvid.REDUCER, holitom.REDUCER)}
assert set(REDUCERS) == set(PRE_LLM_METHODS)

METHODS: dict[str, Method] = {m.name: m for m in (aim.METHOD, fastv.METHOD, pdrop.METHOD, evs.METHOD,
                                                   pooling.METHOD, vidcom2.METHOD, fastvid.METHOD, holitom.METHOD)}

__all__ = ["METHODS", "REDUCERS", "Method", "Reducer"]
