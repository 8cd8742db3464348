"""The what-if over the engine's rules (controller/whatif.py) and the decision built on it (policy.decide): when each
request the engine holds will finish, and which level a newcomer may take without pushing an admitted one past
its due time. Times are worked by hand from the scheduler's rules."""

import math
from dataclasses import replace

import pytest

from controller.policy import Features, decide, default_ladder
from controller.whatif import EngineRules, Job, finish_times

LADDER = default_ladder(28)
SLICED = EngineRules(max_batch=8, step_a=0.1, step_b=0.0, step_multiple=4.0)  # 0.1 s steps, 0.4 s of prefill each


def test_a_lone_request_takes_its_prefill_then_its_decode_steps():
    assert finish_times([Job(1.0, 3)], SLICED) == pytest.approx([1.3])


def test_a_sliced_prefill_shares_each_step_with_the_running_batch():
    # step 1-2: 0.4 prefill + 0.1 decode; step 3: the last 0.2 of prefill (done at 1.2) + decode (t 1.3); then both
    # decode: the running one's last two steps end at 1.5, the newcomer's three at 1.6
    assert finish_times([Job(0.0, 5, admitted=True), Job(1.0, 3)], SLICED) == pytest.approx([1.5, 1.6])


def test_with_nobody_decoding_a_step_runs_the_oldest_prefill_whole_and_its_answer_starts_at_the_next():
    # the first prefill alone (1.0), then its one decode step beside 0.4 s of the second's prefill (1.5); the
    # second's last 0.6 s alone (2.1), then its step (2.2). Unsliced, both prefills run first and decode together.
    assert finish_times([Job(1.0, 1), Job(1.0, 1)], SLICED) == pytest.approx([1.5, 2.2])
    unsliced = EngineRules(max_batch=8, step_a=0.1, step_multiple=None)
    assert finish_times([Job(1.0, 1), Job(1.0, 1)], unsliced) == pytest.approx([2.1, 2.1])


def test_unsliced_the_whole_prefill_runs_before_the_next_decode_step():
    unsliced = EngineRules(max_batch=8, step_a=0.1, step_multiple=None)
    assert finish_times([Job(0.0, 5, admitted=True), Job(1.0, 3)], unsliced) == pytest.approx([1.5, 1.4])


def test_the_decode_step_grows_with_the_batch():
    rules = EngineRules(max_batch=8, step_a=0.1, step_b=0.05, step_multiple=4.0)
    # two decoding together: 0.2 s a step
    assert finish_times([Job(0.0, 4, admitted=True), Job(0.0, 2, admitted=True)], rules) == pytest.approx(
        [0.4 + 2 * 0.15, 0.4])


def test_the_decode_step_grows_with_the_kv_the_batch_reads_padding_included_a_token_a_sequence_a_step():
    rules = EngineRules(max_batch=4, step_a=0.1, step_c=0.001, step_multiple=None)
    # alone, 100 tokens of context: steps of 0.1 + 0.100, 0.101, 0.102
    assert finish_times([Job(0.0, 3, admitted=True, context_tokens=100)], rules) == pytest.approx([0.603])
    # with a second sequence of 200, the gather pads the first to 200: 0.1 + 0.400, then 0.1 + 0.402; a shorter
    # prompt (merged) makes every step of the batch cheaper
    pair = finish_times([Job(0.0, 2, admitted=True, context_tokens=100),
                         Job(0.0, 2, admitted=True, context_tokens=200)], rules)
    assert pair == pytest.approx([1.002, 1.002])
    merged = finish_times([Job(0.0, 2, admitted=True, context_tokens=100),
                           Job(0.0, 2, admitted=True, context_tokens=50)], rules)
    assert merged == pytest.approx([0.2 + 0.2 + 0.202] * 2)
    # past the workspace, in length groups: 200 alone, 100 and 90 together (2 x 100): 0.1 + 0.4, 0.1 + 0.403
    grouped = finish_times([Job(0.0, 2, admitted=True, context_tokens=c) for c in (100, 200, 90)],
                           replace(rules, workspace_tokens=250))
    assert grouped == pytest.approx([0.2 + 0.4 + 0.403] * 3)


