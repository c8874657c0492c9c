"""The WebSocket at /ws (contract section 4) with a real autobahn client over a real port.

Time (heartbeat, AUTH deadline, progress pacing) runs on the harness Clock,
so nothing here sleeps; every wait is bounded.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, strategies as st
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tests.web_fakes import ClockedReactor, FakeDevice, FakeJobs, WebHarness
from vfab.config import WebSocketConfig
from vfab.jobs.states import PAUSED, PLOTTING
from vfab.web.auth import APIKeyCheck
from vfab.web.system import SystemMonitor
from vfab.web.ws import (
    AUTH_TIMEOUT,
    KEYLESS_PER_ADDRESS,
    SLOW_READER_LIMIT,
    KeyTokenError,
    StreamFactory,
    key_from_token,
    key_token,
)

KEY = "s3cret-key"
TIMEOUT = 10
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UPGRADE = ("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n{extra}\r\n")


class Client(WebSocketClientProtocol):
    """Collects what the server sends; can be told not to answer pings."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: DeferredQueue[dict[str, Any]] = DeferredQueue()
        #: Every text frame's payload as it came, byte for byte.
        self.payloads: list[bytes] = []
        self.pings: DeferredQueue[bytes] = DeferredQueue()
        self.opened: Deferred[Client] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.answer_pings = True

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.payloads.append(payload)
        self.messages.put(json.loads(payload))

    def onPing(self, payload: bytes) -> None:
        self.pings.put(payload)
        if self.answer_pings:
            super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def send(self, message: Any) -> None:
        self.sendMessage(json.dumps(message).encode())

    async def next(self) -> dict[str, Any]:
        message = await self.messages.get().addTimeout(TIMEOUT, reactor)
        assert TIMESTAMP.match(message["timestamp"]), message
        assert message["type"] == message["type"].lower()
        return message

    async def ask(self, message: Any) -> dict[str, Any]:
        self.send(message)
        return await self.next()

    async def wait_closed(self) -> tuple[int | None, str | None]:
        return await self.closed.addTimeout(TIMEOUT, reactor)

    async def still_open(self) -> None:
        """A round trip proves the connection works and that all before it arrived."""
        assert (await self.ask({"type": "PING"}))["type"] == "pong"
        assert not self.messages.pending


class ClientFactory(WebSocketClientFactory):
    protocol = Client

    def buildProtocol(self, addr: Any) -> Client:
        self.client = super().buildProtocol(addr)
        return self.client


class RawUpgrade(Protocol):
    """Sends an upgrade request by hand, to read the HTTP status of a refusal."""

    def __init__(self, request: bytes):
        self._request = request
        self.data = b""
        self.head: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.head.called:
            self.head.callback(self.data)
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.head.called:
            self.head.callback(self.data)
        self.lost.callback(None)


@pytest_twisted.async_yield_fixture
async def serve():
    started: list[WebHarness] = []
    clients: list[Client] = []

    async def start(**config: Any) -> WebHarness:
        web = WebHarness(**config)
        web.clients = clients
        await web.service.startService()
        started.append(web)
        return web

    yield start
    for web in started:
        await web.service.stopService().addTimeout(TIMEOUT, reactor)
    for client in clients:
        await client.wait_closed()


async def connect(web: WebHarness, path: str = "/ws", headers: dict[str, str] | None = None,
                  origin: str | None = None, protocols: list[str] | None = None) -> Client:
    factory = ClientFactory(web.ws_url(path), headers=headers, origin=origin,
                            protocols=protocols, reactor=reactor)
    connector = reactor.connectTCP("127.0.0.1", web.port, factory)
    try:
        await _built(factory)
        web.clients.append(factory.client)
        return await factory.client.opened.addTimeout(TIMEOUT, reactor)
    except Exception:
        connector.disconnect()
        raise


async def _built(factory: ClientFactory) -> None:
    # buildProtocol runs once the TCP connection is up; a few reactor turns at most.
    for _ in range(1000):
        if hasattr(factory, "client"):
            return
        d: Deferred[None] = Deferred()
        reactor.callLater(0, d.callback, None)
        await d
    raise TimeoutError("the client never connected")


