"""What the gRPC servicers share (aim.v1 and the Open Inference Protocol): the status of each ServiceError, the
call's deadline, and the one mapping of exceptions to statuses that also counts each request's outcome. Unexpected
failures are logged here and answered INTERNAL with an incident id, never a stack trace."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

import grpc

from .registry import ServedModels
from .types import ServiceError, to_service_error

log = logging.getLogger("aim.service")

STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "internal": grpc.StatusCode.INTERNAL,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "cancelled": grpc.StatusCode.CANCELLED,
}


def deadline_of(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@asynccontextmanager
async def status_mapping(context, models: ServedModels, model: str, count: bool = True):
    """Maps exceptions to gRPC statuses and counts the outcome of a generation request (`model`: the metrics
    label, ServedModels.model_label)."""
    outcome = "ok"
    try:
        yield
    except ServiceError as exc:
        outcome = exc.status
        await context.abort(STATUS[exc.status], str(exc))
    except grpc.aio.AbortError:
        raise
    except (asyncio.CancelledError, GeneratorExit):  # the client cancelled or went away
        outcome = "cancelled"
        raise
    except BaseException as exc:  # noqa: BLE001
        err = to_service_error(exc)
        outcome = err.status
        if err.status == "internal":
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error (incident %s)", incident)
            await context.abort(STATUS["internal"], f"internal error (incident {incident}); the server log has "
                                                    "the details")
        await context.abort(STATUS[err.status], str(err))
    finally:
        if count:
            models.count_outcome(model, outcome)
