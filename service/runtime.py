"""A served model, whatever wire its requests come on: admission (admission.py), media memory (media_memory.py),
the plan choice (plan_choice.py), the engine's serving loop streamed to asyncio, and the one `observe` of every
answer (metrics, caches, the controller).

No protobuf or HTTP here: requests come in as engine types plus a `Reduction` choice; errors leave as ServiceError
with a status name each wire maps. The event loop never runs model or media work: media are read on a small
executor (requests without media on one of their own; the memory for decoded media is waited for on the event
loop), the model runs on the engine's loop thread (one per model), which serves every admitted request together
(continuous batching: up to the engine's max_batch sequences decode in one step). A request whose KV need exceeds
the whole pool -> resource_exhausted. Auto plans (once its media are read): the controller plays what the engine
holds forward with the request at each ladder level (controller/whatif.py) and picks the highest level that keeps it
and every admitted request within its time; one that even its cheapest level cannot make is refused at once
(deadline_exceeded, or resource_exhausted), and the decision and the sequence's entry into the engine happen under
one lock. Every request in the engine carries its due time (min(arrival + SLO, deadline)), which later decisions
protect. Cancellation and deadlines stop a request
between prefill layers and at every decode step, and free its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import AsyncIterator

from aim_engine import AimEngine, GenerationRequest, GenerationResult, SamplingParams, StageRates, TokenDelta
from aim_engine.prepare import IngestedRequest
from aim_engine.request import ImagePart, RequestStats, VideoPart
from aim_engine.errors import Cancelled
from aim_engine.serving.scheduler import KVBudgetError
from controller.controller import BudgetController, ControllerConfig
from controller.cost_model import CostModel
from controller.policy import default_ladder
from controller.slo import slo_class

from . import allocator
from .admission import Admission
from .metrics import ServiceMetrics
from .media_memory import MediaMemory, RequestSlot
from .plan_choice import PlanChoice
from .settings import Settings
from .types import AppliedPlan, Estimate, Finished, Reduction, ServiceError
from .warmup import observation_of, warm_up

log = logging.getLogger("aim.service")

DEFAULT_MEDIA_MEMORY_BYTES = Settings.media_memory_bytes  # decoded media held by one model's requests
TEXT_WORKERS = 2  # threads per model taking in requests without media (tokenizing; milliseconds each)


class ModelRuntime:
    def __init__(self, name: str, engine: AimEngine, metrics: ServiceMetrics, max_queue: int = 16,
                 default_frames: int = 8, default_slo_s: float = 10.0, min_slo_s: float = Settings.min_slo_ms / 1000,
                 controller: BudgetController | None = None,
                 media_workers: int = 2, media_memory_bytes: int = DEFAULT_MEDIA_MEMORY_BYTES):
        self.name = name
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.default_frames = default_frames
        self.default_slo_s = default_slo_s
        self.min_slo_s = min_slo_s
        self.controller = controller or BudgetController(default_ladder(engine.num_layers, engine.default_plan()),
                                                         ControllerConfig(slo_s=default_slo_s),
                                                         memory=engine.memory_pressure)
        self.plans = PlanChoice(name, engine, self.controller, metrics, default_slo_s)
        self._media_executor = ThreadPoolExecutor(media_workers, thread_name_prefix=f"aim-{name}-media")
        # requests without media (their text tokenized, their plan chosen) never queue behind a video's decode
        self._text_executor = ThreadPoolExecutor(TEXT_WORKERS, thread_name_prefix=f"aim-{name}-text")
        self._admitting = threading.Lock()  # one plan decision and its sequence's entry into the engine at a time
        self.media_memory = MediaMemory(max(media_memory_bytes, engine.preparer.limits.max_decoded_bytes))
        self._cache_counts_seen: dict = {}  # (cache stats, field) -> the count already added to its metric
        self.loop = engine.loop  # its limits are the engine's (server.load_models sets the settings' once)
        self.admission = Admission(name, self.loop, max_queue)
        metrics.model_loaded(name)
        metrics.watch_controller(name, self.controller)
        metrics.watch_engine(name, self)
        batch_size = metrics.batch_size.labels(name)
        self.loop.on_decode_step = lambda step: batch_size.observe(step.sequences)
        self.loop.start(name=f"aim-{name}-loop")

    @property
    def ladder(self):
        return self.controller.ladder

    @property
    def max_batch(self) -> int:
        return self.loop.max_batch

    # ---- load signals (the admission's) ---------------------------------------------------------
    @property
    def running(self) -> int:
        return self.admission.running

    @property
    def waiting(self) -> int:
        return self.admission.waiting

    # ---- generation ---------------------------------------------------------------------------
    async def stream(self, request: GenerationRequest, reduction: Reduction, deadline: float | None = None
                     ) -> AsyncIterator[TokenDelta | Finished]:
        """Yields TokenDelta events and one Finished. `deadline` is on time.monotonic(). Every way it ends —
        answered, cut off by its deadline, rejected, cancelled by the client — reaches the controller."""
        arrival = time.monotonic()
        self._check_slo(reduction)
        try:
            self.admission.admit(deadline, arrival)
        except ServiceError as exc:
            self._record_outcome(exc.status, arrival, reduction, deadline)
            raise
        slot = RequestSlot(deadline=deadline)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def push(item) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        self.admission.in_system += 1
        answered = False
        try:
            started = time.perf_counter()
            request = self._with_default_frames(request)
            media_start = time.monotonic()
            executor = await self._media_reserved(request, slot)
            seq, applied, media_s = await loop.run_in_executor(
                executor, self._submit, request, reduction, slot, arrival, started, media_start, push)
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, GenerationResult):
                    finished = self._finished(item, seq, applied, slot, media_s, started, reduction.slo_s)
                    answered = True
                    yield finished
                    return
                yield item
        except ServiceError as exc:
            self._record_outcome(exc.status, arrival, reduction, deadline)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if not answered:  # the client went away, or gRPC ended the call at its deadline
                late = deadline is not None and time.monotonic() >= deadline
                self._record_outcome("deadline_exceeded" if late else "cancelled", arrival, reduction, deadline)
            raise
        finally:
            slot.stop.set()  # client gone, cancelled, or done: the loop drops it at its next step boundary
            self.admission.in_system -= 1
            self.media_memory.release(slot.close())
            allocator.release_free_memory(idle=self.admission.in_system == 0)

    async def generate(self, request: GenerationRequest, reduction: Reduction, deadline: float | None = None
                       ) -> Finished:
        """The whole answer: `stream` run to its end (closed before returning, so the request has left the
        system when the caller sees its answer)."""
        async with contextlib.aclosing(self.stream(request, reduction, deadline)) as events:
            async for event in events:
                if isinstance(event, Finished):
                    return event
        raise RuntimeError("generation ended without a result")

    def _submit(self, request: GenerationRequest, reduction: Reduction, slot: RequestSlot, arrival: float,
                started: float, media_start: float, push):
        """On an executor: decode media, choose the plan, hand the sequence to the engine's loop. Its media time runs
        from `media_start`, waiting for media memory included: what comes before the plan's decision."""
        decoded = self._ingest(request, slot)
        media_s = time.monotonic() - media_start
        if slot.should_stop():
            raise self._stopped(slot, "while the request's media were decoded")
        with self._admitting:  # the decision sees what the engine holds: no other may join between it and `add`
            applied = self.plans.choose(decoded, reduction, slot.deadline, arrival)
            seq = self.engine.sequence(decoded, applied.plan, push, slot.should_stop)
            seq.on_media_encoded = lambda: self.media_memory.release(slot.release_media())  # on the engine's thread
            seq.arrival = started
            due = arrival + (reduction.slo_s or self.default_slo_s)  # the time every admitted request is kept to
            seq.due = due if slot.deadline is None else min(due, slot.deadline)
            if applied.source == "auto" and applied.predicted_s is not None:  # decided now, from what it sees now
                seq.forecast = (time.monotonic(), applied.predicted_s)
                seq.forecast_moves = applied.forecast_moves
            try:
                self.loop.add(seq)
            except KVBudgetError as exc:
                raise ServiceError("resource_exhausted", str(exc)) from None
        return seq, applied, media_s

    def _check_slo(self, reduction: Reduction) -> None:
        """An SLO below the server's minimum is bad input, whatever the wire (it is no outcome: nothing counts it)."""
        if reduction.slo_s is not None and reduction.slo_s < self.min_slo_s:
            raise ServiceError("invalid_argument",
                               f"the latency SLO of {reduction.slo_s * 1000:g} ms is below this server's minimum of "
                               f"{self.min_slo_s * 1000:g} ms; ask for at least that (or none: the default "
                               f"{self.default_slo_s * 1000:g} ms)")

    @staticmethod
    def _stopped(slot: RequestSlot, when: str) -> ServiceError:
        if slot.stop.is_set():
            return ServiceError("cancelled", f"the request was cancelled {when}")
        return ServiceError("deadline_exceeded", f"the deadline passed {when}; allow more time")

    def _finished(self, result: GenerationResult, seq, applied: AppliedPlan, slot: RequestSlot, media_s: float,
                  started: float, slo_s: float | None) -> Finished:
        total_s = time.perf_counter() - started
        queue_s = max(0.0, seq.started - started - media_s) if seq.started else total_s
        # media, prefill and decode: what a queued request waits for
        self.admission.service_times.append(total_s - queue_s)
        if result.finish_reason == "cancelled" and not slot.stop.is_set():
            # stopped by its own deadline, not by the client: the RPC fails as such instead of answering a part
            raise ServiceError("deadline_exceeded", f"the deadline passed after {len(result.token_ids)} "
                                                    "generated tokens; allow more time or ask for fewer tokens")
        done = Finished(result=result, applied=applied, queue_s=queue_s, media_s=media_s, total_s=total_s)
        self.observe(done, seq.sampling, slo_s, seq.forecast[1] if seq.forecast is not None else None)
        return done

    def _with_default_frames(self, request: GenerationRequest) -> GenerationRequest:
        if not any(isinstance(p, VideoPart) and not p.num_frames for p in request.parts):
            return request
        return replace(request, parts=[replace(p, num_frames=p.num_frames or self.default_frames)
                                       if isinstance(p, VideoPart) else p for p in request.parts])

    async def _media_reserved(self, request: GenerationRequest, slot: RequestSlot) -> ThreadPoolExecutor:
        """The executor the request is taken in on, once the memory its decoded media need is reserved. A request
        without media goes to the text executor and never waits for a media worker. One with media has its need
        read from the headers on a media worker, then waits for that memory here, on the event loop: all of it at
        once, holding none meanwhile (so no two requests wait on each other) and no worker (so text requests,
        estimates and requests that fit are served meanwhile, and a request without a deadline holds no thread
        while it waits)."""
        if not any(isinstance(p, (ImagePart, VideoPart)) for p in request.parts):
            return self._text_executor
        loop = asyncio.get_running_loop()
        try:
            need = await loop.run_in_executor(self._media_executor, self.engine.decoded_need, request)
            await self.media_memory.acquire(need, slot.should_stop)
        except Cancelled:
            raise self._stopped(slot, "while the request waited for media memory") from None
        if not slot.hold_media(need):  # it ended (client gone) as the memory came
            self.media_memory.release(need)
            raise self._stopped(slot, "while the request waited for media memory")
        return self._media_executor

    def _ingest(self, request: GenerationRequest, slot: RequestSlot) -> IngestedRequest:
        """Decodes the request's media into the memory reserved for them (`_media_reserved`), then gives back
        what it did not take: a cached item holds no pixels."""
        try:
            decoded = self.engine.ingest(request, slot.should_stop)
        except Cancelled:
            raise self._stopped(slot, "while the request's media were decoded") from None
        self.media_memory.release(slot.release_media(keep=decoded.pixel_bytes()))
        return decoded

    def observe(self, done: Finished, sampling: SamplingParams, slo_s: float | None,
                forecast_s: float | None = None) -> None:
        """An answered request, whatever wire it came on: its metrics, the caches' counters, the controller's
        observation and the SLO-violation counter, all here once. `forecast_s`: its decision's forecast
        (Sequence.forecast: moved later by the work that joined after it, where the decision expected nobody)."""
        m, s, name = self.metrics, done.result.stats, self.name
        t = s.timings
        m.queue_wait.labels(name).observe(done.queue_s)
        m.latency.labels(name, slo_class(slo_s)).observe(done.total_s)
        m.ttft.labels(name).observe(t.ttft_s)  # from the request's arrival
        m.prefill.labels(name).observe(t.prefill_s)
        if s.completion_tokens > 1:
            m.tpot.labels(name).observe(t.decode_s / (s.completion_tokens - 1))
        m.visual_in.labels(name).inc(s.visual_tokens_in)
        m.visual_merged.labels(name).inc(s.visual_tokens_merged)
        m.flops_baseline.labels(name).inc(s.prefill_flops_baseline)
        m.flops_actual.labels(name).inc(s.prefill_flops)
        m.flops_reused.labels(name).inc(s.prefill_flops_reused)
        if s.visual_tokens_in:
            m.retention.labels(name).observe(s.retention)
        m.plans.labels(name, done.applied.source).inc()
        self._record_caches(s)
        applied, media_s, total_s = done.applied, done.media_s, done.total_s
        controlled = applied.source == "auto"
        # its forecast spans its decision (media decoded) to its answer
        ratio = (total_s - media_s) / forecast_s if controlled and forecast_s else None
        self.controller.observe(total_s, observation_of(s, media_s, sampling), slo_s=slo_s, controlled=controlled,
                                prediction_ratio=ratio)
        self.share_rates()
        if ratio is not None:
            m.prediction_ratio.labels(name, applied.level).observe(ratio)
        self._against_slo(total_s, slo_s, controlled)

    def _against_slo(self, latency_s: float, slo_s: float | None, controlled: bool, failed: bool = False) -> None:
        """A request's latency against its SLO, in the metrics, as the controller's window counts it: the ratio
        histogram (controlled requests, as the window holds) and the violation counter (every request; one that
        `failed` for time or load is a miss whatever its latency)."""
        ratio = latency_s / (slo_s or self.default_slo_s)
        if controlled:
            self.metrics.slo_ratio.labels(self.name, slo_class(slo_s)).observe(ratio)
        if ratio >= 1.0 or failed:  # a rejected request counts at its SLO exactly: a miss
            self.metrics.slo_violations.labels(self.name, slo_class(slo_s)).inc()

    def _record_caches(self, stats: RequestStats) -> None:
        """The caches' counters. The feature cache's hits and misses are the request's own; the rest the caches
        count themselves (evictions happen between requests), and the metrics follow their counts."""
        m, name = self.metrics, self.name
        m.feature_cache_hits.labels(name).inc(stats.feature_cache_hits)
        m.feature_cache_misses.labels(name).inc(stats.feature_cache_misses)
        m.feature_cache_saved.labels(name).inc(stats.vision_s_saved)
        followed = []
        if self.engine.feature_cache is not None:
            followed.append((m.feature_cache_evictions, self.engine.feature_cache.stats, "evictions"))
        if self.engine.prefix_cache is not None:
            counts = self.engine.prefix_cache.stats
            followed += [(m.prefix_cache_hits, counts, "hits"), (m.prefix_cache_misses, counts, "misses"),
                         (m.prefix_cache_evictions, counts, "evictions"),
                         (m.prefix_cache_tokens, counts, "tokens_reused")]
        for metric, counts, field_name in followed:
            now = getattr(counts, field_name)
            seen = self._cache_counts_seen.get((id(counts), field_name), 0)
            metric.labels(name).inc(now - seen)
            self._cache_counts_seen[(id(counts), field_name)] = now

    def _record_outcome(self, status: str, arrival: float, reduction: Reduction, deadline: float | None) -> None:
        """A request that ended without an answer, in the controller's window and the SLO-violation counter:
        cut off by its deadline (its latency: the deadline), rejected for load (its SLO: a miss), cancelled by
        its client (the time it ran; a miss only if that was already over its SLO). Bad input is no outcome."""
        slo_s = reduction.slo_s or self.default_slo_s
        elapsed = time.monotonic() - arrival
        if status == "deadline_exceeded":
            latency = max(elapsed, deadline - arrival) if deadline is not None else elapsed
        elif status == "resource_exhausted":
            latency = max(elapsed, slo_s)
        elif status == "cancelled":
            latency = elapsed
        else:
            return
        controlled = reduction.kind == "auto"
        self.controller.observe_outcome(latency, reduction.slo_s, controlled=controlled)
        self._against_slo(latency, reduction.slo_s, controlled, failed=status != "cancelled")

    def calibrate(self, rounds: int = 1) -> None:
        """Warm-up before the first real request (service/warmup.py); not counted as traffic."""
        self.admission.service_times.extend(warm_up(self.engine, self.controller, rounds))
        self.share_rates()

    def share_rates(self) -> None:
        """The cost model's fitted rates to the engine loop, which predicts its step budget with them: one set of
        rates for the controller's predictions and the engine's slices."""
        self.loop.rates = stage_rates(self.controller.cost_model)

    # ---- estimates ----------------------------------------------------------------------------
    async def estimate(self, request: GenerationRequest, reduction: Reduction) -> Estimate:
        """Decodes the media to know their sizes, so it goes through the same admission and media memory as a
        generation; it changes nothing in the controller."""
        self._check_slo(reduction)
        self.admission.admit(None, time.monotonic())
        slot = RequestSlot()
        self.admission.in_system += 1
        try:
            loop = asyncio.get_running_loop()
            request = self._with_default_frames(request)
            executor = await self._media_reserved(request, slot)
            return await loop.run_in_executor(executor, self._estimate, request, reduction, slot)
        finally:
            slot.stop.set()
            self.admission.in_system -= 1
            self.media_memory.release(slot.close())
            allocator.release_free_memory(idle=self.admission.in_system == 0)

    def _estimate(self, request: GenerationRequest, reduction: Reduction, slot: RequestSlot) -> Estimate:
        decoded = self._ingest(request, slot)
        # as if it arrived now, media still to read: the plan and prediction a Generate of it would get
        with self._admitting:
            applied = self.plans.choose(decoded, reduction, None, time.monotonic(), record=False)
            predicted = self.plans.predict(decoded, applied.plan)  # with what the engine holds, played forward
        est = self.engine.estimate(decoded, applied.plan)
        if predicted is not None:  # as if it arrived now: its media still to read
            predicted += self.controller.cost_model.media_s or 0.0
        return Estimate(est.visual_tokens_in, est.visual_tokens_merged, est.prefill_flops_baseline,
                        est.prefill_flops, predicted, applied)

    def close(self) -> None:
        self.controller.close()
        self.loop.close()
        self.loop.on_decode_step = None
        for executor in (self._media_executor, self._text_executor):
            executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["ModelRuntime"]


def stage_rates(model: CostModel) -> StageRates:
    """The engine's view of the cost model's fitted rates (seconds per visual token, a prefill's line in its FLOPs,
    seconds per decode step at a batch size)."""
    fixed, per_flop = model.prefill_line() or (0.0, None)
    return StageRates(vision_s_per_token=model.s_per_visual_token, prefill_s_per_flop=per_flop,
                      prefill_s_fixed=fixed, decode_step=model.s_per_step)
