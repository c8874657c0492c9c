"""The WebSocket at /ws (contract section 4): live events for dashboards and `vfab watch`.

`WebSocketGate` decides at the HTTP upgrade (Origin, API key, capacity) so
refusals are ordinary JSON HTTP errors; `StreamFactory` fans the event bus
out to the clients and runs the heartbeat; `StreamProtocol` is one client.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, Callable

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from zope.interface import implementer

from vfab.config import WebSocketConfig
from vfab.events import CHANNELS
from vfab.jobs.control import DeviceStatus, JobControl
from vfab.web.auth import (
    APIKeyCheck,
    Verdict,
    client_address,
    key_from,
    request_key,
    strip_credentials,
)
from vfab.web.errors import client_error
from vfab.web.responses import error_body
from vfab.web.system import SystemMonitor
from vfab.web.timestamps import utc_timestamp

_log = Logger()

CLOSE_GOING_AWAY = 1001
CLOSE_UNAUTHORIZED = 4401
#: Seconds a client that connected without a key has to send AUTH.
AUTH_TIMEOUT = 10.0
#: Clients that came without a key and have AUTH_TIMEOUT to send one get a small
#: budget of their own, in all and per address, apart from max_connections: they
#: can never keep out a client with a key.
KEYLESS_CLIENTS = 10
KEYLESS_PER_ADDRESS = 2
#: A refusal for that budget is audited once this many seconds per address
#: (remembered for this many addresses at most).
KEYLESS_AUDIT_SECONDS = 60.0
KEYLESS_AUDIT_ADDRESSES = 1024
#: Close code for a client let in to AUTH when every place for one is taken
#: (as HTTP 503; autobahn sends only 1000 and 3000-4999 of its own accord).
CLOSE_TRY_AGAIN_LATER = 4503
#: Unanswered server pings after which a client is dropped.
MAX_MISSED_PONGS = 2
#: Least seconds between two job_progress messages of one job to one client.
PROGRESS_INTERVAL = 0.1
#: Bytes a client may fall behind, beyond the transport's own buffer, before it is dropped.
SLOW_READER_LIMIT = 1024 * 1024
#: Seconds close_all waits for clients to answer the close before cutting them off.
CLOSE_TIMEOUT = 5.0

CHANNEL_ALIASES = {"all": CHANNELS, "devices": ("device",)}
COMMANDS = ("pause", "resume", "cancel")

#: The WebSocket subprotocol the server answers with when a client offers it.
SUBPROTOCOL = "vfab"
#: A browser cannot set headers on a WebSocket, and a key in the URL ends up in
#: proxy logs: it may offer the key as the subprotocol token KEY_TOKEN + the
#: key in base64url without padding (token characters only), beside SUBPROTOCOL.
KEY_TOKEN = "vfab.key."
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class KeyTokenError(ValueError):
    """A key token that is not the base64url of a UTF-8 key."""


def key_token(key: str) -> str:
    """The Sec-WebSocket-Protocol token that carries `key`."""
    encoded = base64.urlsafe_b64encode(key.encode("utf-8")).rstrip(b"=")
    return KEY_TOKEN + encoded.decode("ascii")


def key_from_token(token: str) -> str:
    """The key a key token carries; KeyTokenError if it carries none."""
    encoded = token[len(KEY_TOKEN):]
    # The alphabet is checked first: the decoder would skip stray characters.
    if not _BASE64URL.fullmatch(encoded):
        raise KeyTokenError(f"the {KEY_TOKEN} token is not the key in base64url "
                            f"without padding (A-Z a-z 0-9 - _)")
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
    except ValueError:  # a length no encoding has, or not UTF-8
        raise KeyTokenError(f"the {KEY_TOKEN} token is not the base64url of a "
                            f"UTF-8 key") from None


def offered_protocols(header: str | None) -> list[str]:
    """The subprotocols a Sec-WebSocket-Protocol header offers, in order."""
    return [name.strip() for name in (header or "").split(",") if name.strip()]


def protocol_key(protocols: list[str]) -> str | None:
    """The key offered as a subprotocol token, or None; KeyTokenError if malformed."""
    for name in protocols:
        if name.startswith(KEY_TOKEN):
            return key_from_token(name)
    return None


class MessageError(ValueError):
    """A client message that cannot be acted on; becomes an `error` message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def channels_of(message: dict[str, Any]) -> list[str]:
    """The canonical channels a (UN)SUBSCRIBE names; none given means every channel."""
    requested = message.get("channels")
    if requested is None:
        return list(CHANNELS)
    if isinstance(requested, str):
        requested = [requested]
    if not isinstance(requested, list) or not all(isinstance(c, str) for c in requested):
        raise MessageError("invalid_message", "channels: expected a list of channel names")
    wanted: set[str] = set()
    for name in requested:
        name = name.strip().lower()
        if name in CHANNELS:
            wanted.add(name)
        elif name in CHANNEL_ALIASES:
            wanted.update(CHANNEL_ALIASES[name])
        else:
            raise MessageError("unknown_channel",
                               f"unknown channel {name!r}; channels are "
                               f"{', '.join(CHANNELS)} and all")
    return [channel for channel in CHANNELS if channel in wanted]


