"""Continuous batching is exact: sequences decoded together — different media, prompts, plans (none, merge,
merge+prune, staged, proportional attention) and answer lengths, joining mid-decode, one cancelled — give the
tokens and logits each gives alone. And the KV pool: never over its budget, every block back after a mixed run,
requests that cannot fit queued or refused."""

from __future__ import annotations

import pytest
import torch

from aim_engine import GenerationRequest, GenerationResult, ImagePart, ReductionPlan, SamplingParams, TextPart
from aim_engine import VideoPart
from aim_engine.engine import AimEngine
from aim_engine.serving.scheduler import KVBudgetError
from tests.conftest import (FAMILIES, VIDEO_FAMILIES, assert_same_greedy, logit_tolerance, random_frames,
                            random_image)

LOGIT_TOL = logit_tolerance(1e-4)  # the batch pads keys and masks them, so kernels differ from the lone run's

PLANS = {
    "none": ReductionPlan(),
    "merge": ReductionPlan(merge_retention=0.5),
    "merge+prune": ReductionPlan(merge_retention=0.5, prune_start=1, prune_end=3),
    "staged": ReductionPlan(prune_stages=((1, 0.5), (2, 0.25)), importance="last_token"),
    "proportional": ReductionPlan(merge_retention=0.4, prune_start=2, prune_end=4, proportional_attention=True),
}


def mixed_requests(family: str) -> list[tuple[GenerationRequest, ReductionPlan]]:
    video = family in VIDEO_FAMILIES
    media = [
        [ImagePart(image=random_image(31)), TextPart("Describe the picture in detail.")],
        [TextPart("Compare"), ImagePart(image=random_image(32, (30, 50))), TextPart("with"),
         ImagePart(image=random_image(33)), TextPart("please.")],
        [VideoPart(frames=random_frames(34, 4), fps=4.0), TextPart("What happens?")] if video else
        [ImagePart(image=random_image(35, (60, 40))), TextPart("Count.")],
        [TextPart("Just text, no media at all.")],
        [ImagePart(image=random_image(36, (48, 48))), TextPart("Colour?")],
    ]
    lengths = [12, 5, 9, 3, 7]
    return [(GenerationRequest(parts, SamplingParams(max_new_tokens=n, ignore_eos=True)), plan)
            for parts, n, plan in zip(media, lengths, PLANS.values())]


class Run:
    """Sequences added at chosen steps, stepped to the end; per sequence its events, tokens and logits."""

    def __init__(self, engine: AimEngine):
        self.engine = engine
        self.events: dict[int, list] = {}
        self.seqs = {}

    def add(self, key, request: GenerationRequest, plan: ReductionPlan, should_stop=None):
        events = self.events.setdefault(key, [])
        seq = self.engine.sequence(self.engine.ingest(request), plan, events.append, should_stop)
        seq.logits = []
        self.engine.loop.add(seq)
        self.seqs[key] = seq
        return seq

    def result(self, key) -> GenerationResult:
        last = self.events[key][-1]
        assert isinstance(last, GenerationResult), last
        return last

    def step_until_done(self, on_step=None):
        steps = 0
        while self.engine.loop.has_work():
            self.engine.loop.step()
            steps += 1
            if on_step is not None:
                on_step(steps)
            assert steps < 1000
        return steps


def alone(engine, request, plan, should_stop=None):
    run = Run(engine)
    run.add(0, request, plan, should_stop)
    run.step_until_done()
    return run.result(0), run.seqs[0].logits


