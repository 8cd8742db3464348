"""The engine: a request and a ReductionPlan in, streamed tokens and per-request stats out.

    request ─ingest (prepare.py)─▶ IngestedRequest (media decoded, prompt tokenized, cost shape)
    ─serving loop (serving/)─▶ vision (vision.py), assembly (assembly.py), prefill with pruning (decoder.py) into
    the KV pool (kv_pool.py), then batched decode steps with every other running request ─▶ tokens

This file loads a model and builds the parts from one another, explicitly: the preparer, the KV pool, the caches,
the model runner, the scheduler and the loop (which owns the last two and imports nothing of this file).
`generate` / `stream` drive the loop inline, or wait for its thread when the service runs one.
"""

from __future__ import annotations

import json
import math
import queue
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from .adapters import adapter_for_config
from .adapters.base import FamilyAdapter
from .caches import Caches
from .cost import CostEstimate, RequestShape, cost, kv_tokens
from .decoder import ATTENTION_IMPL
from .errors import ModelLoadError, RequestError
from .feature_cache import FeatureCache, default_capacity_bytes
from .flops import LLMShape
from .media import MediaLimits
from .plan import PLAN_FILE, PlanError, ReductionPlan, plan_from_dict
from .prepare import IngestedRequest, PreparedPrompt, Preparer
from .request import GenerationRequest, GenerationResult, RequestStats, Timings, TokenDelta
from .kv_pool import KVPool
from .serving.prefix_cache import PrefixCache
from .serving.load import SequenceLoad, pending_load
from .serving.loop import ServingLoop
from .serving.model_runner import ModelRunner
from .serving.scheduler import Scheduler
from .serving.sequence import Sequence

# KV pool of a model on CPU when no budget is given. The pool is allocated untouched (torch.empty), so the
# budget costs memory only as sequences fill it.
DEFAULT_CPU_KV_BYTES = 2 * 2**30
# On CUDA without a budget: this share of the device memory free after loading, less room for activations.
CUDA_KV_FREE_SHARE = 0.85
CUDA_ACTIVATION_HEADROOM_BYTES = 2 * 2**30
DEFAULT_MAX_BATCH = 32
# Prompt tokens (after merging) prefilled per engine step, at least one sequence: bounds how long the running
# sequences wait for their next decode step while newcomers are prefilled. Small, so that a burst of arrivals is
# prefilled across steps with decode steps between them rather than all before the next one.
DEFAULT_PREFILL_TOKENS_PER_STEP = 1024


def default_kv_cache_bytes(device: torch.device) -> int:
    """--kv-cache-bytes when not given: a fixed budget on CPU; on CUDA from the memory free after loading."""
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(256 * 2**20, int(CUDA_KV_FREE_SHARE * free) - CUDA_ACTIVATION_HEADROOM_BYTES)


def read_default_plan(path: Path) -> ReductionPlan | None:
    """The default plan stored in a checkpoint directory (PLAN_FILE), or None if there is none."""
    file = Path(path) / PLAN_FILE
    if not file.is_file():
        return None
    try:
        return plan_from_dict(json.loads(file.read_text())["default_plan"])
    except (ValueError, KeyError, TypeError) as exc:  # PlanError and JSONDecodeError are ValueErrors
        raise ModelLoadError(f"{file} does not hold a valid default plan: {exc}") from None


