"""The aim.v1.AimService servicer: decode, hand to the model runtime, encode. Errors become gRPC statuses with
a message the caller can act on; unexpected failures are logged here and answered INTERNAL without details."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

import grpc

from aim_engine import TokenDelta

from .convert import estimate_to_proto, plan_to_proto, request_from_proto, response_to_proto
from .proto.aim.v1 import aim_service_pb2 as pb
from .proto.aim.v1 import aim_service_pb2_grpc as pb_grpc
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


class AimServicer(pb_grpc.AimServiceServicer):
    def __init__(self, state: ServedModels):
        self.state = state
        self.settings = state.settings

    def _parse(self, request):
        return request_from_proto(request, self.settings.default_max_new_tokens, self.settings.max_new_tokens)

    async def Generate(self, request, context):
        async with status_mapping(context, self.state, self.state.model_label(request.model)):
            runtime = self.state.runtime(request.model)
            engine_request, reduction = self._parse(request)
            done = await runtime.generate(engine_request, reduction, deadline_of(context))
            return response_to_proto(runtime.name, done)

    async def GenerateStream(self, request, context):
        async with status_mapping(context, self.state, self.state.model_label(request.model)):
            runtime = self.state.runtime(request.model)
            engine_request, reduction = self._parse(request)
            async for event in runtime.stream(engine_request, reduction, deadline_of(context)):
                if isinstance(event, TokenDelta):
                    yield pb.GenerateStreamResponse(text_delta=event.text)
                else:
                    yield pb.GenerateStreamResponse(result=response_to_proto(runtime.name, event))

    async def GetModelInfo(self, request, context):
        async with status_mapping(context, self.state, self.state.model_label(request.model), count=False):
            runtime = self.state.runtime(request.model)
            engine, s = runtime.engine, self.settings
            return pb.GetModelInfoResponse(
                model=runtime.name, family=engine.adapter.family, num_layers=engine.num_layers,
                hidden_size=engine.shape.hidden, supports_video=engine.adapter.supports_video,
                default_plan=plan_to_proto(engine.default_plan()),
                limits=pb.Limits(max_media_bytes=s.max_media_bytes, max_pixels=s.max_pixels, max_frames=s.max_frames,
                                 max_new_tokens=s.max_new_tokens, max_message_bytes=s.max_message_bytes),
                served_models=list(self.state.runtimes))

    async def EstimateCost(self, request, context):
        async with status_mapping(context, self.state, self.state.model_label(request.model), count=False):
            runtime = self.state.runtime(request.model)
            engine_request, reduction = self._parse(request)
            return estimate_to_proto(await runtime.estimate(engine_request, reduction))
