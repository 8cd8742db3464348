"""The feedback loop on the safety margin: observed p95 latency against the SLO target, every few seconds.

Additive increase / multiplicative decrease on the margin that `decide` multiplies predictions by:
- p95 above target x (1 + deadband): the predictions were too optimistic -> margin x= increase_factor (fast
  reaction, fewer violations);
- p95 below target x (1 - deadband): room to spare -> margin -= decrease_step (slow return to quality);
- inside the deadband: unchanged, so noise does not make it oscillate.
Each step changes the margin by at most `max_step_ratio` (rate limit) and keeps it in [min_margin, max_margin]
(anti-windup: a margin pinned at a bound stops integrating). A pure function of (state, observation, time).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class FeedbackConfig:
    target_fraction: float = 0.75  # aim p95 at this share of the SLO, so that ~99% finish within it
    deadband: float = 0.1  # relative band around the target with no change
    increase_factor: float = 1.25  # multiplicative increase when too slow
    decrease_step: float = 0.05  # additive decrease when there is room
    max_step_ratio: float = 1.5  # rate limit: one step changes the margin by at most this factor
    min_margin: float = 1.0
    max_margin: float = 4.0
    interval_s: float = 2.0  # seconds between steps
    min_samples: int = 5  # requests needed in the window before the p95 is trusted


@dataclass(frozen=True)
class FeedbackState:
    margin: float = 1.2
    last_step_at: float | None = None
    last_action: str = "start"


def step(state: FeedbackState, p95_s: float | None, slo_s: float, samples: int, now: float,
         config: FeedbackConfig = FeedbackConfig()) -> FeedbackState:
    """One control step. Returns the state unchanged when it is not yet time or the data is too thin."""
    if state.last_step_at is not None and now - state.last_step_at < config.interval_s:
        return state
    if p95_s is None or samples < config.min_samples or slo_s <= 0:
        return replace(state, last_step_at=now, last_action="hold: too few samples")
    target = config.target_fraction * slo_s
    error = p95_s / target - 1.0
    if error > config.deadband:
        proposed, action = state.margin * config.increase_factor, "increase: p95 above target"
    elif error < -config.deadband:
        proposed, action = state.margin - config.decrease_step, "decrease: p95 below target"
    else:
        return replace(state, last_step_at=now, last_action="hold: inside the deadband")
    lo, hi = state.margin / config.max_step_ratio, state.margin * config.max_step_ratio
    margin = min(config.max_margin, max(config.min_margin, min(hi, max(lo, proposed))))
    if margin == state.margin:
        action = f"hold: margin pinned at {margin:.2f}"
    return FeedbackState(margin=margin, last_step_at=now, last_action=action)
