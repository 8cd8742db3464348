"""The aim.v1.AimService servicer: decode, hand to the model runtime, encode. Errors become gRPC statuses with
a message the caller can act on; unexpected failures are logged here and answered INTERNAL without details."""

from __future__ import annotations

from aim_engine import TokenDelta

from .convert import estimate_to_proto, plan_to_proto, request_from_proto, response_to_proto
from .proto.aim.v1 import aim_service_pb2 as pb
from .proto.aim.v1 import aim_service_pb2_grpc as pb_grpc
from .grpc_status import deadline_of, status_mapping
from .registry import ServedModels

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
