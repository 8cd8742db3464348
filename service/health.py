"""grpc.health.v1: `Check` for probes and `Watch` for client-side health checking (gRPC's, Envoy's).

grpcio's own aio servicer is replaced because its `Watch` writes through `context.write` (interceptors that wrap
streaming handlers as generators then fail it), it forgets a service's watchers when any one of them leaves (the
others then never hear of a change), and it bounds nothing. Here a `Watch` is an async generator; every watcher of
a service hears every change; at most `max_watchers` streams are open at once (more: RESOURCE_EXHAUSTED), so
watchers cannot take the server's RPC cap from probes (server.py leaves the probes room beyond it)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE_NAME = "grpc.health.v1.Health"
CHECK_METHOD = f"/{SERVICE_NAME}/Check"  # what probes call: it needs no token (interceptors.BearerTokenInterceptor)
DEFAULT_MAX_WATCHERS = 64

Status = health_pb2.HealthCheckResponse.ServingStatus


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, max_watchers: int = DEFAULT_MAX_WATCHERS):
        self.max_watchers = max_watchers
        self.watchers = 0
        self._status: dict[str, Status] = {}
        self._changed = asyncio.Event()  # set and replaced at every change: each watcher waits on the one it saw
        self._closed = False

    async def set(self, service: str, status: Status) -> None:
        if self._status.get(service) != status:
            self._status[service] = status
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def close(self) -> None:
        """Ends every watch (after it has sent the last status), so that a stopping server need not wait out its
        grace for streams that never end."""
        self._closed = True
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        """The service's status now, then each change, until the client leaves or the server stops (`close`).
        An unknown service is SERVICE_UNKNOWN (and is watched: it may appear), as the protocol says."""
        if self.watchers >= self.max_watchers:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.max_watchers} health watches are open, the most this server keeps; use "
                                "Check, or share one watch per client")
        self.watchers += 1
        try:
            sent = None
            while True:
                changed = self._changed
                status = self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                if status != sent:
                    yield health_pb2.HealthCheckResponse(status=status)
                    sent = status
                    continue  # the status may have changed (and the watches closed) while that was sent
                if self._closed:
                    return
                await changed.wait()
        finally:
            self.watchers -= 1
