"""Server interceptors: go-grpc-prometheus-style metrics for every RPC, and an optional bearer-token check."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import time

import grpc

from .health import CHECK_METHOD
from .metrics import ServiceMetrics


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
                with _Call(m, labels, context, received=1) as call:
                    response = await inner(request, context)
                    call.sent()
                    return response

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)

        if kind in ("server_stream", "bidi_stream"):
            inner = handler.unary_stream if kind == "server_stream" else handler.stream_stream
            make = grpc.unary_stream_rpc_method_handler if kind == "server_stream" else \
                grpc.stream_stream_rpc_method_handler
            received = 1 if kind == "server_stream" else 0
            if _writes_itself(inner):  # responses go through context.write: counted as one call, not per message

                async def writing(request_or_iterator, context):
                    with _Call(m, labels, context, received):
                        await inner(request_or_iterator, context)
                return make(writing, handler.request_deserializer, handler.response_serializer)

            async def streaming(request_or_iterator, context):
                with _Call(m, labels, context, received) as call:
                    if kind == "bidi_stream":
                        request_or_iterator = call.count_received(request_or_iterator)
                    async for response in inner(request_or_iterator, context):
                        call.sent()
                        yield response

            return make(streaming, handler.request_deserializer, handler.response_serializer)
        return handler


class _Call:
    """The go-grpc-prometheus bookkeeping of one RPC, around its handler (`with`): started and received on entry,
    handled (with its status) and its duration on exit, however it ends."""

    def __init__(self, metrics: ServiceMetrics, labels: tuple[str, str, str], context, received: int):
        self.m, self.labels, self.context = metrics, labels, context
        self.start = time.perf_counter()
        metrics.grpc_started.labels(*labels).inc()
        if received:
            metrics.grpc_received.labels(*labels).inc(received)

    def __enter__(self) -> "_Call":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self.m.grpc_handled.labels(*self.labels, _status_code(self.context, error).name).inc()
        self.m.grpc_seconds.labels(*self.labels).observe(time.perf_counter() - self.start)
        return False

    def sent(self) -> None:
        self.m.grpc_sent.labels(*self.labels).inc()

    async def count_received(self, iterator):
        async for item in iterator:
            self.m.grpc_received.labels(*self.labels).inc()
            yield item


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC except the health `Check` that probes call needs `authorization: Bearer <token>` (a health `Watch`
    holds a stream open, so it is a caller's, not a probe's). A refused call's request is never parsed: its
    handler takes the bytes as they are."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method == CHECK_METHOD:
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
            return make(deny_stream, None, handler.response_serializer)
        make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
        return make(deny_unary, None, handler.response_serializer)


class _Malformed:
    """What a request's bytes became when they do not parse as its message type."""

    def __init__(self, message: str):
        self.message = message


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the method's request message (invalid UTF-8 in a string field, a truncated or
    foreign message) get INVALID_ARGUMENT with what was wrong, instead of the library's UNKNOWN: the request
    deserializer returns a marker instead of raising, and the handler aborts on it before any work."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, details.method

        def safe(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, ...
                return _Malformed(f"the request is not a valid message for {method} ({type(exc).__name__}: "
                                  f"{exc}); check that the client's stubs come from this server's protos")

        async def check(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

        async def checked(requests, context):
            async for request in requests:
                await check(request, context)
                yield request

        kw = dict(request_deserializer=safe, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                await check(request, context)
                return await _result(inner(request, context))
            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.unary_stream:
            inner = handler.unary_stream
            if _writes_itself(inner):

                async def unary_writes(request, context):
                    await check(request, context)
                    await inner(request, context)
                return grpc.unary_stream_rpc_method_handler(unary_writes, **kw)

            async def unary_stream(request, context):
                await check(request, context)
                async for response in _responses(inner(request, context)):
                    yield response
            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        if handler.stream_unary:
            inner = handler.stream_unary

            async def stream_unary(requests, context):
                return await _result(inner(checked(requests, context), context))
            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        inner = handler.stream_stream
        if _writes_itself(inner):

            async def stream_writes(requests, context):
                await inner(checked(requests, context), context)
            return grpc.stream_stream_rpc_method_handler(stream_writes, **kw)

        async def stream_stream(requests, context):
            async for response in _responses(inner(checked(requests, context), context)):
                yield response
        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


def _writes_itself(behaviour) -> bool:
    """A streaming behaviour that is a coroutine function writes its responses with `context.write` (grpcio's own
    servicers do): a wrapper must await it, not iterate it."""
    return not (inspect.isasyncgenfunction(behaviour) or inspect.isgeneratorfunction(behaviour))


async def _result(value):
    """A handler's return value, whether its behaviour is a coroutine function or a plain one."""
    return await value if inspect.isawaitable(value) else value


async def _responses(stream):
    """A handler's responses, whether it is an async generator or a plain one."""
    if hasattr(stream, "__aiter__"):
        async for response in stream:
            yield response
    else:
        for response in stream:
            yield response