async def raw_upgrade(web: WebHarness, path: str = "/ws", **headers: str) -> tuple[int, bytes]:
    extra = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    request = UPGRADE.format(path=path, extra=extra).encode()
    protocol = RawUpgrade(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", web.port), protocol)
    head = await protocol.head.addTimeout(TIMEOUT, reactor)
    await protocol.lost.addTimeout(TIMEOUT, reactor)
    status = int(head.split(b" ", 2)[1])
    return status, head


# -- subscribing ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["SUBSCRIBE", "subscribe", "Subscribe"])
@pytest_twisted.ensureDeferred
async def test_subscribe_sends_snapshots_in_order(serve, kind):
    web = await serve()
    job = web.jobs.add("one")
    client = await connect(web)
    reply = await client.ask({"type": kind, "channels": ["system", "jobs", "device"]})
    assert reply["type"] == "subscribed"
    assert reply["channels"] == ["system", "jobs", "device"]
    system = await client.next()
    assert system["type"] == "system_status"
    assert set(system) >= {"status", "uptime", "active_jobs", "queue_length", "memory_usage",
                           "cpu_usage", "connections", "device"}
    assert system["status"] == "healthy" and system["queue_length"] == 1
    assert system["connections"] == 1 and system["device"] == "idle"
    assert 0 <= system["memory_usage"] <= 1 and 0 <= system["cpu_usage"] <= 1
    job_list = await client.next()
    assert job_list["type"] == "job_list" and job_list["jobs"] == [job]
    device = await client.next()
    assert device["type"] == "device_status"
    assert {k: v for k, v in device.items() if k != "timestamp"} == web.device.status()
    await client.still_open()


@pytest.mark.parametrize("channels, expected", [
    (["all"], ["system", "jobs", "device"]),
    (["ALL"], ["system", "jobs", "device"]),
    (["devices"], ["device"]),
    (["Jobs", "jobs"], ["jobs"]),
])
@pytest_twisted.ensureDeferred
async def test_subscribe_aliases(serve, channels, expected):
    web = await serve()
    client = await connect(web)
    reply = await client.ask({"type": "subscribe", "channels": channels})
    assert reply["channels"] == expected
    kinds = [(await client.next())["type"] for _ in expected]
    snapshot = {"system": "system_status", "jobs": "job_list", "device": "device_status"}
    assert kinds == [snapshot[c] for c in expected]


@pytest_twisted.ensureDeferred
async def test_unknown_channel_is_an_error_and_the_connection_stays(serve):
    web = await serve()
    client = await connect(web)
    reply = await client.ask({"type": "subscribe", "channels": ["jobs", "weather"]})
    assert reply["type"] == "error" and reply["error_code"] == "unknown_channel"
    assert "weather" in reply["error_message"]
    await client.still_open()


@pytest_twisted.ensureDeferred
async def test_bus_events_reach_subscribers_of_their_channel_only(serve):
    web = await serve()
    client = await connect(web)
    await client.ask({"type": "subscribe", "channels": ["jobs"]})
    await client.next()  # job_list
    web.bus.publish("device", {"type": "device_status", "status": "plotting"})
    web.bus.publish("jobs", {"type": "job_state_change", "job_id": "job-1",
                             "from_state": "queued", "to_state": "plotting", "reason": None})
    event = await client.next()
    assert event["type"] == "job_state_change" and event["to_state"] == "plotting"
    await client.still_open()


@pytest_twisted.ensureDeferred
async def test_one_event_is_one_message_for_every_client(serve):
    """Stamped when it happens, not as each client's copy is written: a progress
    held back for one client (paced to 10 a second) carries the same timestamp as
    the copy another client got at once."""
    web = await serve()
    paced, fresh = await connect(web), await connect(web)
    await paced.ask({"type": "subscribe", "channels": ["jobs"]})
    await paced.next()  # job_list
    web.bus.publish("jobs", {"type": "job_progress", "job_id": "job-1", "progress": 0.1})
    await paced.next()
    await fresh.ask({"type": "subscribe", "channels": ["jobs"]})
    await fresh.next()  # job_list
    web.clock.advance(0.05)
    web.bus.publish("jobs", {"type": "job_progress", "job_id": "job-1", "progress": 0.2})
    at_once = await fresh.next()
    web.clock.advance(0.05)  # the paced client's copy goes out now
    held_back = await paced.next()
    assert at_once["progress"] == held_back["progress"] == 0.2
    assert at_once == held_back


@pytest_twisted.ensureDeferred
async def test_each_event_is_stamped_and_serialised_once_for_all_its_clients(
        serve, monkeypatch):
    """SPEC section 4 (issue 15, item 10): five clients get the same bytes for
    an event, stamped with the time it happened, encoded and framed once
    (autobahn's prepareMessage), not once per client."""
    from vfab.web import ws
    web = await serve()
    clients = [await connect(web) for _ in range(5)]
    for client in clients:
        await client.ask({"type": "subscribe", "channels": ["jobs"]})
        await client.next()  # job_list
    factory = web.service.factory
    prepared, encoded = [], []
    prepare, encode = factory.prepareMessage, ws._encode
    monkeypatch.setattr(factory, "prepareMessage",
                        lambda payload, *args: prepared.append(payload) or prepare(payload, *args))
    monkeypatch.setattr(ws, "_encode", lambda message: encoded.append(message) or encode(message))
    web.clock.advance(1.5)
    happened = web.clock.seconds()
    web.bus.publish("jobs", {"type": "job_state_change", "job_id": "job-1",
                             "from_state": "queued", "to_state": "plotting", "reason": None})
    web.bus.publish("jobs", {"type": "job_progress", "job_id": "job-1", "progress": 0.1})
    web.clock.advance(2.0)  # written out later than it happened
    received = [[await client.next(), await client.next()] for client in clients]
    assert len(prepared) == len(encoded) == 2
    for index, kind in enumerate(("job_state_change", "job_progress")):
        frames = {client.payloads[-2 + index] for client in clients}
        assert len(frames) == 1, frames
        assert frames == {prepared[index]}
        stamps = {messages[index]["timestamp"] for messages in received}
        assert {messages[index]["type"] for messages in received} == {kind}
        assert stamps == {ws.utc_timestamp(happened)}
    for client in clients:
        await client.still_open()


@pytest_twisted.ensureDeferred
async def test_unsubscribe_stops_events(serve):
    web = await serve()
    client = await connect(web)
    await client.ask({"type": "subscribe", "channels": ["device"]})
    await client.next()  # device_status
    reply = await client.ask({"type": "UNSUBSCRIBE", "channels": ["devices"]})
    assert reply == {**reply, "type": "unsubscribed", "channels": ["device"]}
    web.bus.publish("device", {"type": "device_status", "status": "error"})
    await client.still_open()


@pytest_twisted.ensureDeferred
async def test_system_alerts_are_forwarded(serve):
    web = await serve()
    client = await connect(web)
    await client.ask({"type": "subscribe", "channels": ["system"]})
    await client.next()
    web.bus.publish("system", {"type": "system_alert", "severity": "warning",
                               "title": "Pen", "message": "change the pen"})
    alert = await client.next()
    assert alert["type"] == "system_alert" and alert["severity"] == "warning"


@pytest_twisted.ensureDeferred
async def test_job_progress_is_coalesced_to_ten_a_second(serve):
    web = await serve()
    client = await connect(web)
    await client.ask({"type": "subscribe", "channels": ["jobs"]})
    await client.next()
    for step in range(1, 6):
        web.bus.publish("jobs", {"type": "job_progress", "job_id": "job-1",
                                 "progress": step / 10})
    web.bus.publish("jobs", {"type": "job_progress", "job_id": "job-2", "progress": 0.5})
    first = await client.next()
    assert (first["job_id"], first["progress"]) == ("job-1", 0.1)
    other = await client.next()
    assert (other["job_id"], other["progress"]) == ("job-2", 0.5)
    await client.still_open()  # the rest of job-1 waits for its 100 ms
    web.clock.advance(0.1)
    latest = await client.next()
    assert (latest["job_id"], latest["progress"]) == ("job-1", 0.5)
    await client.still_open()


@pytest_twisted.ensureDeferred
async def test_waiting_progress_is_sent_before_the_state_change(serve):
    web = await serve()
    client = await connect(web)
    await client.ask({"type": "subscribe", "channels": ["jobs"]})
    await client.next()
    web.bus.publish("jobs", {"type": "job_progress", "job_id": "job-1", "progress": 0.9})
    web.bus.publish("jobs", {"type": "job_progress", "job_id": "job-1", "progress": 1.0})
    web.bus.publish("jobs", {"type": "job_state_change", "job_id": "job-1",
                             "from_state": "plotting", "to_state": "completed", "reason": None})
    kinds = [(m["type"], m.get("progress")) for m in
             [await client.next(), await client.next(), await client.next()]]
    assert kinds == [("job_progress", 0.9), ("job_progress", 1.0), ("job_state_change", None)]


# -- requests ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_ping_pong(serve):
    web = await serve()
    client = await connect(web)
    assert (await client.ask({"type": "ping"}))["type"] == "pong"
    assert (await client.ask({"type": "PING"}))["type"] == "pong"


@pytest_twisted.ensureDeferred
async def test_commands(serve):
    web = await serve()
    job = web.jobs.add("one", state=PLOTTING)
    client = await connect(web)
    reply = await client.ask({"type": "COMMAND", "command": "pause", "job_id": job["id"]})
    assert reply["type"] == "command_result" and reply["ok"] is True
    assert reply["job"]["state"] == PAUSED
    reply = await client.ask({"type": "command", "command": "pause", "job_id": job["id"]})
    assert reply["ok"] is False and reply["error_code"] == "invalid_state" and reply["error"]
    reply = await client.ask({"type": "command", "command": "cancel", "job_id": "nope"})
    assert reply["ok"] is False and reply["error_code"] == "not_found"
    reply = await client.ask({"type": "command", "command": "explode", "job_id": job["id"]})
    assert reply["ok"] is False and "pause" in reply["error"]
    reply = await client.ask({"type": "command", "command": "resume"})
    assert reply["ok"] is False and "job_id" in reply["error"]
    await client.still_open()


@pytest.mark.parametrize("payload, code", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_message"),
    (b'{"channels": ["jobs"]}', "invalid_message"),
    (b'{"type": "dance"}', "unknown_type"),
    (b'{"type": "subscribe", "channels": 7}', "invalid_message"),
])
@pytest_twisted.ensureDeferred
async def test_bad_messages_get_errors_and_the_connection_stays(serve, payload, code):
    web = await serve()
    client = await connect(web)
    client.sendMessage(payload)
    reply = await client.next()
    assert reply["type"] == "error" and reply["error_code"] == code and reply["error_message"]
    await client.still_open()


