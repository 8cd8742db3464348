import math

import pytest

from aim_engine.plan import ReductionPlan
from controller.policy import (LOW_PRIORITY_MARGIN_FACTOR, PRIORITIES, Features, Level, decide, default_ladder,
                               load_ladder, margin_for_priority, poisson_arrival)
from controller.whatif import EngineRules, Job

LADDER = default_ladder(28)  # full, merge-50, merge-25, aim-default, max-saving
PRED = [2.0, 1.2, 0.9, 0.7, 0.5]


def alone(seconds):
    """The request at each level: that many seconds of prefill, a one-token answer, on an idle engine."""
    return [Job(s, 0) for s in seconds]


def features(budget, min_retention=0.0, predicted=PRED, **kw):
    return Features(budget_s=budget, min_retention=min_retention, candidates=alone(predicted), **kw)


def test_default_ladder_is_ordered_from_quality_to_saving():
    assert [l.name for l in LADDER] == ["full", "merge-50", "merge-25", "aim-default", "max-saving"]
    assert [l.retention for l in LADDER] == [1.0, 0.5, 0.25, 0.25, 0.125]
    assert LADDER[3].plan.prune_start == 14 and LADDER[3].plan.prune_end == 22


def test_a_calibrated_default_takes_the_aim_default_rung_and_sets_the_position_rule():
    calibrated = ReductionPlan(merge_retention=0.1933, prune_start=21, prune_end=30, positions="original")
    ladder = default_ladder(30, calibrated)
    assert ladder[3].plan == calibrated and ladder[0].plan == ReductionPlan()
    assert [l.plan.positions for l in ladder[1:]] == ["original"] * 4
    assert [l.retention for l in ladder] == [1.0, 0.5, 0.25, 0.1933, 0.125]
    assert {l.plan.positions for l in LADDER[1:]} == {"consecutive"}


def test_the_merge_rungs_take_the_calibrated_defaults_attention_rule():
    calibrated = ReductionPlan(merge_retention=0.1621, positions="original", proportional_attention=True)
    ladder = default_ladder(30, calibrated)
    assert [l.plan.proportional_attention for l in ladder] == [False, True, True, True, True]
    assert not any(l.plan.proportional_attention for l in LADDER)


@pytest.mark.parametrize("budget,expected", [(10.0, 0), (2.4, 0), (2.39, 1), (1.0, 3), (0.6, 4)])
def test_highest_quality_that_fits_budget_with_margin(budget, expected):
    d = decide(LADDER, features(budget, margin=1.2))
    assert d.level == expected and d.fits and not d.rejected and d.outcome == "fits"


def test_margin_makes_it_more_conservative():
    loose = decide(LADDER, features(1.0, margin=1.0))
    tight = decide(LADDER, features(1.0, margin=1.4))
    assert (loose.level, tight.level) == (2, 3)


def test_nothing_fits_with_the_margin_gives_cheapest_allowed_best_effort_if_it_fits_at_face_value():
    d = decide(LADDER, features(0.55))  # 0.5 x 1.2 > 0.55 >= 0.5
    assert d.level == 4 and not d.fits and d.outcome == "best_effort" and "no level fits" in d.reason


def test_a_request_even_its_cheapest_level_would_make_late_is_rejected_now():
    d = decide(LADDER, features(0.1))
    assert d.rejected and d.cause == "late" and d.outcome == "rejected" and "past the 0.100s it asked for" in d.reason
    assert d.predicted_s == 0.5


def test_only_the_time_a_request_asked_for_itself_refuses_it():
    """The server's default SLO steers the choice but refuses nobody: a request that gave neither SLO nor deadline
    (own time inf) is served late; one that gave only a long deadline is refused only past that deadline."""
    gave_nothing = decide(LADDER, features(0.1, own_time_s=math.inf))
    assert gave_nothing.level == 4 and not gave_nothing.fits and not gave_nothing.rejected
    long_deadline = decide(LADDER, features(0.1, own_time_s=600.0))
    assert long_deadline.level == 4 and not long_deadline.rejected
    short_deadline = decide(LADDER, features(0.1, own_time_s=0.3))
    assert short_deadline.rejected and "past the 0.300s it asked for" in short_deadline.reason


def test_quality_floor_is_never_crossed():
    d = decide(LADDER, features(1.3, 0.3))
    assert d.level == 1 and not d.fits  # merge-50 is the cheapest level keeping >= 30%
    d = decide(LADDER, features(10.0, 1.0))
    assert d.level == 0
    d = decide(LADDER, features(0.1, 0.3))  # and it is not served below the floor to make the budget
    assert d.rejected and d.cause == "late"


