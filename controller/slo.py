"""SLO classes: a bounded label for a request's latency SLO. The controller keeps one feedback loop per class (a
tenant's tight SLOs steer its own class's margin, not everyone's), and the service labels its latency metrics by
it."""

from __future__ import annotations

SLO_CLASS_BOUNDS_S = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
DEFAULT_CLASS = "default"  # requests that give no SLO (they are held to the server's default)


def slo_class(slo_s: float | None) -> str:
    """The smallest class bound that holds `slo_s` ("default" when the request gave none, "long" past the last)."""
    if slo_s is None:
        return DEFAULT_CLASS
    for bound in SLO_CLASS_BOUNDS_S:
        if slo_s <= bound:
            return f"{bound}s"
    return "long"
