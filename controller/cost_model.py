"""Predicted latency of a request from its size under a plan.

    latency = media + visual_tokens_in * r_vision + prefill_flops * r_prefill + new_tokens * r_token

Each rate is fitted online from the stage timings of finished requests (exponentially weighted means of
seconds per unit), so the model follows the machine it runs on. Until a stage has been observed its rate is
unknown and predictions say so (None).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

SMOOTHING = 0.2  # weight of the newest observation


@dataclass(frozen=True)
class Observation:
    media_s: float
    vision_s: float
    visual_tokens_in: int
    prefill_s: float
    prefill_flops: float
    decode_s: float
    new_tokens: int


@dataclass(frozen=True)
class CostModel:
    media_s: float | None = None
    s_per_visual_token: float | None = None
    s_per_prefill_flop: float | None = None
    s_per_token: float | None = None

    @property
    def ready(self) -> bool:
        return self.s_per_prefill_flop is not None

    def predict(self, visual_tokens_in: int, prefill_flops: float, new_tokens: int) -> float | None:
        if not self.ready:
            return None
        return ((self.media_s or 0.0) + visual_tokens_in * (self.s_per_visual_token or 0.0)
                + prefill_flops * self.s_per_prefill_flop + new_tokens * (self.s_per_token or 0.0))

    def observe(self, obs: Observation) -> "CostModel":
        def ewma(old, new):
            return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new

        updated = replace(self, media_s=ewma(self.media_s, obs.media_s))
        if obs.visual_tokens_in > 0:
            updated = replace(updated,
                              s_per_visual_token=ewma(self.s_per_visual_token, obs.vision_s / obs.visual_tokens_in))
        if obs.prefill_flops > 0:
            updated = replace(updated,
                              s_per_prefill_flop=ewma(self.s_per_prefill_flop, obs.prefill_s / obs.prefill_flops))
        if obs.new_tokens > 1:
            updated = replace(updated, s_per_token=ewma(self.s_per_token, obs.decode_s / (obs.new_tokens - 1)))
        return updated
