"""Prefill in slices beside a running batch (serving/slices.py) is exact: a request whose vision and LLM prefill
are cut into the smallest pieces (one video slice or one layer per engine step) while another answer streams gives
the tokens and logits it gives unsliced, for every family and the pruning, staged, proportional-attention and
merging plans; with prefix reuse and DeepStack; and a request cancelled between two slices frees its KV. The
step's pieces are chosen by predicted seconds (plan_step), and the persistent decode batch bounds its attention
workspace (kv_pool.PagedLayer) without changing a logit."""

from __future__ import annotations

import math

import pytest
import torch

from aim_engine import GenerationRequest, ReductionPlan, SamplingParams, TextPart, VideoPart
from aim_engine.cost import RequestShape
from aim_engine.serving import model_runner
from aim_engine.serving.slices import PrefillWork, StageRates, StepBudget, plan_step
from tests.conftest import FAMILIES, VIDEO_FAMILIES, random_frames
from tests.engine.test_batching import PLANS, Run, alone, assert_same_answer, mixed_requests
from tests.engine.test_prefix_cache import with_caches

STREAMER = GenerationRequest([TextPart("Tell a long story about the sea.")],
                             SamplingParams(max_new_tokens=400, ignore_eos=True))


def sliced_requests(family: str):
    """The batching test's mixed requests, plus a longer video where the family takes video (frame slices)."""
    requests = mixed_requests(family)
    if family in VIDEO_FAMILIES:
        requests.append((GenerationRequest([VideoPart(frames=random_frames(41, 8), fps=2.0),
                                            TextPart("Which way does it move?")],
                                           SamplingParams(max_new_tokens=6, ignore_eos=True)),
                         PLANS["merge+prune"]))
    return requests


class StepPlans:
    """Every step's plan_step choice under a bounded budget (a running batch to protect), recorded through the
    runner."""

    def __init__(self, monkeypatch):
        self.plans = []
        real = model_runner.plan_step

        def record(*args, **kwargs):
            plan = real(*args, **kwargs)
            if math.isfinite(args[1]):
                self.plans.append(plan)
            return plan

        monkeypatch.setattr(model_runner, "plan_step", record)

    def pieces(self) -> list[int]:
        return [sum(len(p.vision) + p.layers for p in plan) for plan in self.plans]

    def frame_slices(self) -> int:
        return sum(1 for plan in self.plans for p in plan for v in p.vision if v.frames is not None)


def run_sliced(engine, requests, budget: StepBudget, on_step=None) -> Run:
    """The requests added while a long answer streams (so the step budget binds), stepped until they end."""
    run = Run(engine)
    saved = engine.loop.budget
    engine.loop.limit(engine.loop.max_batch, budget=budget)
    try:
        streamer = run.add("streamer", STREAMER, ReductionPlan())
        while streamer.work is not None or streamer.next_token is None:
            engine.loop.step()
        for key, (request, plan) in enumerate(requests):
            run.add(key, request, plan)
        steps = 0
        while any(s.status != "finished" for k, s in run.seqs.items() if k != "streamer"):
            engine.loop.step()
            steps += 1
            if on_step is not None:
                on_step(steps, run)
            assert steps < 5000
    finally:
        engine.loop.cancel(run.seqs["streamer"])
        engine.loop.limit(engine.loop.max_batch, budget=saved)
    return run


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefill_sliced_to_one_piece_per_step_equals_it_unsliced(engine_for, family, monkeypatch):
    engine = engine_for(family, layers=5)
    requests = sliced_requests(family)
    lone = [alone(engine, request, plan) for request, plan in requests]
    steps = StepPlans(monkeypatch)
    run = run_sliced(engine, requests, StepBudget(0.0))
    for key, (result, logits) in enumerate(lone):
        assert_same_answer(run.result(key), run.seqs[key].logits, result, logits)
        assert run.result(key).stats.visual_tokens_per_layer == result.stats.visual_tokens_per_layer
        assert run.result(key).stats.prefill_flops == result.stats.prefill_flops
    # one piece per step, really: every layer of every prompt on a step of its own
    assert steps.pieces() and max(steps.pieces()) == 1
    assert sum(p.layers for plan in steps.plans for p in plan) == len(requests) * engine.num_layers
    if family in VIDEO_FAMILIES and engine.adapter.video_slice_frames is not None:
        assert steps.frame_slices() >= 8 // engine.adapter.video_slice_frames
    assert engine.pool.used_blocks == 0 and engine.pool.reserved_blocks == 0