def test_memory_cap_limits_quality():
    d = decide(LADDER, features(10.0, min_level=3))
    assert d.level == 3 and "memory pressure caps" in d.reason


def test_floor_and_memory_cap_in_conflict_reject():
    d = decide(LADDER, features(10.0, 0.5, min_level=3))
    assert d.rejected and d.level == -1 and d.outcome == "rejected" and "quality floor" in d.reason and d.cause == "floor"


def test_without_latency_data_serve_highest_allowed_quality():
    d = decide(LADDER, Features(0.01, 0.0, [None] * 5))
    assert d.level == 0 and d.fits and d.outcome == "no_data"


def test_ladder_from_file_with_depth_fractions(tmp_path):
    path = tmp_path / "ladder.toml"
    path.write_text('[[level]]\nname = "full"\n[[level]]\nname = "half"\nmerge_retention = 0.5\n'
                    '[[level]]\nname = "aim"\nmerge_retention = 0.25\nprune_start = 0.5\nprune_end = 0.79\n')
    ladder = load_ladder(path, 24)
    assert [l.name for l in ladder] == ["full", "half", "aim"]
    assert (ladder[2].plan.prune_start, ladder[2].plan.prune_end) == (12, 19)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[level]]\nname = "x"\nmerge_retention = 0.5\n')
    with pytest.raises(ValueError, match="untouched model"):
        load_ladder(bad, 24)


def test_a_merge_tokens_level_is_refused_since_its_retention_depends_on_the_request(tmp_path):
    """merge_tokens keeps a number of tokens per frame, so its share is the request's (4 of 196 or of 9): it used to
    read as retention 1.0, and a floor of 0.5 let it through."""
    path = tmp_path / "ladder.toml"
    path.write_text('[[level]]\nname = "full"\n[[level]]\nname = "four-a-frame"\nmerge_tokens = 4\n')
    with pytest.raises(ValueError, match=r"ladder.toml: level 'four-a-frame' gives merge_tokens .*merge_retention"):
        load_ladder(path, 24)
    with pytest.raises(ValueError, match="give the level a merge_retention"):
        Level("four-a-frame", ReductionPlan(merge_tokens=4))
    with pytest.raises(ValueError, match="default plan .*aim-plan.json.* gives merge_tokens"):
        default_ladder(28, ReductionPlan(merge_tokens=4, prune_start=14, prune_end=22))


def test_a_ladder_files_bad_plan_names_the_file_and_the_level(tmp_path):
    path = tmp_path / "ladder.toml"
    path.write_text('[[level]]\nname = "full"\n[[level]]\nname = "too-much"\nmerge_retention = 1.5\n')
    with pytest.raises(ValueError, match=r"ladder.toml: level 'too-much': merge_retention must be in \(0, 1\]"):
        load_ladder(path, 24)


def test_retention_is_the_share_merging_keeps_and_pruning_does_not_count():
    """min_retention floors merging (docs/operations.md), as RequestStats.retention measures it."""
    assert [l.retention for l in LADDER] == [1.0, 0.5, 0.25, 0.25, 0.125]
    assert Level("prune-only", ReductionPlan(prune_start=2, prune_end=4)).retention == 1.0
    d = decide([Level("full", ReductionPlan()), Level("prune-only", ReductionPlan(prune_start=2, prune_end=4))],
               Features(10.0, 1.0, alone([20.0, 1.0])))
    assert d.level == 1 and d.fits


# Under one load (budget, predictions, feedback margin), priority alone moves the decision: high takes the
# predictions at face value, low multiplies the margin by LOW_PRIORITY_MARGIN_FACTOR.
LOADED = dict(budget_s=1.3, min_retention=0.0, candidates=alone([1.0, 0.8, 0.6, 0.4, 0.2]), margin=1.5)


def test_priority_high_keeps_more_quality_and_low_less_than_normal_under_the_same_load():
    levels = {p: decide(LADDER, Features(**LOADED, priority=p)) for p in PRIORITIES}
    # normal: 1.0 x 1.5 > 1.3, 0.8 x 1.5 <= 1.3; high: 1.0 x 1 <= 1.3; low: x 2.25, first fit 0.4 x 2.25 <= 1.3
    assert {p: d.level for p, d in levels.items()} == {"high": 0, "normal": 1, "low": 3}
    assert all(d.fits for d in levels.values())
    assert "x 1.00 (high priority)" in levels["high"].reason and "x 2.25 (low priority)" in levels["low"].reason
    assert "priority" not in levels["normal"].reason


