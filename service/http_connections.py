"""The HTTP API's connections, bounded as the gRPC server's are: how many are open, how long one may wait for its
next request, how long a request's body may take to arrive, and how old a connection may grow.

uvicorn by itself bounds none of these: its keep-alive timer starts only after a first answer and stops at the
first byte of the next request, so a client that connects and says nothing, or sends a header a byte at a time,
holds a connection (and an fd) for ever, and a client that keeps a connection busy keeps it for ever. Here one
timer per connection covers it all:
- from the moment a connection opens, and again after each answer, the next request's head must be complete
  within `idle_s` (keep-alive idleness and slow headers are one case: no request yet);
- once a head is in, its body must be complete within `read_s`. A late one is dropped with its connection: the app
  sees its client leave, so the request is never run;
- a request that arrives when the connection is `max_age_s` old or older is answered with `Connection: close`;
- a connection beyond `max_connections` open is answered `refusal` (a 503) and closed before anything is read.
The answer itself is not timed here: a long stream is bounded by the request's own limits (max_new_tokens, its
deadline), as on gRPC.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

CLOSE = (b"connection", b"close")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    idle_s: float  # the next request's head must be complete within this of the connection opening or its last answer
    read_s: float  # a request's body must be complete within this of its head
    max_age_s: float  # a request arriving on a connection this old is its last one


def bounded_protocol(limits: ConnectionLimits, refusal: bytes) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol under `limits`; `refusal`: the whole HTTP response (bytes) that a connection
    over `limits.max_connections` gets before it is closed."""

    class BoundedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _watched: object = None  # the request cycle whose head was last seen
        _reading = False  # the timer is its body's (else: the next head's)

        def connection_made(self, transport) -> None:  # type: ignore[override]
            over = len(self.connections) >= limits.max_connections
            super().connection_made(transport)
            self._born = self.loop.time()
            if over:
                transport.write(refusal)
                transport.close()
                return
            self._arm(limits.idle_s)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            cycle = self.cycle
            if cycle is None:
                return
            if cycle is not self._watched:  # a request's head is in
                self._watched = cycle
                if self.loop.time() - self._born >= limits.max_age_s:
                    cycle.keep_alive = False
                    cycle.scope["headers"].append(CLOSE)  # uvicorn then puts Connection: close on the answer
                self._arm(limits.read_s, reading=True)
            if self._reading and not cycle.more_body:
                self._disarm()  # its body is in: the answer is the app's

        def on_response_complete(self) -> None:
            self._arm(limits.idle_s)  # before uvicorn reads a pipelined request, which re-arms it for its body
            super().on_response_complete()

        def _arm(self, seconds: float, reading: bool = False) -> None:
            self._disarm()
            self._timer, self._reading = self.loop.call_later(seconds, self._late), reading

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._reading = None, False

        def _late(self) -> None:
            self._timer, self._reading = None, False
            if self.transport.is_closing():
                return
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass  # mid-request: closing the transport is all there is to do
            self.transport.close()

    return BoundedH11Protocol
