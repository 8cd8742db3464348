"""KServe Open Inference Protocol v2 (inference.GRPCInferenceService) on the same models, so that
`tritonclient[grpc]` and other OIP clients work unchanged.

Inputs (BYTES tensors; raw_input_contents or contents.bytes_contents):
  text_input [1]  the prompt (UTF-8), required
  image      [N]  encoded images (PNG/JPEG/WebP/GIF), optional, placed before the prompt
  video      [1]  an encoded video (MP4/WebM/MKV/MOV/AVI), optional, placed before the prompt
Output: text_output [1] (BYTES). Knobs are request parameters named aim_* (see PARAMETERS); per-request stats come
back as response parameters aim_*. ModelStreamInfer (Triton) streams one response per text delta, then a final
response with parameter triton_final_response=true and the stats.
"""

from __future__ import annotations

import json
import struct

from aim_engine import GenerationRequest, ReductionPlan, SamplingParams, TokenDelta
from aim_engine.request import ImagePart, TextPart, VideoPart
from aim_engine.errors import GenerationError, PlanError
from aim_engine.mime import sniff_mime_type
from aim_engine.plan import PLAN_FIELDS, format_prune_stages, plan_from_values
from controller.policy import PRIORITIES

from .grpc_status import deadline_of, status_mapping
from .registry import ServedModels
from .proto.inference import grpc_service_pb2 as pb
from .proto.inference import grpc_service_pb2_grpc as pb_grpc
from .types import Finished, Reduction, ServiceError, auto_reduction, to_service_error

SERVER_NAME = "aim-serve"
PARAMETERS = {  # name: (type, meaning)
    "aim_max_new_tokens": (int, "tokens to generate"),
    "aim_temperature": (float, "0 = greedy"),
    "aim_top_p": (float, "nucleus mass (0, 1]"),
    "aim_seed": (int, "sampling seed"),
    "aim_stop": (str, "a stop string, or a JSON list of them"),
    "aim_ignore_eos": (bool, "generate exactly aim_max_new_tokens (benchmarks)"),
    "aim_system": (str, "system prompt"),
    "aim_num_frames": (int, "frames sampled from the video"),
    "aim_reduction": (str, "auto (default) | none | plan"),
    # an explicit plan: one parameter per ReductionPlan field, from the plan's own table (prune_stages as text)
    **{f"aim_{f.name}": (str if f.value_type is tuple else f.value_type, f"plan: {f.help}") for f in PLAN_FIELDS},
    "aim_slo_ms": (int, "auto: latency target"),
    "aim_min_retention": (float, "auto: quality floor"),
    "aim_priority": (str, f"auto: {' | '.join(PRIORITIES)} (the decision's safety margin)"),
}
# The request parameters of an explicit plan: each names one ReductionPlan field; absent = the field's default.
PLAN_PARAMETERS = {f"aim_{f.name}": f.name for f in PLAN_FIELDS}


def plan_from_parameters(params: dict) -> ReductionPlan:
    """The explicit plan of a request with aim_reduction=plan. Raises PlanError naming the bad parameter."""
    return plan_from_values({field: params[name] for name, field in PLAN_PARAMETERS.items() if name in params},
                            label="aim_")


def plan_to_parameters(plan: ReductionPlan) -> dict:
    """The request parameters that give `plan` (for OIP clients): the inverse of plan_from_parameters."""
    params = {"aim_reduction": "plan"}
    for name, field in PLAN_PARAMETERS.items():
        value = getattr(plan, field)
        if value is not None and value != ():
            params[name] = format_prune_stages(value) if field == "prune_stages" else value
    return params


def _param_value(p: pb.InferParameter):
    return getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None


