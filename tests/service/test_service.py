"""The real server on loopback, called by the real client library and plain grpc stubs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.request import urlopen

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aim_engine import ReductionPlan
from aim_engine.serving.sequence import FINISHED
from service.client import AimClient
from service.convert import plan_from_proto
from service.kserve import plan_to_parameters
from service.proto.aim.v1 import aim_service_pb2 as pb
from service.proto.aim.v1 import aim_service_pb2_grpc as pb_grpc
from service.proto.inference import grpc_service_pb2 as kserve_pb
from service.proto.inference import grpc_service_pb2_grpc as kserve_grpc
from service.server import load_models, start_listening
from tests.media_samples import encode_image, encode_video
from tests.service.conftest import BASE, HOLD_TOKENS, ServerThread, hold, wait_until

VIDEO = encode_video(frames=16)
LONG_PROMPT = "Keep talking about this clip."


def test_unary_generate_returns_text_and_stats(server):
    with AimClient(server.target) as client:
        reply = client.generate("What moves?", videos=[VIDEO], frames=4, max_new_tokens=6,
                                plan=ReductionPlan(merge_retention=0.25, prune_start=2, prune_end=5))
    assert reply.model == "tiny-ov" and reply.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert reply.usage.visual_tokens_in == 4 * 16 + 1 and reply.usage.visual_tokens_merged == 4 * 4 + 1
    assert len(reply.usage.visual_tokens_per_layer) == 6 and reply.usage.visual_tokens_per_layer[-1] == 0
    assert 0 < reply.cost.prefill_flops < reply.cost.baseline_prefill_flops
    assert reply.cost.saved_fraction == pytest.approx(1 - reply.cost.prefill_flops / reply.cost.baseline_prefill_flops)
    assert reply.applied_plan.source == pb.PLAN_SOURCE_EXPLICIT and reply.applied_plan.plan.merge_retention == 0.25
    t = reply.timings
    assert t.total_seconds >= t.time_to_first_token_seconds >= t.prefill_seconds > 0


def test_stream_deltas_then_result_matching_unary(server):
    with AimClient(server.target) as client:
        unary = client.generate("Describe.", images=[encode_image("PNG")], max_new_tokens=12, no_reduction=True)
        deltas = list(client.stream("Describe.", images=[encode_image("PNG")], max_new_tokens=12, no_reduction=True))
        result = client.last_result
    assert "".join(deltas) == result.text == unary.text
    assert result.applied_plan.source == pb.PLAN_SOURCE_NONE and result.usage.completion_tokens >= 1


def test_auto_plan_is_chosen_by_the_controller(server):
    with AimClient(server.target) as client:
        for _ in range(2):  # the first request teaches the cost model
            reply = client.generate("Hi", videos=[VIDEO], frames=4, max_new_tokens=2, slo_ms=60_000)
        assert reply.applied_plan.source == pb.PLAN_SOURCE_AUTO and "fits" in reply.applied_plan.reason
        assert "0 running, 0 waiting" in reply.applied_plan.reason  # alone on the server: its budget is its own
        assert reply.applied_plan.plan == pb.ReductionPlan(importance=pb.IMPORTANCE_PAGERANK,  # ample budget: full
                                                           positions=pb.POSITION_RULE_CONSECUTIVE,
                                                           reducer=pb.REDUCER_MERGE)
        floor = client.generate("Hi", videos=[VIDEO], frames=4, max_new_tokens=2, slo_ms=60_000, min_retention=0.5)
        assert floor.applied_plan.plan.merge_retention in (0, 0.5)  # full, or the cheapest level above the floor
        with pytest.raises(grpc.RpcError) as err:  # nothing makes 1 ms: refused at once rather than answered late
            client.generate("Hi", videos=[VIDEO], frames=4, max_new_tokens=2, slo_ms=1, min_retention=0.5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "even merge-50 alone" in err.value.details()


def test_an_auto_requests_priority_sets_the_margin_of_its_decision(server):
    """The decision's reason names the margin it used: face value for high, the feedback margin x 1.5 for low."""
    with AimClient(server.target) as client:
        client.generate("Hi", videos=[VIDEO], frames=4, max_new_tokens=2, slo_ms=60_000)  # latency data exists
        reasons = {p: client.generate("Hi", videos=[VIDEO], frames=4, max_new_tokens=2, slo_ms=60_000,
                                      priority=p).applied_plan.reason for p in ("high", "low", "normal")}
    assert "x 1.00 (high priority)" in reasons["high"] and "(low priority)" in reasons["low"]
    assert "priority" not in reasons["normal"]