@implementer(IPushProducer)
class WriteWatermark:
    """Registered as the transport's producer, it learns when the socket stops draining.

    The transport pauses it once its own buffer is full; what is sent while
    paused is counted, and past `limit` bytes the client is too slow to keep.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.paused = False
        self.backlog = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.backlog = 0

    def stopProducing(self) -> None:
        self.paused = False

    def admit(self, size: int) -> bool:
        """Whether `size` more bytes keep the client within the limit."""
        if self.paused:
            self.backlog += size
        return self.backlog <= self.limit


class Event:
    """One event as every client receives it: stamped once, when it happened, and
    serialised and framed once for all of them (contract section 4)."""

    def __init__(self, message: dict[str, Any]):
        self.message = message
        self._prepared: PreparedMessage | None = None

    def prepared(self, factory: WebSocketServerFactory) -> PreparedMessage:
        if self._prepared is None:
            self._prepared = factory.prepareMessage(_encode(self.message))
        return self._prepared


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=str).encode("utf-8")


class _ProgressSlot:
    """The job_progress throttle of one job for one client."""

    def __init__(self) -> None:
        self.last_sent = float("-inf")
        self.latest: Event | None = None
        self.call: IDelayedCall | None = None


class StreamProtocol(WebSocketServerProtocol):
    """One WebSocket client: its subscriptions, its authentication, its pace."""

    factory: StreamFactory

    def __init__(self) -> None:
        super().__init__()
        self.channels: set[str] = set()
        self.authenticated = False
        self.missed_pongs = 0
        self._auth_timer: IDelayedCall | None = None
        self._snapshots_pending = 0
        self._held: list[dict[str, Any]] = []
        self._progress: dict[Any, _ProgressSlot] = {}
        self._watermark = WriteWatermark(SLOW_READER_LIMIT)
        self._gone = False
        self._gone_waiters: list[Deferred[None]] = []

    # -- connection life -------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.clients.add(self)
        self._watch_write_buffer()

    def _watch_write_buffer(self) -> None:
        # Before the upgrade the HTTP channel was the transport's producer;
        # the socket is ours now, so our watermark takes its place.
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()
        self.transport.registerProducer(self._watermark, True)

    def onConnect(self, request: ConnectionRequest) -> str | None:
        """Admit the client (or refuse it) and answer SUBPROTOCOL if it was offered;
        never a key token, which must not come back in the answer."""
        verdict = self.factory.upgrade_verdict
        if verdict is None:
            # Not through WebSocketGate (which checked the key and removed it).
            key = key_from(request.headers.get, (request.params.get("api_key") or [None])[0])
            try:
                key = key or protocol_key(request.protocols)
            except KeyTokenError:
                key = ""  # never the key (a blank one is refused at start-up): a wrong one
            verdict = self.factory.auth.verify(key, self._client(), "websocket")
        if verdict is Verdict.WRONG:
            raise ConnectionDeny(401, "the API key is wrong")
        if verdict is Verdict.BLOCKED:
            raise ConnectionDeny(429, "too many wrong API keys from this address")
        self.authenticated = verdict is Verdict.ALLOWED
        return SUBPROTOCOL if SUBPROTOCOL in request.protocols else None

    def onOpen(self) -> None:
        _log.info("websocket client {peer} connected ({count} open)",
                  peer=self._client(), count=len(self.factory.clients))
        if not self.authenticated:
            self._auth_timer = self.factory.reactor.callLater(AUTH_TIMEOUT, self._auth_expired)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        _log.info("websocket client {peer} left (code {code})", peer=self._client(), code=code)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.factory.clients.discard(self)
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        for slot in self._progress.values():
            if slot.call is not None and slot.call.active():
                slot.call.cancel()
        self._progress.clear()
        self._gone = True
        waiters, self._gone_waiters = self._gone_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_gone(self) -> Deferred[None]:
        """Fires once the connection is closed."""
        if self._gone:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._gone_waiters.append(waiter)
        return waiter

    def go_away(self, code: int, reason: str) -> None:
        """Start closing: a close frame to an open client, a cut to one still in the handshake."""
        if self.state == self.STATE_OPEN:
            # sendClose() refuses 1001, which RFC 6455 reserves for exactly
            # this case (a server going away), so send the frame directly.
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])
        elif self.state != self.STATE_CLOSING:
            self.abort("the server is closing")

    def abort(self, why: str) -> None:
        """Cut the connection at once, without a closing handshake."""
        self.wasClean = False
        self.wasNotCleanReason = why
        self.dropConnection(abort=True)

    def _auth_expired(self) -> None:
        self._auth_timer = None
        if not self.authenticated:
            _log.info("websocket client {peer} sent no AUTH in time", peer=self._client())
            self.factory.auth.audit.record("auth_timeout", self._client(),
                                           seconds=AUTH_TIMEOUT)
            self.sendClose(code=CLOSE_UNAUTHORIZED, reason="authentication required")

    def _client(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return getattr(peer, "host", None) or str(peer)

    @property
    def address(self) -> str | None:
        """The client's IP address (for the keyless budget)."""
        peer = self.transport.getPeer() if self.transport is not None else None
        return getattr(peer, "host", None)

    # -- heartbeat ---------------------------------------------------------

    def heartbeat(self, system_status: Event) -> None:
        """Ping, drop if the client missed too many pings, and send system_status."""
        if self.state != self.STATE_OPEN:
            return
        if self.missed_pongs >= MAX_MISSED_PONGS:
            _log.info("dropping WebSocket client {peer}: {missed} websocket pings unanswered",
                      peer=self._client(), missed=self.missed_pongs)
            self.factory.auth.audit.record("unresponsive_client_dropped", self._client(),
                                           missed_pings=self.missed_pongs)
            self.abort("the client did not answer pings")
            return
        self.missed_pongs += 1
        self.sendPing()
        if self.authenticated and "system" in self.channels:
            self.send_message(system_status)

    def onPong(self, payload: bytes) -> None:
        self.missed_pongs = 0

    # -- sending -------------------------------------------------------------

    def send_message(self, message: dict[str, Any] | Event) -> None:
        """Send one JSON text message (this client's own, stamped now, or an event
        shared by all), unless the client is gone or too slow."""
        if self.state != self.STATE_OPEN:
            return
        if isinstance(message, Event):
            prepared = message.prepared(self.factory)
            size = len(prepared.payload)
        else:
            if "timestamp" not in message:
                message = {**message, "timestamp": self.factory.timestamp()}
            prepared, payload = None, _encode(message)
            size = len(payload)
        if not self._watermark.admit(size):
            _log.warn("dropping WebSocket client {peer}: it reads too slowly "
                      "({backlog} bytes waiting in its websocket buffer)",
                      peer=self._client(), backlog=self._watermark.backlog)
            self.factory.auth.audit.record("slow_client_dropped", self._client(),
                                           backlog_bytes=self._watermark.backlog,
                                           limit_bytes=self._watermark.limit)
            self.abort("the client reads too slowly")
            return
        if prepared is not None:
            self.sendPreparedMessage(prepared)
        else:
            # max_message_size bounds what clients send; autobahn would apply it
            # to what we send too, and a job_list snapshot may well be larger.
            limit, self.maxMessagePayloadSize = self.maxMessagePayloadSize, 0
            try:
                self.sendMessage(payload, isBinary=False)
            finally:
                self.maxMessagePayloadSize = limit
        self.factory.messages_sent()

    def send_error(self, code: str, message: str) -> None:
        self.send_message({"type": "error", "error_code": code, "error_message": message})

    def deliver(self, channel: str, event: Event) -> None:
        """Forward a bus event if this client subscribed to its channel."""
        if not self.authenticated or channel not in self.channels:
            return
        if self._snapshots_pending:
            self._held.append(event)
        else:
            self._forward(event)

    def _forward(self, event: Event) -> None:
        kind = event.message["type"]
        if kind == "job_progress":
            self._throttle_progress(event)
            return
        if kind == "job_state_change":
            # Progress still waiting must not arrive after the state it led to.
            self._flush_progress(event.message.get("job_id"), forget=True)
        self.send_message(event)

    def _throttle_progress(self, event: Event) -> None:
        job_id = event.message.get("job_id")
        slot = self._progress.setdefault(job_id, _ProgressSlot())
        if slot.call is not None:
            slot.latest = event
            return
        now = self.factory.reactor.seconds()
        wait = slot.last_sent + PROGRESS_INTERVAL - now
        if wait <= 0:
            slot.last_sent = now
            self.send_message(event)
        else:
            slot.latest = event
            slot.call = self.factory.reactor.callLater(wait, self._flush_progress, job_id)

    def _flush_progress(self, job_id: Any, forget: bool = False) -> None:
        slot = self._progress.get(job_id)
        if slot is None:
            return
        if slot.call is not None and slot.call.active():
            slot.call.cancel()
        slot.call = None
        latest, slot.latest = slot.latest, None
        if forget:
            del self._progress[job_id]
        if latest is not None:
            slot.last_sent = self.factory.reactor.seconds()
            self.send_message(latest)

    # -- receiving -----------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            self._handle(self._parse(payload, isBinary))
        except MessageError as error:
            self.send_error(error.code, str(error))

    def _parse(self, payload: bytes, is_binary: bool) -> dict[str, Any]:
        if is_binary:
            raise MessageError("binary_not_supported",
                               "binary frames are not understood; send JSON as text frames")
        try:
            message = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise MessageError("invalid_json", f"the message is not JSON: {error}") from None
        except RecursionError:
            raise MessageError("invalid_json", "the message nests JSON too deeply") from None
        if not isinstance(message, dict):
            raise MessageError("invalid_message", "expected a JSON object with a 'type'")
        if not isinstance(message.get("type"), str):
            raise MessageError("invalid_message", "the message has no 'type'")
        return message

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"].strip().lower()
        if kind == "auth":
            self._auth(message)
            return
        if not self.authenticated:
            raise MessageError("auth_required",
                               'send {"type": "AUTH", "api_key": "..."} first')
        handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "ping": self._ping,
            "command": self._command,
        }
        handler = handlers.get(kind)
        if handler is None:
            raise MessageError("unknown_type",
                               f"unknown message type {message['type']!r}; expected one of "
                               f"SUBSCRIBE, UNSUBSCRIBE, PING, COMMAND, AUTH")
        handler(message)

    def _auth(self, message: dict[str, Any]) -> None:
        key = message.get("api_key")
        if not isinstance(key, str) or not key.strip():
            # A malformed message, not a guess: answered like any other, and
            # a client that is authenticated already stays so.
            raise MessageError("invalid_message",
                               'api_key: expected the API key as a string: '
                               '{"type": "AUTH", "api_key": "..."}')
        verdict = self.factory.auth.verify(key, self._client(), "websocket AUTH")
        if verdict is Verdict.ALLOWED:
            if self._auth_timer is not None and self._auth_timer.active():
                self._auth_timer.cancel()
            self._auth_timer = None
            limit = self.factory.config.max_connections
            if not self.authenticated and self.factory.authenticated_clients() >= limit:
                self.sendClose(code=CLOSE_TRY_AGAIN_LATER,
                               reason=f"{limit} clients are connected already "
                                      f"(websocket.max_connections)")
                return
            self.authenticated = True
            self.send_message({"type": "authenticated"})
            return
        reason = ("too many wrong API keys" if verdict is Verdict.BLOCKED
                  else "the API key is wrong")
        self.sendClose(code=CLOSE_UNAUTHORIZED, reason=reason)

    def _subscribe(self, message: dict[str, Any]) -> None:
        channels = channels_of(message)
        self.channels.update(channels)
        self.send_message({"type": "subscribed", "channels": channels})
        self._send_snapshots(channels)

    def _unsubscribe(self, message: dict[str, Any]) -> None:
        channels = channels_of(message)
        self.channels.difference_update(channels)
        self.send_message({"type": "unsubscribed", "channels": channels})

    def _ping(self, message: dict[str, Any]) -> None:
        self.send_message({"type": "pong"})

    def _command(self, message: dict[str, Any]) -> None:
        command, job_id = message.get("command"), message.get("job_id")
        result: dict[str, Any] = {"type": "command_result", "command": command,
                                  "job_id": job_id}
        if not isinstance(command, str) or command.strip().lower() not in COMMANDS:
            self.send_message({**result, "ok": False, "error_code": "unknown_command",
                               "error": f"command: expected one of {', '.join(COMMANDS)}, "
                                        f"got {command!r}"})
            return
        if not isinstance(job_id, str) or not job_id:
            self.send_message({**result, "ok": False, "error_code": "invalid_message",
                               "error": "job_id: expected the id of a job"})
            return
        command = command.strip().lower()
        result["command"] = command

        def done(job: dict[str, Any]) -> None:
            self.send_message({**result, "ok": True, "job": job})

        def failed(failure: Failure) -> None:
            known = client_error(failure)
            if known is None:
                _log.failure("websocket command {command} {job_id} failed", failure,
                             command=command, job_id=job_id)
                code, text = "internal_error", "the daemon failed; its log has the details"
            else:
                code, text = known.code, known.message
            self.send_message({**result, "ok": False, "error_code": code, "error": text})

        maybeDeferred(getattr(self.factory.jobs, command), job_id).addCallbacks(done, failed)

    # -- snapshots -------------------------------------------------------------

    def _send_snapshots(self, channels: list[str]) -> None:
        """Send each channel's current state, holding live events until it is out."""
        self._snapshots_pending += 1
        snapshots = [self.factory.snapshot(channel) for channel in channels]

        def ready(results: list[tuple[bool, Any]]) -> None:
            for channel, (ok, value) in zip(channels, results):
                if ok:
                    for message in value if isinstance(value, list) else [value]:
                        self.send_message(message)
                    continue
                known = client_error(value)
                if known is not None:  # a damaged database: the reason is the answer
                    self.send_error(known.code, known.message)
                    continue
                _log.failure("websocket: the {channel} snapshot failed", value,
                             channel=channel)
                self.send_error("snapshot_failed",
                                f"the current {channel} state is not available; "
                                f"the daemon log has the details")

        def release(_: Any) -> None:
            self._snapshots_pending -= 1
            if not self._snapshots_pending:
                held, self._held = self._held, []
                for message in held:
                    self._forward(message)

        DeferredList(snapshots, consumeErrors=True).addCallback(ready).addBoth(release)