def assert_same_answer(batched: GenerationResult, batched_logits, lone: GenerationResult, lone_logits):
    assert_same_greedy(batched.token_ids, batched_logits, lone.token_ids, lone_logits, LOGIT_TOL)
    if batched.token_ids == lone.token_ids:
        assert batched.finish_reason == lone.finish_reason


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_alone_with_mixed_plans_and_late_joiners(engine_for, family):
    engine = engine_for(family, layers=5)
    requests = mixed_requests(family)
    lone = [alone(engine, request, plan) for request, plan in requests]

    run = Run(engine)
    batch_sizes = []
    engine.loop.on_decode_step = lambda step: batch_sizes.append(step.sequences)
    joins = {0: [0, 1, 2], 2: [3], 4: [4]}  # steps at which sequences join: 3 at once, then mid-decode
    for key in joins[0]:
        run.add(key, *requests[key])

    def join(step):
        for key in joins.get(step, []):
            run.add(key, *requests[key])

    try:
        run.step_until_done(join)
    finally:
        engine.loop.on_decode_step = None
    assert max(batch_sizes) >= 4  # they really decoded together
    for key, (result, logits) in enumerate(lone):
        assert_same_answer(run.result(key), run.seqs[key].logits, result, logits)
        assert run.result(key).stats.mean_batch > 1
        # the reservation made before prefill from the plan was exact: run to max_new_tokens, every layer held
        # precisely the tokens it was promised
        assert run.seqs[key].kv.lengths.tolist() == run.seqs[key].kv_tokens
    assert engine.pool.used_blocks == 0 and engine.pool.reserved_blocks == 0


def test_one_cancelled_mid_batch_leaves_the_others_unchanged(engine_for):
    engine = engine_for("qwen2_vl", layers=5)
    requests = mixed_requests("qwen2_vl")[:3]
    lone = [alone(engine, request, plan) for request, plan in requests]
    run = Run(engine)
    cancel = {"now": False}
    for key, (request, plan) in enumerate(requests):
        run.add(key, request, plan, should_stop=(lambda: cancel["now"]) if key == 1 else None)
    used = []

    def on_step(step):
        used.append(engine.pool.used_blocks)
        if step == 2:
            cancel["now"] = True

    run.step_until_done(on_step)
    assert run.result(1).finish_reason == "cancelled" and 0 < len(run.result(1).token_ids) < 5
    # its blocks went back at the step boundary after the cancel
    assert used[2] < used[1]
    for key in (0, 2):
        assert_same_answer(run.result(key), run.seqs[key].logits, *lone[key])


def test_seeded_sampling_is_reproducible_in_a_batch(engine_for):
    engine = engine_for("llava_onevision", layers=5)
    requests = mixed_requests("llava_onevision")
    sampled = GenerationRequest(requests[0][0].parts, SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.9,
                                                                     seed=11, ignore_eos=True))
    lone, _ = alone(engine, sampled, ReductionPlan())
    other_seed, _ = alone(engine, GenerationRequest(sampled.parts, SamplingParams(
        max_new_tokens=12, temperature=1.3, top_p=0.9, seed=12, ignore_eos=True)), ReductionPlan())
    assert lone.token_ids != other_seed.token_ids
    run = Run(engine)
    for key, (request, plan) in enumerate(requests[1:4]):
        run.add(key, request, plan)
    run.add("sampled", sampled, ReductionPlan())
    run.add("twin", sampled, ReductionPlan())  # the same seed twice in one batch: two identical answers
    run.step_until_done()
    assert run.result("sampled").token_ids == lone.token_ids == run.result("twin").token_ids


# ---- memory ------------------------------------------------------------------------------------
def small_pool_engine(engine: AimEngine, kv_bytes: int, max_batch: int = 8) -> AimEngine:
    """The same model behind a second serving loop with its own small KV pool."""
    return AimEngine(engine.adapter, name="small", limits=engine.limits, kv_cache_bytes=kv_bytes,
                     max_batch=max_batch)


