"""The controller sees every outcome — answered, cut off by a deadline, rejected, cancelled — and EstimateCost goes
through admission without touching the controller. A real server on loopback, tiny models; every wait is on
observable state."""

from __future__ import annotations

import grpc
import pytest

from service.client import AimClient
from tests.media_samples import encode_image
from tests.service.conftest import HOLD_TOKENS, hold, wait_until

SLO_MS = 500


def _window(runtime) -> list[float]:
    """latency / SLO of the requests in the controller's window."""
    return [ratio for _, ratio in runtime.controller.window._items]


def _counter_total(srv, name: str) -> float:
    """A counter's value summed over its labels."""
    return sum(sample.value for metric in srv.metrics.registry.collect() if metric.name == name
               for sample in metric.samples if sample.name.endswith("_total"))


def _violations(srv) -> float:
    return _counter_total(srv, "aim_slo_violations")


def _slo_ratio_histogram(srv) -> tuple[float, float]:
    """(count, sum) of aim_request_latency_slo_ratio over its labels: what the default PromQL reads."""
    samples = [sample for metric in srv.metrics.registry.collect() if metric.name == "aim_request_latency_slo_ratio"
               for sample in metric.samples]
    return (sum(s.value for s in samples if s.name.endswith("_count")),
            sum(s.value for s in samples if s.name.endswith("_sum")))


def _decisions(srv) -> float:
    return _counter_total(srv, "aim_controller_decisions")


def test_rejections_and_client_cancellations_reach_the_window_and_the_violation_counter(make_server):
    srv = make_server(max_batch=1, max_queue=0, max_new_tokens=HOLD_TOKENS)
    runtime = srv.running.state.runtimes["tiny-ov"]
    with AimClient(srv.target) as client:
        events = hold(client, slo_ms=60_000)  # auto, a generous SLO: in the window at its own share
        before, violations = len(_window(runtime)), _violations(srv)
        with pytest.raises(grpc.RpcError) as err:
            client.generate("Hi", max_new_tokens=2, slo_ms=SLO_MS)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # rejected for load: a miss at (at least) its SLO
        assert len(_window(runtime)) == before + 1 and _window(runtime)[-1] >= 1.0
        assert _violations(srv) == violations + 1
        events.cancel()  # the client goes away: counted at the time it ran, as a share of its 60 s SLO
        wait_until(lambda: len(_window(runtime)) == before + 2, "the cancellation to reach the window")
        assert 0 < _window(runtime)[-1] < 1.0 and _violations(srv) == violations + 1
        wait_until(lambda: runtime.running == 0, "the held request to leave")
    # explicit plans are not the controller's doing: their outcomes do not steer it
    with AimClient(srv.target) as client, AimClient(srv.target) as other:
        events = hold(other, no_reduction=True)
        with pytest.raises(grpc.RpcError) as err:
            client.generate("Hi", max_new_tokens=2, no_reduction=True)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        events.cancel()
        wait_until(lambda: runtime.admission.in_system == 0, "the held request to leave")
    assert len(_window(runtime)) == before + 2
    # the histogram Prometheus reads holds what the window holds: the same requests at the same latency / SLO
    count, total = _slo_ratio_histogram(srv)
    assert count == len(_window(runtime)) and total == pytest.approx(sum(_window(runtime)))


def test_a_request_cut_off_by_its_deadline_counts_at_its_deadline(make_server):
    srv = make_server(max_batch=1, max_new_tokens=HOLD_TOKENS)
    runtime = srv.running.state.runtimes["tiny-ov"]
    runtime.admission.service_times.clear()  # no history: admission lets it run
    violations = _violations(srv)
    with AimClient(srv.target, timeout=1.0) as hurried, pytest.raises(grpc.RpcError) as err:
        hurried.generate("Keep talking.", max_new_tokens=HOLD_TOKENS, ignore_eos=True, slo_ms=SLO_MS)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the client's deadline (~1 s) is its latency: twice its 0.5 s SLO, however early the server stopped it
    wait_until(lambda: _window(runtime), "the outcome to reach the window")
    assert _window(runtime)[-1] >= 0.9 / (SLO_MS / 1000)
    wait_until(lambda: _violations(srv) == violations + 1, "the violation to be counted")


def test_estimate_cost_goes_through_admission_and_leaves_the_controller_alone(make_server):
    srv = make_server(max_batch=1, max_queue=0, max_new_tokens=HOLD_TOKENS)
    runtime = srv.running.state.runtimes["tiny-ov"]
    controller = runtime.controller
    image = encode_image("PNG")
    with AimClient(srv.target) as client:
        decisions = _decisions(srv)  # a scrape reads the controller's status (which steps its margin): first
        state = (controller.feedback, controller.last_level, len(_window(runtime)), controller.cost_model)
        for slo in (50, 500, 50_000):
            estimate = client.estimate("Hi", images=[image], slo_ms=slo, max_new_tokens=4)
            assert estimate.applied_plan.reason
        assert (controller.feedback, controller.last_level, len(_window(runtime)), controller.cost_model) == state
        assert _decisions(srv) == decisions
        events = hold(client, no_reduction=True)  # the only place is taken and no queue is allowed
        with pytest.raises(grpc.RpcError) as err:
            client.estimate("Hi", images=[image])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        events.cancel()
        wait_until(lambda: runtime.running == 0 and runtime.admission.in_system == 0, "the held request to leave")
        assert client.estimate("Hi", images=[image]).visual_tokens_in > 0
        assert runtime.media_memory.used_bytes == 0  # the estimate's decoded image was released


def test_media_memory_waits_for_room_stops_when_asked_and_never_counts_an_ended_request():
    import threading

    from aim_engine.errors import Cancelled
    from service.media_memory import MediaMemory, RequestSlot as _Slot
    from service.types import ServiceError

    memory = MediaMemory(100)
    memory.reserve(60, lambda: False)
    with pytest.raises(Cancelled):  # no room, and its client has gone: it stops waiting
        memory.reserve(60, lambda: True)
    with pytest.raises(ServiceError, match="media memory is 100 bytes"):
        memory.reserve(101, lambda: False)
    reserved = threading.Event()
    waiter = threading.Thread(target=lambda: (memory.reserve(60, lambda: False), reserved.set()))
    waiter.start()
    assert not reserved.is_set() and memory.used_bytes == 60
    memory.release(60)  # room: the waiter gets it
    assert reserved.wait(30) and memory.used_bytes == 60
    waiter.join()
    slot = _Slot()
    assert slot.hold_media(10) and slot.close() == 10 and slot.close() == 0
    assert not slot.hold_media(5)  # ended: whatever a late decoder reserves is handed back, not counted


def test_the_server_caps_rpcs_running_at_once(make_server):
    """--max-concurrent-rpcs: beyond it gRPC itself answers RESOURCE_EXHAUSTED, before any handler runs."""
    srv = make_server(max_concurrent_rpcs=1, max_new_tokens=HOLD_TOKENS)
    with AimClient(srv.target) as client:
        events = hold(client, no_reduction=True)
        with pytest.raises(grpc.RpcError) as err:
            client.model_info()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        events.cancel()
        wait_until(lambda: srv.running.state.runtimes["tiny-ov"].admission.in_system == 0, "the held request to leave")
        wait_until(lambda: _answers_info(client), "the server to take RPCs again")


def _answers_info(client) -> bool:
    try:
        return bool(client.model_info().model)
    except grpc.RpcError:
        return False
