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
        hurried.generate("Keep talking.", max_new_tokens=HOLD_TOKENS, ignore_eos=True)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the client's deadline (~1 s) is its latency, however early the server stopped it (here at once: its answer
    # is predicted past the deadline): a tenth of the default 10 s SLO
    wait_until(lambda: _window(runtime), "the outcome to reach the window")
    assert _window(runtime)[-1] >= 0.9 / 10
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
    import asyncio

    from aim_engine.errors import Cancelled
    from service.media_memory import MediaMemory, RequestSlot as _Slot
    from service.types import ServiceError

    async def scenario():
        memory = MediaMemory(100)
        await memory.acquire(60, lambda: False)
        with pytest.raises(Cancelled):  # no room, and its client has gone: it stops waiting
            await memory.acquire(60, lambda: True)
        with pytest.raises(ServiceError, match="media memory is 100 bytes"):
            await memory.acquire(101, lambda: False)
        waiter = asyncio.ensure_future(memory.acquire(60, lambda: False))
        while memory.waiting == 0:
            await asyncio.sleep(0)
        assert not waiter.done() and memory.used_bytes == 60
        await asyncio.get_running_loop().run_in_executor(None, memory.release, 60)  # room, from another thread
        await asyncio.wait_for(waiter, 30)
        assert memory.used_bytes == 60 and memory.waiting == 0

    asyncio.run(scenario())
    slot = _Slot()
    assert slot.hold_media(10) and slot.release_media(keep=4) == 6 and slot.close() == 4 and slot.close() == 0
    assert not slot.hold_media(5)  # ended: whatever a late decoder reserves is handed back, not counted


def _image_bytes(side: int) -> tuple[bytes, int]:
    """A PNG of side x side and the RGB bytes it takes decoded."""
    return encode_image("PNG", size=(side, side)), side * side * 3


def test_a_request_waits_for_media_memory_without_holding_a_worker_and_gives_it_back_after_vision(make_server):
    """One media worker. A (an image) is decoded and waits for the batch behind a running request, holding its
    memory; B needs more than is left and waits; C fits: it is decoded meanwhile on the one worker, which B does
    not hold. Once through the vision tower, each request's pixels are given back while it still decodes."""
    from service.media_memory import MediaMemory

    srv = make_server(max_batch=1, max_new_tokens=HOLD_TOKENS, media_workers=1)
    runtime = srv.running.state.runtimes["tiny-ov"]
    (a, a_need), (b, b_need), (c, c_need) = _image_bytes(32), _image_bytes(40), _image_bytes(16)
    runtime.media_memory = MediaMemory(b_need + 200)  # A and C fit together; A and B do not
    assert a_need + c_need <= runtime.media_memory.capacity_bytes < a_need + b_need
    with AimClient(srv.target) as running, AimClient(srv.target) as client_a, AimClient(srv.target) as client_b, \
            AimClient(srv.target) as client_c, AimClient(srv.target) as text:
        events = hold(running, no_reduction=True)
        answer_a = client_a.stream_events("A?", images=[a], max_new_tokens=2, no_reduction=True)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            got_a = pool.submit(list, answer_a)
            wait_until(lambda: runtime.media_memory.used_bytes == a_need, "A's memory reserved")
            got_b = pool.submit(client_b.generate, "B?", images=[b], max_new_tokens=2, no_reduction=True)
            wait_until(lambda: runtime.media_memory.waiting == 1, "B to wait for memory")
            got_c = pool.submit(client_c.generate, "C?", images=[c], max_new_tokens=2, no_reduction=True)
            wait_until(lambda: runtime.media_memory.used_bytes == a_need + c_need, "C decoded beside waiting B")
            assert runtime.media_memory.waiting == 1
            # a request without media never waits for the media worker (nor for memory)
            assert text.estimate("Only text.").visual_tokens_in == 0
            events.cancel()
            assert got_a.result(120) and got_b.result(120).text is not None and got_c.result(120).text is not None
        wait_until(lambda: runtime.admission.in_system == 0, "every request to leave")
        assert runtime.media_memory.used_bytes == 0
        held = hold(running, images=[b], no_reduction=True)  # decoding now: its image is through the tower
        assert runtime.media_memory.used_bytes == 0
        held.cancel()


