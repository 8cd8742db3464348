"""The cost model predicts decode time under batching: seconds per step as a line in the batch size, fitted
from finished requests' decode time per token and the mean batch they decoded in."""

import pytest

from controller.cost_model import CostModel, Observation


def observation(batch: float, s_per_step: float, tokens: int = 11) -> Observation:
    return Observation(media_s=0.0, vision_s=0.1, visual_tokens_in=100, prefill_s=0.2, prefill_flops=1e9,
                       decode_s=s_per_step * (tokens - 1), new_tokens=tokens, mean_batch=batch)


def test_step_time_follows_the_batch_size():
    model = CostModel()
    assert model.s_per_step(4) is None and model.predict(100, 1e9, 10) is None
    for batch in (1, 2, 4, 8, 16) * 4:  # a step costs 10 ms plus 2 ms per sequence
        model = model.observe(observation(batch, 0.010 + 0.002 * batch))
    assert model.s_per_step(1) == pytest.approx(0.012, rel=1e-6)
    assert model.s_per_step(32) == pytest.approx(0.074, rel=1e-6)
    alone = model.predict(100, 1e9, 20, batch=1)
    crowded = model.predict(100, 1e9, 20, batch=32)
    assert crowded - alone == pytest.approx(20 * 0.062, rel=1e-6)


def test_without_spread_in_batches_the_step_time_is_their_mean():
    model = CostModel()
    for s in (0.02, 0.03):
        model = model.observe(observation(1, s))
    assert 0.02 < model.s_per_step(1) == model.s_per_step(16) < 0.03  # no slope to extrapolate from


def test_recent_requests_weigh_more():
    model = CostModel()
    for _ in range(10):
        model = model.observe(observation(1, 0.05))
    for _ in range(20):
        model = model.observe(observation(1, 0.01))
    assert model.s_per_step(1) == pytest.approx(0.01, abs=0.002)
