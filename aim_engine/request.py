"""The request an engine serves and what it gives back: plain data (no tensors in them, no gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from PIL import Image

from .errors import RequestError
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


ROLES = ("user", "assistant")


@dataclass
class GenerationRequest:
    """`parts` in prompt order. `turns` splits them into the conversation's messages, in order, as (role, number
    of parts), role one of ROLES: earlier questions and answers before the one to answer, rendered through the
    model's chat template. Empty: the parts are one user message. The last message is the user's, and an
    assistant's holds text only."""

    parts: list[Part]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    turns: tuple[tuple[str, int], ...] = ()

    def messages(self) -> list[tuple[str, list[Part]]]:
        """(role, parts) per message, as `turns` splits the parts (RequestError if they do not)."""
        if not self.turns:
            return [("user", list(self.parts))]
        out, start = [], 0
        for i, (role, count) in enumerate(self.turns):
            if role not in ROLES:
                raise RequestError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
            if count < 0 or start + count > len(self.parts):
                raise RequestError(f"message {i} takes parts beyond the request's {len(self.parts)}")
            parts = list(self.parts[start:start + count])
            if role == "assistant" and any(not isinstance(p, TextPart) for p in parts):
                raise RequestError(f"message {i} is the assistant's: it may hold text only")
            out.append((role, parts))
            start += count
        if start != len(self.parts):
            raise RequestError(f"the messages hold {start} of the request's {len(self.parts)} parts")
        if out[-1][0] != "user":
            raise RequestError("the last message must be the user's: it is the one answered")
        return out


# ---- what comes back ---------------------------------------------------------------------------
@dataclass
class Timings:
    media_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0  # prompt assembly with merging, then the LLM prefill with pruning
    ttft_s: float = 0.0  # from the request's arrival (at the engine, or at the service) to its first token
    decode_s: float = 0.0  # from its first token to its last
    # the decode steps it took part in: decode_s less the other sequences' prefill slices run between them
    decode_steps_s: float = 0.0
    total_s: float = 0.0


@dataclass
class RequestStats:
    prompt_tokens: int = 0  # LLM input tokens after merging
    completion_tokens: int = 0
    decode_steps: int = 0  # decode steps it ran: one per token after the first, and one for an EOS that ended it
    visual_tokens_in: int = 0
    visual_tokens_merged: int = 0
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    prefill_flops_baseline: float = 0.0
    prefill_flops: float = 0.0  # spent: a reused prefix's share is not computed
    # what the reused prefix would have cost this prefill under its plan: the prefix cache's saving, not AIM's
    prefill_flops_reused: float = 0.0
    vision_flops: float = 0.0
    decode_flops: float = 0.0
    kv_cache_bytes: int = 0
    mean_batch: float = 1.0  # sequences per decode step, averaged over this request's decode steps
    mean_kv_attended: float = 0.0  # KV tokens (per layer, padding included) its decode steps read, averaged likewise
    feature_cache_hits: int = 0  # media items whose features came from the feature cache
    feature_cache_misses: int = 0  # media items computed and put in the cache
    vision_s_saved: float = 0.0  # what the hits' vision-tower passes took when they were computed
    prefix_tokens_reused: int = 0  # prompt tokens whose KV came from an earlier request (a reused prefix)
    timings: Timings = field(default_factory=Timings)

    @property
    def prefill_flops_saved(self) -> float:
        """AIM's saving: the baseline less what its plan costs (spent, plus what a reused prefix spared)."""
        return self.prefill_flops_baseline - self.prefill_flops - self.prefill_flops_reused

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