def _bytes_elements(tensor, raw: bytes | None) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise ServiceError("invalid_argument", f"input {tensor.name!r} must be BYTES, got {tensor.datatype}")
    if raw is None:
        return list(tensor.contents.bytes_contents)
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ServiceError("invalid_argument", f"input {tensor.name!r}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4: i + 4 + n])
        if i + 4 + n > len(raw):
            raise ServiceError("invalid_argument", f"input {tensor.name!r}: truncated BYTES element")
        i += 4 + n
    return out


def _bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _parts(request: pb.ModelInferRequest, params: dict) -> list:
    """The request's BYTES inputs as content parts: its images, its video, then the prompt."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ServiceError("invalid_argument", "raw_input_contents must have one entry per input")
    tensors = {}
    for i, tensor in enumerate(request.inputs):
        tensors[tensor.name] = _bytes_elements(tensor, raw[i] if raw else None)
    unknown_inputs = set(tensors) - {"text_input", "image", "video"}
    if unknown_inputs:
        raise ServiceError("invalid_argument", f"unknown inputs {sorted(unknown_inputs)}; "
                                               "use text_input, image, video")
    if len(tensors.get("text_input", [])) != 1:
        raise ServiceError("invalid_argument", "text_input must hold exactly one prompt")
    parts = [ImagePart(data=d, mime_type=sniff_mime_type(d)) for d in tensors.get("image", [])]
    videos = tensors.get("video", [])
    if len(videos) > 1:
        raise ServiceError("invalid_argument", "at most one video per request")
    for data in videos:
        parts.append(VideoPart(data=data, mime_type=sniff_mime_type(data),
                               num_frames=params.get("aim_num_frames", 0)))
    try:
        prompt = tensors["text_input"][0].decode("utf-8")
    except UnicodeDecodeError:
        raise ServiceError("invalid_argument", "text_input is not valid UTF-8") from None
    parts.append(TextPart(prompt))
    return parts


def _stops(stop) -> tuple[str, ...]:
    """aim_stop: one stop string, or a JSON list of them."""
    if not stop:
        return ()
    if not stop.startswith("["):
        return (stop,)
    try:
        stops = json.loads(stop)
    except ValueError:
        stops = None
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ServiceError("invalid_argument", f"aim_stop {stop[:80]!r} is neither a stop string nor a JSON list of "
                                               'strings; send e.g. "END" or ["END", "\\n\\n"]')
    return tuple(stops)


def _reduction(params: dict) -> Reduction:
    kind = params.get("aim_reduction", "auto")
    if kind == "none":
        return Reduction("none")
    if kind == "plan":
        return Reduction("plan", plan=plan_from_parameters(params))
    if kind != "auto":
        raise ServiceError("invalid_argument", f"aim_reduction must be auto, none or plan, got {kind!r}")
    return auto_reduction(params.get("aim_slo_ms"), float(params.get("aim_min_retention", 0.0)),
                          params.get("aim_priority", "normal"), "aim_")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServedModels):
        self.state = state

    # ---- health and metadata ------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.accepting)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.state.accepting and request.name in self.state.runtimes)

    async def ServerMetadata(self, request, context):
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("aim-serve")
        except PackageNotFoundError:
            ver = "0"
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=ver, extensions=["parameters", "streaming"])

    async def ModelMetadata(self, request, context):
        async with status_mapping(context, self.state, self.state.model_label(request.name), count=False):
            runtime = self.state.runtime(request.name)
            t = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=runtime.name, versions=["1"], platform=f"aim-serve/{runtime.engine.adapter.family}",
                inputs=[t(name="text_input", datatype="BYTES", shape=[1]),
                        t(name="image", datatype="BYTES", shape=[-1]),
                        t(name="video", datatype="BYTES", shape=[1])],
                outputs=[t(name="text_output", datatype="BYTES", shape=[1])])

    # ---- inference ----------------------------------------------------------------------------
    def parse_request(self, request: pb.ModelInferRequest) -> tuple[GenerationRequest, Reduction]:
        params = {k: _param_value(v) for k, v in request.parameters.items()}
        unknown = [k for k in params if k.startswith("aim_") and k not in PARAMETERS]
        if unknown:
            raise ServiceError("invalid_argument", f"unknown parameters {unknown}; known: {sorted(PARAMETERS)}")
        for name, (kind, _) in PARAMETERS.items():
            if name in params and not isinstance(params[name], (kind, int) if kind is float else kind):
                raise ServiceError("invalid_argument", f"parameter {name} must be {kind.__name__}")
        parts = _parts(request, params)
        try:
            sampling = self._sampling(params)
            reduction = _reduction(params)
        except (PlanError, GenerationError) as exc:
            raise ServiceError("invalid_argument", str(exc)) from None
        return GenerationRequest(parts, sampling, params.get("aim_system")), reduction

    def _sampling(self, params: dict) -> SamplingParams:
        settings = self.state.settings
        stops = _stops(params.get("aim_stop"))
        max_new = params.get("aim_max_new_tokens", settings.default_max_new_tokens)
        if max_new > settings.max_new_tokens:
            raise ServiceError("invalid_argument", f"aim_max_new_tokens {max_new} exceeds the limit "
                                                   f"{settings.max_new_tokens}")
        return SamplingParams(max_new_tokens=max_new, temperature=float(params.get("aim_temperature", 0.0)),
                              top_p=float(params.get("aim_top_p", 1.0)), seed=params.get("aim_seed"),
                              stop=stops, ignore_eos=bool(params.get("aim_ignore_eos", False)))

    def _response(self, request, runtime_name: str, text: str, done: Finished | None, final: bool | None
                  ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=runtime_name, model_version="1", id=request.id)
        response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        response.raw_output_contents.append(_bytes_tensor([text.encode("utf-8")]))
        if final is not None:
            response.parameters["triton_final_response"].bool_param = final
        if done is not None:
            s = done.result.stats
            p = response.parameters
            p["aim_finish_reason"].string_param = done.result.finish_reason
            p["aim_plan"].string_param = done.applied.plan.describe()
            p["aim_plan_source"].string_param = done.applied.source
            p["aim_baseline_prefill_flops"].double_param = s.prefill_flops_baseline
            p["aim_prefill_flops"].double_param = s.prefill_flops
            p["aim_prefill_flops_reused"].double_param = s.prefill_flops_reused
            p["aim_saved_fraction"].double_param = s.saved_fraction
            p["aim_visual_tokens_in"].int64_param = s.visual_tokens_in
            p["aim_visual_tokens_merged"].int64_param = s.visual_tokens_merged
            p["aim_completion_tokens"].int64_param = s.completion_tokens
            p["aim_total_seconds"].double_param = done.total_s
        return response

    async def ModelInfer(self, request, context):
        async with status_mapping(context, self.state, self.state.model_label(request.model_name)):
            runtime = self.state.runtime(request.model_name)
            engine_request, reduction = self.parse_request(request)
            done = await runtime.generate(engine_request, reduction, deadline_of(context))
            return self._response(request, runtime.name, done.result.text, done, None)

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's decoupled streaming: per request, one response per text delta, then a final one. A failing
        request answers with error_message and the stream goes on."""
        async for request in request_iterator:
            try:
                runtime = self.state.runtime(request.model_name)
                engine_request, reduction = self.parse_request(request)
                async for event in runtime.stream(engine_request, reduction, deadline_of(context)):
                    if isinstance(event, TokenDelta):
                        yield pb.ModelStreamInferResponse(
                            infer_response=self._response(request, runtime.name, event.text, None, False))
                    else:
                        self.state.count_outcome(runtime.name, "ok")
                        yield pb.ModelStreamInferResponse(
                            infer_response=self._response(request, runtime.name, "", event, True))
            except Exception as exc:  # noqa: BLE001 - reported in-band, as Triton does
                err = to_service_error(exc)
                self.state.count_outcome(self.state.model_label(request.model_name), err.status)
                yield pb.ModelStreamInferResponse(error_message=f"{err.status}: {err}", infer_response=
                                                  pb.ModelInferResponse(model_name=request.model_name, id=request.id))

