"""The served models, shared by every wire: which are loaded, whether new requests are accepted, and the one
count of every generation request's outcome."""

from __future__ import annotations

from .metrics import ServiceMetrics
from .runtime import ModelRuntime
from .types import ServiceError


class ServedModels:
    """The models by name (the first is the default) and whether new requests are accepted (False while loading
    and draining)."""

    def __init__(self, settings, metrics: ServiceMetrics):
        self.settings = settings
        self.metrics = metrics
        self.runtimes: dict[str, ModelRuntime] = {}
        self.accepting = False

    @property
    def default_model(self) -> str:
        return next(iter(self.runtimes))

    def runtime(self, name: str) -> ModelRuntime:
        if not self.accepting:
            raise ServiceError("unavailable", "the server is not serving (starting up or shutting down); retry "
                                              "another replica")
        name = name or self.default_model
        if name not in self.runtimes:
            raise ServiceError("not_found", f"unknown model {name!r}; served: {sorted(self.runtimes)}")
        return self.runtimes[name]

    def model_label(self, name: str) -> str:
        """The metrics label for a requested model name: bounded to the served names (and "unknown")."""
        if not name and self.runtimes:
            return self.default_model
        return name if name in self.runtimes else "unknown"

    def count_outcome(self, model_label: str, outcome: str) -> None:
        """A generation request's outcome ("ok" or a status name), whatever wire it came on."""
        self.metrics.requests.labels(model_label, outcome).inc()

    def in_flight(self) -> int:
        return sum(r.running + r.waiting for r in self.runtimes.values())
