"""Prefill work in slices, under a budget per engine step.

Each engine step decodes the running batch and, beside it, runs a bounded amount of prefill work, so that an
arrival never stalls the callers already streaming. The work of one admitted sequence comes in pieces, in order:
- vision: its media items through the tower, whole, or a video in slices of `adapter.video_slice_frames` frames
  where the family encodes them independently (vision.join_slices makes the whole video of them, exactly);
- the LLM prefill, a range of layers at a time (decoder.PrefillRun keeps its state between steps; a pruning
  decision sits at a layer boundary, so no slice splits one).

The budget is in predicted seconds, from the rates the controller fits (StageRates: seconds per visual token in
the tower, a prompt's LLM prefill as a line in its FLOPs, a decode step by its batch and the KV it reads), so it
means the same for a 1000-token unreduced prompt and a 180-token merged one: `StepBudget.multiple` times the
running batch's predicted decode step. A step then takes at most about (1 + multiple) decode steps, and a prefill
of P predicted seconds beside a running batch finishes in about P (1 + 1 / multiple). When nothing is decoding
there is nobody to stall, and the step runs the oldest prefill to its end whatever it costs, and nothing after it:
its answer then starts decoding at the next step, beside the next prefill's slices, instead of waiting at the end
of a step for every other admitted prompt's prefill (with short answers under load, a step of many prefills
answered its first prompt as late as its last).

`plan_step` chooses a step's pieces: sequences in admission order, each piece taken while its predicted cost fits
what is left; the first piece of a step always runs, in its smallest form (one video slice, one layer), so work
advances even when a rate is still unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..cost import RequestShape
from ..decoder import PrefillRun
from ..feature_cache import CachedMedia
from ..request import ImagePart, Part, VideoPart


@dataclass(frozen=True)
class StageRates:
    """Seconds per unit of each stage, as the controller fitted them (None: not observed yet).
    decode_step(batch, kv_tokens): seconds of a decode step of `batch` sequences attending over `kv_tokens` KV
    tokens per layer (the controller's own fit), or None."""

    vision_s_per_token: float | None = None
    prefill_s_per_flop: float | None = None
    prefill_s_fixed: float = 0.0  # seconds of a prompt's prefill whatever its FLOPs, spread evenly over its layers
    decode_step: Callable[[int, float], float | None] | None = None

    def decode_s(self, batch: int, kv_tokens: float = 0.0) -> float | None:
        return None if self.decode_step is None else self.decode_step(batch, kv_tokens)


@dataclass(frozen=True)
class StepBudget:
    """Prefill work per step beside the running batch's decode, as a multiple of its predicted decode step (0:
    one piece per step); None: unsliced (a step runs every admitted prefill whole)."""

    multiple: float | None

    def __post_init__(self):
        if self.multiple is not None and not (self.multiple >= 0 and math.isfinite(self.multiple)):
            raise ValueError(f"the step budget's multiple must be a finite number >= 0, got {self.multiple}")

    def seconds(self, rates: StageRates, decoding: int, kv_tokens: float = 0.0) -> float:
        """This step's budget in predicted seconds, with `decoding` sequences in the running batch attending over
        `kv_tokens` KV tokens (per layer)."""
        if self.multiple is None or decoding == 0:
            return math.inf
        step = rates.decode_s(decoding, kv_tokens)
        return 0.0 if step is None else self.multiple * step


def _media(part: Part) -> bool:
    return isinstance(part, (ImagePart, VideoPart, CachedMedia))


class PrefillWork:
    """One admitted sequence's prefill as it advances over steps: its media items (`encoded[i]` once through the
    tower; a sliced video's `slices[i]` so far), then its PrefillRun (`run`, once its prompt is assembled).
    `layer_tokens[l]`: the prompt tokens its plan predicts at layer l, for costs before the run exists.
    images_together: the family's images depend on each other (one piece holds all the request's images)."""

    def __init__(self, parts: list[Part], shape: RequestShape, layer_tokens: list[int], images_together: bool,
                 slice_frames: int | None):
        self.items = [p for p in parts if _media(p)]
        self.tokens = [sum(groups) + extra for groups, extra in shape.media]  # visual tokens in, per item
        self.layer_tokens = layer_tokens
        self.images_together = images_together
        self.slice_frames = slice_frames
        self.encoded: list = [None] * len(self.items)
        self.slices: dict[int, list] = {}
        self.next_frame: dict[int, int] = {}  # a sliced video: its first frame not yet encoded
        self.run: PrefillRun | None = None
        self.offer = None  # the prefix-cache key to offer its KV under once prefilled (it reused none)

    @property
    def vision_done(self) -> bool:
        return all(m is not None for m in self.encoded)

    def frames(self, item: int) -> int | None:
        """Frames of a video item that can be sliced (None: not sliceable)."""
        part = self.items[item]
        if self.slice_frames is None or not isinstance(part, VideoPart) or part.frames is None:
            return None
        return len(part.frames)

    def pending(self) -> list[tuple[int, ...]]:
        """Items still to encode, as the pieces they must go in (a family whose images depend on each other
        encodes all of a request's images in one)."""
        todo = [i for i, m in enumerate(self.encoded) if m is None]
        if not self.images_together:
            return [(i,) for i in todo]
        images = tuple(i for i in todo if isinstance(self.items[i], ImagePart))
        rest = [(i,) for i in todo if i not in images]
        return ([images] if images else []) + rest

    def layer_cost_tokens(self, layer: int) -> int:
        return self.run.tokens_at(layer) if self.run is not None else self.layer_tokens[layer]


@dataclass
class VisionPiece:
    """Items of one sequence to encode together, or a slice [start, end) of one video's frames."""

    items: tuple[int, ...]
    frames: tuple[int, int] | None = None


@dataclass
class StepPieces:
    """What one sequence runs this step: vision pieces, then `layers` layers of its prefill."""

    work: PrefillWork
    vision: list[VisionPiece] = field(default_factory=list)
    layers: int = 0


def plan_step(works: list[PrefillWork], budget_s: float, rates: StageRates, num_layers: int,
              layer_flops: Callable[[PrefillWork, int], float], first_only: bool = False) -> list[StepPieces]:
    """The pieces of this step, within `budget_s` predicted seconds (see the module's docstring). `works` in
    admission order; layer_flops(work, layer): the predicted FLOPs of that layer of its prefill. `first_only`: no
    piece after the first prefill this step completes (a step that nothing decodes in)."""
    left, started = budget_s, False
    plan: list[StepPieces] = []

    def seconds(units: float, rate: float | None) -> float:
        if units <= 0:
            return 0.0
        return math.inf if rate is None else units * rate

    def take(cost: float) -> bool:
        """Whether a piece of `cost` runs: it fits what is left, or it is the step's first."""
        nonlocal left, started
        if cost <= left or not started:
            left, started = (left if math.isinf(left) else left - cost), True  # an unbounded budget stays so
            return True
        return False

    for work in works:
        pieces = StepPieces(work)
        plan.append(pieces)
        for items in work.pending():
            start = work.next_frame.get(items[0], 0)
            frames = work.frames(items[0]) if len(items) == 1 else None
            per_frame = None if frames is None else work.tokens[items[0]] / frames
            remaining = sum(work.tokens[i] for i in items) if per_frame is None else per_frame * (frames - start)
            whole = seconds(remaining, rates.vision_s_per_token)
            if whole <= left or (per_frame is None and not started):  # it fits, or it cannot be cut and is first
                take(whole)
                pieces.vision.append(VisionPiece(items, None if start == 0 else (start, frames)))
                continue
            if per_frame is None:
                return plan
            step = work.slice_frames
            cost = seconds(per_frame * step, rates.vision_s_per_token)
            count = int(left // cost) if math.isfinite(cost) and cost > 0 and left > 0 else 0
            if count == 0 and not started:
                count = 1
            if count > 0:
                started = True
                left -= count * cost
                end = min(frames, start + count * step)
                pieces.vision.append(VisionPiece(items, (start, end)))
            return plan
        layer = work.run.layer if work.run is not None else 0
        fixed = rates.prefill_s_fixed / num_layers
        while layer < num_layers and take(seconds(layer_flops(work, layer), rates.prefill_s_per_flop) + fixed):
            pieces.layers += 1
            layer += 1
        if layer < num_layers or first_only:
            return plan
    return plan