@pytest_twisted.ensureDeferred
async def test_binary_frames_get_an_error(serve):
    web = await serve()
    client = await connect(web)
    client.sendMessage(b"\x00\x01\x02", isBinary=True)
    reply = await client.next()
    assert reply["type"] == "error" and reply["error_code"] == "binary_not_supported"
    await client.still_open()


@pytest_twisted.ensureDeferred
async def test_too_large_messages_close_the_connection(serve):
    web = await serve(max_message_size=1024)
    client = await connect(web)
    client.send({"type": "ping", "padding": "x" * 2000})
    code, _ = await client.wait_closed()
    assert code == 1009


# -- access ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_auth_by_header_or_query_at_upgrade(serve):
    web = await serve(authenticate=True, api_key=KEY)
    for client in [await connect(web, headers={"X-API-Key": KEY}),
                   await connect(web, headers={"Authorization": f"Bearer {KEY}"}),
                   await connect(web, path=f"/ws?api_key={KEY}")]:
        reply = await client.ask({"type": "subscribe", "channels": ["device"]})
        assert reply["type"] == "subscribed"


@pytest_twisted.ensureDeferred
async def test_wrong_key_at_upgrade_is_401(serve):
    web = await serve(authenticate=True, api_key=KEY)
    status, head = await raw_upgrade(web, X_API_Key="wrong")
    assert status == 401
    status, _ = await raw_upgrade(web, path="/ws?api_key=wrong")
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_auth_message_flow(serve):
    web = await serve(authenticate=True, api_key=KEY)
    client = await connect(web)
    reply = await client.ask({"type": "subscribe", "channels": ["jobs"]})
    assert reply["type"] == "error" and reply["error_code"] == "auth_required"
    web.bus.publish("jobs", {"type": "job_state_change", "job_id": "x"})
    assert (await client.ask({"type": "AUTH", "api_key": KEY}))["type"] == "authenticated"
    assert (await client.ask({"type": "subscribe", "channels": ["jobs"]}))["type"] == "subscribed"
    assert (await client.next())["type"] == "job_list"
    web.clock.advance(AUTH_TIMEOUT + 1)
    await client.still_open()