# LLaVA-OneVision pools each video with a newline after its last frame: it declares no slices, and its videos
# go through the tower whole (the sliced-prefill test above covers it so).
SLICED_VIDEO_FAMILIES = tuple(f for f in VIDEO_FAMILIES if f != "llava_onevision")


@pytest.mark.parametrize("family", SLICED_VIDEO_FAMILIES)
def test_a_video_encoded_in_slices_is_the_video_encoded_whole(engine_for, family):
    adapter = engine_for(family, layers=5).adapter
    assert adapter.video_slice_frames is not None
    frames = random_frames(7, 6, size=(40, 56))
    whole = adapter.encode_videos([(frames, 3.0)])[0]
    step = adapter.video_slice_frames
    parts = [adapter.encode_videos([(frames[i:i + step], 3.0)])[0] for i in range(0, len(frames), step)]
    joined = adapter.join_video(parts)
    torch.testing.assert_close(joined.features, whole.features, rtol=1e-4, atol=1e-4)
    assert [g.tolist() for g in joined.groups] == [g.tolist() for g in whole.groups]
    assert joined.vision_flops == pytest.approx(whole.vision_flops)
    if whole.grid_thw is not None:
        assert joined.grid_thw.tolist() == whole.grid_thw.tolist()
    if whole.deepstack is not None:
        torch.testing.assert_close(joined.deepstack, whole.deepstack, rtol=1e-4, atol=1e-4)


def test_slices_reuse_a_cached_prefix_and_give_the_same_answer(engine_for):
    """Both requests are prefilled in slices: a prefix is reused only where the LLM input is bitwise the same, and a
    video encoded in frame slices equals it encoded whole only to the dtype's tolerance (on some CPUs' kernels not
    bitwise), so the first request is sliced as the second is."""
    engine = with_caches(engine_for("llava_dinov2", layers=5))
    request = GenerationRequest([VideoPart(frames=random_frames(5, 4), fps=2.0), TextPart("What moves?")],
                                SamplingParams(max_new_tokens=5, ignore_eos=True))
    first = run_sliced(engine, [(request, PLANS["merge"])], StepBudget(0.0)).result(0)
    again = GenerationRequest([*request.parts[:1], TextPart("What moves? Answer briefly.")], request.sampling)
    second = alone(with_caches(engine_for("llava_dinov2", layers=5)), again, PLANS["merge"])
    run = run_sliced(engine, [(again, PLANS["merge"])], StepBudget(0.0))
    assert run.result(0).stats.prefix_tokens_reused > 0
    assert_same_answer(run.result(0), run.seqs[0].logits, *second)
    assert first.stats.prefix_tokens_reused == 0


def test_a_request_cancelled_between_slices_ends_and_frees_its_kv(engine_for):
    engine = engine_for("qwen2_vl", layers=5)
    request, plan = sliced_requests("qwen2_vl")[-1]
    stop = {"now": False}
    seen = {}

    def on_step(step, run):
        seq = run.seqs[0]
        if seq.work is not None and seq.work.run is not None and seq.work.run.layer >= 2 and not stop["now"]:
            stop["now"] = True
            seen["layer"] = seq.work.run.layer
            seen["held"] = engine.pool.used_blocks

    run = Run(engine)
    saved = engine.loop.budget
    engine.loop.limit(engine.loop.max_batch, budget=StepBudget(0.0))
    try:
        streamer = run.add("streamer", STREAMER, ReductionPlan())
        while streamer.work is not None or streamer.next_token is None:
            engine.loop.step()
        held_by_streamer = engine.pool.used_blocks
        seq = run.add(0, request, plan, should_stop=lambda: stop["now"])
        for step in range(1, 200):
            engine.loop.step()
            on_step(step, run)
            if seq.status == "finished":
                break
        assert run.result(0).finish_reason == "cancelled" and seen["layer"] < engine.num_layers
        assert seen["held"] > held_by_streamer  # it held prompt KV when it stopped ...
        # ... and none now: what the pool holds and has promised is the streamer's
        assert engine.pool.used_blocks == streamer.kv.held_blocks()
        assert engine.pool.reserved_blocks - engine.pool.used_blocks == streamer.kv.reserved
        assert streamer.status == "running" and streamer.work is None  # the streamer went on decoding
    finally:
        engine.loop.cancel(run.seqs["streamer"])
        engine.loop.limit(engine.loop.max_batch, budget=saved)
    assert engine.pool.used_blocks == 0 and engine.pool.reserved_blocks == 0


