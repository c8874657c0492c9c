"""The web server as a service: one port for the dashboard, the HTTP API and /ws.

`WebService` binds with `serverFromString`, so a failed bind fails start-up
with a one-line reason and `systemd:` socket activation strings work too.
Stopping is two-phase: `close_clients()` says goodbye (1001) to WebSocket
clients while HTTP keeps answering; `stopService()` then stops listening.
"""

from __future__ import annotations

import json
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from vfab.audit import AuditLog
from vfab.config import UploadsConfig, WebSocketConfig
from vfab.events import EventBus
from vfab.jobs.control import DeviceStatus, JobControl
from vfab.jobs.files import NO_SPACE
from vfab.web.api import APIResource, HealthResource
from vfab.web.auth import (APIKeyCheck, Verdict, client_address, exposure_warning,
                            request_key)
from vfab.web.dashboard import DashboardPage
from vfab.web.metrics import MetricsResource, WebMetrics
from vfab.web.query import scrubbed_uri
from vfab.web.responses import NotFound, error_body, method_not_allowed, not_found
from vfab.web.system import SystemMonitor
from vfab.web.ws import StreamFactory, StreamProtocol, WebSocketGate

_log = Logger()

STATIC = Path(__file__).parent / "static"
#: Paths that do their own access checks (/health needs none, /ws allows AUTH later).
_OWN_ACCESS = (b"health", b"ws")
#: The dashboard's page, rendered with a snapshot rather than served as a file.
_PAGE = (b"", b"index.html")
#: Every method some path of the API answers.
_METHODS = b"GET, HEAD, POST, DELETE"
#: The connection of a request refused before its body was read stays open to
#: take (and throw away) what the client still sends: at most this long in all,
#: this long without a byte, and this much (see APIChannel._linger_after_answer).
LINGER_SECONDS = 30.0
LINGER_IDLE_SECONDS = 5.0
LINGER_BYTES = 1 << 30
#: The request line and headers must arrive within this many seconds of the
#: request's first byte, else 408: twisted.web's idle timeout (60 s) restarts
#: with every byte, so a client sending a byte at a time held its connection
#: (and a file descriptor) for as long as it wished (slowloris).
HEADER_SECONDS = 20.0
#: Reason phrases of the refusals (RFC 4918's for 507, not Twisted's).
_REASONS = {**RESPONSES, 507: b"Insufficient Storage"}
#: The Retry-After of an upload refused while others take its place or its room.
UPLOAD_RETRY_SECONDS = 10
#: A body of no declared size has the disk's room for it checked at its first
#: chunk and then every this many bytes (at most this much, twice, into the 1 MiB
#: the daemon keeps for its own writes).
STREAMED_ROOM_CHECK_BYTES = 64 << 10


class ListenError(RuntimeError):
    """The server could not bind its port; the message says where and why."""


