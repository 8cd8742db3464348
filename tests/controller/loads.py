"""Requests and engines for the controller's tests, in the engine's units, with a cost model of known rates: a
request of `seconds` is that many seconds of prefill and a one-token answer (no decode step)."""

import math

from aim_engine.serving.load import EngineLoad, SequenceLoad
from controller.cost_model import Observation

FLOPS_PER_S = 1e9  # the taught cost model's prefill rate


def teach(controller) -> None:
    """One prefill of 1e9 FLOPs in 1 s: the cost model's prefill rate (nothing else is known, nothing decodes)."""
    controller.learn(Observation(media_s=0.0, vision_s=0.0, visual_tokens_in=0, prefill_s=1.0,
                                 prefill_flops=FLOPS_PER_S, decode_s=0.0, new_tokens=1))


def work(seconds: float, due_in_s: float = math.inf, admitted: bool = False) -> SequenceLoad:
    return SequenceLoad(admitted=admitted, vision_tokens=0, prefill_flops=seconds * FLOPS_PER_S, prefilled=False,
                        generated=0, max_new_tokens=1, ignore_eos=False, kv_blocks=0, due_in_s=due_in_s)


def levels(seconds: list[float]) -> list[SequenceLoad]:
    return [work(s) for s in seconds]


def engine(*held: SequenceLoad, max_batch: int = 1) -> EngineLoad:
    """An unsliced engine holding `held` (running, then waiting)."""
    return EngineLoad(tuple(held), max_batch, None, 10 ** 9)


IDLE = engine()
