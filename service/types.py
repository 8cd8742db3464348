"""The service's own request and result types, shared by every wire (aim.v1 gRPC, the Open Inference Protocol,
the OpenAI-compatible HTTP API) and the runtime. No protobuf, no HTTP: each wire converts to and from these."""

from __future__ import annotations

from dataclasses import dataclass

from aim_engine import GenerationResult, ReductionPlan
from aim_engine.errors import EngineError, GenerationError, MediaError, PlanError
from controller.policy import PRIORITIES


class ServiceError(Exception):
    """A request that cannot be served; `status` is a gRPC status name in lower case. `too_large`: it failed
    because something it sent is over a size limit (a wire with a status of its own for that, HTTP's 413, uses
    it; gRPC keeps `status`). `param`: the request field at fault, where a wire reports it (OpenAI's `param`)."""

    def __init__(self, status: str, message: str, too_large: bool = False, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.too_large = too_large
        self.param = param


@dataclass(frozen=True)
class Reduction:
    """The request's choice: "auto" (with SLO/priority/floor), "plan" (explicit), or "none"."""

    kind: str = "auto"
    plan: ReductionPlan | None = None
    slo_s: float | None = None
    min_retention: float = 0.0
    priority: str = "normal"  # controller.policy.PRIORITIES


def auto_reduction(slo_ms: float | None, min_retention: float, priority: str, label: str,
                   param: str | None = None) -> Reduction:
    """An `auto` budget, checked the same way on every wire (`label` names the fields as the wire does, e.g.
    "aim_"): slo_ms >= 0 (0 or None: the server's default SLO), min_retention in [0, 1], priority one of
    controller.policy.PRIORITIES."""
    def bad(message: str) -> ServiceError:
        return ServiceError("invalid_argument", message, param=param)

    if slo_ms is not None and not slo_ms >= 0:
        raise bad(f"{label}slo_ms must be >= 0 ms (0 = the server's default), got {slo_ms}")
    if not 0.0 <= min_retention <= 1.0:
        raise bad(f"{label}min_retention must be in [0, 1], got {min_retention}")
    if priority not in PRIORITIES:
        raise bad(f"{label}priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return Reduction("auto", slo_s=slo_ms / 1000 if slo_ms else None, min_retention=min_retention, priority=priority)


@dataclass
class AppliedPlan:
    plan: ReductionPlan
    source: str  # "none" | "explicit" | "auto"
    reason: str
    predicted_s: float | None = None
    level: str | None = None  # an auto plan's ladder level
    # an auto plan whose decision expected no request next (Decision.expected): predicted_s is its finish on the work
    # the engine held, and the work that joins after it moves that forecast later (controller.in_flight_error)
    forecast_moves: bool = False


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