class APIRequest(Request):
    """A request whose body is bounded and whose failures answer in JSON.

    twisted.web buffers the whole body before a resource sees it, so the limit
    is applied here, as it arrives: a chunked body that passes `max_body_size`
    is answered 413 at once and the rest is never read. (A declared
    Content-Length over the limit never gets here: APIChannel answers it at once.)
    """

    max_body_size: int = 0
    body_refused = False
    #: The bytes of the body received so far.
    body_received = 0
    #: Whether the body has no declared size (chunked), and when the disk's room
    #: for it is next checked (see STREAMED_ROOM_CHECK_BYTES).
    _streamed = False
    _next_room_check = 0

    def gotLength(self, length: int | None) -> None:
        self.max_body_size = self.channel.site.max_body_size
        self._streamed = length is None
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_refused:  # answered already; the rest is not read
            return
        self.body_received += len(data)
        if self.body_received > self.max_body_size:  # only a chunked body: no length to refuse
            self._refuse_body(lambda: self.channel.refuse_body(
                self.max_body_size, "the request body is larger than"))
            return
        try:
            super().handleContentChunk(data)
        except OSError as error:
            if error.errno not in NO_SPACE:
                raise
            self._refuse_body(self.channel.refuse_for_space)
            return
        if self._streamed and self.body_received >= self._next_room_check:
            self._next_room_check = self.body_received + STREAMED_ROOM_CHECK_BYTES
            refusal = self.channel.site.streamed_refusal(self.body_received)
            if refusal is not None:
                self._refuse_body(lambda: self.channel.refuse(refusal))

    def _refuse_body(self, answer: Callable[[], None]) -> None:
        """Refuse the body as it comes: its spool is given back to the disk at
        once, not when the lingering connection closes, and `answer()` says why."""
        self.body_refused = True
        self.content.close()
        self.content = BytesIO()
        answer()

    def process(self) -> None:
        """As twisted.web, but `*` (OPTIONS *) answers in JSON like any other path
        rather than an empty 200 that claims support for OPTIONS."""
        if self.body_refused:  # answered (413, 507) already, while the body came
            return
        if self.path != b"*":
            super().process()
            return
        self.site = self.channel.site
        if self.method == b"OPTIONS":
            self.setHeader(b"Allow", _METHODS)
            body = error_body(self, 405, "method_not_allowed",
                              "OPTIONS is not supported (no CORS preflight); the API uses "
                              + _METHODS.decode("ascii"))
        else:
            body = not_found(self)
        self.write(body)
        self.finish()

    def processingFailed(self, reason: Failure) -> None:
        _log.failure("{method} {path} failed", reason,
                     method=self.method.decode("ascii", "replace"), path=scrubbed_uri(self.path))
        body = error_body(self, 500, "internal_error",
                          "the daemon failed to handle this request; its log has the details")
        self.write(body)
        self.finish()


