"""The warm-up at start: a synthetic image question at every ladder level, to seed the controller's cost model
(and warm kernels) before the first real request. Not counted as traffic: it reaches no metric."""

from __future__ import annotations

import time

from aim_engine import AimEngine, GenerationRequest, SamplingParams
from aim_engine.request import ImagePart, TextPart
from controller.controller import BudgetController
from controller.cost_model import Observation


def warm_up(engine: AimEngine, controller: BudgetController, rounds: int = 1) -> list[float]:
    """`rounds` requests per ladder level, computed without the caches (what computing costs, not what a cache
    saves); each one's stage timings teach the cost model. Returns their service times."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8))
    request = GenerationRequest([ImagePart(image=image), TextPart("Describe the image.")],
                                SamplingParams(max_new_tokens=4))
    service_times = []
    for _ in range(rounds):
        for level in controller.ladder:
            start = time.monotonic()
            with engine.without_caches():
                s = engine.generate(request, level.plan).stats
            controller.learn(Observation(
                media_s=0.0, vision_s=s.timings.vision_s, visual_tokens_in=s.visual_tokens_in,
                prefill_s=s.timings.prefill_s, prefill_flops=s.prefill_flops, decode_s=s.timings.decode_s,
                new_tokens=s.completion_tokens))
            service_times.append(time.monotonic() - start)
    return service_times