def test_a_full_batch_and_a_short_pool_make_a_newcomer_wait():
    one = EngineRules(max_batch=1, step_a=0.1, step_multiple=4.0)
    assert finish_times([Job(0.0, 5, admitted=True), Job(1.0, 0)], one) == pytest.approx([0.5, 1.5])
    pool = EngineRules(max_batch=8, step_a=0.1, step_multiple=4.0, free_kv_blocks=5)
    jobs = [Job(0.0, 5, kv_blocks=10, admitted=True), Job(1.0, 0, kv_blocks=8)]
    assert finish_times(jobs, pool) == pytest.approx([0.5, 1.5])  # admitted once the first gives its 10 back
    assert finish_times([Job(1.0, 0, kv_blocks=20)], pool) == [math.inf]  # more than the pool will ever hold


def test_a_request_expected_later_is_admitted_when_it_arrives():
    # idle until it arrives at 2 s, then its 1 s of prefill
    assert finish_times([Job(1.0, 0, arrives_s=2.0)], SLICED) == pytest.approx([3.0])
    # it arrives during the running request's decode: its prefill shares the steps from the first one after 0.25 s
    times = finish_times([Job(0.0, 10, admitted=True), Job(0.4, 0, arrives_s=0.25)], SLICED)
    assert times[1] == pytest.approx(0.3 + 0.4) and times[0] == pytest.approx(1.0 + 0.4)


def test_every_finish_time_scales_with_the_rates():
    """What `decide` relies on to apply its margin as one factor."""
    jobs = [Job(0.0, 7, admitted=True), Job(0.3, 2, admitted=True), Job(1.1, 5), Job(0.2, 0)]
    base = finish_times(jobs, SLICED)
    scaled = finish_times([Job(j.prefill_s * 1.7, j.steps, admitted=j.admitted) for j in jobs],
                          EngineRules(max_batch=8, step_a=0.17, step_multiple=4.0))
    assert scaled == pytest.approx([1.7 * t for t in base])


PRED = [2.0, 1.2, 0.9, 0.7, 0.5]


def newcomer(steps=0):
    return [Job(s, steps) for s in PRED]


def test_a_queue_ahead_counts_in_the_newcomers_finish():
    serial = EngineRules(max_batch=1, step_a=0.1, step_multiple=None)
    idle = decide(LADDER, Features(2.4, 0.0, newcomer(), rules=serial))
    queued = decide(LADDER, Features(2.4, 0.0, newcomer(), admitted=[Job(1.0, 0, admitted=True)], rules=serial))
    assert idle.level == 0 and idle.predicted_s == pytest.approx(2.0)
    # behind 1 s of work: merge-25 finishes at 1.9 (x 1.2 = 2.28 <= 2.4), merge-50 at 2.2 would not fit
    assert queued.level == 2 and queued.predicted_s == pytest.approx(1.9) and "1 running, 0 waiting" in queued.reason


def test_a_newcomer_takes_the_level_that_keeps_an_admitted_request_within_its_due_time():
    """The running request decodes 10 steps (1 s alone) and is due in 2 s: the newcomer's prefill slices would
    stretch its steps. Full (2 s of prefill) would end it at 2.6 s; only max saving (0.5 s) keeps it at 1.5 s
    (x 1.2 = 1.8 <= 2)."""
    running = Job(0.0, 10, due_s=2.0, admitted=True)
    d = decide(LADDER, Features(10.0, 0.0, newcomer(), admitted=[running], rules=SLICED))
    assert d.level == 4 and d.fits and "full would push 1 admitted request(s) past their due time" in d.reason
    # the same request alone takes the full model
    assert decide(LADDER, Features(10.0, 0.0, newcomer(), rules=SLICED)).level == 0


def test_an_admitted_request_already_late_is_not_protected():
    late = Job(0.0, 10, due_s=0.5, admitted=True)  # finishes at 1.0 whatever comes
    assert decide(LADDER, Features(10.0, 0.0, newcomer(), admitted=[late], rules=SLICED)).level == 0


