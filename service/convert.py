"""aim.v1 messages <-> engine/runtime types. Protobuf types stop here."""

from __future__ import annotations

from aim_engine import GenerationRequest, SamplingParams
from aim_engine.request import ImagePart, TextPart, VideoPart
from aim_engine.errors import GenerationError, PlanError

from .plan_proto import plan_from_proto, plan_to_proto  # noqa: F401 - the service's converters, in one place
from .proto.aim.v1 import aim_service_pb2 as pb
from .types import AppliedPlan, Estimate, Finished, Reduction, ServiceError, auto_reduction

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "cancelled": pb.FINISH_REASON_CANCELLED}
_SOURCE = {"none": pb.PLAN_SOURCE_NONE, "explicit": pb.PLAN_SOURCE_EXPLICIT, "auto": pb.PLAN_SOURCE_AUTO}
_PRIORITY = {pb.PRIORITY_UNSPECIFIED: "normal", pb.PRIORITY_LOW: "low", pb.PRIORITY_NORMAL: "normal",
             pb.PRIORITY_HIGH: "high"}  # names: controller.policy.PRIORITIES


def request_from_proto(msg, default_max_new_tokens: int, max_new_tokens_limit: int
                       ) -> tuple[GenerationRequest, Reduction]:
    """GenerateRequest / GenerateStreamRequest / EstimateCostRequest -> engine request + reduction choice.
    Raises ServiceError(invalid_argument) with a precise message."""
    try:
        return _request(msg, default_max_new_tokens, max_new_tokens_limit), _reduction(msg.reduction)
    except (PlanError, GenerationError) as exc:
        raise ServiceError("invalid_argument", str(exc)) from None


def _request(msg, default_max_new_tokens: int, limit: int) -> GenerationRequest:
    return GenerationRequest(_parts(msg), _sampling(msg, default_max_new_tokens, limit), msg.system_prompt or None)


def _parts(msg) -> list:
    if not msg.parts:
        raise ServiceError("invalid_argument", "parts is empty: send at least one text part")
    parts = []
    for i, part in enumerate(msg.parts):
        kind = part.WhichOneof("content")
        if kind == "text":
            parts.append(TextPart(part.text))
        elif kind == "image":
            parts.append(ImagePart(data=part.image.data, mime_type=part.image.mime_type))
        elif kind == "video":
            parts.append(VideoPart(data=part.video.data, mime_type=part.video.mime_type,
                                   num_frames=part.video.num_frames))
        elif kind == "frames":
            if part.frames.fps < 0:
                raise ServiceError("invalid_argument", f"parts[{i}].frames.fps must be >= 0")
            parts.append(VideoPart(encoded_frames=[(f.data, f.mime_type) for f in part.frames.frames],
                                   fps=part.frames.fps or None))
        else:
            raise ServiceError("invalid_argument", f"parts[{i}] has no content")
    return parts


def _sampling(msg, default_max_new_tokens: int, limit: int) -> SamplingParams:
    s = msg.sampling
    max_new = s.max_new_tokens or default_max_new_tokens
    if max_new > limit:
        raise ServiceError("invalid_argument", f"sampling.max_new_tokens {max_new} exceeds the limit {limit}")
    return SamplingParams(max_new_tokens=max_new, temperature=s.temperature, top_p=s.top_p or 1.0,
                          seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop), ignore_eos=s.ignore_eos)


def _reduction(msg: pb.Reduction) -> Reduction:
    kind = msg.WhichOneof("choice")
    if kind is None:
        return Reduction("auto")
    if kind == "none":
        return Reduction("none")
    if kind == "plan":
        return Reduction("plan", plan=plan_from_proto(msg.plan))
    auto = msg.auto
    if auto.priority not in _PRIORITY:
        raise ServiceError("invalid_argument", f"unknown auto.priority value {auto.priority}; use one of "
                                               f"{', '.join(pb.Priority.keys())}")
    return auto_reduction(auto.latency_slo_ms, auto.min_retention, _PRIORITY[auto.priority], "auto.")


def applied_to_proto(applied: AppliedPlan) -> pb.AppliedPlan:
    return pb.AppliedPlan(plan=plan_to_proto(applied.plan), source=_SOURCE[applied.source], reason=applied.reason)


def response_to_proto(model: str, done: Finished) -> pb.GenerateResponse:
    r, s = done.result, done.result.stats
    t = s.timings
    return pb.GenerateResponse(
        model=model,
        text=r.text,
        finish_reason=_FINISH[r.finish_reason],
        usage=pb.Usage(prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                       visual_tokens_in=s.visual_tokens_in, visual_tokens_merged=s.visual_tokens_merged,
                       visual_tokens_per_layer=s.visual_tokens_per_layer, feature_cache_hits=s.feature_cache_hits,
                       feature_cache_misses=s.feature_cache_misses, prefix_tokens_reused=s.prefix_tokens_reused),
        cost=pb.Cost(baseline_prefill_flops=s.prefill_flops_baseline, prefill_flops=s.prefill_flops,
                     prefill_flops_reused=s.prefill_flops_reused,
                     saved_fraction=s.saved_fraction, vision_flops=s.vision_flops, decode_flops=s.decode_flops,
                     kv_cache_bytes=s.kv_cache_bytes),
        timings=pb.Timings(queue_seconds=done.queue_s, media_seconds=done.media_s, vision_seconds=t.vision_s,
                           prefill_seconds=t.prefill_s, time_to_first_token_seconds=t.ttft_s,
                           decode_seconds=t.decode_s, total_seconds=done.total_s,
                           vision_seconds_saved=s.vision_s_saved),
        applied_plan=applied_to_proto(done.applied),
    )


def estimate_to_proto(est: Estimate) -> pb.EstimateCostResponse:
    return pb.EstimateCostResponse(
        visual_tokens_in=est.visual_tokens_in, visual_tokens_merged=est.visual_tokens_merged,
        baseline_prefill_flops=est.prefill_flops_baseline, prefill_flops=est.prefill_flops,
        predicted_latency_seconds=est.predicted_s or 0.0, applied_plan=applied_to_proto(est.applied))
