"""A request refused before its body was read (413, 507, 503): the client reads
its answer however long it goes on sending, within bounds, and is never reset
while it reads (issue 14, the refusals left open).

Byte by byte on one APIChannel, with a Clock: the bounds are seconds and bytes
that the tests move, never wait for.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from vfab.web import server
from vfab.web.server import LINGER_IDLE_SECONDS, LINGER_SECONDS, APISite

LIMIT = 1024
PIECE = b" " * 65536
#: What a client hanging up gives the channel.
HUNG_UP = Failure(ConnectionDone())


class HalfClosingTransport(StringTransport):
    """A TCP-like transport that records the half-close (FIN after the answer)."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Bodies(Resource):
    """Every path: records the bodies that reached a resource."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> bytes:
        self.bodies.append(request.content.read())
        return b"{}"


def connect(clock: Clock, resource: Resource | None = None
            ) -> tuple[Any, HalfClosingTransport]:
    channel = APISite(resource or Bodies(), max_body_size=LIMIT).buildProtocol(None)
    channel.callLater = clock.callLater
    transport = HalfClosingTransport()
    channel.makeConnection(transport)
    return channel, transport


def answers(transport: StringTransport) -> list[tuple[bytes, Any]]:
    """Every (status line, JSON body) written, in order."""
    found, rest = [], transport.value()
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines
                      if line.lower().startswith(b"content-length:"))
        body, rest = rest[:length], rest[length:]
        found.append((lines[0], json.loads(body) if body else None))
    return found


DECLARED = (b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/svg+xml\r\n"
            b"Content-Length: 100000000\r\n\r\n")
CHUNKED = (b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/svg+xml\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("head", [DECLARED, CHUNKED + chunk(b" " * (LIMIT + 1))],
                         ids=["declared", "chunked"])
def test_a_client_that_goes_on_sending_reads_its_413_and_then_an_end(head):
    """The answer, then the half-close, and the connection kept while the client
    sends (until it hangs up): it was closed after 5 s, which reset a client
    still sending and lost it the 413 (measured: reset at 5.2 s)."""
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(head)
    [(status, body)] = answers(transport)
    assert status == b"HTTP/1.1 413 Content Too Large" and body["error"]["code"] == "too_large"
    assert transport.write_closed and not transport.disconnecting
    for _ in range(int(LINGER_SECONDS) - 1):  # a slow client: 64 KiB a second
        channel.dataReceived(PIECE)
        clock.advance(1)
    assert not transport.disconnecting
    channel.connectionLost(HUNG_UP)  # the client read the answer and hung up
    assert clock.getDelayedCalls() == []
    assert len(answers(transport)) == 1


def test_a_refused_client_is_closed_once_it_sends_nothing_for_a_while():
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(DECLARED + PIECE)
    clock.advance(LINGER_IDLE_SECONDS - 0.5)
    channel.dataReceived(PIECE)
    clock.advance(LINGER_IDLE_SECONDS - 0.5)
    assert not transport.disconnecting
    clock.advance(0.5)
    assert transport.disconnecting
    channel.connectionLost(HUNG_UP)


def test_a_refused_client_that_never_stops_sending_is_closed_at_the_bound():
    clock = Clock()
    channel, transport = connect(clock)
    said: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        said.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        channel.dataReceived(DECLARED)
        for _ in range(int(LINGER_SECONDS)):
            assert not transport.disconnecting
            channel.dataReceived(PIECE)
            clock.advance(1)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert transport.disconnecting
    assert [line for line in said if f"still sending after {LINGER_SECONDS:g} s" in line]
    channel.connectionLost(HUNG_UP)
    assert clock.getDelayedCalls() == []


def test_a_refused_client_is_closed_past_the_bytes_it_may_still_send(monkeypatch):
    monkeypatch.setattr(server, "LINGER_BYTES", 3 * len(PIECE))
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(DECLARED)
    for _ in range(3):
        channel.dataReceived(PIECE)
    assert not transport.disconnecting
    channel.dataReceived(b" ")
    assert transport.disconnecting
    channel.connectionLost(HUNG_UP)


# -- the end of a chunked body: the limit passed in its last chunk --------------------------

NEXT = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_chunked_body_of_exactly_the_limit_in_its_last_chunk_is_read():
    clock = Clock()
    bodies = Bodies()
    channel, transport = connect(clock, bodies)
    channel.dataReceived(CHUNKED + chunk(b"a" * (LIMIT - 10)) + chunk(b"b" * 10)
                         + b"0\r\n\r\n")
    assert bodies.bodies == [b"a" * (LIMIT - 10) + b"b" * 10]
    assert [status for status, _ in answers(transport)] == [b"HTTP/1.1 200 OK"]
    assert not transport.write_closed
    channel.connectionLost(HUNG_UP)


@pytest.mark.parametrize("arrival", [
    "the excess, the terminating chunk and the next request in one piece",
    "the excess and the terminating chunk in one piece, the next request later",
    "the excess alone, then the terminating chunk and the next request",
])
def test_the_limit_passed_in_the_last_chunk_is_one_413_and_nothing_else(arrival):
    """The race at the end of a chunked body: the refusal and the body's end come
    in the same read. The 413 must be the only answer: no resource sees the body,
    the request is not answered a second time, the next request is not served."""
    clock = Clock()
    bodies = Bodies()
    channel, transport = connect(clock, bodies)
    excess = CHUNKED + chunk(b"a" * (LIMIT - 10)) + chunk(b"b" * 11)
    pieces = {
        "the excess, the terminating chunk and the next request in one piece":
            [excess + b"0\r\n\r\n" + NEXT],
        "the excess and the terminating chunk in one piece, the next request later":
            [excess + b"0\r\n\r\n", NEXT],
        "the excess alone, then the terminating chunk and the next request":
            [excess, b"0\r\n\r\n" + NEXT],
    }[arrival]
    for piece in pieces:
        channel.dataReceived(piece)
        clock.advance(1)
    [(status, body)] = answers(transport)
    assert status == b"HTTP/1.1 413 Content Too Large"
    assert body["error"]["code"] == "too_large" and f"{LIMIT} bytes" in body["error"]["message"]
    assert bodies.bodies == []
    assert transport.write_closed and not transport.disconnecting
    clock.advance(LINGER_IDLE_SECONDS)
    assert transport.disconnecting and len(answers(transport)) == 1
    channel.connectionLost(HUNG_UP)
    assert clock.getDelayedCalls() == []


# -- slowloris: headers sent a byte at a time ----------------------------------------------

@pytest.mark.parametrize("start", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"],
                         ids=["first request", "after a request"])
def test_headers_that_take_too_long_are_408_however_slowly_they_drip(start):
    """A byte every few seconds kept twisted.web's 60 s idle timeout from ever
    firing: 190 such connections held a daemon's file descriptors (and every
    other client out) for as long as the client wished. The request line and
    headers must now arrive within HEADER_SECONDS of the request's first byte."""
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(start + b"G")
    for _ in range(int(server.HEADER_SECONDS // 5) - 1):
        clock.advance(5)
        channel.dataReceived(b"E")
    assert [status for status, _ in answers(transport)] == [b"HTTP/1.1 200 OK"] * bool(start)
    clock.advance(5)
    statuses = answers(transport)
    assert statuses[-1][0] == b"HTTP/1.1 408 Request Timeout"
    assert statuses[-1][1]["error"]["code"] == "request_timeout"
    assert f"{server.HEADER_SECONDS:g} s" in statuses[-1][1]["error"]["message"]
    assert transport.write_closed
    clock.advance(LINGER_IDLE_SECONDS)
    assert transport.disconnecting
    channel.connectionLost(HUNG_UP)


def test_headers_in_time_and_a_slow_body_are_not_cut_by_the_header_deadline():
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
    clock.advance(server.HEADER_SECONDS * 2)  # the body: twisted.web's idle timeout's
    channel.dataReceived(b"<svg")
    assert [status for status, _ in answers(transport)] == [b"HTTP/1.1 200 OK"]
    assert not transport.disconnecting
    channel.connectionLost(HUNG_UP)
    assert clock.getDelayedCalls() == []