def test_pool_holds_its_budget_queues_what_does_not_fit_and_gets_every_block_back(engine_for):
    base = engine_for("llava_onevision", layers=5)
    requests = mixed_requests("llava_onevision")
    needs = [base.sequence(base.ingest(r), p, emit=print).kv_tokens for r, p in requests]
    block_bytes = base.pool.block_bytes
    # room for the largest request and a little more: the rest must wait their turn
    largest = max(base.pool.blocks_for(t) for t in needs)
    engine = small_pool_engine(base, (largest + 4) * block_bytes)
    pool = engine.pool
    assert pool.capacity_bytes <= (largest + 4) * block_bytes

    run = Run(engine)
    stop_flags = {}
    for round_ in range(3):
        for key, (request, plan) in enumerate(requests):
            name = (round_, key)
            stop_flags[name] = False
            run.add(name, request, plan, should_stop=lambda name=name: stop_flags[name])
    with pytest.raises(KVBudgetError, match="KV cache"):  # could never fit: refused at once
        big = GenerationRequest(requests[2][0].parts, SamplingParams(max_new_tokens=3000))
        run.add("too-big", big, ReductionPlan())
    observed = {"queued_for_memory": False}

    def on_step(step):
        sched = engine.loop.scheduler
        assert pool.used_blocks <= pool.reserved_blocks <= pool.num_blocks
        if sched.waiting and len(sched.running) < sched.max_batch:
            observed["queued_for_memory"] = True
        if step == 3:  # a caller gone or a deadline passed: one running and one waiting sequence stop
            running = [k for k, s in run.seqs.items() if s.status == "running"]
            waiting = [k for k, s in run.seqs.items() if s.status == "waiting"]
            stop_flags[running[0]] = True
            stop_flags[waiting[-1]] = True

    run.step_until_done(on_step)
    assert observed["queued_for_memory"]
    reasons = [run.result(k).finish_reason for k in stop_flags]
    assert reasons.count("cancelled") == 2 and reasons.count("length") == len(stop_flags) - 2
    assert pool.used_blocks == 0 and pool.reserved_blocks == 0 and pool.free_blocks == pool.num_blocks
    # and the answers are still the lone ones
    lone = [alone(base, request, plan) for request, plan in requests]
    for (round_, key), stopped in stop_flags.items():
        if not stopped:
            assert_same_answer(run.result((round_, key)), run.seqs[(round_, key)].logits, *lone[key])


def test_max_batch_one_serves_one_at_a_time(engine_for):
    base = engine_for("llava", layers=5)
    engine = AimEngine(base.adapter, kv_cache_bytes=64 * 2**20, max_batch=1)
    run = Run(engine)
    sizes = []
    engine.loop.on_decode_step = lambda step: sizes.append(step.sequences)
    for key, (request, plan) in enumerate(mixed_requests("llava")[:3]):
        run.add(key, request, plan)
    run.step_until_done()
    assert set(sizes) == {1}
    assert [run.result(k).stats.mean_batch for k in range(3)] == [1.0, 1.0, 1.0]