@pytest_twisted.ensureDeferred
async def test_wrong_auth_message_closes_4401(serve):
    web = await serve(authenticate=True, api_key=KEY)
    client = await connect(web)
    client.send({"type": "auth", "api_key": "wrong"})
    code, _ = await client.wait_closed()
    assert code == 4401


@pytest.mark.parametrize("auth", [{"type": "AUTH", "api_key": None}, {"type": "AUTH"},
                                  {"type": "AUTH", "api_key": 7}, {"type": "AUTH", "api_key": " "}])
@pytest_twisted.ensureDeferred
async def test_auth_without_a_key_string_is_an_error_and_keeps_the_connection(serve, auth):
    web = await serve(authenticate=True, api_key=KEY)
    authenticated = await connect(web, headers={"X-API-Key": KEY})
    assert (await authenticated.ask({"type": "subscribe", "channels": ["device"]}))["type"] \
        == "subscribed"
    await authenticated.next()  # the device snapshot
    reply = await authenticated.ask(auth)
    assert reply["type"] == "error" and reply["error_code"] == "invalid_message"
    assert "api_key" in reply["error_message"]
    assert (await authenticated.ask({"type": "PING"}))["type"] == "pong"
    waiting = await connect(web)
    reply = await waiting.ask(auth)
    assert reply["type"] == "error" and reply["error_code"] == "invalid_message"
    assert (await waiting.ask({"type": "PING"}))["error_code"] == "auth_required"
    assert (await waiting.ask({"type": "AUTH", "api_key": KEY}))["type"] == "authenticated"