# The tiny LLaVA-OneVision model sees a 4-frame video as 4 x 16 tokens + 1 newline. At retention 0.5 merging keeps
# 8 per frame, pooling a 4x4 grid to 3x3 keeps 9, and EVS keeps a total of 4 x 8 (the first frame whole).
STAGED_MERGED = {"merge": 4 * 8 + 1, "pool": 4 * 9 + 1, "evs": 4 * 8 + 1}
STAGED = {reducer: ReductionPlan(merge_retention=0.5, reducer=reducer, prune_stages=((1, 0.5), (3, 0.25)),
                                 importance="last_token") for reducer in STAGED_MERGED}


@pytest.mark.parametrize("reducer", STAGED)
def test_an_explicit_plan_with_reducer_stages_and_last_token_is_applied_and_echoed(server, reducer):
    plan = STAGED[reducer]
    with AimClient(server.target) as client:
        reply = client.generate("What moves?", videos=[VIDEO], frames=4, max_new_tokens=2, plan=plan)
    applied = reply.applied_plan
    assert applied.source == pb.PLAN_SOURCE_EXPLICIT and plan_from_proto(applied.plan) == plan
    assert applied.plan.importance == pb.IMPORTANCE_LAST_TOKEN and len(applied.plan.prune_stages) == 2
    assert reply.usage.visual_tokens_in == 4 * 16 + 1 and reply.usage.visual_tokens_merged == STAGED_MERGED[reducer]
    merged = STAGED_MERGED[reducer]  # the stages: half from layer 1, a quarter from layer 3
    assert list(reply.usage.visual_tokens_per_layer) == [merged, merged // 2, merged // 2] + [merged // 4] * 3


def test_the_evs_reducer_leaves_a_single_image_whole_where_merging_reduces_it(server):
    with AimClient(server.target) as client:
        replies = {r: client.generate("What?", images=[encode_image("PNG")], max_new_tokens=2,
                                      plan=ReductionPlan(merge_retention=0.5, reducer=r)) for r in ("merge", "evs")}
    assert replies["evs"].usage.visual_tokens_merged == replies["evs"].usage.visual_tokens_in
    assert replies["merge"].usage.visual_tokens_merged < replies["merge"].usage.visual_tokens_in


def test_kserve_parameters_give_the_same_plan(server):
    plan = STAGED["pool"]
    request = kserve_pb.ModelInferRequest(model_name="tiny-ov")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"What?")
    request.inputs.add(name="video", datatype="BYTES", shape=[1]).contents.bytes_contents.append(VIDEO)
    for name, value in {**plan_to_parameters(plan), "aim_num_frames": 4, "aim_max_new_tokens": 2}.items():
        kind = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], kind, value)
    with grpc.insecure_channel(server.target) as channel:
        reply = kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    p = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in reply.parameters.items()}
    assert p["aim_plan_source"] == "explicit" and p["aim_plan"] == plan.describe()
    assert "pool" in p["aim_plan"] and "L1:0.5 L3:0.25 (last_token)" in p["aim_plan"]
    assert p["aim_visual_tokens_merged"] == STAGED_MERGED["pool"]


def test_model_info_and_estimate(server):
    with AimClient(server.target) as client:
        info = client.model_info()
        assert (info.model, info.family, info.num_layers, info.supports_video) == ("tiny-ov", "llava_onevision", 6, True)
        assert list(info.served_models) == ["tiny-ov", "tiny-llava"]
        assert info.default_plan.merge_retention == 0.25 and info.limits.max_frames == 64
        plan = ReductionPlan(merge_retention=0.25, prune_start=2, prune_end=5)
        est = client.estimate("What?", videos=[VIDEO], frames=4, max_new_tokens=3, plan=plan)
        run = client.generate("What?", videos=[VIDEO], frames=4, max_new_tokens=3, plan=plan)
    assert (est.visual_tokens_in, est.visual_tokens_merged) == (run.usage.visual_tokens_in,
                                                                 run.usage.visual_tokens_merged)
    assert est.prefill_flops == run.cost.prefill_flops and est.baseline_prefill_flops == run.cost.baseline_prefill_flops
    assert est.predicted_latency_seconds > 0 and est.applied_plan.source == pb.PLAN_SOURCE_EXPLICIT


