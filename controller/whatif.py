"""What the engine will do with the requests it holds: its scheduler's rules played forward, in predicted seconds.

The engine (aim_engine/serving/loop.py) runs steps. Each step
1. admits waiting sequences in arrival order while the batch has room (`max_batch`) and the KV pool can reserve
   a sequence's whole need (`kv_blocks`);
2. runs up to the step budget of prefill work (vision and LLM layers) in admission order: `step_multiple` x the
   running batch's decode step; when nothing decodes, the oldest prefill whole and nothing after it; all of it
   when slicing is off (serving/slices.py);
3. runs one decode step of every sequence whose prefill is done, in `a + b x batch + c x kv` seconds (the fitted
   rates; kv: the KV tokens its attention reads per layer, each row padded to the longest of its group in the
   gather workspace (aim_engine/decode_read.py), so growing by one a sequence a step).
A prefill yields a sequence's first token, each decode step one more; a sequence leaves when its answer is
complete, and its KV goes back to the pool.

`finish_times` plays these rules forward from now. Prefill work is fluid (a step takes at most the budget's seconds
of it, oldest sequence first), and the simulation jumps from event to event (a prefill done, an answer done, an
expected request's arrival), so it costs O(n^2) for n jobs however long their answers. Requests not yet here are
jobs that arrive later (`Job.arrives_s`): `policy.decide` adds the ones it expects. Every duration scales with the
rates, so a margin on the rates scales every finish time by the same factor, provided the expected arrivals'
times scale with it too (`decide` relies on it).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from aim_engine.decode_read import tokens_read


@dataclass(frozen=True)
class Job:
    """One request as the engine will run it."""

    prefill_s: float  # predicted seconds of vision and LLM prefill still to run
    steps: int  # decode steps still to run after its prefill: the answer's tokens after the first
    due_s: float = math.inf  # seconds from now by which its caller wants the answer
    kv_blocks: int = 0  # KV blocks it holds (admitted) or must reserve before it is admitted
    admitted: bool = False  # in the running batch, its KV reserved
    arrives_s: float = 0.0  # a request expected later: seconds from now until it arrives
    context_tokens: float = 0.0  # KV tokens (per layer) it holds for its next decode step


@dataclass(frozen=True)
class EngineRules:
    """The scheduler's limits and the fitted rates of a decode step."""

    max_batch: int
    step_a: float  # seconds of a decode step: step_a + step_b x sequences decoding + step_c x the KV it reads
    step_b: float = 0.0
    step_c: float = 0.0
    step_multiple: float | None = 4.0  # prefill per step beside a decoding batch, in its decode steps; None: unsliced
    free_kv_blocks: float = math.inf  # blocks the pool can still promise (free, or held only by evictable caches)
    workspace_tokens: float = math.inf  # the decode gather's workspace, in keys per layer (decode_read.pack)

    def decode_s(self, batch: int, kv_tokens: float = 0.0) -> float:
        return max(0.0, self.step_a + self.step_b * batch + self.step_c * kv_tokens) if batch else 0.0


def finish_times(jobs: Sequence[Job], rules: EngineRules) -> list[float]:
    """Seconds from now until each job's answer is complete (inf: it can never be admitted). Admitted jobs first
    in admission order, then the waiting ones in arrival order (the order `jobs` gives within each); a job that
    `arrives_s` later is admitted no earlier."""
    n = len(jobs)
    prefill = [j.prefill_s for j in jobs]
    steps = [j.steps for j in jobs]
    context = [j.context_tokens for j in jobs]
    finish = [math.inf] * n
    running = [i for i, j in enumerate(jobs) if j.admitted]
    waiting = deque(i for i, j in enumerate(jobs) if not j.admitted)
    free = rules.free_kv_blocks  # what admitted jobs hold is already taken from it
    t = 0.0
    while running or waiting:
        while waiting and len(running) < rules.max_batch and jobs[waiting[0]].kv_blocks <= free \
                and jobs[waiting[0]].arrives_s <= t:
            i = waiting.popleft()
            free -= jobs[i].kv_blocks
            running.append(i)
        if not running:
            if waiting and jobs[waiting[0]].arrives_s > t:  # idle until the next one arrives
                t = jobs[waiting[0]].arrives_s
                continue
            break  # the head needs more KV than the pool can ever promise: it and those behind never finish
        for i in [i for i in running if prefill[i] <= 0 and steps[i] <= 0]:  # answered at its prefill
            finish[i] = t
            running.remove(i)
            free += jobs[i].kv_blocks
        if not running:
            continue
        prefilling = [i for i in running if prefill[i] > 0]
        decoding = [i for i in running if prefill[i] <= 0 and steps[i] > 0]
        d = rules.decode_s(len(decoding), tokens_read([context[i] for i in decoding], rules.workspace_tokens))
        if rules.step_multiple is None:
            budget = math.inf
        elif decoding:
            budget = max(rules.step_multiple * d, d)  # a step's first piece always runs
        else:  # nobody to stall: the oldest prefill whole, then its answer starts beside the next one's slices
            budget = prefill[prefilling[0]] if prefilling else math.inf
        total = sum(prefill[i] for i in prefilling)
        arrival = jobs[waiting[0]].arrives_s if waiting else math.inf
        k = _steps_to_next_event([prefill[i] for i in prefilling], [steps[i] for i in decoding], d, budget,
                                 arrival - t)
        spent = min(total, k * budget) if prefilling else 0.0
        # prefill completes in FIFO order within these k steps (only in the last one: see _steps_to_next_event)
        used, done = 0.0, []
        for i in prefilling:
            take = min(prefill[i], spent - used)
            if take <= 0:
                break
            used += take
            prefill[i] -= take
            if prefill[i] <= 1e-12:
                prefill[i] = 0.0
                done.append((i, t + used + (k - 1) * d))
        # k decode steps (d: the first), the KV read growing by one token a sequence a step (each group's longest
        # grows by one): k d + c n k (k - 1) / 2
        t += spent + (k * d + rules.step_c * len(decoding) * k * (k - 1) / 2 if decoding else 0.0)
        leaving = []
        for i in decoding:
            steps[i] -= k
            context[i] += k
            if steps[i] <= 0:
                finish[i] = t
                leaving.append(i)
        for i, at in done:
            if steps[i] <= 0:
                finish[i] = at
                leaving.append(i)
        for i in leaving:
            running.remove(i)
            free += jobs[i].kv_blocks
    return finish


def _steps_to_next_event(prefills: list[float], steps: list[int], d: float, budget: float, until_arrival: float
                         ) -> float:
    """Engine steps until the next event: the head prefill done (it gets `budget` seconds of prefill a step), an
    answer complete, or the first step after the next arrival (`until_arrival` seconds away), so that it joins
    there. `d`: a decode step's seconds; inf when nothing would ever happen."""
    if prefills:
        k_prefill = max(1, math.ceil(prefills[0] / budget - 1e-9)) if math.isfinite(budget) else 1
    else:
        k_prefill = math.inf
    k = min(min(steps, default=math.inf), k_prefill)
    if 0 < until_arrival < math.inf:
        step_s = d + (min(budget, sum(prefills)) if prefills else 0.0)
        if step_s > 0:
            k = min(k, max(1, math.ceil(until_arrival / step_s)))
    return k


__all__ = ["EngineRules", "Job", "finish_times"]
