"""What a request costs the engine, from its size under a plan: the fitted rate of each stage.

    own work = media + visual_tokens * r_vision + prefill(flops) + decode_steps * step(batch, kv)
    prefill(flops) = c + r * flops        (seconds of one prompt's LLM prefill)
    step(batch, kv) = a + b * batch + c' * kv
                    (seconds per decode step when `batch` sequences decode together and their attention reads
                    `kv` KV tokens per layer)

A prefill's time is not proportional to its FLOPs: every prompt pays for its text tokens, its layers' kernels and
(when it prunes) the attention it scores, whatever its visual tokens. Measured on the reference model on a CPU,
seconds per GFLOP rose from 0.0077 unreduced to 0.019 at maximum saving (line fit: c = 0.12 s, r = 0.0065 s/GFLOP
predicts every level within 10%), so one rate per FLOP, fitted from whichever levels were served last,
over-predicted the unreduced prompt 2.5x after cheap requests and under-predicted the cheap ones after unreduced
ones. c and r are a line over the prefills seen (the start-up warm-up runs every ladder level, so it spans them).

Under continuous batching a step serves every running sequence, so a request's time per token grows with the
batch it shares (b) and with the KV they read (c': on the reference model's 32-frame, 128-token answers, leaving it
out predicted them 2-4x short; merging, which shortens every prompt, shortens every step of the batch), from a
floor that does not (a: weights read once per step). The KV read is the engine's count, padding included: the
decode attention pads each row to the longest in the batch (aim_engine/decode_read.py), so a short answer beside
a 32-frame prompt reads the prompt's length, and a sum of the rows' KV, fitted across batches that mixed them and
batches that did not, mispredicted both.

Both are fitted by exponentially weighted non-negative least squares (linear_fit.py). With no spread in what was
seen yet, a decode step is their weighted mean (flat) and a prefill is proportional to its FLOPs. The vision rate
is an exponentially weighted mean of seconds per visual token. Each rate follows the machine it runs on; until a
stage has been observed its rate is unknown and predictions say so (None).

decode_steps is not what the request's max_new_tokens allows but what requests of this model actually run: the
90th percentile of the decode steps of the last 64 real answers (one cut off at its max_new_tokens counts at its
max_new_tokens - 1, a lower bound of what it wanted), never more than the request's own max_new_tokens - 1; all of
them when it ignores EOS; max_new_tokens - 1 until answers have been seen. Steps, not tokens: the prefill samples
the first token, and an answer that ends with EOS runs one more step for the EOS, which it does not count (a
one-word answer is one decode step, not none: counted in tokens, every short answer was predicted a step short,
which on the reference model's one-word video answers was 8 % of a full request and 30 % of a reduced one, and
every request queued behind them inherited it).

Every rate is fitted from the request's own work only: its vision and prefill pieces, and the decode steps it took
part in (Timings.decode_steps_s, not the wall time between its first and last token, which holds other requests'
prefill slices). Waiting and sharing the engine are not a rate: `job` turns what a request still has to do into
a whatif.Job, and the what-if plays the engine's rules over every job it holds (whatif.py). (An earlier build
multiplied predictions by a learnt correction of observed / predicted latency; with queueing outside its model it
learnt queueing as compute. What the what-if still cannot know, later arrivals beyond their measured share and
noise, is the feedback margin's, per SLO class: feedback.py.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from aim_engine.serving.load import SequenceLoad

from .linear_fit import LinearFit
from .whatif import Job

SMOOTHING = 0.2  # weight of the newest observation (vision rate, media time)
# the fits' (LinearFit): slower, so that a run of one level or one batch size keeps the spread that fits them
PREFILL_SMOOTHING = 0.05
STEP_SMOOTHING = 0.1
ANSWER_WINDOW = 64  # recent answers' decode steps kept
ANSWER_QUANTILE = 0.9  # the decode steps predicted: this quantile of the recent answers'


@dataclass(frozen=True)
class Observation:
    media_s: float
    vision_s: float
    visual_tokens_in: int
    prefill_s: float
    prefill_flops: float
    decode_s: float
    new_tokens: int  # tokens it generated (an EOS that ended it not counted)
    mean_batch: float = 1.0  # sequences per decode step, averaged over the request's steps
    mean_kv_tokens: float = 0.0  # KV tokens (per layer, padding included) its decode steps read, averaged likewise
    max_new_tokens: int | None = None  # what it allowed (None: not a real request's answer, e.g. a warm-up)
    ignore_eos: bool = False  # it generated max_new_tokens whatever the model said: not an answer length
    decode_steps: int | None = None  # decode steps it ran (None: new_tokens - 1, an answer that did not end on EOS)

    @property
    def steps(self) -> int:
        """Decode steps it ran: its tokens after the first, and one more for an EOS that ended it."""
        return self.decode_steps if self.decode_steps is not None else max(0, self.new_tokens - 1)


@dataclass(frozen=True)
class CostModel:
    media_s: float | None = None
    s_per_visual_token: float | None = None
    # seconds of one prompt's prefill: c + r x its FLOPs
    prefill_fit: LinearFit = LinearFit(2, prefer=(1, 0), smoothing=PREFILL_SMOOTHING)
    # seconds of a decode step: a + b x sequences + c x KV tokens it reads (per layer, padding included)
    step_fit: LinearFit = LinearFit(3, prefer=(0, 1, 2), smoothing=STEP_SMOOTHING)
    answer_steps: tuple[int, ...] = ()  # decode steps of the recent real answers, oldest first

    @property
    def ready(self) -> bool:
        return self.prefill_line() is not None

    def prefill_line(self) -> tuple[float, float] | None:
        """(c, r): seconds of one prompt's LLM prefill = c + r x its FLOPs (None before any prefill was observed).
        With one prompt size seen, proportional to its FLOPs."""
        return self.prefill_fit.coefficients()

    def prefill_s(self, flops: float, share: float = 1.0) -> float:
        """Predicted seconds of a prefill of `flops` FLOPs of which `share` of the layers are still to run (`flops`
        being those layers' FLOPs): 0 before any prefill was observed."""
        line = self.prefill_line()
        if line is None or flops <= 0:
            return 0.0
        return line[0] * share + line[1] * flops

    def step_line(self) -> tuple[float, float, float] | None:
        """(a, b, c): seconds of a decode step of `batch` sequences attending over `kv` KV tokens (per layer, all of
        them together) = a + b x batch + c x kv (None before any decode was observed). Until the steps seen vary in
        batch or KV, the terms they cannot tell apart are 0: first the KV term, then the batch's."""
        return self.step_fit.coefficients()

    def s_per_step(self, batch: float = 1.0, kv_tokens: float = 0.0) -> float | None:
        """Seconds per decode step at this batch size and KV (None before any decode was observed)."""
        line = self.step_line()
        return None if line is None else line[0] + line[1] * batch + line[2] * kv_tokens

    def expected_decode_steps(self, max_new_tokens: int, ignore_eos: bool = False) -> int:
        """The decode steps to plan for after the prefill's first token (see the module's docstring)."""
        most = max(0, max_new_tokens - 1)
        if ignore_eos or not self.answer_steps:
            return most
        ordered = sorted(self.answer_steps)
        rank = min(len(ordered) - 1, max(0, math.ceil(ANSWER_QUANTILE * len(ordered)) - 1))
        return min(most, ordered[rank])

    def job(self, load: SequenceLoad, admitted: bool | None = None) -> Job | None:
        """What a request (in the engine, or at a ladder level) still has to do, in predicted seconds; None until
        the prefill rate is known."""
        if not self.ready:
            return None
        prefill_s = (load.vision_tokens * (self.s_per_visual_token or 0.0)
                     + self.prefill_s(load.prefill_flops, load.prefill_share))
        expected = self.expected_decode_steps(load.max_new_tokens, load.ignore_eos)
        # a decoding one has run a step for each token after its first; past the expected steps it runs one more
        steps = max(1, expected - (load.generated - 1)) if load.prefilled else expected
        return Job(prefill_s, steps, load.due_in_s, load.kv_blocks, load.admitted if admitted is None else admitted,
                   context_tokens=load.context_tokens)

    def observe(self, obs: Observation) -> "CostModel":
        def ewma(old, new):
            return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new

        updated = replace(self, media_s=ewma(self.media_s, obs.media_s))
        if obs.max_new_tokens is not None and not obs.ignore_eos:
            updated = replace(updated, answer_steps=(self.answer_steps + (obs.steps,))[-ANSWER_WINDOW:])
        if obs.visual_tokens_in > 0:
            updated = replace(updated,
                              s_per_visual_token=ewma(self.s_per_visual_token, obs.vision_s / obs.visual_tokens_in))
        if obs.prefill_flops > 0:
            updated = replace(updated, prefill_fit=self.prefill_fit.add((obs.prefill_flops,), obs.prefill_s))
        if obs.steps > 0:
            updated = replace(updated, step_fit=self.step_fit.add((obs.mean_batch, obs.mean_kv_tokens),
                                                                  obs.decode_s / obs.steps))
        return updated