def test_the_position_rule_travels_both_ways(server):
    """An explicit plan's position rule reaches the engine and comes back in the applied plan; FLOPs do not depend
    on it (the same tokens are computed); unspecified means the paper's consecutive rule."""
    with AimClient(server.target) as client:
        replies = {rule: client.generate("What?", videos=[VIDEO], frames=4, max_new_tokens=6, seed=0,
                                         plan=ReductionPlan(merge_retention=0.25, positions=rule))
                   for rule in ("consecutive", "original")}
    consecutive, original = replies["consecutive"], replies["original"]
    assert consecutive.applied_plan.plan.positions == pb.POSITION_RULE_CONSECUTIVE
    assert original.applied_plan.plan.positions == pb.POSITION_RULE_ORIGINAL
    assert original.cost.prefill_flops == consecutive.cost.prefill_flops
    assert plan_from_proto(original.applied_plan.plan) == ReductionPlan(merge_retention=0.25, positions="original")
    assert plan_from_proto(pb.ReductionPlan(merge_retention=0.25)).positions == "consecutive"  # unspecified


def test_the_attention_rule_travels_both_ways(server):
    """Proportional attention reaches the engine (it changes what a merged prompt computes, not its FLOPs) and
    comes back in the applied plan; unset means the paper's plain attention."""
    with AimClient(server.target) as client:
        replies = {rule: client.generate("What?", videos=[VIDEO], frames=4, max_new_tokens=6, seed=0,
                                         plan=ReductionPlan(merge_retention=0.25, proportional_attention=rule))
                   for rule in (False, True)}
    plain, proportional = replies[False], replies[True]
    assert proportional.applied_plan.plan.proportional_attention and not plain.applied_plan.plan.proportional_attention
    assert proportional.text != plain.text  # the engine attended differently (greedy, seeded)
    assert proportional.cost.prefill_flops == plain.cost.prefill_flops
    assert plan_from_proto(proportional.applied_plan.plan) == ReductionPlan(merge_retention=0.25,
                                                                           proportional_attention=True)
    assert not plan_from_proto(pb.ReductionPlan(merge_retention=0.25)).proportional_attention


def _raw(stub, **fields):
    base = dict(parts=[pb.ContentPart(text="Hi")], sampling=pb.SamplingParams(max_new_tokens=2))
    base.update(fields)
    return stub.Generate(pb.GenerateRequest(**base), timeout=30)