class APIChannel(HTTPChannel):
    """An HTTP connection that says why it will not read a request.

    twisted.web drops a connection whose request line or a header line is
    longer than MAX_LENGTH without a word, answers a bare 400 when all the
    headers together pass totalHeadersSize, when there are more than
    maxHeaders of them or the Content-Length is not a number, and waits for a body of any declared length (a client that
    declares 10**30 bytes and sends none holds the connection until the idle
    timeout). Each of these is answered here, in JSON, before twisted.web sees it.
    """

    #: The bytes of this request's line and headers so far, counted as
    #: twisted.web counts them against totalHeadersSize (a line without its
    #: CRLF). Its own count is private (_receivedHeaderSize), so we keep ours.
    _header_bytes = 0
    #: This request's header fields so far (twisted.web's count is private too).
    _header_fields = 0
    #: The closes that end a refused request's connection: after LINGER_SECONDS,
    #: and after LINGER_IDLE_SECONDS without a byte (see _linger_after_answer).
    _linger: IDelayedCall | None = None
    _linger_idle: IDelayedCall | None = None
    #: The bytes thrown away since the refusal.
    _dropped = 0
    #: Whether the next bytes are a request's line and headers, and the 408 that
    #: ends them HEADER_SECONDS after their first byte.
    _awaiting_headers = True
    _header_deadline: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        self._start_header_deadline()
        super().dataReceived(data)
        # The start of the next request may have come with the end of this one
        # (LineReceiver keeps it in its buffer until its line is whole).
        if self._buffer:
            self._start_header_deadline()

    def _start_header_deadline(self) -> None:
        if self._awaiting_headers and self._header_deadline is None:
            self._header_deadline = self.callLater(HEADER_SECONDS, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        self._refuse(b"408 Request Timeout", "request_timeout",
                     f"the request line and headers did not arrive within "
                     f"{HEADER_SECONDS:g} s")

    def _end_header_deadline(self) -> None:
        if self._header_deadline is not None and self._header_deadline.active():
            self._header_deadline.cancel()
        self._header_deadline = None

    def allContentReceived(self) -> None:
        self._awaiting_headers = True  # what comes next is the next request's
        super().allContentReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse_headers()

    def lineReceived(self, line: bytes) -> None:
        if self._header_bytes + len(line) > self.totalHeadersSize:
            self._refuse_headers()
            return
        self._header_bytes += len(line)
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._header_bytes = self._header_fields = 0  # the next line is the next request's
        self._awaiting_headers = False
        self._end_header_deadline()
        if self.length != 0:  # a body follows (None: chunked)
            refusal = self.site.admit_body(self.requests[-1], self._path, self.length,
                                           getattr(self.transport.getPeer(), "host", "?"))
            if refusal is not None:
                self.refuse(refusal)
                return
        super().allHeadersReceived()

    def headerReceived(self, line: bytes) -> bool:
        self._header_fields += 1
        if self._header_fields > self.maxHeaders:
            self._refuse(b"431 Request Header Fields Too Large", "headers_too_large",
                         f"the request has more than {self.maxHeaders} header fields")
            return False
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return self._length_acceptable(value.strip(b" \t")) \
                and super().headerReceived(line)
        return super().headerReceived(line)

    def _length_acceptable(self, value: bytes) -> bool:
        """Refuse a Content-Length that is not a number (400) or more than the
        upload limit (413) at once, before any of the body is read."""
        if not value.isdigit():  # bytes.isdigit(): ASCII digits only
            self._refuse(b"400 Bad Request", "invalid_content_length",
                         f"Content-Length: expected a number of bytes, got "
                         f"{value.decode('latin-1')!r:.40}")
            return False
        limit = self.site.max_body_size
        digits = value.lstrip(b"0") or b"0"
        if len(digits) > len(str(limit)) or int(digits) > limit:
            shown = digits.decode("ascii")
            if len(shown) > 40:
                shown = f"{shown[:20]}... ({len(shown)} digits)"
            self.refuse_body(limit, f"the request body is declared as {shown} bytes, more than")
            return False
        return True

    def refuse(self, refusal: Refusal) -> None:
        """Answer a refusal of the site's (see APISite.admit_body) at once."""
        status, code, message, headers = refusal
        self._refuse(b"%d %s" % (status, _REASONS[status]), code, message, headers)

    def refuse_body(self, limit: int, why: str) -> None:
        """Answer 413 at once: the rest of the body is not read (see _refuse)."""
        self._refuse(b"413 Content Too Large", "too_large",
                     f"{why} the limit of {limit} bytes (uploads.max_size)")

    def refuse_for_space(self) -> None:
        """Answer 507 at once: the body's temporary file (twisted.web puts it in
        the temporary directory, not the workspace) met a full disk."""
        where = tempfile.gettempdir()
        _log.error("a request body did not fit in {where}: the disk is full", where=where)
        self._refuse(b"507 Insufficient Storage", "insufficient_storage",
                     f"the request body does not fit: the disk of {where} is full")

    def _refuse_headers(self) -> None:
        self._refuse(b"431 Request Header Fields Too Large", "headers_too_large",
                     f"the request line and headers are larger than the limit of "
                     f"{self.totalHeadersSize} bytes")

    def _refuse(self, status: bytes, code: str, message: str,
                headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer `status` in JSON and close: the rest of the request is never read."""
        body = json.dumps({"error": {"code": code, "message": message}},
                          separators=(",", ":")).encode("utf-8")
        _log.info("{client} request refused before it was read: {status} ({message})",
                  client=getattr(self.transport.getPeer(), "host", "?"),
                  status=status.decode("ascii"), message=message)
        if self.requests:  # its upload, if it was one, is over
            self.site.uploads.pop(self.requests[-1], None)
        extra = b"".join(b"%s: %s\r\n" % header for header in headers)
        self.transport.write(b"HTTP/1.1 %s\r\n"
                             b"Content-Type: application/json; charset=utf-8\r\n%s"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (status, extra, len(body), body))
        self._linger_after_answer()

    def _linger_after_answer(self) -> None:
        """Throw away what the client still sends, then close.

        Closing a socket with bytes unread, or with bytes still coming, resets
        the connection, and a client still sending its body (most send it all
        before they read) would lose the answer with it. So the answer is
        followed by a half-close (the client reads the answer, then its end),
        and the connection is closed once the client hangs up, or after
        LINGER_IDLE_SECONDS without a byte, LINGER_SECONDS in all or
        LINGER_BYTES thrown away, whichever comes first.
        """
        self.clearLineBuffer()
        self._awaiting_headers = False
        self._end_header_deadline()
        self.setTimeout(None)  # the bounds below replace the idle timeout
        self.dataReceived = self._drop  # type: ignore[method-assign]
        self.lineReceived = lambda *args: None  # type: ignore[method-assign]
        self.transport.unregisterProducer()  # else a paused channel holds back the FIN
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:  # TCP; TLS has none: its close comes at the end
            half_close()
        self._linger = self.callLater(LINGER_SECONDS, self._stop_lingering,
                                      f"still sending after {LINGER_SECONDS:g} s")
        self._linger_idle = self.callLater(LINGER_IDLE_SECONDS, self._stop_lingering, None)

    def _drop(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > LINGER_BYTES:
            self._stop_lingering(f"still sending after {LINGER_BYTES} bytes")
        elif self._linger_idle is not None and self._linger_idle.active():
            self._linger_idle.reset(LINGER_IDLE_SECONDS)

    def _stop_lingering(self, why: str | None) -> None:
        """Close the refused request's connection; `why` if a bound cut a client
        still sending (which then sees a reset)."""
        for call in (self._linger, self._linger_idle):
            if call is not None and call.active():
                call.cancel()
        self._linger = self._linger_idle = None
        if why is not None:
            _log.info("{client} refused request: closed, {why}",
                      client=getattr(self.transport.getPeer(), "host", "?"), why=why)
        self.dataReceived = lambda *args: None  # type: ignore[method-assign]
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._end_header_deadline()
        for call in (self._linger, self._linger_idle):
            if call is not None and call.active():
                call.cancel()
        super().connectionLost(reason)


#: Refusal = (status, code, message, headers).
Refusal = tuple[int, str, str, tuple[tuple[bytes, bytes], ...]]
#: Whether the disk has room for an upload: (size, others, spooled=) -> None or
#: (status, why) (see DiskSpace.room_for_upload).
UploadRoom = Callable[..., "tuple[int, str] | None"]


class APISite(Site):
    """A Site with bounded request bodies and an access log through twisted.logger.

    A request body (an upload) is admitted before any of it is read: only with
    the key when `auth` needs one (401, so that clients without it can neither
    fill the disk nor take the uploads' places), at most `max_uploads` at once
    (503 with Retry-After: each holds about twice its size on disk while it is
    read), and only when `room(size, others)` says the disk can take a declared
    size (see DiskSpace.room_for_upload); a body of no declared size is checked
    as it streams (`streamed_refusal`).
    """

    protocol = APIChannel
    requestFactory = APIRequest
    noisy = False  # WebService logs the one line that matters: where it listens

    def __init__(self, root: Resource, max_body_size: int, *,
                 max_uploads: int = UploadsConfig().max_concurrent,
                 auth: APIKeyCheck | None = None,
                 room: UploadRoom | None = None):
        # Left to itself twisted.web reads a form body whole into memory and parses
        # it on the reactor (a 40 MB form: 0.9 GB and /health stalled for 1.7 s),
        # and answers a bad one with a bare 400; the API reads forms itself, a
        # piece at a time (vfab.web.multipart).
        super().__init__(root, parsePOSTFormSubmission=False)
        self.max_body_size = max_body_size
        self.max_uploads = max_uploads
        self._auth = auth
        self._room = room
        #: The uploads being received or handled, with their declared sizes (0: chunked).
        self.uploads: dict[APIRequest, int] = {}

    def admit_body(self, request: APIRequest, target: bytes, length: int | None,
                   client: str) -> Refusal | None:
        """None if the body of `request` (to `target`, of `length` bytes or
        chunked) may be read, else the refusal to answer at once."""
        if self._auth is not None and self._auth.required:
            verdict = self._auth.verify(request_key(request, target), client)
            if verdict is not Verdict.ALLOWED:
                return self._auth.refusal_parts(client, verdict)
        retry = ((b"Retry-After", b"%d" % UPLOAD_RETRY_SECONDS),)
        if len(self.uploads) >= self.max_uploads:
            return (503, "too_many_uploads",
                    f"{len(self.uploads)} uploads are being received, the most taken at once "
                    f"(uploads.max_concurrent); try again in {UPLOAD_RETRY_SECONDS} s", retry)
        if length:
            refused = self._room_refusal(length)
            if refused is not None:
                return refused
        self.uploads[request] = length or 0
        request.notifyFinish().addBoth(lambda _: self.uploads.pop(request, None))
        return None

    def streamed_refusal(self, received: int) -> Refusal | None:
        """None if a body of no declared size, `received` bytes of it spooled so
        far, may go on, else the refusal to answer at once."""
        return self._room_refusal(received, spooled=True)

    def _room_refusal(self, size: int, *, spooled: bool = False) -> Refusal | None:
        if self._room is None:
            return None
        others = sum(max(0, declared - upload.body_received)
                     for upload, declared in self.uploads.items())
        refused = self._room(size, others, spooled=spooled)
        if refused is None:
            return None
        status, message = refused
        if status == 507:
            return status, "insufficient_storage", message, ()
        return (status, "too_many_uploads", message,
                ((b"Retry-After", b"%d" % UPLOAD_RETRY_SECONDS),))

    def log(self, request: IRequest) -> None:
        _log.info('{client} "{method} {uri}" {code} {length}',
                  client=client_address(request),
                  method=request.method.decode("ascii", "replace"),
                  uri=scrubbed_uri(request.uri),
                  code=request.code, length=request.sentLength or "-")


class StaticFiles(File):
    """The dashboard's files; missing ones and other methods answer in JSON."""

    childNotFound = NotFound()

    def render(self, request: IRequest) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, [b"GET"])
        return super().render(request)


class Root(Resource):
    """The top of the tree: asks for the API key on the API and the metrics. /health
    and /ws do their own checks; the dashboard's page and files hold no data (with a
    key required the page is rendered empty), so a browser can load them and then
    ask its user for the key."""

    def __init__(self, auth: APIKeyCheck, page: Resource, dashboard: Resource):
        super().__init__()
        self._auth = auth
        self._page = page
        self._dashboard = dashboard
        self._dashboard_files = frozenset(
            path.name.encode() for path in STATIC.iterdir() if path.is_file())

    def getChildWithDefault(self, name: bytes, request: IRequest) -> Resource:
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            return NotFound()
        keyless = name in _OWN_ACCESS or name in _PAGE or name in self._dashboard_files
        if not keyless:
            verdict = self._auth.verify_request(request)
            if verdict is not Verdict.ALLOWED:
                return _Refusal(self._auth, verdict)
        if name in self.children:
            return self.children[name]
        if name in _PAGE:
            return self._page
        return self._dashboard.getChildWithDefault(name, request)


class _Refusal(Resource):
    isLeaf = True

    def __init__(self, auth: APIKeyCheck, verdict: Verdict):
        super().__init__()
        self._auth, self._verdict = auth, verdict

    def render(self, request: IRequest) -> bytes:
        return self._auth.refusal(request, self._verdict)


class WebService(Service):
    """Serves the dashboard, the HTTP API, /metrics and the WebSocket on one port.

    `health` reports what only the daemon knows (False or {"status":
    "unhealthy", ...} when the store is broken); `device_type` "none" keeps a
    missing plotter from degrading /health; `endpoint` overrides the listening
    endpoint string (e.g. "systemd:domain=INET:index=0"); `max_upload_size` is
    `uploads.max_size`, `max_concurrent_uploads` `uploads.max_concurrent`, and
    `upload_room` says whether the disk has room for an upload (see APISite);
    `plotters` lists every plotter's status (default: only `device`'s).
    """

    def __init__(self, config: WebSocketConfig, jobs: JobControl, device: DeviceStatus,
                 bus: EventBus, reactor: Any, *,
                 health: Callable[[], bool | dict[str, Any]] | None = None,
                 endpoint: str | None = None, device_type: str | None = None,
                 audit: AuditLog | None = None,
                 max_upload_size: int = UploadsConfig().max_size,
                 max_concurrent_uploads: int = UploadsConfig().max_concurrent,
                 upload_room: UploadRoom | None = None,
                 plotters: Callable[[], list[dict[str, Any]]] | None = None):
        self.config = config
        self._jobs = jobs
        self._device = device
        self._plotters = plotters or (lambda: [device.status()])
        self._bus = bus
        self._reactor = reactor
        self._endpoint = endpoint
        self._max_upload_size = max_upload_size
        self._max_concurrent_uploads = max_concurrent_uploads
        self._upload_room = upload_room
        self._clients: set[StreamProtocol] = set()
        self.monitor = SystemMonitor(jobs, device, reactor, connections=self._count_clients,
                                     health=health, device_type=device_type,
                                     plotters=self._plotters)
        self.metrics = WebMetrics(jobs, self.monitor, connections=self._count_clients,
                                  plotters=self._plotters)
        self.auth = APIKeyCheck(config.api_key, config.authenticate, reactor, audit=audit)
        self.factory: StreamFactory | None = None
        self.port: int | None = None
        self._listening: IListeningPort | None = None
        self._heartbeat: LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def _count_clients(self) -> int:
        return len(self._clients)

    def _build_site(self) -> APISite:
        self.factory = StreamFactory(self.config, self._jobs, self._device, self.monitor,
                                     self.auth, self._reactor, clients=self._clients,
                                     messages_sent=self.metrics.messages_sent.inc,
                                     plotters=self._plotters)
        page = DashboardPage((STATIC / "index.html").read_text(encoding="utf-8"),
                             self.factory.snapshot, self._reactor,
                             holds_data=not self.config.authenticate)
        root = Root(self.auth, page, StaticFiles(str(STATIC)))
        root.putChild(b"health", HealthResource(self.monitor))
        root.putChild(b"api", APIResource(self._jobs, self._device, self._reactor,
                                          plotters=self._plotters))
        root.putChild(b"metrics", MetricsResource(self.metrics))
        root.putChild(b"ws", WebSocketGate(self.factory))
        return APISite(root, max_body_size=self._max_upload_size,
                       max_uploads=self._max_concurrent_uploads, auth=self.auth,
                       room=self._upload_room)

    def _endpoint_description(self) -> str:
        if self._endpoint:
            return self._endpoint
        interface = self.config.host.replace(":", "\\:")
        return f"tcp:{self.config.port}:interface={interface}"

    def startService(self) -> Deferred[None]:
        """Bind and start; the Deferred fails with ListenError if the port cannot be had."""
        super().startService()
        site = self._build_site()
        description = self._endpoint_description()
        listening = serverFromString(self._reactor, description).listen(site)
        return listening.addCallbacks(self._listening_on, self._cannot_listen,
                                      errbackArgs=(description,))

    def _listening_on(self, port: IListeningPort) -> None:
        self._listening = port
        self.port = port.getHost().port
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        _log.info("listening on http://{host}:{port}", host=shown, port=self.port)
        warning = exposure_warning(getattr(port.getHost(), "host", host), self.config.authenticate)
        if warning is not None:
            _log.critical("{warning}", warning=warning)
            self.auth.audit.record("exposed_without_auth", None, host=host, port=self.port)
        assert self.factory is not None
        self._unsubscribe = self._bus.subscribe(self.factory.publish, remote=True)
        self._heartbeat = LoopingCall(self.factory.heartbeat)
        self._heartbeat.clock = self._reactor
        self._heartbeat.start(self.config.heartbeat_interval, now=False).addErrback(
            lambda failure: _log.failure("the WebSocket heartbeat stopped", failure))

    def _cannot_listen(self, failure: Failure, description: str) -> Failure:
        self.running = 0
        if failure.check(CannotListenError):
            error = failure.value
            why = getattr(error.socketError, "strerror", None) or str(error.socketError)
            where = f"{self.config.host}:{self.config.port}" if not self._endpoint else description
            return Failure(ListenError(f"cannot listen on {where}: {why}"))
        return Failure(ListenError(f"cannot listen on {description}: {failure.getErrorMessage()}"))

    def close_clients(self) -> Deferred[Any]:
        """Say goodbye (1001) to every WebSocket client and refuse new ones.

        Fires when all are gone, after at most a few seconds; HTTP keeps answering.
        """
        if self.factory is None:
            return succeed(None)
        return self.factory.close_all()

    def stopService(self) -> Deferred[None]:
        """Close the WebSocket clients, then stop listening."""
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None

        def stop_listening(_: Any) -> Deferred[None] | None:
            port, self._listening = self._listening, None
            return port.stopListening() if port is not None else None

        return self.close_clients().addCallback(stop_listening)
