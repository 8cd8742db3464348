"""A request's state while the engine serves it: from waiting, through its prefill, to its last token."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..generation import IncrementalText
from ..request import ImagePart, VideoPart
from ..plan import ReductionPlan
from ..kv_pool import SequenceKV

if TYPE_CHECKING:
    from ..assembly import PreparedPrompt
    from ..cost import CostEstimate
    from .slices import PrefillWork
    from ..request import GenerationRequest, RequestStats

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """`emit` receives, in order: TokenDelta events, then one GenerationResult or one exception. It is called
    on the thread that steps the engine and must not block.

    `kv_tokens[l]`: the most tokens the sequence can hold at layer l (its prompt after merging and the plan's
    pruning, plus `max_new_tokens - 1` generated tokens): the KV it reserves before its prefill."""

    request: "GenerationRequest"
    plan: ReductionPlan
    kv_tokens: list[int]
    prompt_tokens: int  # LLM input tokens after merging: what its prefill processes
    emit: Callable[[Any], None]
    stats: "RequestStats"
    should_stop: Callable[[], bool] | None = None
    on_media_encoded: Callable[[], None] | None = None  # called once its media's pixels are dropped (see below)
    cost: "CostEstimate | None" = None  # what its plan predicts it costs (serving/load.py reads its work left from it)
    due: float | None = None  # when its caller wants the answer, on time.monotonic (None: no due time)
    # a prediction its submitter made of its answer: (when it was made, on time.monotonic; seconds it predicted)
    forecast: tuple[float, float] | None = None
    forecast_moves: bool = False  # it counted on no other work: work joining later moves it (extend_forecasts)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: str = WAITING
    arrival: float = field(default_factory=time.perf_counter)
    # set at admission / prefill
    kv: SequenceKV | None = None
    work: "PrefillWork | None" = None  # its prefill, while it advances over steps (None once it decodes)
    prepared: "PreparedPrompt | None" = None
    generator: torch.Generator | None = None
    text: IncrementalText | None = None
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled and not yet fed back through the model
    started: float = 0.0  # prefill began
    first_token: float = 0.0
    decode_steps: int = 0
    batch_size_sum: int = 0  # over its decode steps: the sum of the batch sizes it ran in
    kv_attended_sum: float = 0.0  # over its decode steps: the KV tokens (per layer, padding included) they read
    logits: list[torch.Tensor] | None = None  # if a list: every step's logits (vocab,) fp32, appended on the host

    @property
    def sampling(self):
        return self.request.sampling

    def stop_requested(self) -> bool:
        return self.should_stop is not None and self.should_stop()

    def media_encoded(self) -> None:
        """Its media are through the vision tower: the prefill reads their features from here on, so their decoded
        pixels are dropped (a server holding memory for them can give it back: `on_media_encoded`, once)."""
        self.request = replace(self.request, parts=[_without_pixels(p) for p in self.request.parts])
        if self.work is not None:
            self.work.items = [_without_pixels(p) for p in self.work.items]
        hook, self.on_media_encoded = self.on_media_encoded, None
        if hook is not None:
            hook()

    @property
    def mean_batch(self) -> float:
        return self.batch_size_sum / self.decode_steps if self.decode_steps else 1.0

    @property
    def mean_kv_attended(self) -> float:
        return self.kv_attended_sum / self.decode_steps if self.decode_steps else 0.0


def _without_pixels(part):
    if isinstance(part, ImagePart) and part.image is not None:
        return replace(part, image=None, data=None)
    if isinstance(part, VideoPart) and part.frames is not None:
        return replace(part, frames=None, data=None, encoded_frames=None)
    return part