@pytest_twisted.ensureDeferred
async def test_no_auth_in_time_closes_4401(serve):
    web = await serve(authenticate=True, api_key=KEY)
    client = await connect(web)
    assert (await client.ask({"type": "PING"}))["error_code"] == "auth_required"
    web.clock.advance(AUTH_TIMEOUT)
    code, _ = await client.wait_closed()
    assert code == 4401


@pytest_twisted.ensureDeferred
async def test_auth_message_without_authentication_configured(serve):
    web = await serve()
    client = await connect(web)
    assert (await client.ask({"type": "AUTH", "api_key": "anything"}))["type"] == "authenticated"


@pytest_twisted.ensureDeferred
async def test_origin_must_be_allowed(serve):
    web = await serve(allowed_origins=["http://good.example"])
    status, _ = await raw_upgrade(web, Origin="http://evil.example")
    assert status == 403
    client = await connect(web, origin="http://good.example")
    await client.still_open()
    no_origin = await connect(web)  # not a browser
    await no_origin.still_open()


@pytest_twisted.ensureDeferred
async def test_max_connections(serve):
    web = await serve(max_connections=2)
    first, second = await connect(web), await connect(web)
    status, head = await raw_upgrade(web)
    assert status == 503
    assert b"too_many_connections" in head or b"Retry-After" in head
    await first.still_open()
    await second.still_open()
    await first.ask({"type": "subscribe", "channels": ["system"]})
    assert (await first.next())["connections"] == 2


@pytest_twisted.ensureDeferred
async def test_keyless_clients_never_keep_out_a_client_with_a_key(serve):
    """Upgrades without a key (waiting to AUTH) have a small budget of their own:
    full, a keyless one is 503, and a client with a key still gets in."""
    web = await serve(authenticate=True, api_key=KEY, max_connections=2)
    audited = []
    web.service.factory.auth.audit.record = lambda event, *args, **detail: audited.append(event)
    waiting = [await connect(web) for _ in range(KEYLESS_PER_ADDRESS)]
    for _ in range(5):  # a flood of refusals is one audit record a window
        status, head = await raw_upgrade(web)
        assert status == 503 and b"too_many_unauthenticated" in head
    assert audited.count("keyless_limit") == 1
    keyed = [await connect(web, headers={"X-API-Key": KEY}) for _ in range(2)]
    for client in keyed:
        await client.still_open()
    for client in waiting:  # still there, for AUTH alone
        reply = await client.ask({"type": "PING"})
        assert reply["error_code"] == "auth_required"
    status, head = await raw_upgrade(web, X_API_Key=KEY)
    assert status == 503 and b"too_many_connections" in head
    # One already in that sends AUTH again stays; a waiting client whose AUTH
    # would pass max_connections is told to come back.
    assert (await keyed[0].ask({"type": "AUTH", "api_key": KEY}))["type"] == "authenticated"
    await keyed[0].still_open()
    waiting[0].send({"type": "AUTH", "api_key": KEY})
    code, _ = await waiting[0].wait_closed()
    assert code == 4503


