"""Reuse of a shared prefix's KV (serving/prefix_cache.py): a second question about the same media starts after the
cached prefix and gets the tokens and logits computing it afresh gives; pruning plans never reuse; the pool's
accounting holds, and entries are evicted when admission needs room."""

from __future__ import annotations

import pytest
import torch

from aim_engine import AimEngine
from aim_engine.generation import SamplingParams
from aim_engine.plan import ReductionPlan
from aim_engine.request import GenerationRequest, ImagePart, TextPart, VideoPart
from tests.conftest import FAMILIES, VIDEO_FAMILIES, logit_tolerance
from tests.engine.test_batching import Run
from tests.media_samples import encode_image, encode_video

KV = 64 * 2**20


def with_caches(engine: AimEngine, prefix_bytes: int = 16 * 2**20, kv: int = KV) -> AimEngine:
    return AimEngine(engine.adapter, limits=engine.limits, kv_cache_bytes=kv, feature_cache_bytes=64 * 2**20,
                     prefix_cache_bytes=prefix_bytes)


def media_parts(family: str):
    if family in VIDEO_FAMILIES:
        return [VideoPart(data=encode_video(frames=24, size=(64, 64)), mime_type="video/mp4", num_frames=16)]
    return [ImagePart(data=encode_image("PNG", size=(56, 56), seed=4), mime_type="image/png"),
            ImagePart(data=encode_image("PNG", size=(40, 40), seed=5), mime_type="image/png")]


def ask(engine: AimEngine, parts, question: str, plan: ReductionPlan, steps: int = 20):
    run = Run(engine)
    run.add(0, GenerationRequest([*parts, TextPart(question)], SamplingParams(max_new_tokens=steps,
                                                                              ignore_eos=True)), plan)
    run.step_until_done()
    return run.result(0), torch.stack(run.seqs[0].logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reused_prefix_gives_what_computing_afresh_gives(engine_for, family):
    """Prefill and 20 decode steps of the second question, with its media prefix reused, against an engine that
    computes everything; under the untouched model and under merging with original positions and
    proportional attention (the reference model's kind of default)."""
    base = engine_for(family)
    parts = media_parts(family)
    for plan in (ReductionPlan(), ReductionPlan(merge_retention=0.75, positions="original",
                                                proportional_attention=True)):
        cached = with_caches(base)
        first, _ = ask(cached, parts, "What is in it?", plan)
        assert first.stats.prefix_tokens_reused == 0 and len(cached.prefix_cache) == 1, first.stats
        result, logits = ask(cached, parts, "Which colour is the largest thing? Answer briefly.", plan)
        ref, ref_logits = ask(base, parts, "Which colour is the largest thing? Answer briefly.", plan)
        assert result.stats.prefix_tokens_reused > 0 and result.stats.prefix_tokens_reused % 16 == 0
        assert result.token_ids == ref.token_ids
        torch.testing.assert_close(logits, ref_logits, atol=logit_tolerance(1e-4), rtol=1e-4)
        assert result.stats.visual_tokens_per_layer == ref.stats.visual_tokens_per_layer
        assert result.stats.prefill_flops < ref.stats.prefill_flops  # the prefix was not computed again
        # the cache's saving is counted apart: the plan costs what computing afresh costs, AIM saves the same
        assert result.stats.prefill_flops_reused > 0 and ref.stats.prefill_flops_reused == 0
        assert result.stats.prefill_flops + result.stats.prefill_flops_reused == pytest.approx(
            ref.stats.prefill_flops, rel=1e-9)
        assert result.stats.saved_fraction == pytest.approx(ref.stats.saved_fraction, rel=1e-9)


def test_pruning_plans_never_reuse_or_offer_a_prefix(engine_for):
    base = engine_for("llava")
    cached = with_caches(base)
    plan = ReductionPlan(merge_retention=0.5, prune_start=1, prune_end=3)
    for question in ("What is it?", "What else?"):
        result, _ = ask(cached, media_parts("llava"), question, plan, steps=3)
        assert result.stats.prefix_tokens_reused == 0
    assert len(cached.prefix_cache) == 0 and cached.prefix_cache.stats.hits == 0


def test_shared_blocks_are_held_until_the_last_holder_lets_go_and_admission_evicts_entries(engine_for):
    base = engine_for("llava")
    cached = with_caches(base)
    pool, prefix = cached.pool, cached.prefix_cache
    ask(cached, media_parts("llava"), "What is it?", ReductionPlan(), steps=3)
    held = prefix.bytes // pool.block_bytes
    assert held > 0 and pool.used_blocks == held == prefix.evictable_blocks()  # only the entry holds blocks
    assert cached.memory_pressure() == 0.0  # blocks only the cache holds count as free
    # admission that needs the whole pool evicts the entry first
    assert pool.make_room(pool.num_blocks) and len(prefix) == 0 and pool.used_blocks == 0
    assert prefix.stats.evictions == 1