def test_multi_image_requests_never_wait_on_each_other_for_memory(make_server):
    """Media memory for one request's images only, two workers, and several two-image requests at once: each
    reserves its whole need before decoding, so none holds a part while waiting for the rest (the old per-image
    reservation let two requests each hold one image and wait for ever)."""
    from concurrent.futures import ThreadPoolExecutor

    from service.media_memory import MediaMemory

    srv = make_server(media_workers=2)
    runtime = srv.running.state.runtimes["tiny-ov"]
    first, second = _image_bytes(40), _image_bytes(41)
    runtime.media_memory = MediaMemory(first[1] + second[1])
    with AimClient(srv.target) as client, ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(client.generate, f"Q{i}?", images=[first[0], second[0]], max_new_tokens=2,
                               no_reduction=True) for i in range(4)]
        assert all(a.result(120).text is not None for a in answers)
    assert runtime.media_memory.used_bytes == 0


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


def test_an_slo_below_the_minimum_is_refused_on_every_wire_and_counts_as_no_outcome(make_server):
    import openai

    from service.proto.inference import grpc_service_pb2 as kpb
    from service.proto.inference import grpc_service_pb2_grpc as kgrpc

    srv = make_server(min_slo_ms=50, http_port=0)
    runtime = srv.running.state.runtimes["tiny-ov"]
    window = len(_window(runtime))
    with AimClient(srv.target) as client:
        for call in (lambda: client.generate("Hi", max_new_tokens=2, slo_ms=49),
                     lambda: client.estimate("Hi", slo_ms=1)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "below this server's minimum of 50 ms" in err.value.details()
        assert client.generate("Hi", max_new_tokens=2, slo_ms=50).usage.completion_tokens >= 1  # the minimum
    request = kpb.ModelInferRequest(model_name="tiny-ov")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hi")
    request.parameters["aim_slo_ms"].int64_param = 10
    with grpc.insecure_channel(srv.target) as channel, pytest.raises(grpc.RpcError) as err:
        kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "minimum of 50 ms" in err.value.details()
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.running.http_port}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="minimum of 50 ms"):
        oai.chat.completions.create(model="tiny-ov", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                    extra_body={"reduction": {"auto": {"slo_ms": 1}}})
    assert len(_window(runtime)) == window + 1  # bad input is no outcome: only the answered request is in the window


def test_an_auto_answer_is_observed_against_its_prediction_under_its_level(make_server):
    srv = make_server()
    with AimClient(srv.target) as client:
        reply = client.generate("Hi", images=[encode_image("PNG")], max_new_tokens=2, slo_ms=60_000)
    runtime = srv.running.state.runtimes["tiny-ov"]
    level = runtime.ladder[runtime.controller.last_level].name  # the level its decision chose
    counts = {s.labels["level"]: s.value for m in srv.metrics.registry.collect()
              if m.name == "aim_controller_prediction_ratio" for s in m.samples if s.name.endswith("_count")}
    assert sum(counts.values()) == 1 and counts.get(level) == 1, (counts, reply.applied_plan.reason)


def test_a_request_decided_after_an_auto_answer_moves_that_answers_forecast_later(make_server):
    """A forecast that expected nobody (the first request on an idle server) is held to the work known at its
    decision: a request that joins after it is known work, not the forecast's error, so the delay its decision
    predicts it adds moves the forecast (controller.in_flight_error)."""
    srv = make_server(max_new_tokens=HOLD_TOKENS)
    runtime = srv.running.state.runtimes["tiny-ov"]
    with AimClient(srv.target) as client:
        events = hold(client, slo_ms=60_000)  # auto: decided, forecast, and decoding
        held = next(s for s in runtime.engine.loop.scheduler.running if s.forecast is not None)
        made, forecast = held.forecast
        reply = client.generate("Hi", images=[encode_image("PNG")], max_new_tokens=2, slo_ms=60_000)
        assert reply.applied_plan.reason  # decided, with the held answer in the engine
        assert held.forecast[0] == made and held.forecast[1] > forecast  # its prefill slows the held one's steps
        events.cancel()
