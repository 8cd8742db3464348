from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Importance(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMPORTANCE_UNSPECIFIED: _ClassVar[Importance]
    IMPORTANCE_PAGERANK: _ClassVar[Importance]
    IMPORTANCE_TEXT: _ClassVar[Importance]
    IMPORTANCE_LAST_TOKEN: _ClassVar[Importance]

class Reducer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCER_UNSPECIFIED: _ClassVar[Reducer]
    REDUCER_MERGE: _ClassVar[Reducer]
    REDUCER_POOL: _ClassVar[Reducer]
    REDUCER_EVS: _ClassVar[Reducer]
    REDUCER_VIDCOM2: _ClassVar[Reducer]
    REDUCER_FASTVID: _ClassVar[Reducer]
    REDUCER_HOLITOM: _ClassVar[Reducer]

class PositionRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSITION_RULE_UNSPECIFIED: _ClassVar[PositionRule]
    POSITION_RULE_CONSECUTIVE: _ClassVar[PositionRule]
    POSITION_RULE_ORIGINAL: _ClassVar[PositionRule]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class PlanSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_SOURCE_UNSPECIFIED: _ClassVar[PlanSource]
    PLAN_SOURCE_NONE: _ClassVar[PlanSource]
    PLAN_SOURCE_EXPLICIT: _ClassVar[PlanSource]
    PLAN_SOURCE_AUTO: _ClassVar[PlanSource]
IMPORTANCE_UNSPECIFIED: Importance
IMPORTANCE_PAGERANK: Importance
IMPORTANCE_TEXT: Importance
IMPORTANCE_LAST_TOKEN: Importance
REDUCER_UNSPECIFIED: Reducer
REDUCER_MERGE: Reducer
REDUCER_POOL: Reducer
REDUCER_EVS: Reducer
REDUCER_VIDCOM2: Reducer
REDUCER_FASTVID: Reducer
REDUCER_HOLITOM: Reducer
POSITION_RULE_UNSPECIFIED: PositionRule
POSITION_RULE_CONSECUTIVE: PositionRule
POSITION_RULE_ORIGINAL: PositionRule
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_NORMAL: Priority
PRIORITY_HIGH: Priority
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
PLAN_SOURCE_UNSPECIFIED: PlanSource
PLAN_SOURCE_NONE: PlanSource
PLAN_SOURCE_EXPLICIT: PlanSource
PLAN_SOURCE_AUTO: PlanSource

class Image(_message.Message):
    __slots__ = ("data", "mime_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("data", "mime_type", "num_frames")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    num_frames: int
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., num_frames: _Optional[int] = ...) -> None: ...

class Frames(_message.Message):
    __slots__ = ("frames", "fps")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Image]
    fps: float
    def __init__(self, frames: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., fps: _Optional[float] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "image", "video", "frames")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: Image
    video: Video
    frames: Frames
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., video: _Optional[_Union[Video, _Mapping]] = ..., frames: _Optional[_Union[Frames, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class PruneStage(_message.Message):
    __slots__ = ("layer", "keep")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    layer: int
    keep: float
    def __init__(self, layer: _Optional[int] = ..., keep: _Optional[float] = ...) -> None: ...

class ReductionPlan(_message.Message):
    __slots__ = ("merge_tokens", "merge_retention", "prune_start", "prune_end", "importance", "positions", "proportional_attention", "reducer", "prune_stages", "merge_pruned")
    MERGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MERGE_RETENTION_FIELD_NUMBER: _ClassVar[int]
    PRUNE_START_FIELD_NUMBER: _ClassVar[int]
    PRUNE_END_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PROPORTIONAL_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    REDUCER_FIELD_NUMBER: _ClassVar[int]
    PRUNE_STAGES_FIELD_NUMBER: _ClassVar[int]
    MERGE_PRUNED_FIELD_NUMBER: _ClassVar[int]
    merge_tokens: int
    merge_retention: float
    prune_start: int
    prune_end: int
    importance: Importance
    positions: PositionRule
    proportional_attention: bool
    reducer: Reducer
    prune_stages: _containers.RepeatedCompositeFieldContainer[PruneStage]
    merge_pruned: bool
    def __init__(self, merge_tokens: _Optional[int] = ..., merge_retention: _Optional[float] = ..., prune_start: _Optional[int] = ..., prune_end: _Optional[int] = ..., importance: _Optional[_Union[Importance, str]] = ..., positions: _Optional[_Union[PositionRule, str]] = ..., proportional_attention: _Optional[bool] = ..., reducer: _Optional[_Union[Reducer, str]] = ..., prune_stages: _Optional[_Iterable[_Union[PruneStage, _Mapping]]] = ..., merge_pruned: _Optional[bool] = ...) -> None: ...

class AutoBudget(_message.Message):
    __slots__ = ("latency_slo_ms", "priority", "min_retention")
    LATENCY_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MIN_RETENTION_FIELD_NUMBER: _ClassVar[int]
    latency_slo_ms: int
    priority: Priority
    min_retention: float
    def __init__(self, latency_slo_ms: _Optional[int] = ..., priority: _Optional[_Union[Priority, str]] = ..., min_retention: _Optional[float] = ...) -> None: ...

class NoReduction(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Reduction(_message.Message):
    __slots__ = ("auto", "plan", "none")
    AUTO_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    auto: AutoBudget
    plan: ReductionPlan
    none: NoReduction
    def __init__(self, auto: _Optional[_Union[AutoBudget, _Mapping]] = ..., plan: _Optional[_Union[ReductionPlan, _Mapping]] = ..., none: _Optional[_Union[NoReduction, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "parts", "sampling", "reduction", "system_prompt")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    model: str
    parts: _containers.RepeatedCompositeFieldContainer[ContentPart]
    sampling: SamplingParams
    reduction: Reduction
    system_prompt: str
    def __init__(self, model: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, _Mapping]] = ..., system_prompt: _Optional[str] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("model", "parts", "sampling", "reduction", "system_prompt")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    model: str
    parts: _containers.RepeatedCompositeFieldContainer[ContentPart]
    sampling: SamplingParams
    reduction: Reduction
    system_prompt: str
    def __init__(self, model: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, _Mapping]] = ..., system_prompt: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "visual_tokens_in", "visual_tokens_merged", "visual_tokens_per_layer", "feature_cache_hits", "feature_cache_misses", "prefix_tokens_reused")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_IN_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_MERGED_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_REUSED_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    visual_tokens_in: int
    visual_tokens_merged: int
    visual_tokens_per_layer: _containers.RepeatedScalarFieldContainer[int]
    feature_cache_hits: int
    feature_cache_misses: int
    prefix_tokens_reused: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., visual_tokens_in: _Optional[int] = ..., visual_tokens_merged: _Optional[int] = ..., visual_tokens_per_layer: _Optional[_Iterable[int]] = ..., feature_cache_hits: _Optional[int] = ..., feature_cache_misses: _Optional[int] = ..., prefix_tokens_reused: _Optional[int] = ...) -> None: ...

class Cost(_message.Message):
    __slots__ = ("baseline_prefill_flops", "prefill_flops", "saved_fraction", "vision_flops", "decode_flops", "kv_cache_bytes", "prefill_flops_reused")
    BASELINE_PREFILL_FLOPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FLOPS_FIELD_NUMBER: _ClassVar[int]
    SAVED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    VISION_FLOPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FLOPS_REUSED_FIELD_NUMBER: _ClassVar[int]
    baseline_prefill_flops: float
    prefill_flops: float
    saved_fraction: float
    vision_flops: float
    decode_flops: float
    kv_cache_bytes: int
    prefill_flops_reused: float
    def __init__(self, baseline_prefill_flops: _Optional[float] = ..., prefill_flops: _Optional[float] = ..., saved_fraction: _Optional[float] = ..., vision_flops: _Optional[float] = ..., decode_flops: _Optional[float] = ..., kv_cache_bytes: _Optional[int] = ..., prefill_flops_reused: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "media_seconds", "vision_seconds", "prefill_seconds", "time_to_first_token_seconds", "decode_seconds", "total_seconds", "vision_seconds_saved")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEDIA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VISION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VISION_SECONDS_SAVED_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    media_seconds: float
    vision_seconds: float
    prefill_seconds: float
    time_to_first_token_seconds: float
    decode_seconds: float
    total_seconds: float
    vision_seconds_saved: float
    def __init__(self, queue_seconds: _Optional[float] = ..., media_seconds: _Optional[float] = ..., vision_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., time_to_first_token_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., vision_seconds_saved: _Optional[float] = ...) -> None: ...

class AppliedPlan(_message.Message):
    __slots__ = ("plan", "source", "reason")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    plan: ReductionPlan
    source: PlanSource
    reason: str
    def __init__(self, plan: _Optional[_Union[ReductionPlan, _Mapping]] = ..., source: _Optional[_Union[PlanSource, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "usage", "cost", "timings", "applied_plan", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_PLAN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    cost: Cost
    timings: Timings
    applied_plan: AppliedPlan
    model: str
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., applied_plan: _Optional[_Union[AppliedPlan, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("text_delta", "result")
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    text_delta: str
    result: GenerateResponse
    def __init__(self, text_delta: _Optional[str] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_media_bytes", "max_pixels", "max_frames", "max_new_tokens", "max_message_bytes")
    MAX_MEDIA_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_media_bytes: int
    max_pixels: int
    max_frames: int
    max_new_tokens: int
    max_message_bytes: int
    def __init__(self, max_media_bytes: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_frames: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model", "family", "num_layers", "hidden_size", "supports_video", "default_plan", "limits", "served_models")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_VIDEO_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PLAN_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    family: str
    num_layers: int
    hidden_size: int
    supports_video: bool
    default_plan: ReductionPlan
    limits: Limits
    served_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., family: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., supports_video: _Optional[bool] = ..., default_plan: _Optional[_Union[ReductionPlan, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., served_models: _Optional[_Iterable[str]] = ...) -> None: ...

class EstimateCostRequest(_message.Message):
    __slots__ = ("model", "parts", "sampling", "reduction", "system_prompt")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    model: str
    parts: _containers.RepeatedCompositeFieldContainer[ContentPart]
    sampling: SamplingParams
    reduction: Reduction
    system_prompt: str
    def __init__(self, model: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, _Mapping]] = ..., system_prompt: _Optional[str] = ...) -> None: ...

class EstimateCostResponse(_message.Message):
    __slots__ = ("visual_tokens_in", "visual_tokens_merged", "baseline_prefill_flops", "prefill_flops", "predicted_latency_seconds", "applied_plan")
    VISUAL_TOKENS_IN_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_MERGED_FIELD_NUMBER: _ClassVar[int]
    BASELINE_PREFILL_FLOPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FLOPS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_PLAN_FIELD_NUMBER: _ClassVar[int]
    visual_tokens_in: int
    visual_tokens_merged: int
    baseline_prefill_flops: float
    prefill_flops: float
    predicted_latency_seconds: float
    applied_plan: AppliedPlan
    def __init__(self, visual_tokens_in: _Optional[int] = ..., visual_tokens_merged: _Optional[int] = ..., baseline_prefill_flops: _Optional[float] = ..., prefill_flops: _Optional[float] = ..., predicted_latency_seconds: _Optional[float] = ..., applied_plan: _Optional[_Union[AppliedPlan, _Mapping]] = ...) -> None: ...