def test_priority_scales_the_feedback_margin():
    assert margin_for_priority(1.5, "normal") == 1.5
    assert margin_for_priority(1.5, "high") == 1.0 and margin_for_priority(0.8, "high") == 0.8
    assert margin_for_priority(1.5, "low") == 1.5 * LOW_PRIORITY_MARGIN_FACTOR > 1.5


def test_priority_leaves_the_floor_the_memory_cap_and_best_effort_alone():
    high_floor = decide(LADDER, Features(**{**LOADED, "min_retention": 0.3}, min_level=1, priority="high"))
    assert high_floor.level == 1  # capped by memory even though full would fit at face value
    low_floor = decide(LADDER, Features(**{**LOADED, "min_retention": 0.5}, priority="low"))
    assert low_floor.level == 1 and not low_floor.fits  # 0.8 x 2.25 > 1.3, and the floor forbids cheaper


def test_an_unknown_priority_is_refused():
    with pytest.raises(ValueError, match="priority must be one of"):
        Features(**LOADED, priority="urgent")


def test_the_cheapest_level_is_the_least_predicted_work_not_the_ladders_last():
    # maximum saving predicted dearer than aim-default (its scoring's fixed cost outweighs the FLOPs it saves)
    costs = [2.0, 1.2, 0.9, 0.5, 0.7]
    d = decide(LADDER, features(0.55, predicted=costs))  # nothing fits with the margin; 0.5 at face value does
    assert d.level == 3 and not d.fits and d.outcome == "best_effort"
    late = decide(LADDER, features(0.4, predicted=costs, own_time_s=0.4))
    assert late.rejected and late.cause == "late" and late.cheapest == 3 and "aim-default" in late.reason
    # the requests expected next are weighed at each level too: one every 1 s on average, placed as a Poisson
    # stream brings them 9 times in 10 (at 0.10, 0.53 and 1.10 s: three within this one's 1.5 s), each due 1.5 s
    # after it arrives, served one at a time behind this one. At merge-50 (1.2 s each) the first would finish at
    # 2.4 s, past its 1.6 s; at merge-25 (0.9 s) at 1.8 s; at aim-default (0.5 s) they finish at 1.0, 1.5 and 2.0 s,
    # in time.
    assert [round(poisson_arrival(k), 2) for k in (1, 2, 3)] == [0.10, 0.53, 1.10]
    upcoming = decide(LADDER, features(1.5, predicted=costs, margin=1.0, arrival_gap_s=1.0))
    assert upcoming.level == 3 and upcoming.fits
    assert "full would exceed the budget" in upcoming.reason and "3 expected next, one every 1.00s" in upcoming.reason


def test_a_loose_request_leaves_room_for_the_tight_ones_expected_beside_it():
    """One request every 1 s on average, on an engine that serves one at a time; each level is weighed with the
    requests expected in this one's 5 s budget (eight, the first at 0.1 s) at that level too. Loose ones (20 s each)
    all finish in time behind full-model requests (2 s each: the eighth, arriving at 4.7 s, finishes at 18 s), so
    this one takes the full model. With requests of a 1 s budget expected every other time (an interactive class
    beside this batch one), only maximum saving (0.5 s) keeps them within it: behind aim-default's 0.7 s the first,
    arriving at 0.1 s, would finish at 1.4 s, past its 1.1 s. With none given, the expected ones get this one's 5 s:
    merge-25."""
    loose = decide(LADDER, features(5.0, margin=1.0, arrival_gap_s=1.0, upcoming_budgets=[20.0]))
    tight = decide(LADDER, features(5.0, margin=1.0, arrival_gap_s=1.0, upcoming_budgets=[1.0, 20.0]))
    assert (loose.level, tight.level) == (0, 4) and tight.fits
    assert decide(LADDER, features(5.0, margin=1.0, arrival_gap_s=1.0)).level == 2


def test_the_margin_scales_the_work_of_the_requests_expected_next_not_their_arrival():
    """One request expected 1.97 s from now (one every 20 s on average: a Poisson stream brings the first that
    soon 1 time in 10, the second not within the budget), due 2.4 s after it arrives; every level takes 1 s, served
    one at a time, margin 1.5. It finds the engine idle and is done 1 s after it arrives: 1.5 s with the margin, in
    time. Scaled as a whole, its finish 2.97 s from now would read 4.45 s against its 4.37 s, and the request would
    be refused the full model for work it never waits for."""
    assert 20.0 * poisson_arrival(1) == pytest.approx(1.97, abs=0.005)
    d = decide(LADDER, features(2.4, predicted=[1.0] * 5, margin=1.5, arrival_gap_s=20.0))
    assert d.level == 0 and d.fits and "1 expected next, one every 20.00s" in d.reason
