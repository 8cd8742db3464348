"""The warm-up at start: a synthetic image question at every ladder level, then every level once more side by side,
to seed the controller's cost model (and warm kernels) before the first real request. Not counted as traffic: it
reaches no metric."""

from __future__ import annotations

import time

from aim_engine import AimEngine, GenerationRequest, RequestStats, SamplingParams
from aim_engine.request import ImagePart, TextPart
from controller.controller import BudgetController
from controller.cost_model import Observation

WARM_UP_BATCH_TOKENS = 16  # tokens each answer of the warm-up's batch decodes


def warm_up(engine: AimEngine, controller: BudgetController, rounds: int = 1) -> list[float]:
    """`rounds` requests per ladder level, computed without the caches (what computing costs, not what a cache
    saves); each one's stage timings teach the cost model. Returns their service times."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8))
    request = GenerationRequest([ImagePart(image=image), TextPart("Describe the image.")],
                                SamplingParams(max_new_tokens=4, ignore_eos=True))  # decode steps observed too
    service_times = []
    for _ in range(rounds):
        for level in controller.ladder:
            start = time.monotonic()
            with engine.without_caches():
                s = engine.generate(request, level.plan).stats
            controller.learn(observation_of(s))
            service_times.append(time.monotonic() - start)
    if rounds:
        # Then every level at once, with longer answers: decode steps of a batch over unequal KV, so that the step's
        # batch and KV terms are fitted before real requests share a batch (taught one request at a time, the batch
        # term stays 0 until they do).
        together = GenerationRequest(request.parts, SamplingParams(max_new_tokens=WARM_UP_BATCH_TOKENS,
                                                                   ignore_eos=True))
        with engine.without_caches():
            results = engine.generate_together([(together, level.plan) for level in controller.ladder])
        for result in results:
            controller.learn(observation_of(result.stats))
    return service_times


def observation_of(stats: RequestStats, media_s: float = 0.0, sampling: SamplingParams | None = None) -> Observation:
    """What a finished request teaches the cost model: its stage timings and sizes. Vision as computing costs it
    (the cost model must not learn that a cache hit's vision is free); `sampling`: a real request's (its answer
    length counts), None for a warm-up's."""
    t = stats.timings
    return Observation(media_s=media_s, vision_s=t.vision_s + stats.vision_s_saved,
                       visual_tokens_in=stats.visual_tokens_in, prefill_s=t.prefill_s,
                       prefill_flops=stats.prefill_flops, decode_s=t.decode_steps_s, new_tokens=stats.completion_tokens,
                       mean_batch=stats.mean_batch, mean_kv_tokens=stats.mean_kv_attended,
                       max_new_tokens=None if sampling is None else sampling.max_new_tokens,
                       ignore_eos=False if sampling is None else sampling.ignore_eos, decode_steps=stats.decode_steps)
