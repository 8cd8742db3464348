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

        def finish(context, start, error: BaseException | None):
            m.grpc_handled.labels(*labels, _status_code(context, error).name).inc()
            m.grpc_seconds.labels(*labels).observe(time.perf_counter() - start)

        if kind == "unary":
            inner = handler.unary_unary

            async def unary(request, context):
                m.grpc_started.labels(*labels).inc()
                m.grpc_received.labels(*labels).inc()
                start, error = time.perf_counter(), None
                try:
                    response = await inner(request, context)
                    m.grpc_sent.labels(*labels).inc()
                    return response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, start, error)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)

        if kind == "server_stream":
            inner = handler.unary_stream

            async def server_stream(request, context):
                m.grpc_started.labels(*labels).inc()
                m.grpc_received.labels(*labels).inc()
                start, error = time.perf_counter(), None
                try:
                    async for response in inner(request, context):
                        m.grpc_sent.labels(*labels).inc()
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, start, error)

            return grpc.unary_stream_rpc_method_handler(server_stream, handler.request_deserializer,
                                                        handler.response_serializer)

        if kind == "bidi_stream":
            inner = handler.stream_stream

            async def bidi(request_iterator, context):
                m.grpc_started.labels(*labels).inc()
                start, error = time.perf_counter(), None

                async def counted():
                    async for item in request_iterator:
                        m.grpc_received.labels(*labels).inc()
                        yield item

                try:
                    async for response in inner(counted(), context):
                        m.grpc_sent.labels(*labels).inc()
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, start, error)

            return grpc.stream_stream_rpc_method_handler(bidi, handler.request_deserializer,
                                                         handler.response_serializer)
        return handler


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