#: RFC 7230 token characters: what a Sec-WebSocket-Protocol entry may hold.
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@given(st.text(min_size=1))
def test_a_key_token_is_a_token_that_gives_the_key_back(key):
    token = key_token(key)
    assert TOKEN.fullmatch(token) and token.startswith("vfab.key.") and "=" not in token
    assert key_from_token(token) == key


def test_the_key_token_is_base64url_without_padding():
    assert key_token("s3cret-key") == "vfab.key.czNjcmV0LWtleQ"
    assert key_token("\u00fc?>") == "vfab.key.w7w_Pg"  # - and _, never + and /


@pytest.mark.parametrize("token", [
    "vfab.key.", "vfab.key.czNjcmV0LWtleQ==", "vfab.key.czNj+mV0", "vfab.key.czNj/mV0",
    "vfab.key.czNjc", "vfab.key.__8", "vfab.key.czNj%mV0",
])
def test_a_bad_key_token_is_refused(token):
    with pytest.raises(KeyTokenError):
        key_from_token(token)


@pytest_twisted.ensureDeferred
async def test_key_as_a_subprotocol_token(serve):
    """The dashboard's way (a browser cannot set headers): in at the upgrade with
    the key, answered with the subprotocol "vfab" and never the key token."""
    web = await serve(authenticate=True, api_key=KEY)
    client = await connect(web, protocols=["vfab", key_token(KEY)])
    assert client.websocket_protocol_in_use == "vfab"
    assert (await client.ask({"type": "PING"}))["type"] == "pong"  # no AUTH needed
    alone = await connect(web, protocols=[key_token(KEY)])
    assert alone.websocket_protocol_in_use is None
    await alone.still_open()
    status, head = await raw_upgrade(web, Sec_WebSocket_Protocol=f"vfab, {key_token(KEY)}")
    assert status == 101
    assert re.search(rb"(?i)\r\nsec-websocket-protocol: vfab\r\n", head), head
    assert b"vfab.key." not in head


@pytest_twisted.ensureDeferred
async def test_a_client_offering_no_or_other_subprotocols_works_as_before(serve):
    web = await serve(authenticate=True, api_key=KEY)
    for protocols in (None, ["chat"]):
        client = await connect(web, headers={"X-API-Key": KEY}, protocols=protocols)
        assert client.websocket_protocol_in_use is None
        await client.still_open()
    keyless = await connect(web, protocols=["vfab"])
    assert keyless.websocket_protocol_in_use == "vfab"
    assert (await keyless.ask({"type": "PING"}))["error_code"] == "auth_required"
    assert (await keyless.ask({"type": "AUTH", "api_key": KEY}))["type"] == "authenticated"


@pytest.mark.parametrize("token, message", [
    (key_token("wrong"), b"the API key is wrong"),
    ("vfab.key.czNjc", b"not the base64url of a UTF-8 key"),
    ("vfab.key.", b"not the key in base64url"),
])
@pytest_twisted.ensureDeferred
async def test_a_wrong_or_bad_key_token_is_401_at_the_upgrade(serve, token, message):
    web = await serve(authenticate=True, api_key=KEY)
    failures = []
    web.service.auth.audit.record = lambda event, *args, **detail: failures.append(event)
    status, head = await raw_upgrade(web, Sec_WebSocket_Protocol=f"vfab, {token}")
    assert status == 401 and message in head, head
    assert failures == ["auth_failed"]  # it counts towards the wrong-key limit


