"""Predicted latency of a request from its size under a plan and the batch it will decode in.

    latency = media + visual_tokens_in * r_vision + prefill_flops * r_prefill + new_tokens * step(batch)
    step(batch) = a + b * batch    (seconds per decode step when `batch` sequences decode together)

Under continuous batching a step serves every running sequence, so a request's time per token grows with the
batch it shares (b), from a floor that does not (a: weights read once per step). a and b are fitted by
exponentially weighted least squares over finished requests (their decode time per token against the mean batch
they decoded in); with no spread in the batches seen yet, step(batch) is their weighted mean.

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
    mean_batch: float = 1.0  # sequences per decode step, averaged over the request's steps


@dataclass(frozen=True)
class CostModel:
    media_s: float | None = None
    s_per_visual_token: float | None = None
    s_per_prefill_flop: float | None = None
    # exponentially weighted sums over (x = mean batch, y = seconds per decode step): weight, x, y, x^2, x*y
    step_fit: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    @property
    def ready(self) -> bool:
        return self.s_per_prefill_flop is not None

    def s_per_step(self, batch: float = 1.0) -> float | None:
        """Seconds per decode step at this batch size (None before any decode was observed)."""
        w, sx, sy, sxx, sxy = self.step_fit
        if w <= 0:
            return None
        mean_x, mean_y = sx / w, sy / w
        var_x = sxx / w - mean_x * mean_x
        if var_x <= 1e-6 * max(1.0, mean_x * mean_x):
            return mean_y
        slope = max(0.0, (sxy / w - mean_x * mean_y) / var_x)
        return max(0.0, mean_y + slope * (batch - mean_x))

    def predict(self, visual_tokens_in: int, prefill_flops: float, new_tokens: int, batch: float = 1.0,
                media: bool = True) -> float | None:
        """Seconds from arrival (`media=False`: from the end of media decoding)."""
        if not self.ready:
            return None
        return (((self.media_s or 0.0) if media else 0.0) + visual_tokens_in * (self.s_per_visual_token or 0.0)
                + prefill_flops * self.s_per_prefill_flop + new_tokens * (self.s_per_step(batch) or 0.0))

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
            x, y = obs.mean_batch, obs.decode_s / (obs.new_tokens - 1)
            keep = 1 - SMOOTHING
            updated = replace(updated, step_fit=tuple(
                keep * old + new for old, new in zip(self.step_fit, (1.0, x, y, x * x, x * y))))
        return updated