def test_a_newcomer_that_would_push_two_admitted_requests_past_their_due_time_at_any_level_is_rejected():
    """A refusal is a miss too: pushing one admitted request past its due time at face value costs as many misses
    as refusing the newcomer, so it is served (best effort, at its cheapest); pushing two, it is refused."""
    tight = Job(0.0, 10, due_s=1.05, admitted=True)  # 1.0 s alone; any prefill slice beside it makes it late
    one = decide(LADDER, Features(10.0, 0.0, newcomer(), admitted=[tight], rules=SLICED))
    assert one.level == 4 and not one.fits and not one.rejected
    d = decide(LADDER, Features(10.0, 0.0, newcomer(), admitted=[tight, tight], rules=SLICED))
    assert d.rejected and d.cause == "harm" and "push 2 admitted requests" in d.reason


def test_a_newcomer_that_waits_for_kv_is_predicted_to_and_a_smaller_level_goes_first():
    """10 blocks held by a request decoding for 1 s, 5 free. Full and merge-50 (10 and 8 blocks) wait for them;
    merge-25 (6) too; aim-default (4) is admitted at once and done at 0.8 s."""
    rules = EngineRules(max_batch=8, step_a=0.1, step_multiple=4.0, free_kv_blocks=5)
    held = Job(0.0, 10, kv_blocks=10, admitted=True)
    candidates = [Job(s, 0, kv_blocks=b) for s, b in zip(PRED, [10, 8, 6, 4, 2])]
    d = decide(LADDER, Features(2.0, 0.0, candidates, admitted=[held], rules=rules))
    assert d.level == 3 and d.predicted_s == pytest.approx(0.8)


def test_the_margin_applies_to_the_admitted_requests_too():
    running = Job(0.0, 10, due_s=1.9, admitted=True)
    at_face_value = decide(LADDER, Features(10.0, 0.0, newcomer(), admitted=[running], rules=SLICED, margin=1.0))
    careful = decide(LADDER, Features(10.0, 0.0, newcomer(), admitted=[running], rules=SLICED, margin=1.3))
    assert at_face_value.level < careful.level


def test_a_level_leaves_room_for_the_requests_expected_next():
    """Requests are expected one every 1.2 s on average, each due 2.4 s after it arrives, on a server that serves
    one at a time, each at the level being weighed: placed where a Poisson stream has brought them 9 times in 10, at
    t_k = 0.12, 0.64, 1.32 and 2.10 s (four within the budget). Alone, the newcomer would take full (2 s x 1.2 <=
    2.4). With them, at c seconds a request they queue one behind another: the k-th is done (k + 1) c from now, and
    with the margin on the work (not on when they arrive) 1.2 (k + 1) c must stay within t_k + 2.4. Full and
    merge-50 (k = 1: 2.88 > 2.52) and merge-25 (k = 2: 3.24 > 3.04) fail; aim-default (0.7 s) keeps all four in time
    (k = 4: 4.2 <= 4.5). Its own finish is predicted without their wait: they come after it."""
    serial = EngineRules(max_batch=1, step_a=0.1, step_multiple=None)
    quiet = decide(LADDER, Features(2.4, 0.0, newcomer(), rules=serial))
    busy = decide(LADDER, Features(2.4, 0.0, newcomer(), rules=serial, arrival_gap_s=1.2))
    assert quiet.level == 0
    assert busy.level == 3 and busy.fits and busy.predicted_s == pytest.approx(0.7)
    assert "full would leave no room for the 4 request(s) expected next at it" in busy.reason


def test_a_served_decision_says_what_it_expected_and_how_much_later_the_admitted_ones_finish():
    """What moves a forecast that expected nobody (controller.in_flight_error): each admitted request's delay from
    this one on the work known now, the requests it expected next left out (they are its assumption)."""
    running = Job(0.0, 10, admitted=True)  # decodes 1 s alone
    d = decide(LADDER, Features(10.0, 0.0, newcomer(steps=5), admitted=[running], rules=SLICED))
    *others, own = finish_times([running, newcomer(steps=5)[d.level]], SLICED)
    assert d.level == 0 and d.expected == 0 and d.predicted_s == pytest.approx(own)
    assert d.delays == pytest.approx((others[0] - 1.0,)) and d.delays[0] > 0  # its prefill slices stretch the steps
    # with requests expected next, the delays are still on the known work
    busy = decide(LADDER, Features(10.0, 0.0, newcomer(steps=10), admitted=[running], rules=SLICED,
                                   arrival_gap_s=1.0))
    *others, _ = finish_times([running, newcomer(steps=10)[busy.level]], SLICED)
    assert busy.fits and busy.expected > 0 and busy.delays == pytest.approx((others[0] - 1.0,))
    # best effort carries its delays too; a refusal none
    tight = Job(0.0, 10, due_s=1.05, admitted=True)
    best_effort = decide(LADDER, Features(10.0, 0.0, newcomer(), admitted=[tight], rules=SLICED))
    assert not best_effort.fits and best_effort.expected == 0
    assert len(best_effort.delays) == 1 and best_effort.delays[0] > 0.05
    refused = decide(LADDER, Features(10.0, 0.0, newcomer(), admitted=[tight, tight], rules=SLICED))
    assert refused.rejected and refused.delays == ()