@pytest_twisted.ensureDeferred
async def test_keyless_flood_never_keeps_out_a_subprotocol_key(serve):
    """The lock-out of issue 14 item 1 as the dashboard met it: twenty keyless
    clients from one address, each trying again as soon as it is refused (503)
    or closed (4401, no AUTH in time). A client that comes without a key to send
    AUTH (the dashboard until now) is kept out every time; one that offers the
    key as a subprotocol token gets in every time."""
    web = await serve(authenticate=True, api_key=KEY)
    flood, rounds = 20, 10
    token_admitted = auth_kept_out = 0
    for _ in range(rounds):
        waiting = [await connect(web) for _ in range(KEYLESS_PER_ADDRESS)]
        for _ in range(flood - KEYLESS_PER_ADDRESS):
            status, head = await raw_upgrade(web)
            assert status == 503 and b"too_many_unauthenticated" in head
        status, _ = await raw_upgrade(web)  # the old dashboard, to send AUTH
        auth_kept_out += status == 503
        dashboard = await connect(web, protocols=["vfab", key_token(KEY)])
        reply = await dashboard.ask({"type": "SUBSCRIBE", "channels": ["device"]})
        token_admitted += reply["type"] == "subscribed"
        dashboard.sendClose()
        await dashboard.wait_closed()
        web.clock.advance(AUTH_TIMEOUT)
        for client in waiting:
            assert (await client.wait_closed())[0] == 4401
    assert (token_admitted, auth_kept_out) == (rounds, rounds)


@pytest_twisted.ensureDeferred
async def test_plain_http_to_ws_is_426(serve):
    web = await serve()
    assert await _http_get(web, "/ws") == 426


# -- heartbeat and shutdown ----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_heartbeat_pings_and_sends_system_status(serve):
    web = await serve(heartbeat_interval=5)
    watcher, quiet = await connect(web), await connect(web)
    await watcher.ask({"type": "subscribe", "channels": ["system"]})
    await watcher.next()
    web.clock.advance(5)
    await watcher.pings.get().addTimeout(TIMEOUT, reactor)
    await quiet.pings.get().addTimeout(TIMEOUT, reactor)
    status = await watcher.next()
    assert status["type"] == "system_status" and status["uptime"] == 5.0
    await quiet.still_open()  # not subscribed to system: nothing but the ping


@pytest_twisted.ensureDeferred
async def test_a_client_that_misses_two_pings_is_dropped(serve):
    web = await serve(heartbeat_interval=5)
    lively, silent = await connect(web), await connect(web)
    silent.answer_pings = False
    for _ in range(2):
        web.clock.advance(5)
        await lively.pings.get().addTimeout(TIMEOUT, reactor)
        await silent.pings.get().addTimeout(TIMEOUT, reactor)
        await lively.still_open()  # its pong is in before the next tick
    web.clock.advance(5)
    await silent.wait_closed()
    await lively.pings.get().addTimeout(TIMEOUT, reactor)
    await lively.still_open()


@pytest_twisted.ensureDeferred
async def test_close_clients_says_going_away_and_refuses_new_ones(serve):
    web = await serve()
    first, second = await connect(web), await connect(web)
    await web.service.close_clients().addTimeout(TIMEOUT, reactor)
    assert (await first.wait_closed())[0] == 1001
    assert (await second.wait_closed())[0] == 1001
    status, _ = await raw_upgrade(web)
    assert status == 503
    health = await _http_get(web, "/health")
    assert health == 200


async def _http_get(web: WebHarness, path: str) -> int:
    from twisted.web.client import Agent, readBody

    response = await Agent(reactor).request(b"GET", web.url(path)).addTimeout(TIMEOUT, reactor)
    await readBody(response).addTimeout(TIMEOUT, reactor)
    return response.code


@pytest_twisted.ensureDeferred
async def test_messages_are_counted_in_metrics(serve):
    web = await serve()
    client = await connect(web)
    await client.ask({"type": "ping"})
    text = (await web.service.metrics.scrape()).decode()
    assert "vfab_websocket_messages_sent_total 1.0" in text
    assert "vfab_websocket_connections 1.0" in text


# -- the protocol on a StringTransport ------------------------------------------------------

