"""The service's own request and result types, shared by every wire (aim.v1 gRPC, the Open Inference Protocol,
the OpenAI-compatible HTTP API) and the runtime. No protobuf, no HTTP: each wire converts to and from these."""

from __future__ import annotations

from dataclasses import dataclass

from aim_engine import GenerationResult, ReductionPlan
from aim_engine.errors import EngineError, GenerationError, MediaError, PlanError


class ServiceError(Exception):
    """A request that cannot be served; `status` is a gRPC status name in lower case. `too_large`: it failed
    because something it sent is over a size limit (a wire with a status of its own for that, HTTP's 413, uses
    it; gRPC keeps `status`)."""

    def __init__(self, status: str, message: str, too_large: bool = False):
        super().__init__(message)
        self.status = status
        self.too_large = too_large


@dataclass(frozen=True)
class Reduction:
    """The request's choice: "auto" (with SLO/priority/floor), "plan" (explicit), or "none"."""

    kind: str = "auto"
    plan: ReductionPlan | None = None
    slo_s: float | None = None
    min_retention: float = 0.0
    priority: str = "normal"  # controller.policy.PRIORITIES


@dataclass
class AppliedPlan:
    plan: ReductionPlan
    source: str  # "none" | "explicit" | "auto"
    reason: str
    predicted_s: float | None = None


@dataclass
class Finished:
    """The last event of a stream."""

    result: GenerationResult
    applied: AppliedPlan
    queue_s: float
    media_s: float
    total_s: float


@dataclass
class Estimate:
    visual_tokens_in: int
    visual_tokens_merged: int
    prefill_flops_baseline: float
    prefill_flops: float
    predicted_s: float | None
    applied: AppliedPlan


def to_service_error(exc: BaseException) -> ServiceError:
    """Engine errors are the caller's fault: invalid_argument with the engine's message."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, (EngineError, PlanError, GenerationError)):
        return ServiceError("invalid_argument", str(exc),
                            too_large=isinstance(exc, MediaError) and exc.reason == MediaError.TOO_LARGE)
    return ServiceError("internal", "internal error; the server log has the details")
