"""What the engine holds as work still to do (serving/load.py), which the controller plays forward: read between
steps while a video's prefill advances in slices beside a streaming answer, it shrinks as the work is done, and a
request not yet in the engine reads as it will once added."""

from __future__ import annotations

import math

import pytest

from aim_engine import ReductionPlan
from aim_engine.cost import kv_tokens
from aim_engine.serving.slices import StepBudget
from tests.engine.test_batching import Run
from tests.engine.test_slicing import STREAMER, sliced_requests


def test_the_load_follows_a_sliced_prefill_beside_a_streaming_answer(engine_for):
    engine = engine_for("qwen2_vl", layers=5)
    request, plan = sliced_requests("qwen2_vl")[-1]  # a video of 8 frames, sliced; merging and pruning
    run = Run(engine)
    saved = engine.loop.budget
    engine.loop.limit(engine.loop.max_batch, budget=StepBudget(0.0))  # one piece per step
    try:
        streamer = run.add("streamer", STREAMER, ReductionPlan())
        while streamer.work is not None or streamer.next_token is None:
            engine.loop.step()
        ingested = engine.ingest(request)
        before = engine.pending_load(ingested, plan, due_in_s=7.0)
        estimate = engine.cost(ingested.shape, plan)
        assert before.vision_tokens == ingested.shape.visual_tokens_in > 0
        assert before.prefill_flops == estimate.prefill_flops and not before.admitted and not before.prefilled
        assert before.kv_blocks == engine.pool.blocks_for(kv_tokens(estimate, request.sampling.max_new_tokens))
        # what its decode steps will attend over: its prompt after merging and pruning, per layer on average
        per_layer = [estimate.text_tokens + v for v in estimate.visual_tokens_per_layer]
        assert before.context_tokens == sum(per_layer) / len(per_layer) < ingested.shape.visual_tokens_in
        seq = run.add(0, request, plan)
        seq.due = 1000.0
        seq.forecast = (985.0, 11.0)  # forecast at 985 s to take 11 s
        load = engine.loop.load(now=990.0)
        assert (load.max_batch, load.step_multiple) == (engine.loop.max_batch, 0.0)
        assert load.free_kv_blocks == engine.pool.available_blocks
        held, waiting = load.sequences
        assert held.admitted and held.prefilled and held.generated == len(streamer.generated) > 0
        assert held.due_in_s == math.inf and held.max_new_tokens == STREAMER.sampling.max_new_tokens
        assert held.forecast_s is None  # nobody forecast it
        # as pending_load said, with its forecast: made 5 s ago, of 11 s
        assert waiting == type(before)(**{**before.__dict__, "due_in_s": 10.0, "forecast_s": 11.0,
                                          "forecast_age_s": 5.0, "seq_id": seq.seq_id})
        assert held.seq_id == streamer.seq_id != seq.seq_id
        # work that joined after the forecast moves it later, by the sequence's id; one nobody forecast stays so
        engine.loop.extend_forecasts({seq.seq_id: 2.0, streamer.seq_id: 1.0})
        assert seq.forecast == (985.0, 11.0)  # it counted on the others: what came after is its error
        seq.forecast_moves = True  # it counted on no other work: what comes after moves it
        engine.loop.extend_forecasts({seq.seq_id: 2.0, streamer.seq_id: 1.0})
        assert seq.forecast == (985.0, 13.0) and streamer.forecast is None
        assert engine.loop.load(now=990.0).sequences[1].forecast_s == 13.0
        seen = []
        while seq.work is not None or seq.status == "waiting":
            engine.loop.step()
            now = engine.loop.load(now=990.0).sequences[1]
            seen.append((now.vision_tokens, now.prefill_flops, now.admitted))
        # admitted at the first step; the video's tokens go in slices, then the layers' FLOPs, never back up
        assert all(admitted for *_, admitted in seen)
        tokens, flops = [t for t, _, _ in seen], [f for _, f, _ in seen]
        assert tokens == sorted(tokens, reverse=True) and len(set(tokens)) > 2 and tokens[-1] == 0
        assert flops == sorted(flops, reverse=True) and flops[0] == estimate.prefill_flops
        assert len(set(flops)) >= engine.num_layers
        done = engine.loop.load(now=990.0).sequences[1]
        assert done.prefilled and done.prefill_flops == 0 and done.vision_tokens == 0
        # its next decode step feeds back its last token and reads what it holds then: one more than now
        assert done.context_tokens == float(seq.kv.lengths.mean()) + 1 == before.context_tokens + len(seq.generated)
    finally:
        engine.loop.cancel(run.seqs["streamer"])
        engine.loop.limit(engine.loop.max_batch, budget=saved)


def test_a_requests_stats_say_how_much_kv_its_decode_steps_read(engine_for):
    """What the cost model fits a decode step's KV term from: alone, a request's steps read its prompt and the
    tokens fed back so far (after each step's write: prompt + 1, ..., prompt + n - 1)."""
    engine = engine_for("llava", layers=4)
    from aim_engine import GenerationRequest, SamplingParams
    from aim_engine.request import TextPart

    result = engine.generate(GenerationRequest([TextPart("Say something long.")],
                                               SamplingParams(max_new_tokens=5, ignore_eos=True)), ReductionPlan())
    stats = result.stats
    assert stats.completion_tokens == 5 and stats.mean_batch == 1.0
    assert stats.mean_kv_attended == stats.prompt_tokens + (1 + 2 + 3 + 4) / 4


def test_the_decode_batch_counts_the_kv_its_members_read_padded_to_the_longest(engine_for):
    """DecodeBatch.kv_attended (array operations, on the decode step's host path) is, per layer, the members padded
    to the longest (decode_read.tokens_read), averaged over the layers, pruned layers of unequal length included;
    the same of the members' KV handed to it in any order (what the step budget reads for sequences not yet in
    the batch)."""
    from aim_engine import GenerationRequest, SamplingParams
    from aim_engine.decode_read import tokens_read
    from aim_engine.request import TextPart

    engine = engine_for("llava", layers=4)
    run = Run(engine)
    pruned = ReductionPlan(prune_start=1, prune_end=3)
    for i, plan in enumerate([ReductionPlan(), pruned, ReductionPlan()]):
        run.add(i, GenerationRequest([TextPart("word " * (5 + 7 * i))],
                                     SamplingParams(max_new_tokens=6, ignore_eos=True)), plan)
    seen = []

    def check(_step=None):
        batch = engine.loop.runner.batch
        if batch.members:
            kvs = [s.kv for s in run.seqs.values() if s.kv in batch.members][::-1]
            layers = len(kvs[0].lengths)
            by_layer = sum(tokens_read([int(kv.lengths[layer]) for kv in kvs]) for layer in range(layers)) / layers
            summed = sum(float(kv.lengths.mean()) for kv in kvs)
            seen.append((batch.kv_attended(), batch.kv_attended(kvs), by_layer, summed, len(kvs)))

    run.step_until_done(on_step=check)
    assert seen and all(a == pytest.approx(b) == pytest.approx(c) for a, b, c, _, _ in seen)
    assert any(n > 1 and a > s for a, _, _, s, n in seen)  # unequal prompts: padding is read too