# ---- choosing a step's pieces -------------------------------------------------------------------------------
def _work(videos: int = 1, frames: int = 8, per_frame: int = 10, text: int = 20, layers: int = 4) -> PrefillWork:
    parts = [VideoPart(frames=[None] * frames) for _ in range(videos)]
    shape = RequestShape(media=[([per_frame] * frames, 0)] * videos, text_tokens=text)
    return PrefillWork(parts, shape, [text + videos * frames * per_frame] * layers, images_together=False,
                       slice_frames=2)


def test_the_step_budget_is_in_predicted_seconds_and_the_first_piece_always_runs():
    rates = StageRates(vision_s_per_token=0.01, prefill_s_per_flop=1.0, decode_step=lambda batch, kv: 0.5)
    flops = lambda work, layer: 0.25  # noqa: E731 - every layer predicted at 0.25 s
    # nobody decoding: nobody to stall, so everything runs
    assert StepBudget(1.0).seconds(rates, decoding=0) == math.inf
    assert StepBudget(None).seconds(rates, decoding=3) == math.inf
    assert StepBudget(2.0).seconds(rates, decoding=3) == pytest.approx(1.0)
    whole = plan_step([_work()], math.inf, rates, 4, flops)
    assert whole[0].vision[0].frames is None and whole[0].layers == 4
    # 0.5 s: the video (8 frames x 10 tokens x 0.01 s = 0.8 s) does not fit whole; 2 slices of 2 frames (0.4 s) do
    work = _work()
    plan = plan_step([work], 0.5, rates, 4, flops)
    assert [(v.items, v.frames) for v in plan[0].vision] == [((0,), (0, 4))] and plan[0].layers == 0
    work.next_frame[0] = 4
    work.slices[0] = ["first half"]
    # the rest of the video (0.4 s) and then layers within 1.0 s: 0.4 + 2 x 0.25
    plan = plan_step([work], 1.0, rates, 4, flops)
    assert [(v.items, v.frames) for v in plan[0].vision] == [((0,), (4, 8))] and plan[0].layers == 2
    # a budget of 0, or rates still unknown: one piece per step, the smallest (a slice, a layer)
    assert [(v.frames, p.layers) for p in plan_step([_work()], 0.0, rates, 4, flops) for v in p.vision] == \
        [((0, 2), 0)]
    unknown = plan_step([_work(videos=0)], 10.0, StageRates(), 4, flops)
    assert unknown[0].layers == 1
    # admission order: the second prompt gets what the first leaves
    first, second = _work(videos=0), _work(videos=0)
    plan = plan_step([first, second], 1.5, rates, 4, flops)
    assert [p.layers for p in plan] == [4, 2]
    # a prompt's fixed prefill cost (1 s over 4 layers) is part of each layer's: 0.5 s a layer fits 3 in 1.5 s
    fixed = StageRates(vision_s_per_token=0.01, prefill_s_per_flop=1.0, prefill_s_fixed=1.0)
    assert plan_step([_work(videos=0)], 1.5, fixed, 4, flops)[0].layers == 3
    # a step nobody decodes in (first_only): the oldest prefill whole, vision and every layer, and nothing after it
    plan = plan_step([_work(), _work(videos=0)], math.inf, rates, 4, flops, first_only=True)
    assert [(len(p.vision), p.layers) for p in plan] == [(1, 4)]
    assert [p.layers for p in plan_step([_work(videos=0), _work(videos=0)], math.inf, rates, 4, flops)] == [4, 4]


def test_a_step_nobody_decodes_in_prefills_the_oldest_prompt_and_its_answer_starts_at_the_next(engine_for):
    """With slicing on and nothing decoding, a step runs the oldest prefill whole and none of the next one's, so the
    first answer decodes from the next step on (beside the next prompt's slices) instead of waiting for every
    admitted prompt's prefill; the answers are the ones each gives alone."""
    engine = engine_for("qwen2_vl", layers=5)
    requests = mixed_requests("qwen2_vl")[:3]
    lone = [alone(engine, request, plan) for request, plan in requests]
    run = Run(engine)
    saved = engine.loop.budget
    engine.loop.limit(engine.loop.max_batch, budget=StepBudget(4.0))
    try:
        first, *others = [run.add(key, request, plan) for key, (request, plan) in enumerate(requests)]
        engine.loop.step()
        assert first.work is None and len(first.generated) == 2  # its first token, and a decode step after it
        for seq in others:  # nothing of theirs ran
            assert seq.work is None or (seq.work.run is None and not any(m is not None for m in seq.work.encoded))
            assert not seq.generated
        run.step_until_done()
    finally:
        engine.loop.limit(engine.loop.max_batch, budget=saved)
    for key, (result, logits) in enumerate(lone):
        assert_same_answer(run.result(key), run.seqs[key].logits, result, logits)


