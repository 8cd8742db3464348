"""The feature cache through the service: a repeated video is answered from cached features with the same answer,
the response and the metrics say so, and the exposition carries the cache's series."""

from __future__ import annotations

import pytest

import urllib.request

from aim_engine import AimEngine
from service.client import AimClient
from tests.media_samples import encode_video
from tests.service.conftest import BASE, ServerThread, wait_until


def _sample(metric, model: str) -> float:
    return next(s.value for s in metric.collect()[0].samples if s.labels.get("model") == model
                and not s.name.endswith("_created"))


def test_a_repeated_video_is_answered_from_cached_features(tiny_engines):
    engine = AimEngine(tiny_engines["tiny-ov"].adapter, kv_cache_bytes=64 * 2**20, feature_cache_bytes=64 * 2**20)
    srv = ServerThread(BASE, {"tiny-ov": engine})
    try:
        video = encode_video(frames=16)
        with AimClient(srv.target) as client:
            first, second = (client.generate("What moves?", videos=[video], frames=4, max_new_tokens=4,
                                             no_reduction=True) for _ in range(2))
            other = client.generate("What moves?", videos=[video], frames=6, max_new_tokens=4, no_reduction=True)
        assert second.text == first.text
        assert (first.usage.feature_cache_hits, first.usage.feature_cache_misses) == (0, 1)
        assert (second.usage.feature_cache_hits, second.usage.feature_cache_misses) == (1, 0)
        assert (other.usage.feature_cache_hits, other.usage.feature_cache_misses) == (0, 1)  # sampled otherwise
        assert first.cost.vision_flops > 0 and second.cost.vision_flops == 0
        assert second.timings.vision_seconds_saved > 0 and first.timings.vision_seconds_saved == 0
        metrics = srv.metrics
        wait_until(lambda: _sample(metrics.feature_cache_misses, "tiny-ov") == 2, "the misses to be counted")
        assert _sample(metrics.feature_cache_hits, "tiny-ov") == 1
        assert _sample(metrics.feature_cache_saved, "tiny-ov") == second.timings.vision_seconds_saved
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5).read().decode()
        def exposed(series: str) -> float:
            return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " "))

        assert exposed('aim_feature_cache_bytes{model="tiny-ov"}') == engine.feature_cache.bytes > 0
        assert exposed('aim_feature_cache_capacity_bytes{model="tiny-ov"}') == 64 * 2**20
    finally:
        srv.stop()


def test_a_second_question_about_the_same_video_reuses_the_prefix(tiny_engines):
    engine = AimEngine(tiny_engines["tiny-ov"].adapter, kv_cache_bytes=64 * 2**20, feature_cache_bytes=64 * 2**20,
                       prefix_cache_bytes=16 * 2**20)
    srv = ServerThread(BASE, {"tiny-ov": engine})
    try:
        video = encode_video(frames=24)
        with AimClient(srv.target) as client:
            first, second = (client.generate(question, videos=[video], frames=16, max_new_tokens=4, no_reduction=True)
                             for question in ("What moves?", "Which colour is it?"))
        assert first.usage.prefix_tokens_reused == 0 and second.usage.prefix_tokens_reused > 0
        assert second.cost.prefill_flops < first.cost.prefill_flops
        # the prefix cache's saving is reported and counted apart from AIM's (none here: no reduction)
        assert first.cost.prefill_flops_reused == 0 and second.cost.prefill_flops_reused > 0
        assert second.cost.saved_fraction == pytest.approx(0.0, abs=1e-9)
        wait_until(lambda: _sample(srv.metrics.flops_reused, "tiny-ov") == second.cost.prefill_flops_reused,
                   "the cache's saving to be counted")
        wait_until(lambda: _sample(srv.metrics.prefix_cache_hits, "tiny-ov") == 1, "the hit to be counted")
        assert _sample(srv.metrics.prefix_cache_misses, "tiny-ov") == 1
        assert _sample(srv.metrics.prefix_cache_tokens, "tiny-ov") == second.usage.prefix_tokens_reused
    finally:
        srv.stop()