class AimEngine:
    """One model: request preparation (media, vision, merging, prompt), cost, and the serving loop that runs
    many requests' prefills and batched decode steps over one KV pool.

    kv_cache_bytes: the KV pool's budget (None: `default_kv_cache_bytes`); max_batch: most sequences decoding
    together (1 serves one request at a time); feature_cache_bytes: the visual-feature cache's budget (0: no
    cache; None: `feature_cache.default_capacity_bytes`); prefix_cache_bytes: the most of the KV pool reused
    prefixes may hold (0: no reuse; None: a quarter of the pool; serving/prefix_cache.py)."""

    def __init__(self, adapter: FamilyAdapter, name: str = "model", limits: MediaLimits = MediaLimits(),
                 default_plan: ReductionPlan | None = None, kv_cache_bytes: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH,
                 prefill_tokens_per_step: int = DEFAULT_PREFILL_TOKENS_PER_STEP, feature_cache_bytes: int | None = 0,
                 prefix_cache_bytes: int | None = 0):
        self.adapter = adapter
        self.name = name
        self.limits = limits
        self.lm = adapter.language_model()
        self.shape = LLMShape.from_config(adapter.text_config)
        if self.shape.sliding_layers and (adapter.uses_mrope or not any(w is not None for w in self.lm.windows)):
            raise ModelLoadError(f"the {adapter.family} checkpoint has sliding-window layers, which its adapter does "
                                 "not run (only Gemma 3's are supported)")
        if default_plan is not None:
            try:
                default_plan.check_depth(self.shape.layers)
            except PlanError as exc:
                raise ModelLoadError(f"the checkpoint's default plan does not fit the model: {exc}") from None
        self._default_plan = default_plan
        self.tokenizer = adapter.tokenizer
        gen_cfg = getattr(adapter.model, "generation_config", None)
        eos = {self.tokenizer.eos_token_id}
        if gen_cfg is not None and gen_cfg.eos_token_id is not None:
            eos |= set(gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id])
        self.eos_ids = {e for e in eos if e is not None}
        if feature_cache_bytes is None:
            feature_cache_bytes = default_capacity_bytes(adapter.device)
        layout = self.lm.kv_layout(adapter.dtype)
        budget = kv_cache_bytes if kv_cache_bytes is not None else default_kv_cache_bytes(adapter.device)
        self.pool = KVPool(layout, budget, device=adapter.device)
        if prefix_cache_bytes is None:
            prefix_cache_bytes = self.pool.capacity_bytes // 4
        self.caches = Caches(FeatureCache(feature_cache_bytes) if feature_cache_bytes > 0 else None,
                             PrefixCache(self.pool, prefix_cache_bytes) if prefix_cache_bytes > 0 else None)
        self.preparer = Preparer(adapter, limits, self.num_layers, self.caches)
        runner = ModelRunner(adapter, self.lm, self.shape, self.preparer, self.pool, self.caches)
        self.loop = ServingLoop(Scheduler(self.pool, max_batch, prefill_tokens_per_step), runner, self.eos_ids)

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             limits: MediaLimits = MediaLimits(), kv_cache_bytes: int | None = None,
             max_batch: int = DEFAULT_MAX_BATCH,
             prefill_tokens_per_step: int = DEFAULT_PREFILL_TOKENS_PER_STEP,
             feature_cache_bytes: int | None = 0, prefix_cache_bytes: int | None = 0) -> "AimEngine":
        """Loads a checkpoint directory (never the hub): model, tokenizer, image processor, chat template."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        adapter_cls, model_cls = adapter_for_config(config)
        model = model_cls.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32,
                                          attn_implementation="sdpa").to(device).eval()
        model.config.text_config._attn_implementation = ATTENTION_IMPL
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        template = path / "chat_template.jinja"
        if template.is_file() and not tokenizer.chat_template:
            tokenizer.chat_template = template.read_text()
        return cls(adapter_cls(model, tokenizer, image_processor), name=path.name, limits=limits,
                   default_plan=read_default_plan(path), kv_cache_bytes=kv_cache_bytes, max_batch=max_batch,
                   prefill_tokens_per_step=prefill_tokens_per_step, feature_cache_bytes=feature_cache_bytes,
                   prefix_cache_bytes=prefix_cache_bytes)

    # ---- plan helpers ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.shape.layers

    def default_plan(self) -> ReductionPlan:
        """The checkpoint's own calibrated plan (PLAN_FILE) if it has one, else the paper's for this depth."""
        return self._default_plan or ReductionPlan.default_for_depth(self.num_layers)

    # ---- preparation and cost ----------------------------------------------------------------
    @property
    def feature_cache(self) -> FeatureCache | None:
        return self.caches.features

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.caches.prefixes

    def without_caches(self):
        """No feature or prefix cache for what runs inside (measuring what computing costs: the server's warm-up
        calibration). Only while nothing else is served."""
        return self.caches.off()

    def memory_pressure(self) -> float:
        """Share of this engine's memory in use, [0, 1]: the KV pool's reserved share or, on CUDA, the share of
        the device memory outside the pool that the allocator can no longer give (free on the device plus what
        it has cached but not allocated is still available), whichever is higher. Not NVML's "used", which
        stays high once the allocator has cached a large request's memory."""
        pool = self.pool
        held = pool.reserved_blocks - (self.prefix_cache.evictable_blocks() if self.prefix_cache else 0)
        kv = held / pool.num_blocks if pool.num_blocks else 1.0  # prefix entries nobody uses are free to evict
        device = torch.device(self.adapter.device)
        if device.type != "cuda":
            return kv
        free, total = torch.cuda.mem_get_info(device)
        cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        outside = total - pool.capacity_bytes
        used = 1.0 - (free + cached_unused) / outside if outside > 0 else 1.0
        return max(kv, min(1.0, max(0.0, used)))

    def decoded_need(self, request: GenerationRequest) -> int:
        """The bytes its decoded media will hold, from their headers (Preparer.decoded_need): reserve them first."""
        return self.preparer.decoded_need(request)

    def ingest(self, request: GenerationRequest, should_stop: Callable[[], bool] | None = None,
               reserve: Callable[[int], None] | None = None) -> IngestedRequest:
        """The request taken in once (Preparer.ingest: text checked, media decoded under the budgets,
        prompt tokenized), refused if its prompt and answer cannot fit the model's context."""
        decoded = self.preparer.ingest(request, should_stop, reserve)
        self.check_context(decoded.shape, request.sampling.max_new_tokens)
        return decoded

    def prepare(self, request: GenerationRequest, plan: ReductionPlan, timings: Timings | None = None
                ) -> PreparedPrompt:
        return self.preparer.prepare(request, plan, timings)

    def shape_of(self, request: GenerationRequest) -> RequestShape:
        """The request's token counts per media item and of its text; refuses a request whose prompt and answer
        cannot fit the model's context (every path to a cost or a sequence goes through ingest)."""
        return self.ingest(request).shape

    def cost(self, shape: RequestShape, plan: ReductionPlan) -> CostEstimate:
        return cost(self.shape, shape, plan)

    @property
    def context_length(self) -> int | None:
        return getattr(self.adapter.text_config, "max_position_embeddings", None)

    def check_context(self, shape: RequestShape, max_new_tokens: int) -> None:
        """The prompt before merging (the positions it spans under the `original` rule) plus the answer must fit
        the model's context."""
        limit = self.context_length
        need = shape.text_tokens + shape.visual_tokens_in + max_new_tokens
        if limit and need > limit:
            raise RequestError(
                f"the prompt is {shape.text_tokens} text + {shape.visual_tokens_in} visual tokens and asks for "
                f"up to {max_new_tokens} new ones ({need} positions); the model's context is {limit}: shorten the "
                "prompt, send fewer or smaller media, or ask for fewer tokens")

    def estimate(self, request: GenerationRequest, plan: ReductionPlan) -> CostEstimate:
        """Token counts and LLM prefill FLOPs of `request` under `plan`; its media are read (to know sizes and
        frame counts; an IngestedRequest has them already) but nothing is encoded. Raises the same errors as
        generate() for bad input."""
        plan.check_depth(self.num_layers)
        return self.cost(self.shape_of(request), plan)

    # ---- running --------------------------------------------------------------------------------
    def sequence(self, request: GenerationRequest, plan: ReductionPlan, emit: Callable[[object], None],
                 should_stop: Callable[[], bool] | None = None) -> Sequence:
        """A sequence for the serving loop, of an IngestedRequest (another request is taken in first). Raises the
        request's errors."""
        request = self.ingest(request)
        plan.check_depth(self.num_layers)
        estimate = self.cost(request.shape, plan)
        return Sequence(request=request, plan=plan, kv_tokens=kv_tokens(estimate, request.sampling.max_new_tokens),
                        prompt_tokens=estimate.text_tokens + estimate.visual_tokens_merged, emit=emit,
                        stats=RequestStats(), should_stop=should_stop, cost=estimate)

    def pending_load(self, request: IngestedRequest, plan: ReductionPlan, due_in_s: float = math.inf) -> SequenceLoad:
        """The work `request` would bring under `plan`, as `loop.load()` counts what the engine holds."""
        estimate = self.cost(request.shape, plan)
        reserved = kv_tokens(estimate, request.sampling.max_new_tokens)
        return pending_load(request, estimate, reserved, self.pool.blocks_for(reserved), due_in_s)

    def stream(self, request: GenerationRequest, plan: ReductionPlan | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[TokenDelta | GenerationResult]:
        """Yields TokenDelta as text becomes final, then one GenerationResult. The serving loop is driven on this
        thread (other requests in the loop advance with it), unless its own thread runs it: then this waits for
        that thread's steps. `should_stop` is polled between prefill layers and before every decode step; when it
        returns True generation ends with finish_reason 'cancelled'."""
        seq, events, media_s = self._taken_in(request, plan or ReductionPlan(), should_stop)
        self.loop.add(seq)
        try:
            yield from self._events(events, media_s)
        finally:
            self.loop.cancel(seq)  # a caller that stops iterating early frees the sequence's KV at once

    def generate(self, request: GenerationRequest, plan: ReductionPlan | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        for event in self.stream(request, plan, should_stop):
            if isinstance(event, GenerationResult):
                return event
        raise AssertionError("stream ended without a result")

    def generate_together(self, requests: list[tuple[GenerationRequest, ReductionPlan | None]]
                          ) -> list[GenerationResult]:
        """Several requests side by side, as the service runs requests that arrive together: all of them join the
        loop before its next step, so they prefill in turn and decode in one batch. Results in the order given."""
        pending: list[tuple[Sequence, queue.SimpleQueue, float]] = []
        try:
            for request, plan in requests:
                pending.append(self._taken_in(request, plan or ReductionPlan()))
            for seq, _, _ in pending:
                self.loop.add(seq)
            return [list(self._events(events, media_s))[-1] for _, events, media_s in pending]
        finally:
            for seq, _, _ in pending:
                self.loop.cancel(seq)

    def _taken_in(self, request: GenerationRequest, plan: ReductionPlan,
                  should_stop: Callable[[], bool] | None = None) -> tuple[Sequence, queue.SimpleQueue, float]:
        """A sequence of `request` for the loop (not added yet), the queue its events arrive on, and the seconds
        its media took to decode."""
        t0 = time.perf_counter()
        request = self.ingest(request)
        media_s = time.perf_counter() - t0
        events: queue.SimpleQueue = queue.SimpleQueue()
        seq = self.sequence(request, plan, events.put, should_stop)
        seq.arrival = t0
        return seq, events, media_s

    def _events(self, events: queue.SimpleQueue, media_s: float) -> Iterator[TokenDelta | GenerationResult]:
        """One sequence's events as they come, up to its result (its timings with the `media_s` its media took),
        driving the loop inline when no thread runs it; raises the sequence's error."""
        while True:
            if events.empty() and not self.loop.threaded:
                self.loop.step()
                continue
            event = events.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, GenerationResult):
                event.stats.timings.media_s += media_s
                yield event
                return
            yield event