def _count_calls(monkeypatch, engine, method: str) -> list:
    calls = []
    vision = engine.adapter.model.model
    original = getattr(vision, method)
    monkeypatch.setattr(vision, method, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def _assert_same_media(batched, alone):
    assert batched.kind == alone.kind
    assert [g.tolist() for g in batched.groups] == [g.tolist() for g in alone.groups]
    if alone.grid_thw is not None:
        assert batched.grid_thw.tolist() == alone.grid_thw.tolist()
    assert batched.extra == alone.extra
    assert batched.vision_flops == alone.vision_flops
    torch.testing.assert_close(batched.features, alone.features, atol=logit_tolerance(1e-5), rtol=0)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_videos_admitted_together_share_one_pass_through_the_vision_tower(engine_for, family, monkeypatch):
    engine = engine_for(family, layers=5)
    # different lengths, rates and (Qwen: the tower attends per video) frame sizes
    videos = [VideoPart(frames=random_frames(40 + i, n, size), fps=fps)
              for i, (n, size, fps) in enumerate(((3, (64, 64), 4.0), (5, (48, 80), 2.0), (2, (64, 64), None)))]
    alone = [engine.preparer.encode_media([v]) for v in videos]
    calls = _count_calls(monkeypatch, engine, "get_image_features" if family in ("llava_dinov2", "internvl") else
                         "get_video_features")  # those two encode a frame as an image
    run = Run(engine)
    for key, video in enumerate(videos):
        run.add(key, GenerationRequest([video, TextPart("What moves?")], SamplingParams(max_new_tokens=2)),
                ReductionPlan())
    run.step_until_done()
    assert len(calls) == 1  # three requests' ten frames in one pass
    for key, media in enumerate(alone):
        _assert_same_media(run.seqs[key].prepared.media[0], media[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_images_admitted_together_share_one_pass_where_the_family_allows(engine_for, family, monkeypatch):
    """Families whose image features do not depend on the prompt's other images encode every admitted
    request's images in one pass; LLaVA-OneVision (several images in a prompt get base views only) encodes
    prompt by prompt. Either way each image's features are those it gets alone."""
    engine = engine_for(family, layers=5)
    image_sets = [[random_image(50, (64, 64))], [random_image(51, (40, 72)), random_image(52, (64, 48))],
                  [random_image(53, (56, 56))]]
    alone = [engine.preparer.encode_media([ImagePart(image=im) for im in images]) for images in image_sets]
    calls = _count_calls(monkeypatch, engine, "get_image_features")
    run = Run(engine)
    for key, images in enumerate(image_sets):
        parts = [ImagePart(image=im) for im in images] + [TextPart("What is shown?")]
        run.add(key, GenerationRequest(parts, SamplingParams(max_new_tokens=2)), ReductionPlan())
    run.step_until_done()
    assert len(calls) == (1 if engine.adapter.images_independent else len(image_sets))
    assert engine.adapter.images_independent == (family != "llava_onevision")
    for key, media in enumerate(alone):
        batched = run.seqs[key].prepared.media
        assert len(batched) == len(media)
        for b, a in zip(batched, media):
            _assert_same_media(b, a)


def test_a_burst_is_prefilled_across_steps_with_decode_steps_between(engine_for):
    """With a prefill budget of one prompt per step, three arrivals join the batch one step apart (each step also
    runs a decode step for those already running), and each still gets its whole answer."""
    base = engine_for("llava", layers=5)
    engine = AimEngine(base.adapter, kv_cache_bytes=64 * 2**20, prefill_tokens_per_step=1)
    run = Run(engine)
    for key, (request, plan) in enumerate(mixed_requests("llava")[:3]):
        run.add(key, GenerationRequest(request.parts, SamplingParams(max_new_tokens=6, ignore_eos=True)), plan)
    running = []
    run.step_until_done(lambda step: running.append(len(engine.loop.scheduler.running)))
    assert running[:3] == [1, 2, 3]
    assert [len(run.result(k).token_ids) for k in range(3)] == [6, 6, 6]
    assert len(run.seqs[0].logits) == 6 and run.seqs[0].decode_steps == 5


def test_a_sequence_that_outgrows_its_reservation_fails_alone_and_the_batch_goes_on(engine_for):
    """A sequence whose reservation is short of its answer (as if its KV need were under-counted) asks for a block
    no one has promised, with none left: it fails with KVPoolExhausted, and the other answers as alone."""
    from aim_engine.kv_pool import KVPoolExhausted

    engine = engine_for("llava")
    request = GenerationRequest([TextPart("Tell me a long story.")], SamplingParams(max_new_tokens=40,
                                                                                 ignore_eos=True))
    lone, lone_logits = alone(engine, request, ReductionPlan())
    run = Run(engine)
    short = run.add("short", request, ReductionPlan())
    short.kv_tokens = [t - 39 for t in short.kv_tokens]  # room for its prompt and one token
    run.add("whole", request, ReductionPlan())
    engine.loop.step()  # both admitted and prefilled: their reservations taken
    pool = engine.pool
    spare = pool.free_blocks - (pool.reserved_blocks - pool.used_blocks)
    filler = pool.reserve([spare * pool.block_size] + [0] * (engine.num_layers - 1))  # nothing left to take
    try:
        run.step_until_done()
    finally:
        pool.release(filler)
    assert isinstance(run.events["short"][-1], KVPoolExhausted)
    assert_same_answer(run.result("whole"), run.seqs["whole"].logits, lone, lone_logits)


def test_generate_together_decodes_side_by_side_and_answers_as_alone(engine_for):
    """The engine's own way to run requests that arrive together (the service's warm-up uses it to teach the
    cost model a batch): each request's answer, in the order given, decoded in one batch (that a batch answers as
    each alone is the test above), every block back."""
    engine = engine_for("llava_onevision", layers=5)
    requests = mixed_requests("llava_onevision")
    together = engine.generate_together(requests)
    assert [len(r.token_ids) for r in together] == [r.sampling.max_new_tokens for r, _ in requests]
    assert max(r.stats.mean_batch for r in together) >= 3
    assert engine.pool.used_blocks == 0 and engine.pool.reserved_blocks == 0
