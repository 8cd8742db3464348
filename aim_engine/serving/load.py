"""What the engine holds, as work still to do: for each sequence, its vision and LLM prefill still to run, its answer
so far, its KV and when its caller wants it. In the engine's own units (visual tokens, FLOPs, tokens, blocks);
whoever fits rates to them (the controller) turns them into seconds. Read without stopping the loop: a snapshot
taken between two of its steps or during one, which is what a prediction needs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..cost import CostEstimate
from ..feature_cache import CachedMedia
from ..request import ImagePart, Part, VideoPart
from .sequence import RUNNING, Sequence


@dataclass(frozen=True)
class SequenceLoad:
    admitted: bool  # in the running batch, its KV reserved
    vision_tokens: int  # visual tokens still to go through the tower (a cache hit goes through none)
    prefill_flops: float  # LLM prefill FLOPs still to run
    prefilled: bool  # its first token is out: it decodes
    generated: int  # tokens of its answer so far
    max_new_tokens: int
    ignore_eos: bool
    kv_blocks: int  # blocks it reserved (admitted) or must reserve
    due_in_s: float = math.inf  # seconds until its caller wants the answer (inf: no due time)
    prefill_share: float = 1.0  # share of its prefill's layers still to run (prefill_flops are theirs)
    context_tokens: float = 0.0  # KV tokens it holds for its next decode step, per layer: prompt (reduced) + answer
    # its submitter's forecast (Sequence.forecast): the seconds it predicted, and the seconds since (None: none made)
    forecast_s: float | None = None
    forecast_age_s: float = 0.0
    seq_id: int | None = None  # the sequence's (ServingLoop.extend_forecasts); None: not in the engine yet


@dataclass(frozen=True)
class EngineLoad:
    sequences: tuple[SequenceLoad, ...]  # running in admission order, then waiting in arrival order
    max_batch: int
    step_multiple: float | None  # the step budget (slices.StepBudget.multiple); None: unsliced
    free_kv_blocks: int  # what admission can still reserve: free and unpromised, or held only by evictable prefixes
    workspace_tokens: float = math.inf  # the decode attention's gather workspace, in keys per layer (decode_read)


def vision_tokens(parts: list[Part], estimate_media: list[tuple[list[int], int]]) -> list[int]:
    """Per media item, its visual tokens through the tower: none for an item the feature cache holds."""
    items = [p for p in parts if isinstance(p, (ImagePart, VideoPart, CachedMedia))]
    return [0 if isinstance(part, CachedMedia) else sum(groups) + loose
            for part, (groups, loose) in zip(items, estimate_media)]


def prompt_context(kv_tokens: list[int], max_new_tokens: int) -> float:
    """KV tokens per layer of a prompt whose reservation is `kv_tokens` (cost.kv_tokens: the prompt after merging
    and pruning plus max_new_tokens - 1 per layer), averaged over the layers."""
    return sum(kv_tokens) / max(1, len(kv_tokens)) - (max_new_tokens - 1)


def pending_load(request, estimate: CostEstimate, kv_tokens: list[int], kv_blocks: int,
                 due_in_s: float = math.inf) -> SequenceLoad:
    """A request not yet in the engine (an IngestedRequest) under the plan of `estimate`, which reserves
    `kv_tokens` per layer (cost.kv_tokens) in `kv_blocks`."""
    sampling = request.sampling
    context = prompt_context(kv_tokens, sampling.max_new_tokens)
    return SequenceLoad(False, sum(vision_tokens(request.parts, request.shape.media)), estimate.prefill_flops, False,
                        0, sampling.max_new_tokens, sampling.ignore_eos, kv_blocks, due_in_s, context_tokens=context)


def sequence_load(seq: Sequence, num_layers: int, kv_blocks: int, now: float) -> SequenceLoad:
    """A sequence in the engine, from its progress so far (`now` on time.monotonic, for its due time)."""
    request, work = seq.request, seq.work
    due = math.inf if seq.due is None else seq.due - now
    forecast = {} if seq.forecast is None else dict(forecast_s=seq.forecast[1], forecast_age_s=now - seq.forecast[0])
    forecast["seq_id"] = seq.seq_id
    sampling = request.sampling
    admitted = seq.status == RUNNING
    context = prompt_context(seq.kv_tokens, sampling.max_new_tokens) + len(seq.generated)
    if admitted and work is None:  # decoding
        return SequenceLoad(True, 0, 0.0, True, len(seq.generated), sampling.max_new_tokens, sampling.ignore_eos,
                            kv_blocks, due, context_tokens=context, **forecast)
    flops = seq.cost.prefill_flops if seq.cost is not None else 0.0
    share = 1.0
    tokens = sum(vision_tokens(request.parts, request.shape.media))
    if work is not None:
        tokens = 0
        for item, (encoded, item_tokens) in enumerate(zip(work.encoded, work.tokens)):
            if encoded is None and not isinstance(work.items[item], CachedMedia):
                frames = work.frames(item)
                done = work.next_frame.get(item, 0) / frames if frames else 0.0
                tokens += round(item_tokens * (1 - done))
        if work.run is not None:
            share = max(0, num_layers - work.run.layer) / num_layers
            flops *= share
    return SequenceLoad(admitted, tokens, flops, False, 0, sampling.max_new_tokens, sampling.ignore_eos, kv_blocks, due,
                        share, context, **forecast)