class FakeClock:
    t = 0.0

    def __call__(self):
        return self.t


def taught_controller():
    """A controller on a fake clock (set its `t`) whose cost model knows a prefill rate (loads.teach)."""
    from controller.controller import BudgetController

    from .loads import teach

    clock = FakeClock()
    controller = BudgetController(LADDER, clock=clock)
    teach(controller)
    return controller, clock


def test_the_gap_comes_from_recent_decisions_and_none_is_expected_after_idling_or_on_an_empty_engine():
    from controller.controller import ARRIVAL_WINDOW_S

    from .loads import IDLE, engine, levels, work

    controller, clock = taught_controller()
    assert controller.arrival_gap_s() is None
    for t in (0.0, 1.0, 2.0, 3.0):
        clock.t = t
        controller.choose(levels([0.1] * 5), IDLE, 10.0, 0.0)
    clock.t = 4.0
    assert controller.arrival_gap_s() == pytest.approx(1.0)
    assert controller.recent_budgets() == (10.0,) * 4  # what the requests expected next are given
    assert controller.features(levels([0.1] * 5), IDLE, 10.0, 0.0, "normal", None,
                               controller.cost_model).upcoming_budgets == (10.0,) * 4
    # a request that finds the engine empty expects nobody (the arrivals have not been outrunning it); one that
    # finds it holding work expects the next at the recent gap
    assert controller.features(levels([0.1] * 5), IDLE, 10.0, 0.0, "normal", None,
                               controller.cost_model).arrival_gap_s is None
    assert controller.features(levels([0.1] * 5), engine(work(0.5, admitted=True)), 10.0, 0.0, "normal", None,
                               controller.cost_model).arrival_gap_s == pytest.approx(1.0)
    controller.choose(levels([0.1] * 5), IDLE, 10.0, 0.0, record=False)  # an estimate is no arrival
    assert controller.arrival_gap_s() == pytest.approx(1.0)
    clock.t = 3.0 + ARRIVAL_WINDOW_S + 0.1  # nothing for a window: nobody is expected
    assert controller.arrival_gap_s() is None and controller.recent_budgets() == ()


def test_a_request_sent_right_after_an_answer_is_its_callers_next_and_forecasts_no_more_work():
    """A caller that waits for each answer before it sends again arrives at our own pace: at maximum saving's pace
    it would be expected at maximum saving, and held there. Its requests (each within CALLER_TURNAROUND_S after an
    answer) count as arrivals for nothing but the budgets; requests that come on their own still set the gap."""
    from controller.controller import CALLER_TURNAROUND_S

    from .loads import IDLE, levels

    controller, clock = taught_controller()
    sent = 0.0
    for _ in range(6):  # one request after another: 0.4 s of service, sent again 10 ms after each answer
        clock.t = sent
        controller.choose(levels([0.1] * 5), IDLE, 10.0, 0.0, arrived_at=sent)
        clock.t = sent + 0.4
        controller.observe(0.4)
        sent = clock.t + 0.01
    assert 0.01 < CALLER_TURNAROUND_S
    clock.t = sent
    assert controller.arrival_gap_s() is None  # only its first request came on its own
    assert controller.recent_budgets() == (10.0,) * 6
    for t in (sent + 1.0, sent + 2.0):  # others, on their own, while the caller waits for its next answer
        clock.t = t
        controller.choose(levels([0.1] * 5), IDLE, 10.0, 0.0, arrived_at=t - 0.2)
    clock.t = sent + 3.0
    assert controller.arrival_gap_s() == pytest.approx(clock.t / 3)  # since the caller's first: 3 on their own

