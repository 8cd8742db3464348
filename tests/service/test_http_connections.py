"""The HTTP API's connections are bounded (service/http_connections.py): a real uvicorn on loopback, spoken to with
raw sockets, since what is tested is what a client that misbehaves at the byte level can hold.

Each timing test waits for the server to close the connection; without the bound it would never close, so the
generous guard timeout cannot make a broken build pass."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.http_connections import ConnectionLimits, bounded_protocol

from tests.service.conftest import metric_value, wait_until

GUARD_S = 30.0  # only against a hang
REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nfull"


class Harness:
    """uvicorn with the bounded protocol, in a thread with its own loop; its app answers GET / and reads a POSTed
    body whole, recording whether the body came or the client left."""

    def __init__(self, limits: ConnectionLimits):
        self.bodies: list[object] = []

        async def root(request: Request):
            return JSONResponse({"ok": True})

        async def upload(request: Request):
            try:
                self.bodies.append(len(await request.body()))
            except ClientDisconnect:
                self.bodies.append("left")
                raise
            return JSONResponse({"bytes": self.bodies[-1]})

        app = Starlette(routes=[Route("/", root), Route("/upload", upload, methods=["POST"])])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="critical", lifespan="off", http=bounded_protocol(limits, REFUSAL))
        self.server = uvicorn.Server(config)
        self.server.capture_signals = _no_signals
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self.server.serve(sockets=[self.sock]),), daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, "uvicorn to start")

    def connect(self) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=GUARD_S)
        return conn

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _no_signals():
    import contextlib

    return contextlib.nullcontext()


@pytest.fixture
def harness():
    made = []

    def make(max_connections=8, idle_s=GUARD_S * 4, read_s=GUARD_S * 4, max_age_s=GUARD_S * 4) -> Harness:
        made.append(Harness(ConnectionLimits(max_connections, idle_s, read_s, max_age_s)))
        return made[-1]

    yield make
    for h in made:
        h.stop()


def read_response(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += conn.recv(65536)
    return int(status_line.split()[1]), headers, body


def closed_by_server(conn: socket.socket) -> bool:
    """Reads until the server closes (True) or the guard passes (False)."""
    conn.settimeout(GUARD_S)
    try:
        while conn.recv(65536):
            pass
        return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True


GET = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


def test_a_connection_that_never_sends_a_request_is_closed(harness):
    h = harness(idle_s=0.2)
    conn = h.connect()
    assert closed_by_server(conn)
    wait_until(lambda: h.open_connections() == 0, "the server to forget the connection")


def test_a_header_sent_a_byte_at_a_time_does_not_hold_the_connection(harness):
    """uvicorn's own keep-alive timer stops at the first byte: a slow head kept it open for ever."""
    h = harness(idle_s=0.3)
    conn = h.connect()
    conn.sendall(b"GET / HTTP/1.1\r\n")
    deadline = time.monotonic() + GUARD_S
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            conn.sendall(b"x-slow: y\r\n")  # a header line every 50 ms, the head never complete
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        conn.settimeout(0.05)
        try:
            closed = conn.recv(1) == b""
        except (TimeoutError, socket.timeout):
            pass
    assert closed


def test_keep_alive_serves_requests_until_idle_then_closes(harness):
    h = harness(idle_s=0.3)
    conn = h.connect()
    for _ in range(3):  # one connection, three requests: it is kept alive between them
        conn.sendall(GET)
        status, headers, body = read_response(conn)
        assert status == 200 and json.loads(body) == {"ok": True} and headers.get("connection") != "close"
    assert closed_by_server(conn)


def test_a_body_that_does_not_arrive_in_time_drops_the_request(harness):
    h = harness(read_s=0.3)
    conn = h.connect()
    conn.sendall(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n" + b"a" * 10)
    assert closed_by_server(conn)
    wait_until(lambda: h.bodies == ["left"], "the app to see its client leave")
    # a body that comes whole is read, and the timer does not outlive it
    conn = h.connect()
    conn.sendall(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
    status, _, body = read_response(conn)
    assert status == 200 and json.loads(body) == {"bytes": 5}


def test_an_old_connection_is_told_to_close_on_its_next_answer(harness):
    young = harness()
    conn = young.connect()
    conn.sendall(GET)
    assert read_response(conn)[1].get("connection") != "close"
    old = harness(max_age_s=0.0)  # every connection is old at its first request
    conn = old.connect()
    conn.sendall(GET)
    status, headers, body = read_response(conn)
    assert status == 200 and json.loads(body) == {"ok": True} and headers["connection"] == "close"
    assert closed_by_server(conn)


def test_connections_past_the_limit_are_refused_and_a_freed_place_is_reused(harness):
    h = harness(max_connections=2)
    held = [h.connect(), h.connect()]
    wait_until(lambda: h.open_connections() == 2, "two connections open")
    extra = h.connect()
    data = b""
    while chunk := extra.recv(65536):
        data += chunk
    assert data == REFUSAL
    for conn in held:  # the two held ones still serve
        conn.sendall(GET)
        assert read_response(conn)[0] == 200
    held.pop().close()
    wait_until(lambda: h.open_connections() == 1, "a place freed")
    conn = h.connect()
    conn.sendall(GET)
    assert read_response(conn)[0] == 200


# ---- the service's own HTTP API -----------------------------------------------------------------------------
def test_the_service_refuses_a_connection_past_its_limit_with_an_error_object_and_drops_a_slow_body(make_server):
    srv = make_server(http_port=0, http_max_connections=1, http_read_s=0.3)
    port = srv.running.http_port
    held = socket.create_connection(("127.0.0.1", port), timeout=GUARD_S)
    held.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    assert read_response(held)[0] == 200
    extra = socket.create_connection(("127.0.0.1", port), timeout=GUARD_S)
    status, headers, body = read_response(extra)
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "unavailable" and "--http-max-connections" in error["message"]
    assert closed_by_server(extra)
    # the held connection starts a chat request whose body never comes whole: dropped, counted as cancelled
    before = metric_value(srv, "aim_requests_total", outcome="cancelled")
    held.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 1000\r\n\r\n{\"model\": ")
    assert closed_by_server(held)
    wait_until(lambda: metric_value(srv, "aim_requests_total", outcome="cancelled") == before + 1,
               "the dropped request counted as cancelled")
    uvicorn_server, _task = srv.running._http
    wait_until(lambda: not uvicorn_server.server_state.connections, "the server to forget the dropped connection")
    conn = socket.create_connection(("127.0.0.1", port), timeout=GUARD_S)  # its place is free again
    chat = json.dumps({"model": "tiny-ov", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: " + str(len(chat)).encode() + b"\r\n\r\n" + chat)
    status, _, body = read_response(conn)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("bad,match", [(dict(http_max_connections=0), "http_max_connections"),
                                       (dict(http_idle_s=0.0), "http_idle_s"),
                                       (dict(http_read_s=float("inf")), "http_read_s"),
                                       (dict(max_connection_age_s=-1.0), "max_connection_age_s")])
def test_bounds_that_would_bound_nothing_are_refused_at_start(bad, match):
    from service.settings import Settings

    with pytest.raises(ValueError, match=match):
        Settings(models=["a"], **bad).validate()
