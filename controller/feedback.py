"""The feedback loop on the safety margin that `decide` multiplies predictions by: observed latency against the
SLO target, every few seconds. A pure function of (state, observations, time).

- Too slow — the window's p95 above target x (1 + deadband) *and* a request finished since the last step that was
  itself above it — margin x= increase_factor (rate limited to x max_step_ratio per step, at most max_margin).
  Requiring fresh evidence is the anti-windup: the slow requests of a burst that has ended stay in the window for
  its length, but once every request finishing is fast they no longer push the margin up.
- Room to spare — p95 below target x (1 - deadband): margin -= decrease_step per step (the slow, tuned return).
- The window is slow but the requests that finished since the last increase (at least min_samples) are fast, with
  p95 below the target band (a burst that has ended): margin -= decrease_step per step, no longer held up by the
  window's old samples. (A faster return here, tried at 2x, made the margin oscillate under a steady ramp.)
- No evidence at all — nothing finished for `quiet_s` (an idle server), or the window emptied — the margin relaxes
  toward min_margin exponentially with time: min + (margin - min) x exp(-dt / relax_s). It depends on the elapsed
  time, not on how many steps ran, so an idle server (no steps at all) is back near its floor at its next request.
- Otherwise (inside the deadband, too few samples, waiting for requests to finish): unchanged, so noise does not
  make it oscillate.

Bound, from the ceiling (4) to within 0.1 of the floor (4/3) after a burst's last slow request
(`recovery_bound_s`; the fake-clock test in tests/controller/test_feedback.py checks both): idle, quiet_s +
relax_s x ln(26.7) + one interval = 45 s with the defaults; with fast requests still arriving, 52 steps of
decrease_step = 104 s once min_samples of them have finished, plus one interval — and it leaves the ceiling at
the first step (the old loop held it there for the window's 60 s, and an idle server never stepped at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class FeedbackConfig:
    target_fraction: float = 0.75  # aim p95 at this share of the SLO, so that ~99% finish within it
    deadband: float = 0.1  # relative band around the target with no change
    increase_factor: float = 1.25  # multiplicative increase when too slow
    decrease_step: float = 0.05  # additive decrease per step when the window's p95 has room
    relax_s: float = 10.0  # time constant of the return toward min_margin
    quiet_s: float = 10.0  # with nothing finishing for this long, the loop relaxes (silence is not overload)
    max_step_ratio: float = 1.5  # rate limit: one increase multiplies the margin by at most this
    # The least margin a decision takes (None: 1 / target_fraction). A request planned to finish later than the
    # target share of its budget is planned past what this loop aims for; and a margin near 1, which the loop
    # relaxes to in a lull (the p95 of light-load answers has room), left decisions filling their budgets to the
    # edge, so that the cluster of arrivals after the lull made them late (docs/performance.md, the controller in
    # five scenarios).
    min_margin: float | None = None
    max_margin: float = 4.0
    interval_s: float = 2.0  # seconds between steps
    min_samples: int = 5  # requests needed in the window before the p95 is trusted

    def __post_init__(self) -> None:
        if self.min_margin is None:
            object.__setattr__(self, "min_margin", 1.0 / self.target_fraction)

    def recovery_bound_s(self, within: float = 0.1, idle: bool = True) -> float:
        """Seconds after the last slow request until the margin, from its ceiling, is within `within` of
        min_margin: idle, `quiet_s` then exponential relaxation; with fast requests finishing, `decrease_step`
        per step (a step needs a request to have finished since the last one). Plus one interval for the last
        step to land."""
        span = self.max_margin - self.min_margin
        if idle:
            return self.quiet_s + self.relax_s * math.log(max(1.0, span / within)) + self.interval_s
        return math.ceil(max(0.0, span - within) / self.decrease_step - 1e-9) * self.interval_s + self.interval_s


@dataclass(frozen=True)
class FeedbackState:
    margin: float = 1.2
    last_step_at: float | None = None
    last_action: str = "start"
    last_sample_at: float | None = None  # when the newest request seen by a step finished
    last_increase_at: float | None = None


@dataclass(frozen=True)
class Fresh:
    """The requests that finished since the last step: how many, the largest latency / SLO among them, and when the
    newest finished."""

    count: int = 0
    max_ratio: float | None = None
    newest_at: float | None = None


@dataclass(frozen=True)
class SinceIncrease:
    """The requests that finished after the last increase: how many, and their p95 / SLO."""

    count: int = 0
    p95: float | None = None


def step(state: FeedbackState, p95: float | None, slo: float, samples: int, now: float,
         config: FeedbackConfig = FeedbackConfig(), fresh: Fresh = Fresh(),
         since_increase: SinceIncrease = SinceIncrease()) -> FeedbackState:
    """One control step; `p95` over the window in the units of `slo`; `fresh`: the requests that finished since
    the last step; `since_increase`: since the last increase. Returns the state unchanged when it is not yet
    time."""
    if state.last_step_at is not None and now - state.last_step_at < config.interval_s:
        return state
    dt = 0.0 if state.last_step_at is None else now - state.last_step_at
    last_sample_at = fresh.newest_at if fresh.count else state.last_sample_at
    moved = replace(state, last_step_at=now, last_sample_at=last_sample_at)
    quiet_since = state.last_sample_at if state.last_sample_at is not None else state.last_step_at
    quiet = not fresh.count and quiet_since is not None and now - quiet_since >= config.quiet_s
    if p95 is None or samples < config.min_samples or slo <= 0:
        if quiet or p95 is None:
            return _relax(moved, dt, config, "relax: too few samples")
        return replace(moved, last_action="hold: too few samples")
    target = config.target_fraction * slo
    error = p95 / target - 1.0
    if error > config.deadband:
        if fresh.count and fresh.max_ratio is not None and fresh.max_ratio / target - 1.0 > config.deadband:
            proposed = min(state.margin * config.increase_factor, state.margin * config.max_step_ratio)
            margin = min(config.max_margin, max(config.min_margin, proposed))
            action = "increase: p95 above target" if margin != state.margin else f"hold: margin pinned at {margin:.2f}"
            return replace(moved, margin=margin, last_action=action, last_increase_at=now)
        if since_increase.count >= config.min_samples and since_increase.p95 is not None \
                and since_increase.p95 / target - 1.0 < -config.deadband:
            margin = max(config.min_margin, state.margin - config.decrease_step)
            return replace(moved, margin=margin, last_action="decrease: the requests since the last increase are "
                                                             "fast (the window's p95 is old)")
        if fresh.count:
            return replace(moved, last_action="hold: p95 above target, the requests finishing now near it")
        if quiet:
            return _relax(moved, dt, config, "relax: nothing finished lately")
        return replace(moved, last_action="hold: p95 above target, waiting for requests to finish")
    if error < -config.deadband:  # steady state with room: the slow, tuned decrease
        margin = max(config.min_margin, state.margin - config.decrease_step)
        action = "decrease: p95 below target" if margin != state.margin else f"hold: margin at {margin:.2f}"
        return replace(moved, margin=margin, last_action=action)
    return replace(moved, last_action="hold: inside the deadband")


def _relax(state: FeedbackState, dt: float, config: FeedbackConfig, action: str) -> FeedbackState:
    excess = max(0.0, state.margin - config.min_margin)
    margin = config.min_margin + excess * math.exp(-dt / config.relax_s) if config.relax_s > 0 else config.min_margin
    if margin == state.margin:
        action = f"hold: margin at {margin:.2f}"
    return replace(state, margin=max(config.min_margin, min(config.max_margin, margin)), last_action=action)
