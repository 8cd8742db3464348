"""The OpenAI-compatible HTTP API: FastAPI on uvicorn, in the gRPC server's process and event loop, over the same
runtimes (admission, controller, metrics and limits are theirs, not this module's).

  POST /v1/chat/completions   stream false or true (server-sent events, then `data: [DONE]`)
  GET  /v1/models, /v1/models/{id}
  GET  /health                liveness (200 while the process serves HTTP)
  GET  /ready                 readiness (200 once the models are loaded; 503 while loading and draining)

Errors are OpenAI's error object, {"error": {"message", "type", "param", "code"}}, with `code` the status name the
gRPC wire would use. A client that goes away stops its request: its sequence leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from aim_engine import TokenDelta

from .http_connections import ConnectionLimits, bounded_protocol
from .openai_convert import (MediaAccess, chat_request_from_json, chunk_json, completion_id, completion_json, now,
                             usage_chunk_json)
from .registry import ServedModels
from .types import ServiceError, to_service_error

log = logging.getLogger("aim.service")

# status name -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    "invalid_argument": (400, "invalid_request_error"),
    "unauthenticated": (401, "authentication_error"),
    "not_found": (404, "invalid_request_error"),
    "resource_exhausted": (429, "rate_limit_error"),
    "internal": (500, "server_error"),
    "unavailable": (503, "server_error"),
    "deadline_exceeded": (504, "timeout_error"),
}
TOO_LARGE = (413, "invalid_request_error")
RETRY_AFTER_S = 1  # what a shed request is told to wait before retrying (the openai client honours it)


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def error_response(status: str, message: str, param: str | None = None, too_large: bool = False) -> JSONResponse:
    http, kind = TOO_LARGE if too_large else HTTP_STATUS.get(status, HTTP_STATUS["internal"])
    code = "request_too_large" if too_large else "model_not_found" if status == "not_found" else status
    headers = {"Retry-After": str(RETRY_AFTER_S)} if http in (429, 503) else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, http,
                        headers=headers)


def _service_error_response(exc: BaseException) -> JSONResponse:
    err = to_service_error(exc)
    if err.status == "internal":
        incident = uuid.uuid4().hex[:12]
        log.error("internal error (incident %s)", incident, exc_info=exc)
        return error_response("internal", f"internal error (incident {incident}); the server log has the details")
    return error_response(err.status, str(err), err.param, err.too_large)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes: never read whole first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServiceError("invalid_argument", f"the request body is {declared} bytes; the limit is {limit} "
                                               "(--max-message-bytes)", too_large=True)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServiceError("invalid_argument", f"the request body is over the limit of {limit} bytes "
                                                       "(--max-message-bytes)", too_large=True)
            chunks.append(chunk)
    except ClientDisconnect:  # it left, or its body was too slow (--http-read-s): nothing to run
        raise _ClientGone() from None
    return b"".join(chunks)


def _parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ServiceError("invalid_argument", f"the request body is not valid JSON ({exc})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, awaitable):
    """`awaitable`'s result; cancelled (which ends its request in the runtime) if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        raise _ClientGone()
    return work.result()