def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmasked server frames as (opcode, payload)."""
    frames, at = [], 0
    while at < len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            length = struct.unpack(">H", data[at:at + 2])[0]
            at += 2
        elif length == 127:
            length = struct.unpack(">Q", data[at:at + 8])[0]
            at += 8
        frames.append((opcode, data[at:at + length]))
        at += length
    return frames


def _open_protocol(**config: Any) -> tuple[Any, StringTransport, Clock, StreamFactory]:
    clock = Clock()
    jobs, device = FakeJobs(), FakeDevice()
    monitor = SystemMonitor(jobs, device, clock)
    cfg = WebSocketConfig(**config)
    factory = StreamFactory(cfg, jobs, device, monitor, APIKeyCheck(None, False, clock),
                            ClockedReactor(clock))
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(UPGRADE.format(path="/ws", extra="").encode())
    assert transport.value().startswith(b"HTTP/1.1 101"), transport.value()
    transport.clear()
    return protocol, transport, clock, factory


@pytest.mark.parametrize("token, answer", [
    (key_token(KEY), b"HTTP/1.1 101"), (key_token("wrong"), b"HTTP/1.1 401"),
    ("vfab.key.czNjc", b"HTTP/1.1 401"),
])
def test_the_protocol_reads_a_key_token_itself(token, answer):
    """Not through WebSocketGate (which strips the key before autobahn reads the
    upgrade), the protocol checks the token on its own."""
    clock = Clock()
    jobs, device = FakeJobs(), FakeDevice()
    factory = StreamFactory(WebSocketConfig(), jobs, device, SystemMonitor(jobs, device, clock),
                            APIKeyCheck(KEY, True, clock), ClockedReactor(clock))
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(UPGRADE.format(
        path="/ws", extra=f"Sec-WebSocket-Protocol: vfab, {token}\r\n").encode())
    assert transport.value().startswith(answer), transport.value()
    if answer.endswith(b"101"):
        assert b"Sec-WebSocket-Protocol: vfab\r\n" in transport.value()
        assert protocol.authenticated
    assert b"vfab.key." not in transport.value()


def test_heartbeat_timing_on_a_clock():
    protocol, transport, clock, factory = _open_protocol(heartbeat_interval=30)
    protocol.channels.add("system")
    factory.heartbeat()
    frames = _frames(transport.value())
    assert [opcode for opcode, _ in frames] == [9, 1]  # a ping, then system_status
    assert json.loads(frames[1][1])["type"] == "system_status"
    protocol.onPong(b"")
    factory.heartbeat()
    factory.heartbeat()
    assert not transport.disconnecting
    factory.heartbeat()  # two pings unanswered
    assert transport.disconnecting


def test_a_client_that_reads_too_slowly_is_dropped():
    protocol, transport, clock, factory = _open_protocol()
    protocol.channels.add("jobs")
    protocol.authenticated = True
    assert transport.producer is not None
    transport.producer.pauseProducing()  # what the transport does when its buffer is full
    event = {"type": "system_alert", "message": "x" * 10_000}
    for _ in range(SLOW_READER_LIMIT // 10_000 + 2):
        factory.publish("jobs", event)
    assert transport.disconnecting
    sent = len(transport.value())
    factory.publish("jobs", event)
    assert len(transport.value()) == sent


def test_a_reader_that_catches_up_is_kept():
    protocol, transport, clock, factory = _open_protocol()
    protocol.channels.add("jobs")
    protocol.authenticated = True
    event = {"type": "system_alert", "message": "x" * 10_000}
    for _ in range(3):
        transport.producer.pauseProducing()
        for _ in range(SLOW_READER_LIMIT // 10_000 - 5):
            factory.publish("jobs", event)
        transport.producer.resumeProducing()
    assert not transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_the_device_snapshot_is_one_device_status_per_plotter(serve):
    web = await serve()
    left = {**web.device.status(), "plotter": "left", "host": "studio", "tags": ["a3"]}
    right = {**left, "plotter": "right", "tags": [], "status": "plotting"}
    web.service.factory.plotters = lambda: [left, right]
    client = await connect(web)
    await client.ask({"type": "subscribe", "channels": ["device"]})
    shown = [await client.next(), await client.next()]
    assert [{k: v for k, v in status.items() if k != "timestamp"} for status in shown] == [
        left, right]
    web.bus.publish("device", {**right, "status": "idle"})
    live = await client.next()
    assert (live["type"], live["plotter"], live["status"]) == ("device_status", "right", "idle")
    await client.still_open()