BAD_REQUESTS = [
    ("corrupt image", dict(parts=[pb.ContentPart(image=pb.Image(data=b"\x89PNG broken", mime_type="image/png")),
                                  pb.ContentPart(text="Hi")]), grpc.StatusCode.INVALID_ARGUMENT, "cannot decode"),
    ("truncated video", dict(parts=[pb.ContentPart(video=pb.Video(data=VIDEO[:300], mime_type="video/mp4")),
                                    pb.ContentPart(text="Hi")]), grpc.StatusCode.INVALID_ARGUMENT, "video"),
    ("unsupported MIME", dict(parts=[pb.ContentPart(image=pb.Image(data=encode_image("PNG"), mime_type="image/bmp")),
                                     pb.ContentPart(text="Hi")]), grpc.StatusCode.INVALID_ARGUMENT, "unsupported"),
    ("too many frames", dict(parts=[pb.ContentPart(video=pb.Video(data=VIDEO, mime_type="video/mp4", num_frames=65)),
                                    pb.ContentPart(text="Hi")]), grpc.StatusCode.INVALID_ARGUMENT, "limit is 64"),
    ("too many listed frames", dict(parts=[pb.ContentPart(frames=pb.Frames(frames=[pb.Image(
        data=encode_image("PNG"), mime_type="image/png")] * 65)), pb.ContentPart(text="Hi")]),
        grpc.StatusCode.INVALID_ARGUMENT, "limit is 64"),
    ("empty prompt", dict(parts=[pb.ContentPart(text="  ")]), grpc.StatusCode.INVALID_ARGUMENT, "no text"),
    ("no parts", dict(parts=[]), grpc.StatusCode.INVALID_ARGUMENT, "parts is empty"),
    ("bad retention", dict(reduction=pb.Reduction(plan=pb.ReductionPlan(merge_retention=1.5))),
     grpc.StatusCode.INVALID_ARGUMENT, "merge_retention must be in"),
    ("bad prune range", dict(reduction=pb.Reduction(plan=pb.ReductionPlan(prune_start=4, prune_end=2))),
     grpc.StatusCode.INVALID_ARGUMENT, "prune_end must be greater"),
    ("prune beyond depth", dict(reduction=pb.Reduction(plan=pb.ReductionPlan(prune_start=9, prune_end=12))),
     grpc.StatusCode.INVALID_ARGUMENT, "beyond the model"),
    ("unknown position rule", dict(reduction=pb.Reduction(plan=pb.ReductionPlan(merge_retention=0.5, positions=7))),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown positions value 7"),
    ("unknown reducer", dict(reduction=pb.Reduction(plan=pb.ReductionPlan(merge_retention=0.5, reducer=7))),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown reducer value 7"),
    ("stages and a range", dict(reduction=pb.Reduction(plan=pb.ReductionPlan(
        prune_start=2, prune_end=4, prune_stages=[pb.PruneStage(layer=2, keep=0.5)]))),
     grpc.StatusCode.INVALID_ARGUMENT, "prune_start/prune_end or prune_stages, not both"),
    ("stages beyond depth", dict(reduction=pb.Reduction(plan=pb.ReductionPlan(
        prune_stages=[pb.PruneStage(layer=9, keep=0.5)]))), grpc.StatusCode.INVALID_ARGUMENT, "beyond the model"),
    ("unknown priority", dict(reduction=pb.Reduction(auto=pb.AutoBudget(priority=7))),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown auto.priority value 7"),
    ("bad floor", dict(reduction=pb.Reduction(auto=pb.AutoBudget(min_retention=2))),
     grpc.StatusCode.INVALID_ARGUMENT, "min_retention"),
    ("bad temperature", dict(sampling=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    ("too many tokens", dict(sampling=pb.SamplingParams(max_new_tokens=5000)), grpc.StatusCode.INVALID_ARGUMENT,
     "exceeds the limit"),
    ("video to image model", dict(model="tiny-llava", parts=[pb.ContentPart(video=pb.Video(
        data=VIDEO, mime_type="video/mp4")), pb.ContentPart(text="Hi")]), grpc.StatusCode.INVALID_ARGUMENT,
     "does not accept video"),
    ("unknown model", dict(model="gpt-9"), grpc.StatusCode.NOT_FOUND, "unknown model 'gpt-9'"),
]


@pytest.mark.parametrize("name,fields,code,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_the_right_status_and_the_server_keeps_serving(server, name, fields, code, message):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AimServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            _raw(stub, **fields)
        assert err.value.code() == code
        assert message in err.value.details() and "Traceback" not in err.value.details()
        assert _raw(stub).text is not None  # still serving


def test_concurrent_clients_are_all_answered_or_cleanly_rejected(make_server):
    """One request holds the only place in the batch while ten more arrive: the queue takes two, which are answered
    once the holder is cancelled; the other eight are rejected at once."""
    srv = make_server(max_queue=2, max_batch=1, max_new_tokens=HOLD_TOKENS)
    runtime = srv.running.state.runtimes["tiny-ov"]
    with AimClient(srv.target) as client:
        def call(i):
            try:
                client.generate(f"Q{i}", videos=[VIDEO], frames=4, max_new_tokens=20, no_reduction=True)
                return "ok"
            except grpc.RpcError as exc:
                return exc.code()

        holder = hold(client, no_reduction=True)
        with ThreadPoolExecutor(10) as pool:
            try:
                calls = [pool.submit(call, i) for i in range(10)]
                wait_until(lambda: sum(c.done() for c in calls) >= 8, "the calls beyond the queue to be rejected")
                assert (runtime.running, runtime.waiting) == (1, 2)  # the holder runs, two wait behind it
            finally:
                holder.cancel()
            outcomes = [c.result(timeout=60) for c in calls]
    assert outcomes.count("ok") == 2 and outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8, outcomes


def _record_calls(monkeypatch, owner, name: str) -> list:
    """Spies on `owner.name`: the first argument of every call, in order; the call still goes through."""
    real, seen = getattr(owner, name), []

    def spy(first, *args, **kwargs):
        seen.append(first)
        return real(first, *args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return seen


def _assert_stops_within_one_step(seq) -> None:
    """Once the server asks `seq` to stop (cancelled, or past its deadline), it leaves after at most the decode
    step already under way, instead of generating the rest of its answer."""
    wait_until(seq.stop_requested, "the server to ask the sequence to stop")
    tokens_when_asked = len(seq.generated)
    wait_until(lambda: seq.status == FINISHED, "the sequence to leave the batch")
    assert len(seq.generated) - tokens_when_asked <= 1, (tokens_when_asked, len(seq.generated))


def _requests_counted(metrics, outcome: str) -> float | None:
    return {s.labels["outcome"]: s.value for s in metrics.requests.collect()[0].samples
            if s.name == "aim_requests_total"}.get(outcome)


def test_cancelled_generation_stops_and_the_next_request_starts_promptly(make_server, monkeypatch):
    srv = make_server(max_batch=1, max_new_tokens=HOLD_TOKENS)
    runtime = srv.running.state.runtimes["tiny-ov"]
    sequences = _record_calls(monkeypatch, runtime.engine.loop, "add")
    with AimClient(srv.target) as client:
        events = hold(client, LONG_PROMPT, videos=[VIDEO], frames=4, no_reduction=True)
        [held] = sequences
        events.cancel()
        _assert_stops_within_one_step(held)
        assert runtime.running == 0
        reply = client.generate("Next", images=[encode_image("PNG")], max_new_tokens=2)
    # with max_batch=1 the next request could run only once the cancelled one had left, long before its end
    assert reply.usage.completion_tokens == 2 and len(held.generated) < HOLD_TOKENS
    wait_until(lambda: _requests_counted(srv.metrics, "cancelled") == 1, "the cancellation to be counted")
    assert runtime.running == 0


def test_deadline_exceeded_stops_the_request(make_server, monkeypatch):
    """A held answer with a deadline: it is stopped while decoding. The deadline is doubled only while it passes
    before the first token (a busy machine), so that the decode step's check is what stops it."""
    srv = make_server(max_batch=1, max_new_tokens=HOLD_TOKENS)
    runtime = srv.running.state.runtimes["tiny-ov"]
    sequences = _record_calls(monkeypatch, runtime.engine.loop, "add")
    with AimClient(srv.target) as client:
        for seconds in (1, 2, 4, 8, 16):
            runtime.admission.service_times.clear()  # admission has no history: it lets it run
            with AimClient(srv.target, timeout=seconds) as hurried:
                try:
                    reply = hurried.generate(LONG_PROMPT, videos=[VIDEO], frames=4, max_new_tokens=HOLD_TOKENS,
                                             ignore_eos=True, no_reduction=True)
                except grpc.RpcError as exc:
                    error = exc
                else:
                    pytest.fail(f"{reply.usage.completion_tokens} tokens finished within a {seconds}s deadline")
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "cannot cover" not in error.details()
            if sequences:
                _assert_stops_within_one_step(sequences[-1])
                if sequences[-1].generated:
                    break  # it was decoding when its deadline passed
            sequences.clear()
        else:
            pytest.fail("the deadline passed before the first token even at 16 s")
        assert runtime.running == 0 and len(sequences[-1].generated) < HOLD_TOKENS
        assert client.generate("Next", max_new_tokens=2).usage.completion_tokens == 2


def test_deadline_that_cannot_be_met_is_rejected_at_admission(make_server, monkeypatch):
    srv = make_server(max_batch=1)
    runtime = srv.running.state.runtimes["tiny-ov"]
    decoded = _record_calls(monkeypatch, runtime.engine, "ingest")
    sequences = _record_calls(monkeypatch, runtime.engine.loop, "add")
    runtime.admission.service_times.clear()
    runtime.admission.service_times.append(3600.0)  # every request so far took an hour
    with AimClient(srv.target, timeout=60) as hurried, pytest.raises(grpc.RpcError) as err:
        hurried.generate("Hi", images=[encode_image("PNG")], max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "cannot cover" in err.value.details()
    assert decoded == [] and sequences == []  # rejected on arrival: no media decoded, nothing reached the engine


def test_oversized_message_is_rejected_and_the_server_keeps_serving(make_server):
    srv = make_server(max_message_bytes=256 * 1024)
    with AimClient(srv.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("Hi", images=[b"\x89PNG" + b"\0" * (512 * 1024)])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.generate("Hi", max_new_tokens=1).usage.completion_tokens == 1


def _health(target, service=""):
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_not_serving_until_loaded_serving_then_not_serving_while_draining(server, tiny_engines):
    from tests.service.conftest import ServerThread

    srv = ServerThread.__new__(ServerThread)  # a server thread that only listens, models loaded by hand
    import asyncio

    srv.loop = asyncio.new_event_loop()
    started = threading.Event()

    def run():
        asyncio.set_event_loop(srv.loop)
        srv.running = srv.loop.run_until_complete(start_listening(BASE))
        started.set()
        srv.loop.run_forever()

    srv.thread = threading.Thread(target=run, daemon=True)
    srv.thread.start()
    started.wait(30)
    target = f"127.0.0.1:{srv.running.port}"
    NOT, OK = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
    assert _health(target) == NOT and _health(target, "aim.v1.AimService") == NOT
    with AimClient(target) as client, pytest.raises(grpc.RpcError) as err:
        client.generate("Hi")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    srv.call(load_models(srv.running, tiny_engines))
    assert _health(target) == OK and _health(target, "inference.GRPCInferenceService") == OK
    srv.call(srv.running.set_serving(False))  # what draining does first
    assert _health(target) == NOT
    srv.call(srv.running.drain_and_stop(0.1))
    srv.loop.call_soon_threadsafe(srv.loop.stop)


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(replies).list_services_response.service}
    assert {"aim.v1.AimService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_bearer_token(make_server):
    srv = make_server(auth_token="s3cret")
    for token, ok in ((None, False), ("wrong", False), ("s3cret", True)):
        with AimClient(srv.target, token=token) as client:
            if ok:
                assert client.generate("Hi", max_new_tokens=1).usage.completion_tokens == 1
                assert list(client.stream("Hi", max_new_tokens=1))
            else:
                for call in (lambda: client.generate("Hi"), lambda: list(client.stream("Hi"))):
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _health(srv.target) == health_pb2.HealthCheckResponse.SERVING  # probes need no token


def _self_signed(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), cert_pem


def test_tls(make_server, tmp_path):
    cert, key, cert_pem = _self_signed(tmp_path)
    srv = make_server(tls_cert=cert, tls_key=key)
    target = f"localhost:{srv.port}"
    with AimClient(target, root_certificates=cert_pem) as client:
        assert client.generate("Hi", max_new_tokens=1).usage.completion_tokens == 1
    with AimClient(target, timeout=5) as plaintext, pytest.raises(grpc.RpcError) as err:
        plaintext.generate("Hi", max_new_tokens=1)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_request_metrics_use_bounded_model_labels(make_server):
    srv = make_server()
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.AimServiceStub(channel)
        _raw(stub)  # default model
        for name in ("made-up-1", "made-up-2"):
            with pytest.raises(grpc.RpcError):
                _raw(stub, model=name)
    expected = {("tiny-ov", "ok"): 1.0, ("unknown", "not_found"): 2.0}

    def labels():  # the server counts after the status has gone out: give it a moment
        return {(s.labels["model"], s.labels["outcome"]): s.value
                for s in srv.metrics.requests.collect()[0].samples if s.name == "aim_requests_total"}

    deadline = time.monotonic() + 5
    while labels() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert labels() == expected


def test_no_queue_means_run_if_a_worker_is_free_else_reject(make_server):
    srv = make_server(max_queue=0, max_batch=1, max_new_tokens=HOLD_TOKENS)
    with AimClient(srv.target) as client:
        for _ in range(20):  # a free worker: served, and free again by the time the answer arrives
            assert client.generate("Hi", max_new_tokens=1).usage.completion_tokens == 1
        events = hold(client, no_reduction=True)  # the worker is busy until it is cancelled
        with pytest.raises(grpc.RpcError) as err:
            client.generate("Hi", max_new_tokens=1)
        events.cancel()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _batch_sizes(metrics, model: str) -> dict[str, float]:
    """Cumulative bucket counts of aim_batch_size for `model`, by upper bound."""
    return {s.labels["le"]: s.value for s in metrics.batch_size.collect()[0].samples
            if s.name == "aim_batch_size_bucket" and s.labels["model"] == model}


def test_concurrent_requests_decode_in_one_batch_and_answer_as_alone(make_server):
    """While one long request holds its place in the batch (it runs until cancelled), five others arrive over
    gRPC: each is decoded in steps shared with it, and answers exactly what it answers alone."""
    srv = make_server(max_batch=8, max_queue=8, max_new_tokens=HOLD_TOKENS)
    prompts = [f"Question {i}: what moves, and where?" for i in range(5)]
    kwargs = dict(videos=[VIDEO], frames=4, max_new_tokens=12, ignore_eos=True)
    # unreduced and merged prompts in one batch, each plan explicit: an `auto` request may rightly get another
    # level beside five others than alone (the controller leaves room for the requests it sees arriving)
    plans = [dict(no_reduction=True) if i % 2 == 0 else dict(plan=ReductionPlan(merge_retention=0.5))
             for i in range(5)]
    with AimClient(srv.target) as client:
        alone = [client.generate(p, **kwargs, **plans[i]).text for i, p in enumerate(prompts)]
        before = _batch_sizes(srv.metrics, "tiny-ov")
        holder = client.stream_events(LONG_PROMPT, videos=[VIDEO], frames=4, max_new_tokens=HOLD_TOKENS, ignore_eos=True,
                                      no_reduction=True)
        next(holder)  # it is decoding
        with ThreadPoolExecutor(5) as pool:
            together = list(pool.map(lambda ip: client.generate(ip[1], **kwargs, **plans[ip[0]]).text,
                                     enumerate(prompts)))
        holder.cancel()
    assert together == alone
    after = _batch_sizes(srv.metrics, "tiny-ov")
    steps = after["+Inf"] - before["+Inf"]
    alone_steps = after["1.0"] - before["1.0"]
    assert steps > 0 and steps - alone_steps >= 11  # each of the five decoded its 11 steps beside the holder
    text = urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics").read().decode()
    for name in ("aim_kv_cache_usage_ratio", "aim_kv_cache_reserved_ratio", "aim_kv_cache_used_bytes",
                 "aim_kv_cache_capacity_bytes", "aim_batch_size_bucket"):
        assert f'{name}{{' in text


def test_a_qwen3_vl_model_is_served_with_its_family_and_default_plan(engine_for):
    """The 2026 family over the wire: info names it, its default plan fits its depth, and a video (timestamps,
    DeepStack) is answered under the default plan and the controller's, as estimated."""
    srv = ServerThread(BASE, {"tiny-qwen3": engine_for("qwen3_vl", layers=8)})
    try:
        with AimClient(srv.target) as client:
            info = client.model_info()
            assert (info.model, info.family, info.num_layers, info.supports_video) == ("tiny-qwen3", "qwen3_vl", 8,
                                                                                       True)
            default = plan_from_proto(info.default_plan)
            assert default == ReductionPlan.default_for_depth(8)
            est = client.estimate("What happens?", videos=[VIDEO], frames=6, max_new_tokens=3, plan=default)
            run = client.generate("What happens?", videos=[VIDEO], frames=6, max_new_tokens=3, plan=default)
            auto = client.generate("What happens?", videos=[VIDEO], frames=6, max_new_tokens=3)
        assert run.usage.visual_tokens_merged < run.usage.visual_tokens_in
        assert est.prefill_flops == run.cost.prefill_flops and run.cost.prefill_flops < run.cost.baseline_prefill_flops
        assert auto.applied_plan.source == pb.PLAN_SOURCE_AUTO and auto.usage.completion_tokens == 3
    finally:
        srv.stop()
