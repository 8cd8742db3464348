"""The cost model's fitted rates: a prefill as a line in its FLOPs; a decode step as a + b x batch + c x the KV
tokens the batch attends over, fitted from finished requests' decode time per token and the mean batch and KV they
decoded with; answer lengths."""

import math

import pytest

from aim_engine.serving.load import SequenceLoad
from controller.cost_model import CostModel, Observation


def observation(batch: float, s_per_step: float, tokens: int = 11, kv: float = 0.0) -> Observation:
    return Observation(media_s=0.0, vision_s=0.1, visual_tokens_in=100, prefill_s=0.2, prefill_flops=1e9,
                       decode_s=s_per_step * (tokens - 1), new_tokens=tokens, mean_batch=batch, mean_kv_tokens=kv)


def test_step_time_follows_the_batch_size():
    model = CostModel()
    assert model.s_per_step(4) is None and model.step_line() is None
    for batch in (1, 2, 4, 8, 16) * 4:  # a step costs 10 ms plus 2 ms per sequence
        model = model.observe(observation(batch, 0.010 + 0.002 * batch))
    assert model.s_per_step(1) == pytest.approx(0.012, rel=1e-6)
    assert model.s_per_step(32) == pytest.approx(0.074, rel=1e-6)
    assert model.step_line()[2] == 0.0  # no KV seen: no KV term


def test_step_time_follows_the_kv_the_batch_reads_apart_from_its_size():
    """On a CPU a long-context batch's step is dominated by attention over its KV: merging, which shortens every
    prompt, then shortens every step of the batch too. 5 ms + 1 ms a sequence + 2 ms per 1000 KV tokens."""
    model = CostModel()
    for batch, context in [(1, 500), (4, 500), (4, 3000), (16, 200), (16, 3000), (8, 1000)] * 3:
        kv = batch * context
        model = model.observe(observation(batch, 0.005 + 0.001 * batch + 2e-6 * kv, kv=kv))
    assert model.step_line() == pytest.approx((0.005, 0.001, 2e-6), rel=1e-6)
    assert model.s_per_step(8, 8 * 2000) == pytest.approx(0.005 + 0.008 + 0.032, rel=1e-6)
    # a job's context is what its next decode step attends over, handed to the what-if
    decoding = SequenceLoad(True, 0, 0.0, True, 2, 128, False, 7, context_tokens=1234.0)
    assert model.job(decoding).context_tokens == 1234.0


def test_a_batch_whose_kv_moves_with_its_size_keeps_the_fewer_terms():
    """Every request the same size: KV = batch x context, so the points cannot tell the batch term from the KV
    term; the fit keeps the batch's (prefer), exact on what it saw."""
    model = CostModel()
    for batch in (1, 2, 4, 8) * 3:
        model = model.observe(observation(batch, 0.004 + 0.003 * batch, kv=batch * 600.0))
    assert model.step_line() == pytest.approx((0.004, 0.003, 0.0), rel=1e-6)


def test_without_spread_in_batches_the_step_time_is_their_mean():
    model = CostModel()
    for s in (0.02, 0.03):
        model = model.observe(observation(1, s))
    assert 0.02 < model.s_per_step(1) == model.s_per_step(16) < 0.03  # no slope to extrapolate from


def test_recent_requests_weigh_more():
    model = CostModel()
    for _ in range(10):
        model = model.observe(observation(1, 0.05))
    for _ in range(40):
        model = model.observe(observation(1, 0.01))
    assert model.s_per_step(1) == pytest.approx(0.01, abs=0.002)


def answer(tokens: int, max_new: int = 128, s_per_step: float = 0.01) -> Observation:
    """A real answer of `tokens` tokens that ended on EOS (or at max_new): a decode step for each token after the
    first, and one for the EOS."""
    steps = tokens if tokens < max_new else tokens - 1
    return Observation(media_s=0.0, vision_s=0.1, visual_tokens_in=100, prefill_s=0.2, prefill_flops=1e9,
                       decode_s=s_per_step * steps, new_tokens=tokens, max_new_tokens=max_new, decode_steps=steps)


def test_decode_steps_are_what_answers_run_not_what_max_new_tokens_allows():
    model = CostModel().observe(observation(1, 0.01))  # a warm-up (no max_new_tokens): not an answer
    assert model.expected_decode_steps(128) == 127  # nothing learnt yet: the request's own bound
    for tokens in [2, 3, 3, 4, 2, 3, 5, 3, 2, 40]:  # one-word answers, one long one
        model = model.observe(answer(tokens))
    assert model.expected_decode_steps(128) == 5  # the 90th percentile, not the outlier, not 127
    assert model.expected_decode_steps(3) == 2  # never above the request's own bound
    assert model.expected_decode_steps(128, ignore_eos=True) == 127
    short = model.job(SequenceLoad(False, 100, 1e9, False, 0, 128, False, 7))
    full = model.job(SequenceLoad(False, 100, 1e9, False, 0, 128, True, 7))
    assert (short.steps, full.steps) == (5, 127)  # the first token comes from the prefill
    model = model.observe(Observation(0.0, 0.1, 100, 0.2, 1e9, 1.27, 128, max_new_tokens=128, ignore_eos=True))
    assert model.expected_decode_steps(128) == 5  # an answer forced to its length says nothing of answer lengths


