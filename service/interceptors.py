"""Server interceptors: go-grpc-prometheus-style metrics for every RPC, and an optional bearer-token check."""

from __future__ import annotations

import asyncio
import hmac
import time

import grpc

from .metrics import ServiceMetrics

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _grpc_type(handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _status_code(context, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()  # set by context.abort / set_code
    if code is not None:
        return code
    if error is None:
        return grpc.StatusCode.OK
    return grpc.StatusCode.CANCELLED if isinstance(error, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics):
        self.m = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        service, method = _split(details.method)
        kind = _grpc_type(handler)
        labels = (kind, service, method)
        m = self.m

        if kind == "unary":
            inner = handler.unary_unary

            async def unary(request, context):
                call = _Call(m, labels, received=1)
                try:
                    response = await inner(request, context)
                    call.sent()
                    return response
                except BaseException as exc:
                    call.error = exc
                    raise
                finally:
                    call.finish(context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)

        if kind in ("server_stream", "bidi_stream"):
            inner = handler.unary_stream if kind == "server_stream" else handler.stream_stream

            async def streaming(request_or_iterator, context):
                call = _Call(m, labels, received=1 if kind == "server_stream" else 0)
                if kind == "bidi_stream":
                    request_or_iterator = call.count_received(request_or_iterator)
                try:
                    async for response in inner(request_or_iterator, context):
                        call.sent()
                        yield response
                except BaseException as exc:
                    call.error = exc
                    raise
                finally:
                    call.finish(context)

            make = grpc.unary_stream_rpc_method_handler if kind == "server_stream" else \
                grpc.stream_stream_rpc_method_handler
            return make(streaming, handler.request_deserializer, handler.response_serializer)
        return handler


class _Call:
    """The go-grpc-prometheus bookkeeping of one RPC."""

    def __init__(self, metrics: ServiceMetrics, labels: tuple[str, str, str], received: int):
        self.m, self.labels, self.error = metrics, labels, None
        self.start = time.perf_counter()
        metrics.grpc_started.labels(*labels).inc()
        if received:
            metrics.grpc_received.labels(*labels).inc(received)

    def sent(self) -> None:
        self.m.grpc_sent.labels(*self.labels).inc()

    async def count_received(self, iterator):
        async for item in iterator:
            self.m.grpc_received.labels(*self.labels).inc()
            yield item

    def finish(self, context) -> None:
        self.m.grpc_handled.labels(*self.labels, _status_code(context, self.error).name).inc()
        self.m.grpc_seconds.labels(*self.labels).observe(time.perf_counter() - self.start)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC except health checks needs `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self.expected):
            return await continuation(details)
        handler = await continuation(details)
        message = "missing bearer token" if not given else "invalid bearer token"

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        if handler is None:
            return None
        if handler.response_streaming:
            make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else \
                grpc.unary_stream_rpc_method_handler
            return make(deny_stream, handler.request_deserializer, handler.response_serializer)
        make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
        return make(deny_unary, handler.request_deserializer, handler.response_serializer)
