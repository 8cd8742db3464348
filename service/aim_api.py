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
from .metrics import slo_class
from .proto.aim.v1 import aim_service_pb2 as pb
from .proto.aim.v1 import aim_service_pb2_grpc as pb_grpc
from .runtime import Finished, ModelRuntime, ServiceError, to_service_error

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


class ServingState:
    """The models and whether new requests are accepted (False while loading and draining)."""

    def __init__(self, settings, metrics):
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

    def in_flight(self) -> int:
        return sum(r.running + r.waiting for r in self.runtimes.values())


def deadline_of(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@asynccontextmanager
async def status_mapping(context, metrics, model: str, count: bool = True):
    """`model` is the metrics label (ServingState.model_label)."""
    """Maps exceptions to gRPC statuses and counts the outcome of a generation request."""
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
            metrics.requests.labels(model, outcome).inc()


class AimServicer(pb_grpc.AimServiceServicer):
    def __init__(self, state: ServingState):
        self.state = state
        self.settings = state.settings

    def _decode(self, request):
        return request_from_proto(request, self.settings.default_max_new_tokens, self.settings.max_new_tokens)

    def _observe(self, runtime: ModelRuntime, done: Finished, slo_s: float | None) -> None:
        m, s, name = self.state.metrics, done.result.stats, runtime.name
        m.latency.labels(name, slo_class(slo_s)).observe(done.total_s)
        m.ttft.labels(name).observe(s.timings.ttft_s)  # from the request's arrival
        m.prefill.labels(name).observe(s.timings.prefill_s)
        if s.completion_tokens > 1:
            m.tpot.labels(name).observe(s.timings.decode_s / (s.completion_tokens - 1))
        m.visual_in.labels(name).inc(s.visual_tokens_in)
        m.visual_merged.labels(name).inc(s.visual_tokens_merged)
        m.flops_baseline.labels(name).inc(s.prefill_flops_baseline)
        m.flops_actual.labels(name).inc(s.prefill_flops)
        if s.visual_tokens_in:
            m.retention.labels(name).observe(s.retention)
        m.plans.labels(name, done.applied.source).inc()

    async def Generate(self, request, context):
        async with status_mapping(context, self.state.metrics, self.state.model_label(request.model)):
            runtime = self.state.runtime(request.model)
            engine_request, reduction = self._decode(request)
            done = await runtime.generate(engine_request, reduction, deadline_of(context))
            self._observe(runtime, done, reduction.slo_s)
            return response_to_proto(runtime.name, done)

    async def GenerateStream(self, request, context):
        async with status_mapping(context, self.state.metrics, self.state.model_label(request.model)):
            runtime = self.state.runtime(request.model)
            engine_request, reduction = self._decode(request)
            async for event in runtime.stream(engine_request, reduction, deadline_of(context)):
                if isinstance(event, TokenDelta):
                    yield pb.GenerateStreamResponse(text_delta=event.text)
                else:
                    self._observe(runtime, event, reduction.slo_s)
                    yield pb.GenerateStreamResponse(result=response_to_proto(runtime.name, event))

    async def GetModelInfo(self, request, context):
        async with status_mapping(context, self.state.metrics, self.state.model_label(request.model), count=False):
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
        async with status_mapping(context, self.state.metrics, self.state.model_label(request.model), count=False):
            runtime = self.state.runtime(request.model)
            engine_request, reduction = self._decode(request)
            return estimate_to_proto(await runtime.estimate(engine_request, reduction))
