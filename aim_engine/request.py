"""The request an engine serves and what it gives back: engine types, no torch tensors, no gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from PIL import Image

from .generation import SamplingParams
from .plan import ReductionPlan


# ---- the request -------------------------------------------------------------------------------
@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    """Encoded bytes with their MIME type, or an already decoded image."""

    data: bytes | None = None
    mime_type: str = ""
    image: Image.Image | None = None
    cache_key: object = None  # set when the engine decodes `data`: the feature cache's key for these bytes


@dataclass
class VideoPart:
    """A video as encoded bytes + MIME type + frames to sample; or as frames, already decoded (`frames`) or
    encoded images (`encoded_frames`: (bytes, MIME type) pairs). `fps` is frames per second of the source
    timeline (taken from the container when decoding bytes); models with a time axis in their positions
    (Qwen2.5-VL) use it, others ignore it."""

    data: bytes | None = None
    mime_type: str = ""
    num_frames: int = 8
    frames: list[Image.Image] | None = None
    fps: float | None = None
    encoded_frames: list[tuple[bytes, str]] | None = None
    cache_key: object = None  # set when the engine decodes `data` / `encoded_frames`: the feature cache's key


Part = Union[TextPart, ImagePart, VideoPart]


@dataclass
class GenerationRequest:
    parts: list[Part]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None


# ---- what comes back ---------------------------------------------------------------------------
@dataclass
class Timings:
    media_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0  # prompt assembly with merging, then the LLM prefill with pruning
    ttft_s: float = 0.0  # from the request's arrival (at the engine, or at the service) to its first token
    decode_s: float = 0.0
    total_s: float = 0.0


@dataclass
class RequestStats:
    prompt_tokens: int = 0  # LLM input tokens after merging
    completion_tokens: int = 0
    visual_tokens_in: int = 0
    visual_tokens_merged: int = 0
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    prefill_flops_baseline: float = 0.0
    prefill_flops: float = 0.0
    vision_flops: float = 0.0
    decode_flops: float = 0.0
    kv_cache_bytes: int = 0
    mean_batch: float = 1.0  # sequences per decode step, averaged over this request's decode steps
    feature_cache_hits: int = 0  # media items whose features came from the feature cache
    feature_cache_misses: int = 0  # media items computed and put in the cache
    vision_s_saved: float = 0.0  # what the hits' vision-tower passes took when they were computed
    prefix_tokens_reused: int = 0  # prompt tokens whose KV came from an earlier request (a reused prefix)
    timings: Timings = field(default_factory=Timings)

    @property
    def prefill_flops_saved(self) -> float:
        return self.prefill_flops_baseline - self.prefill_flops

    @property
    def saved_fraction(self) -> float:
        return self.prefill_flops_saved / self.prefill_flops_baseline if self.prefill_flops_baseline else 0.0

    @property
    def retention(self) -> float:
        """Visual tokens after merging over visual tokens in (1.0 with no visual input)."""
        return self.visual_tokens_merged / self.visual_tokens_in if self.visual_tokens_in else 1.0


@dataclass
class TokenDelta:
    text: str
    token_id: int


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (EOS or stop string) | "length" | "cancelled"
    token_ids: list[int]
    stats: RequestStats
    plan: ReductionPlan