class StreamFactory(WebSocketServerFactory):
    """All WebSocket clients: fans bus events out, runs the heartbeat, closes them all."""

    protocol = StreamProtocol

    def __init__(self, config: WebSocketConfig, jobs: JobControl, device: DeviceStatus,
                 monitor: SystemMonitor, auth: APIKeyCheck, reactor: Any, *,
                 clients: set[StreamProtocol] | None = None,
                 messages_sent: Callable[[], None] = lambda: None,
                 plotters: Callable[[], list[dict[str, Any]]] | None = None):
        super().__init__(server="vfab", reactor=reactor)
        self.setProtocolOptions(
            maxFramePayloadSize=config.max_message_size,
            maxMessagePayloadSize=config.max_message_size,
            failByDrop=False,  # a too-large message gets a close frame (1009), not a cut
            webStatus=False,
        )
        self.config = config
        self.jobs = jobs
        self.device = device
        #: Every plotter's status: the device channel's snapshot is one each.
        self.plotters = plotters or (lambda: [device.status()])
        self.monitor = monitor
        self.auth = auth
        self.clients: set[StreamProtocol] = clients if clients is not None else set()
        self.messages_sent = messages_sent
        self.closing = False
        #: The gate's verdict on the upgrade being handed to autobahn, which
        #: calls onConnect before WebSocketResource.render returns.
        self.upgrade_verdict: Verdict | None = None
        #: When a keyless refusal from each address was last audited: one record
        #: a window, so that a flood fills no disk.
        self.keyless_reported: dict[str | None, float] = {}

    def timestamp(self) -> str:
        return utc_timestamp(self.reactor.seconds())

    def authenticated_clients(self) -> int:
        """The clients max_connections counts: those with a key."""
        return sum(1 for client in self.clients if client.authenticated)

    def publish(self, channel: str, message: dict[str, Any]) -> None:
        """The event bus subscriber: stamp the event once and hand it to every client."""
        if not self.clients:
            return
        event = Event({**message, "type": str(message.get("type", "")).lower(),
                       "timestamp": message.get("timestamp") or self.timestamp()})
        for client in list(self.clients):
            client.deliver(channel, event)

    def heartbeat(self) -> None:
        """Every heartbeat_interval: ping every client and send system_status."""
        if not self.clients:
            return
        status = Event(self.monitor.system_status())
        for client in list(self.clients):
            client.heartbeat(status)

    def snapshot(self, channel: str) -> Deferred[dict[str, Any] | list[dict[str, Any]]]:
        """The message that tells a new subscriber where `channel` stands (for the
        device channel, one `device_status` per plotter)."""
        if channel == "system":
            return maybeDeferred(self.monitor.system_status)
        if channel == "jobs":
            return maybeDeferred(self.jobs.list).addCallback(
                lambda jobs: {"type": "job_list", "jobs": jobs})
        return maybeDeferred(self.plotters).addCallback(
            lambda statuses: [{**status, "type": "device_status"} for status in statuses])

    def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down",
                  timeout: float = CLOSE_TIMEOUT) -> Deferred[Any]:
        """Close every client and refuse new ones; fires once all are gone.

        Clients that do not finish the closing handshake within `timeout`
        seconds are cut off, so this always ends.
        """
        self.closing = True
        clients = list(self.clients)
        for client in clients:
            client.go_away(code, reason)
        all_gone = DeferredList([client.when_gone() for client in clients])
        if not clients:
            return all_gone

        def cut_off() -> None:
            for client in clients:
                if client in self.clients:
                    _log.info("websocket client did not close in time; cutting it off")
                    client.abort("the client did not finish closing")

        timer = self.reactor.callLater(timeout, cut_off)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return all_gone.addBoth(finished)