def test_the_budget_refuses_a_multiple_that_is_no_number():
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="multiple"):
            StepBudget(bad)


# ---- the decode workspace -----------------------------------------------------------------------------------
def test_one_long_sequence_among_short_ones_is_attended_in_bounded_groups(engine_for, monkeypatch):
    base = engine_for("llava", layers=4)
    long_request = GenerationRequest([TextPart("word " * 300)], SamplingParams(max_new_tokens=6, ignore_eos=True))
    short = [GenerationRequest([TextPart(f"Say {i}.")], SamplingParams(max_new_tokens=6, ignore_eos=True))
             for i in range(6)]
    requests = [(long_request, ReductionPlan())] + [(r, ReductionPlan()) for r in short]
    lone = [alone(base, r, p) for r, p in requests]
    from aim_engine.kv_pool import PagedLayer

    widths = []
    real = PagedLayer.keys_and_mask

    def spy(self, rows):
        keys, values, mask = real(self, rows)
        widths.append((keys.shape[0], keys.shape[2]))
        return keys, values, mask

    monkeypatch.setattr(PagedLayer, "keys_and_mask", spy)
    limit = 400
    monkeypatch.setattr(base.loop.runner.batch, "workspace_tokens", limit)
    steps = []
    base.loop.on_decode_step = steps.append
    run = Run(base)
    for key, (request, plan) in enumerate(requests):
        run.add(key, request, plan)
    try:
        run.step_until_done()
    finally:
        base.loop.on_decode_step = None
    # what the steps say they read (per layer, the accounting the decode step's rate is fitted to) is what the
    # gathers read: every group's rows x its longest, at every layer
    assert sum(step.kv_read for step in steps) * base.num_layers == pytest.approx(
        sum(rows * width for rows, width in widths))
    for key, (result, logits) in enumerate(lone):
        assert_same_answer(run.result(key), run.seqs[key].logits, result, logits)
    assert any(rows == 1 and width > 300 for rows, width in widths)  # the long one alone
    assert any(rows > 1 for rows, _ in widths)  # the short ones together
    assert all(rows * width <= limit for rows, width in widths if rows > 1)


def test_the_persistent_batch_keeps_every_members_tables_through_growth_joins_and_leaves():
    import random

    from aim_engine.kv_pool import DecodeBatch, KVLayout, KVPool

    layers = 3
    layout = KVLayout(layers, 2, 4, torch.float32)
    pool = KVPool(layout, 8 * KVPool.bytes_for(layout, [400] * layers))
    batch = DecodeBatch(pool, [None] * layers)
    rng, members, left = random.Random(0), [], []
    for step in range(200):
        if step % 9 == 0 and len(batch) < 7:  # joins past the first rows' and blocks' capacity
            kv = pool.reserve([400] * layers)
            for layer in range(layers):
                kv.append_slots(layer, rng.randrange(1, 60))
            batch.join(kv)
            members.append(kv)
        if step % 23 == 22:  # one leaves from the middle: the last row moves into its place
            kv = members.pop(len(members) // 2)
            batch.leave(kv)
            left.append((kv, kv.lengths.tolist()))
            pool.release(kv)
        assert batch.outgrown() == []
        decode = batch.step(torch.zeros(len(batch)), torch.float32)
        assert sorted(map(id, batch.members)) == sorted(map(id, members))
        for row, kv in enumerate(batch.members):
            assert kv.batch_row == row
            for layer in range(layers):
                assert int(decode.write[layer, row]) == int(kv.slots(layer)[-1])  # its new token's slot
                assert int(batch.lengths[layer, row]) == kv.lengths[layer] == batch._lengths[layer, row]
                assert batch.tables[layer, row, :len(kv.blocks[layer])].tolist() == kv.blocks[layer]
    assert batch.tables.shape[1] >= 7 and batch.tables.shape[2] > 4  # it grew in rows and in blocks
    for kv, lengths in left:  # a member that left keeps its lengths, no longer a view of the batch
        assert kv.lengths.tolist() == lengths and kv.batch_row is None