def test_a_one_word_answer_is_a_decode_step_not_none():
    """A one-token answer ends on the EOS its one decode step samples: that step is work (one word in tokens, as
    answers used to be counted, was no step at all), and its time teaches the step's rate."""
    model = CostModel()
    for _ in range(10):
        model = model.observe(answer(1, s_per_step=0.05))
    assert model.expected_decode_steps(8) == 1
    assert model.job(SequenceLoad(False, 100, 1e9, False, 0, 8, False, 7)).steps == 1
    assert model.s_per_step(1) == pytest.approx(0.05)
    # an answer whose first token was EOS ran no step
    for _ in range(10):
        model = model.observe(answer(0))
    assert model.expected_decode_steps(8) == 1 and CostModel().observe(answer(0)).expected_decode_steps(8) == 0


def test_a_job_is_what_a_request_still_has_to_do_in_seconds_of_the_fitted_rates():
    model = CostModel()
    waiting = SequenceLoad(False, 100, 1e9, False, 0, 128, False, 7, due_in_s=3.0)
    assert model.job(waiting) is None  # no prefill rate yet
    for tokens in [2, 3, 3, 4, 2, 3, 5, 3, 2, 4]:
        model = model.observe(answer(tokens))
    job = model.job(waiting)
    assert job.prefill_s == pytest.approx(100 * 0.001 + 1e9 * 2e-10) and job.steps == 4  # its p90 answer's steps
    assert (job.due_s, job.kv_blocks, job.admitted) == (3.0, 7, False)
    decoding = SequenceLoad(True, 0, 0.0, True, 2, 128, False, 7)  # one step run: its second token
    assert model.job(decoding).prefill_s == 0 and model.job(decoding).steps == 3
    assert model.job(SequenceLoad(True, 0, 0.0, True, 9, 128, False, 7)).steps == 1  # past the expected length
    assert model.job(SequenceLoad(True, 0, 0.0, True, 3, 128, True, 7)).steps == 125  # it ignores EOS


def test_the_decode_step_line_never_goes_below_zero():
    """Steps measured under contention at large batches can fit a line whose intercept is negative; the what-if
    needs a step that costs time at every batch size."""
    model = CostModel()
    for batch, s in [(1, 0.001), (2, 0.001), (10, 0.2), (12, 0.25)] * 3:
        model = model.observe(observation(batch, s))
    a, b, c = model.step_line()
    assert a >= 0 and b > 0 and c == 0 and model.s_per_step(1) > 0


def prefill(flops: float, seconds: float) -> Observation:
    return Observation(media_s=0.0, vision_s=0.0, visual_tokens_in=0, prefill_s=seconds, prefill_flops=flops,
                       decode_s=0.0, new_tokens=1)


def test_a_prefill_is_a_fixed_cost_plus_a_rate_per_flop():
    """Measured on the reference model on a CPU: 0.12 s whatever the prompt plus 6.5 ms per GFLOP. A rate per FLOP
    alone, fitted from cheap requests, would predict the unreduced prompt 2.5x too long."""
    model = CostModel()
    assert model.prefill_line() is None and not model.ready
    model = model.observe(prefill(1e10, 0.12 + 0.065))  # one size seen: proportional, as nothing says otherwise
    assert model.prefill_line() == pytest.approx((0.0, 0.185 / 1e10))
    for gflops in (132, 63, 32, 21, 8.6):  # the warm-up: one prompt per ladder level
        model = model.observe(prefill(gflops * 1e9, 0.12 + 0.0065 * gflops))
    c, r = model.prefill_line()
    assert c == pytest.approx(0.12, rel=1e-6) and r == pytest.approx(0.0065e-9, rel=1e-6)
    for _ in range(30):  # then a long run of the cheapest level only: the line keeps what the warm-up spanned
        model = model.observe(prefill(8.6e9, 0.12 + 0.0065 * 8.6))
    assert model.prefill_s(132e9) == pytest.approx(0.12 + 0.0065 * 132, rel=1e-6)
    # a prompt with a quarter of its layers still to run pays a quarter of the fixed part
    assert model.prefill_s(33e9, share=0.25) == pytest.approx(0.03 + 0.0065 * 33, rel=1e-6)
    waiting = SequenceLoad(False, 0, 33e9, False, 0, 1, False, 1, prefill_share=0.25)
    assert model.job(waiting).prefill_s == pytest.approx(0.03 + 0.0065 * 33, rel=1e-6)


def test_the_prefill_line_never_goes_below_zero():
    model = CostModel()
    for gflops, seconds in ((10, 0.5), (100, 0.6), (10, 0.5), (100, 0.6)):  # steep intercept, tiny slope: fine
        model = model.observe(prefill(gflops * 1e9, seconds))
    c, r = model.prefill_line()
    assert c > 0 and r > 0
    model = CostModel()
    for gflops, seconds in ((10, 0.01), (100, 1.0)):  # a line through these would cross zero at 9 GFLOPs
        model = model.observe(prefill(gflops * 1e9, seconds))
    c, r = model.prefill_line()
    assert c == 0.0 and r > 0 and model.prefill_s(1e9) > 0