class WebSocketGate(Resource):
    """/ws: checks Origin, key and capacity at the upgrade, then hands over to autobahn.

    A key comes as for HTTP or as a KEY_TOKEN subprotocol (the dashboard's
    way: a browser cannot set headers here); a client without one is let in to
    send AUTH, within the keyless budget; a wrong key is refused here. An Origin header must be in a
    non-empty `allowed_origins`; clients that send none (not browsers) pass.
    """

    isLeaf = True

    def __init__(self, factory: StreamFactory):
        super().__init__()
        self._factory = factory
        self._websocket = WebSocketResource(factory)

    def render(self, request: IRequest) -> bytes | int:
        config, factory = self._factory.config, self._factory
        upgrade = request.getHeader(b"upgrade") or b""
        if upgrade.strip().lower() != b"websocket":
            request.setHeader(b"Upgrade", b"websocket")
            return error_body(request, 426, "upgrade_required",
                              "this is the WebSocket endpoint: connect with a WebSocket client")
        audit = factory.auth.audit
        origin = request.getHeader(b"origin")
        if config.allowed_origins and origin is not None:
            if origin.decode("utf-8", "replace") not in config.allowed_origins:
                audit.record("origin_refused", client_address(request),
                             origin=origin.decode("utf-8", "replace"))
                return error_body(request, 403, "origin_not_allowed",
                                  "this Origin is not in websocket.allowed_origins")
        protocols = offered_protocols(_header(request, b"sec-websocket-protocol"))
        try:
            key = request_key(request) or protocol_key(protocols)
            token_error = None
        except KeyTokenError as error:
            key, token_error = "", error  # never the key (a blank one is refused at start-up)
        verdict = factory.auth.verify(key, client_address(request), "websocket")
        if verdict is Verdict.WRONG and token_error is not None:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="vfab"')
            return error_body(request, 401, "unauthorized", str(token_error))
        if verdict in (Verdict.WRONG, Verdict.BLOCKED):
            return factory.auth.refusal(request, verdict)
        if factory.closing:
            return error_body(request, 503, "shutting_down",
                              "the daemon is shutting down and takes no new connections")
        if verdict is Verdict.MISSING:
            refusal = self._keyless_refusal(request)
            if refusal is not None:
                return refusal
        elif factory.authenticated_clients() >= config.max_connections:
            audit.record("connection_limit", client_address(request),
                         max_connections=config.max_connections)
            request.setHeader(b"Retry-After", b"10")
            return error_body(request, 503, "too_many_connections",
                              f"{config.max_connections} WebSocket clients are connected "
                              f"already (websocket.max_connections)")
        strip_credentials(request)
        _strip_key_token(request, protocols)
        factory.upgrade_verdict = verdict
        try:
            return self._websocket.render(request)
        finally:
            factory.upgrade_verdict = None

    def _keyless_refusal(self, request: IRequest) -> bytes | None:
        """503 when the clients waiting to send AUTH have used their budget."""
        address = getattr(request.getClientAddress(), "host", None)
        waiting = [client for client in self._factory.clients if not client.authenticated]
        from_here = sum(1 for client in waiting if client.address == address)
        if len(waiting) < KEYLESS_CLIENTS and from_here < KEYLESS_PER_ADDRESS:
            return None
        now = self._factory.reactor.seconds()
        reported = self._factory.keyless_reported
        if now - reported.get(address, float("-inf")) >= KEYLESS_AUDIT_SECONDS:
            if len(reported) >= KEYLESS_AUDIT_ADDRESSES:
                reported.clear()
            reported[address] = now
            self._factory.auth.audit.record("keyless_limit", client_address(request),
                                            waiting=len(waiting), from_address=from_here)
        request.setHeader(b"Retry-After", b"10")
        return error_body(request, 503, "too_many_unauthenticated",
                          f"{len(waiting)} WebSocket clients without a key are waiting to "
                          f"send AUTH ({from_here} from this address); send the key with "
                          f"the upgrade (X-API-Key header, a {KEY_TOKEN} subprotocol token "
                          f"or ?api_key=), or try again later")


def _header(request: IRequest, name: bytes) -> str | None:
    """Every value of header `name`, joined as one list (as autobahn reads it)."""
    values = request.requestHeaders.getRawHeaders(name)
    return b",".join(values).decode("latin-1") if values else None


def _strip_key_token(request: IRequest, protocols: list[str]) -> None:
    """Remove a key token from the offered subprotocols, so that autobahn (which
    re-reads the upgrade and logs it at debug level) never sees the key."""
    kept = [name for name in protocols if not name.startswith(KEY_TOKEN)]
    if kept == protocols:
        return
    if kept:
        request.requestHeaders.setRawHeaders(b"sec-websocket-protocol",
                                             [", ".join(kept).encode("latin-1")])
    else:
        request.requestHeaders.removeHeader(b"sec-websocket-protocol")
