"""The step loop: one per model. Each step admits waiting sequences, runs a bounded slice of the admitted ones'
prefill work (vision and LLM layers, within the step's budget: slices.py), then one batched decode step for
every sequence whose prefill is done, and hands each caller its new text.

One driver at a time: `start()`'s thread (the service) or, while no thread runs, whoever calls `step()` inline
(the engine's own `generate` without a server, evaluation, tests). The engine waits for the thread's steps
when one runs (`threaded`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..errors import Cancelled
from ..kv_pool import KVPoolExhausted
from ..request import GenerationResult, TokenDelta
from .load import EngineLoad, sequence_load
from .model_runner import DecodeStepStats, ModelRunner
from .scheduler import Scheduler
from .sequence import FINISHED, Sequence
from .slices import StageRates, StepBudget

log = logging.getLogger("aim.engine")


class ServingLoop:
    """Owns its scheduler and runner; `eos_ids` end an answer (unless it ignores EOS)."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, eos_ids: set[int]):
        self.scheduler = scheduler
        self.runner = runner
        self.eos_ids = eos_ids
        # each decode step as it ran (metrics; whoever fits the step's rates)
        self.on_decode_step: Callable[[DecodeStepStats], None] | None = None
        self.budget = StepBudget(None)  # prefill work per step beside the decode (slices.py); None: unsliced
        self.rates = StageRates()  # the fitted rates the budget is predicted with (set by whoever fits them)
        self._step_lock = threading.RLock()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- submitting -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queues a sequence (thread-safe, never blocks). Raises KVBudgetError if it could never fit."""
        self.scheduler.add(seq)
        with self._wake:
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Ends a sequence now if it has not ended (its caller gave up); frees its KV."""
        with self._step_lock:
            self.scheduler.take_inbox()
            if seq.status != FINISHED:
                self._finish(seq, "cancelled")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def limit(self, max_batch: int, prefill_tokens_per_step: int | None = None,
              budget: StepBudget | None = None, workspace_bytes: int | None = None) -> None:
        """The batching limits: most sequences decoding together, prompt tokens admitted per step, the prefill
        work per step, the decode attention's gather workspace (kv_pool.DecodeBatch) (None: as they are)."""
        with self._step_lock:
            self.scheduler.max_batch = max_batch
            if prefill_tokens_per_step is not None:
                self.scheduler.prefill_tokens_per_step = prefill_tokens_per_step
            if budget is not None:
                self.budget = budget
            if workspace_bytes is not None:
                self.runner.batch.workspace_bytes = workspace_bytes

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    @property
    def num_running(self) -> int:
        """Sequences in the running batch."""
        return self.scheduler.num_running

    def load(self, now: float) -> EngineLoad:
        """What the engine holds, as work still to do (load.py); read without waiting for the step that runs.
        `now` on time.monotonic, for the sequences' due times."""
        sched, layers = self.scheduler, self.runner.lm.num_layers
        pool = sched.pool
        running, waiting = list(sched.running), list(sched.waiting) + list(sched.inbox())
        loads = tuple(sequence_load(s, layers, pool.blocks_for(s.kv_tokens), now) for s in running + waiting)
        evictable = self.runner.caches.prefixes.evictable_blocks() if self.runner.caches.prefixes else 0
        return EngineLoad(loads, sched.max_batch, self.budget.multiple, pool.available_blocks + evictable,
                          self.runner.batch.workspace_tokens)

    def extend_forecasts(self, delays: dict[int, float]) -> None:
        """Moves the submitter's forecast (Sequence.forecast) of each sequence in `delays` (by seq_id) whose forecast
        counted on no other work (`forecast_moves`) later by its seconds: work that joined the engine after it, by how
        much its submitter predicts it delays that sequence. From any thread, like `load` (one tuple assignment per
        sequence)."""
        sched = self.scheduler
        for seq in list(sched.running) + list(sched.waiting) + list(sched.inbox()):
            delay, forecast = delays.get(seq.seq_id), seq.forecast
            if delay and forecast is not None and seq.forecast_moves:
                seq.forecast = (forecast[0], forecast[1] + delay)

    @property
    def threaded(self) -> bool:
        """Whether the loop's own thread drives it (then nobody else steps it)."""
        return self._thread is not None and self._thread.is_alive()

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> None:
        """Admits what fits, runs this step's prefill pieces (within the budget, slices.py), then one decode step
        for every sequence whose prefill is done."""
        with self._step_lock:
            sched = self.scheduler
            sched.take_inbox()
            for seq in sched.stopped():
                self._finish(seq, "cancelled")
            for seq in sched.admit():
                seq.work = self.runner.work_for(seq)
            prefilling = [s for s in sched.running if s.work is not None]
            if prefilling:
                decoding = [s for s in sched.running if s.work is None]
                budget_s = self.budget.seconds(self.rates, len(decoding),
                                               self.runner.batch.kv_attended([s.kv for s in decoding]))
                # sliced, with nobody decoding: the oldest prefill whole, and its answer starts at the next step
                first_only = not decoding and self.budget.multiple is not None
                for seq, outcome in self.runner.advance(prefilling, budget_s, self.rates, first_only):
                    if isinstance(outcome, Cancelled):
                        self._finish(seq, "cancelled")
                    elif isinstance(outcome, BaseException):
                        self._fail(seq, outcome)
                    else:
                        self._accept_or_fail(seq, outcome)
            batch = [s for s in sched.running if s.work is None]
            if not batch:
                return
            try:
                stepped, outgrown, ran = self.runner.decode(batch)
            except Exception as exc:  # noqa: BLE001 - a failed batched step fails the sequences in it
                log.exception("decode step failed for %d sequences", len(batch))
                for seq in batch:
                    self._fail(seq, exc)
                return
            for seq in outgrown:
                self._fail(seq, KVPoolExhausted("the sequence outgrew its KV reservation and no free block is left"))
            if self.on_decode_step is not None and ran is not None:
                self.on_decode_step(ran)
            for seq, token in stepped:
                self._accept_or_fail(seq, token)

    def _accept_or_fail(self, seq: Sequence, token: int) -> None:
        try:
            self._accept(seq, token)
        except Exception as exc:  # noqa: BLE001 - e.g. detokenisation: this sequence fails, the batch goes on
            log.exception("sequence %d failed after a sampled token", seq.seq_id)
            self._fail(seq, exc)

    def _accept(self, seq: Sequence, token: int) -> None:
        """A newly sampled token: the end of the answer, or text for the caller and the next decode input."""
        params = seq.sampling
        if token in self.eos_ids and not params.ignore_eos:
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        delta = seq.text.add(token)
        if delta:
            seq.emit(TokenDelta(delta, token))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) >= params.max_new_tokens:
            self._finish(seq, "length")
        elif seq.stop_requested():
            self._finish(seq, "cancelled")
        else:
            seq.next_token = token

    def _finish(self, seq: Sequence, reason: str) -> None:
        stats = seq.stats
        if seq.kv is not None:
            stats.kv_cache_bytes = seq.kv.used_bytes()
        self.runner.retire(seq)
        self.scheduler.finish(seq)
        if seq.text is not None:
            tail = seq.text.flush()
            if tail:
                seq.emit(TokenDelta(tail, seq.generated[-1] if seq.generated else -1))
        end = time.perf_counter()
        stats.completion_tokens = len(seq.generated)
        stats.decode_steps = seq.decode_steps
        stats.timings.decode_s = end - seq.first_token if seq.first_token else 0.0
        stats.timings.total_s = end - seq.arrival
        stats.mean_batch = seq.mean_batch
        stats.mean_kv_attended = seq.mean_kv_attended
        seq.emit(GenerationResult(text=seq.text.text if seq.text else "", finish_reason=reason,
                                  token_ids=list(seq.generated), stats=stats, plan=seq.plan))

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self.runner.retire(seq)
        self.scheduler.finish(seq)
        seq.emit(exc)

    # ---- the thread -----------------------------------------------------------------------------
    def start(self, name: str = "aim-loop") -> "ServingLoop":
        """Starts the stepping thread (a no-op if it runs); a closed loop can be started again."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.has_work():
                    self._wake.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must outlive any one step
                log.exception("engine step failed")

    def close(self) -> None:
        """Stops the thread after its current step; sequences still queued are failed."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._step_lock:
            self.scheduler.take_inbox()
            for seq in list(self.scheduler.waiting) + list(self.scheduler.running):
                self._fail(seq, RuntimeError("the engine was closed"))
