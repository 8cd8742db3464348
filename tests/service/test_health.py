"""grpc.health.v1 on a real server: Watch streams every change to every watcher, needs a token where Check does not,
is bounded in number, and never locks probes out."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import AimClient
from service.settings import Settings
from tests.service.conftest import hold, wait_until

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Watcher:
    """One Watch stream read on its own thread; its statuses (or its error) land in a queue."""

    def __init__(self, target: str, service: str = "", token: str | None = None):
        self.channel = grpc.insecure_channel(target)
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.call = health_pb2_grpc.HealthStub(self.channel).Watch(
            health_pb2.HealthCheckRequest(service=service), metadata=metadata)
        self.seen: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.seen.put(reply.status)
            self.seen.put("ended")
        except grpc.RpcError as exc:
            self.seen.put(exc.code())

    def next(self):
        return self.seen.get(timeout=30)

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def check(target: str, service: str = ""):
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


def test_watch_streams_the_status_and_every_change_to_every_watcher(make_server):
    srv = make_server()
    first, second, other = Watcher(srv.target), Watcher(srv.target), Watcher(srv.target, "aim.v1.AimService")
    assert first.next() == SERVING and second.next() == SERVING and other.next() == SERVING
    unknown = Watcher(srv.target, "no.such.Service")
    assert unknown.next() == UNKNOWN
    second.close()  # one watcher leaving must not deafen the others (grpcio's own servicer forgets them all)
    wait_until(lambda: srv.running.health.watchers == 3, "the closed watch to end")
    srv.call(srv.running.set_serving(False))
    assert first.next() == NOT_SERVING and other.next() == NOT_SERVING
    srv.call(srv.running.set_serving(True))
    assert first.next() == SERVING
    for w in (first, other, unknown):
        w.close()


def test_watches_end_when_the_server_stops_so_it_need_not_wait_out_its_grace(make_server):
    srv = make_server(drain_seconds=600)
    watcher = Watcher(srv.target)
    assert watcher.next() == SERVING
    srv.stop(grace=600)  # returns once the watch has ended (it would hold the stop for 600 s otherwise)
    assert watcher.next() == NOT_SERVING
    assert watcher.next() in ("ended", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    watcher.close()


def test_watch_needs_the_token_and_check_does_not(make_server):
    srv = make_server(auth_token="s3cret")
    anonymous = Watcher(srv.target)
    assert anonymous.next() == grpc.StatusCode.UNAUTHENTICATED
    wrong = Watcher(srv.target, token="guess")
    assert wrong.next() == grpc.StatusCode.UNAUTHENTICATED
    caller = Watcher(srv.target, token="s3cret")
    assert caller.next() == SERVING
    assert check(srv.target) == SERVING
    for w in (anonymous, wrong, caller):
        w.close()


def test_watches_are_bounded_and_probes_answer_with_the_batch_queue_and_watches_full(make_server):
    srv = make_server(max_health_watches=2, max_batch=1, max_queue=1, max_new_tokens=4000)
    watches = [Watcher(srv.target) for _ in range(2)]
    assert [w.next() for w in watches] == [SERVING, SERVING]
    refused = Watcher(srv.target)
    assert refused.next() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with AimClient(srv.target) as running_client, AimClient(srv.target) as queued_client, \
            AimClient(srv.target) as third:
        running = hold(running_client)
        queued = queued_client.stream_events("Wait.", max_new_tokens=2)
        runtime = next(iter(srv.running.state.runtimes.values()))
        wait_until(lambda: runtime.admission.in_system == 2, "the batch and the queue to be full")
        with pytest.raises(grpc.RpcError) as err:
            third.generate("One more.", max_new_tokens=1)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert check(srv.target) == SERVING  # the probe's room is beyond everything callers can hold
        running.cancel()
        assert list(queued)
    for w in [*watches, refused]:
        w.close()


def test_the_rpc_cap_leaves_room_for_watches_and_probes():
    settings = Settings(models=["a"], max_batch=8, max_queue=16, max_health_watches=64)
    assert settings.concurrent_rpcs() == 8 + 16 + 64 + 32
    with pytest.raises(ValueError, match="max_health_watches"):
        Settings(models=["a"], max_concurrent_rpcs=10, max_health_watches=10).validate()


def test_a_call_refused_for_its_token_is_not_parsed():
    """The refusal's handler takes the raw bytes: a 64 MiB request with a bad token costs no protobuf parse."""
    import asyncio

    from service.interceptors import BearerTokenInterceptor

    parsed = []

    def parse(data: bytes):
        parsed.append(data)
        return data

    async def behaviour(request, context):  # pragma: no cover - never reached without the token
        return request

    inner = grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=parse)

    class Details:
        method = "/aim.v1.AimService/Generate"
        invocation_metadata = (("authorization", "Bearer guess"),)

    async def continuation(details):
        return inner

    handler = asyncio.run(BearerTokenInterceptor("s3cret").intercept_service(continuation, Details()))
    assert handler.request_deserializer is None and handler.unary_unary is not behaviour
    Details.invocation_metadata = (("authorization", "Bearer s3cret"),)
    assert asyncio.run(BearerTokenInterceptor("s3cret").intercept_service(continuation, Details())) is inner
