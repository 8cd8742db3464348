"""The visual-feature cache: a hit gives exactly what computing gives, the budget holds, a batch computes shared
media once, nothing bad is cached, and features never come back for other bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aim_engine import AimEngine
from aim_engine.errors import MediaError
from aim_engine.feature_cache import FeatureCache, MediaKey, media_bytes
from aim_engine.generation import SamplingParams
from aim_engine.plan import ReductionPlan
from aim_engine.request import GenerationRequest, ImagePart, TextPart, VideoPart
from tests.conftest import FAMILIES, VIDEO_FAMILIES
from tests.engine.test_exactness import engine_greedy_logits
from tests.media_samples import encode_image, encode_video

KV = 64 * 2**20


def cached_engine(engine: AimEngine, capacity: int = 256 * 2**20) -> AimEngine:
    """The same loaded model behind a second engine that has a feature cache."""
    return AimEngine(engine.adapter, limits=engine.limits, kv_cache_bytes=KV, feature_cache_bytes=capacity)


def media_requests(family: str):
    image = encode_image("PNG", size=(40, 56), seed=1)
    other = encode_image("JPEG", size=(30, 30), seed=2)
    yield "image", [ImagePart(data=image, mime_type="image/png"), TextPart("Describe the picture.")]
    yield "two-images", [TextPart("Compare"), ImagePart(data=image, mime_type="image/png"), TextPart("and"),
                         ImagePart(data=other, mime_type="image/jpeg"), TextPart("please.")]
    if family in VIDEO_FAMILIES:
        yield "video", [VideoPart(data=encode_video(frames=12), mime_type="video/mp4", num_frames=4),
                        TextPart("What happens?")]


CASES = [(f, name) for f in FAMILIES for name, _ in media_requests(f)]


@pytest.mark.parametrize("family,case", CASES)
def test_a_hit_gives_the_same_tokens_and_logits_as_computing(engine_for, family, case):
    engine = engine_for(family)
    parts = dict(media_requests(family))[case]
    request = GenerationRequest(parts, SamplingParams(max_new_tokens=4))
    cached = cached_engine(engine)
    for plan in (ReductionPlan(), engine.default_plan()):
        ref_logits, ref_tokens = engine_greedy_logits(engine, request, plan, 4)
        for _ in range(2):  # the first computes (and keeps what it may), the second hits
            logits, tokens = engine_greedy_logits(cached, request, plan, 4)
            assert tokens == ref_tokens
            torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)
    media = cached.prepare(request, ReductionPlan()).media
    expected = ["hit" if m.kind == "video" or engine.adapter.images_independent else "" for m in media]
    assert [m.cache for m in media] == expected  # LLaVA-OneVision packs images by their count: not cached


@pytest.mark.parametrize("family,case", [(f, c) for f, c in CASES if c != "image"])
def test_cost_estimate_equals_spend_and_stats_count_the_hits(engine_for, family, case):
    engine = cached_engine(engine_for(family))
    parts = dict(media_requests(family))[case]
    request = GenerationRequest(parts, SamplingParams(max_new_tokens=3))
    plan = engine.default_plan()
    first = engine.generate(request, plan)
    estimate = engine.estimate(request, plan)  # now from the cached entries' shapes, nothing decoded
    second = engine.generate(request, plan)
    assert first.token_ids == second.token_ids
    # LLaVA-OneVision packs images by how many share the prompt: its images are never cached, its videos are
    items = 0 if case == "two-images" and not engine.adapter.images_independent else \
        len([p for p in parts if not isinstance(p, TextPart)])
    assert (first.stats.feature_cache_hits, first.stats.feature_cache_misses) == (0, items)
    assert (second.stats.feature_cache_hits, second.stats.feature_cache_misses) == (items, 0)
    assert first.stats.vision_flops > 0  # a hit spends no vision FLOPs; an uncached item spends them again
    assert (second.stats.vision_flops == 0) == (items > 0) and (second.stats.vision_s_saved > 0) == (items > 0)
    for stats in (first.stats, second.stats):
        assert (estimate.visual_tokens_in, estimate.visual_tokens_merged, estimate.prefill_flops) == (
            stats.visual_tokens_in, stats.visual_tokens_merged, stats.prefill_flops)
    assert engine.feature_cache.stats.hits == items


def test_two_requests_of_one_batch_compute_shared_media_once(engine_for):
    engine = cached_engine(engine_for("qwen2_vl"))
    video = VideoPart(data=encode_video(frames=12), mime_type="video/mp4", num_frames=4)
    image = ImagePart(data=encode_image("PNG", seed=5), mime_type="image/png")
    requests = [GenerationRequest([video, image, TextPart(q)]) for q in ("What happens?", "Which colour?")]
    decoded = [engine.ingest(r).parts for r in requests]  # both decoded before either is encoded
    seen = []
    adapter = engine.adapter
    encode_videos, encode_image_sets = adapter.encode_videos, adapter.encode_image_sets
    adapter.encode_videos = lambda videos: seen.append(("videos", len(videos))) or encode_videos(videos)
    adapter.encode_image_sets = lambda sets: seen.append(("images", [len(s) for s in sets])) or encode_image_sets(sets)
    try:
        first, second = engine.preparer.encode_batch(decoded)
    finally:
        del adapter.encode_videos, adapter.encode_image_sets
    assert seen == [("videos", 1), ("images", [1, 0])]
    assert [m.cache for m in first] == ["miss", "miss"] and [m.cache for m in second] == ["hit", "hit"]
    for a, b in zip(first, second):
        assert a.features is b.features  # one computation, shared
    assert (engine.feature_cache.stats.misses, engine.feature_cache.stats.hits) == (2, 2)


def test_corrupt_media_are_never_cached(engine_for):
    engine = cached_engine(engine_for("llava"))
    good = encode_image("PNG", seed=3)
    bad = GenerationRequest([ImagePart(data=good[:40], mime_type="image/png"), TextPart("What is it?")])
    with pytest.raises(MediaError):
        engine.generate(bad, ReductionPlan())
    assert len(engine.feature_cache) == 0 and engine.feature_cache.stats.misses == 0


def _media(rows: int, value: float = 0.0):
    from aim_engine.adapters.base import EncodedMedia

    return EncodedMedia("image", torch.full((rows, 8), value), [torch.arange(rows)], vision_flops=1.0)


def test_the_budget_holds_and_the_least_recently_used_goes_first():
    one = media_bytes(_media(16))
    cache = FeatureCache(capacity_bytes=3 * one)
    keys = [MediaKey.of("image", "", [bytes([i])]) for i in range(5)]
    for key in keys[:3]:
        cache.put(key, _media(16))
    assert cache.get(keys[0]) is not None  # keys[0] is now the most recently used
    cache.put(keys[3], _media(16))
    assert cache.bytes <= cache.capacity_bytes and len(cache) == 3
    assert cache.peek(keys[1]) is None and cache.peek(keys[0]) is not None  # keys[1] was the least recently used
    cache.put(keys[4], _media(200))  # larger than the whole budget: not kept, nothing evicted for it
    assert cache.peek(keys[4]) is None and len(cache) == 3
    assert cache.stats.evictions == 1


def test_features_never_come_back_for_other_bytes_even_when_digests_collide(engine_for, monkeypatch):
    engine = cached_engine(engine_for("llava"))
    real_of = MediaKey.of.__func__

    def colliding(cls, kind, sampling, chunks):  # every input gets the same SHA-256 digest
        return dataclasses.replace(real_of(cls, kind, sampling, chunks), digest=b"\0" * 32)

    monkeypatch.setattr(MediaKey, "of", classmethod(colliding))
    first, second = (GenerationRequest([ImagePart(data=encode_image("PNG", seed=s), mime_type="image/png"),
                                        TextPart("Describe it.")], SamplingParams(max_new_tokens=3)) for s in (7, 8))
    engine.generate(first, ReductionPlan())
    prepared = engine.prepare(second, ReductionPlan())
    assert [m.cache for m in prepared.media] == ["miss"]  # detected by the second fingerprint: computed afresh
    assert engine.feature_cache.stats.collisions == 1
    reference = engine_for("llava").prepare(second, ReductionPlan())
    torch.testing.assert_close(prepared.media[0].features, reference.media[0].features, atol=0, rtol=0)


def test_a_hit_is_refused_or_served_as_computing_would(engine_for):
    """The cache skips work, never a check: a MIME type the engine refuses, or media over the request's decoded
    limit, are refused as they are when nothing is cached."""
    engine = cached_engine(engine_for("qwen2_vl"))
    video = encode_video(frames=12)
    ok = GenerationRequest([VideoPart(data=video, mime_type="video/mp4", num_frames=4), TextPart("What?")],
                           SamplingParams(max_new_tokens=2))
    engine.generate(ok, ReductionPlan())
    flv = GenerationRequest([VideoPart(data=video, mime_type="video/x-flv", num_frames=4), TextPart("What?")])
    with pytest.raises(MediaError, match="unsupported video type"):
        engine.ingest(flv)
    decoded = engine.feature_cache.peek(engine.ingest(ok).parts[0].key).decoded_bytes
    assert decoded > 0
    tight = AimEngine(engine.adapter, limits=dataclasses.replace(engine.limits, max_decoded_bytes=2 * decoded - 1),
                      kv_cache_bytes=KV, feature_cache_bytes=0)
    tight.caches.features = engine.feature_cache  # warm, but with a limit two copies exceed
    twice = GenerationRequest([VideoPart(data=video, mime_type="video/mp4", num_frames=4)] * 2 + [TextPart("What?")])
    with pytest.raises(MediaError, match="decoded-media limit"):
        tight.ingest(twice)