class _Routes:
    """The API's handlers over the served models (each wire's translation, nothing else: the runtime does the rest)."""

    def __init__(self, models: ServedModels):
        self.models = models
        self.settings = settings = models.settings
        self.access = MediaAccess(settings.allowed_local_media_path, settings.media_hosts(), settings.max_media_bytes)
        self.expected = f"Bearer {settings.auth_token}".encode() if settings.auth_token else None

    def authorize(self, request: Request) -> None:
        if self.expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self.expected):
            raise ServiceError("unauthenticated", "missing bearer token" if not given else "invalid bearer token")

    async def health(self):
        return {"status": "ok"}

    async def ready(self):
        if not self.models.accepting:
            return error_response("unavailable", "not ready: the models are loading, or the server is draining")
        return {"status": "ready", "models": list(self.models.runtimes)}

    @staticmethod
    def _card(name: str, created: int) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "aim-serve"}

    async def list_models(self, request: Request):
        try:
            self.authorize(request)
            self.models.runtime("")  # unavailable while loading or draining
        except ServiceError as exc:
            return _service_error_response(exc)
        created = now()
        return {"object": "list", "data": [self._card(name, created) for name in self.models.runtimes]}

    async def get_model(self, name: str, request: Request):
        try:
            self.authorize(request)
            return self._card(self.models.runtime(name).name, now())
        except ServiceError as exc:
            return _service_error_response(exc)

    async def chat_completions(self, request: Request):
        arrival = time.monotonic()
        label, outcome, streaming = "unknown", "ok", False
        try:
            self.authorize(request)  # before the body is read
            # off the event loop, as the media in it: a body may be up to --max-message-bytes of JSON
            body = await asyncio.to_thread(_parse_json, await _read_body(request, self.settings.max_message_bytes))
            name = body.get("model") if isinstance(body, dict) else None
            name = name if isinstance(name, str) else ""
            label = self.models.model_label(name)
            runtime = self.models.runtime(name)
            chat = await asyncio.to_thread(chat_request_from_json, body, self.settings, self.access)  # reads URLs
            deadline = None if chat.deadline_s is None else arrival + chat.deadline_s
            cid, created = completion_id(), now()
            if not chat.stream:
                done = await _unless_client_leaves(request, runtime.generate(chat.request, chat.reduction, deadline))
                return JSONResponse(completion_json(cid, runtime.name, created, done))
            events = runtime.stream(chat.request, chat.reduction, deadline)
            # the first event before the headers: a request refused at admission or by its media gets its status
            first = await _unless_client_leaves(request, events.__anext__())
            streaming = True
            return StreamingResponse(_chunks(self.models, label, events, first, cid, runtime.name, created,
                                             chat.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        except _ClientGone:
            outcome = "cancelled"
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - ServiceErrors with their status; the rest without details
            outcome = to_service_error(exc).status
            return _service_error_response(exc)
        finally:
            if not streaming:
                self.models.count_outcome(label, outcome)


async def _http_error(request: Request, exc: StarletteHTTPException):
    """Unknown routes and wrong methods, as OpenAI error objects too."""
    response = error_response("not_found" if exc.status_code == 404 else "invalid_argument",
                              f"{request.method} {request.url.path}: {exc.detail}")
    response.status_code = exc.status_code
    return response


def build_app(models: ServedModels) -> FastAPI:
    routes = _Routes(models)
    app = FastAPI(title="aim-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/ready", routes.ready, methods=["GET"])
    app.add_api_route("/v1/models", routes.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", routes.get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    return app


async def _chunks(models: ServedModels, label: str, events, first, cid: str, model: str, created: int,
                  include_usage: bool):
    """The server-sent events of one streamed answer. An error after the headers is sent in-band, as OpenAI does
    (the client raises it); a client that leaves cancels the stream, which ends the request in the runtime."""
    outcome = "ok"
    try:
        yield _sse(chunk_json(cid, model, created, {"role": "assistant", "content": ""}))
        event = first
        while isinstance(event, TokenDelta):
            if event.text:
                yield _sse(chunk_json(cid, model, created, {"content": event.text}))
            event = await events.__anext__()
        yield _sse(chunk_json(cid, model, created, {}, "length" if event.result.finish_reason == "length"
                              else "stop"))
        if include_usage:
            yield _sse(usage_chunk_json(cid, model, created, event))
        yield _sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "cancelled"
        raise
    except Exception as exc:  # noqa: BLE001 - in-band, like OpenAI's own streams
        err = to_service_error(exc)
        outcome = err.status
        body = json.loads(_service_error_response(exc).body)
        yield _sse(body)
    finally:
        await events.aclose()
        models.count_outcome(label, outcome)


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the service's event loop: signals stay the service's (SIGTERM drains both wires)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _refusal(limit: int) -> bytes:
    """The whole HTTP response a connection over `--http-max-connections` gets before it is closed."""
    response = error_response("unavailable", f"the server holds {limit} HTTP connections, its limit "
                                             "(--http-max-connections); retry with backoff")
    head = [b"HTTP/1.1 503 Service Unavailable", *(k + b": " + v for k, v in response.raw_headers),
            b"connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + response.body


def http_server(models: ServedModels, sock, grace_s: float) -> EmbeddedServer:
    """A uvicorn server for `build_app(models)` on an already bound socket (so port 0 is known at once), its
    connections bounded (http_connections.py)."""
    settings = models.settings
    limits = ConnectionLimits(settings.http_max_connections, settings.http_idle_s, settings.http_read_s,
                              settings.max_connection_age_s)
    config = uvicorn.Config(build_app(models), log_level="warning", access_log=False, lifespan="off",
                            http=bounded_protocol(limits, _refusal(limits.max_connections)),
                            timeout_keep_alive=settings.http_idle_s,
                            timeout_graceful_shutdown=max(1, math.ceil(grace_s)))
    server = EmbeddedServer(config)
    server.sock = sock
    return server
