"""The web server as a service: one port for the dashboard, the HTTP API and /ws.

`WebService` binds with `serverFromString`, so a failed bind fails start-up
with a one-line reason and `systemd:` socket activation strings work too.
Stopping is two-phase: `close_clients()` says goodbye (1001) to WebSocket
clients while HTTP keeps answering; `stopService()` then stops listening.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from vfab.audit import AuditLog
from vfab.config import WebSocketConfig
from vfab.events import EventBus
from vfab.jobs.control import DeviceStatus, JobControl
from vfab.web.api import APIResource, HealthResource
from vfab.web.auth import APIKeyCheck, Verdict, client_address, exposure_warning
from vfab.web.metrics import MetricsResource, WebMetrics
from vfab.web.query import scrubbed_uri
from vfab.web.responses import NotFound, error_body, method_not_allowed, not_found
from vfab.web.system import SystemMonitor
from vfab.web.ws import StreamFactory, StreamProtocol, WebSocketGate

_log = Logger()

STATIC = Path(__file__).parent / "static"
#: Paths that do their own access checks (/health needs none, /ws allows AUTH later).
_OWN_ACCESS = (b"health", b"ws")
#: Every method some path of the API answers.
_METHODS = b"GET, HEAD, POST, DELETE"


class ListenError(RuntimeError):
    """The server could not bind its port; the message says where and why."""


class APIRequest(Request):
    """A request whose body is bounded and whose failures answer in JSON.

    twisted.web buffers the whole body before a resource sees it, so the limit
    is applied here, as it arrives: past `max_body_size` the rest is counted
    and discarded and the resource answers 413.
    """

    max_body_size: int = 0
    body_too_large = False
    _body_received = 0

    def gotLength(self, length: int | None) -> None:
        self.max_body_size = self.channel.site.max_body_size
        if length is not None and length > self.max_body_size:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_received += len(data)
        if self._body_received > self.max_body_size:
            self.body_too_large = True
        if not self.body_too_large:
            super().handleContentChunk(data)

    def process(self) -> None:
        """As twisted.web, but `*` (OPTIONS *) answers in JSON like any other path
        rather than an empty 200 that claims support for OPTIONS."""
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
    """An HTTP connection that answers headers it will not read with 431.

    twisted.web drops a connection whose request line or a header line is
    longer than MAX_LENGTH without a word, and answers a bare 400 when all the
    headers together pass totalHeadersSize; a client is owed the reason.
    """

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse_headers()

    def lineReceived(self, line: bytes) -> None:
        # _receivedHeaderSize is twisted.web's documented count of this
        # request's header bytes so far; refuse before it would.
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse_headers()
            return
        super().lineReceived(line)

    def _refuse_headers(self) -> None:
        message = (f"the request line and headers are larger than the limit of "
                   f"{self.totalHeadersSize} bytes")
        body = json.dumps({"error": {"code": "headers_too_large", "message": message}},
                          separators=(",", ":")).encode("utf-8")
        _log.info("{client} request headers over {limit} bytes: 431",
                  client=getattr(self.transport.getPeer(), "host", "?"),
                  limit=self.totalHeadersSize)
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"Content-Type: application/json; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(body), body))
        self.loseConnection()
        # Nothing else that arrives on this connection is read, as twisted.web
        # does for a connection it is done with.
        self.dataReceived = self.lineReceived = lambda *args: None  # type: ignore[method-assign]


class APISite(Site):
    """A Site with bounded request bodies and an access log through twisted.logger."""

    protocol = APIChannel
    requestFactory = APIRequest
    noisy = False  # WebService logs the one line that matters: where it listens

    def __init__(self, root: Resource, max_body_size: int):
        super().__init__(root)
        self.max_body_size = max_body_size

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
    """The top of the tree: asks for the API key on every path but /health and /ws."""

    def __init__(self, auth: APIKeyCheck, dashboard: Resource):
        super().__init__()
        self._auth = auth
        self._dashboard = dashboard

    def getChildWithDefault(self, name: bytes, request: IRequest) -> Resource:
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            return NotFound()
        if name not in _OWN_ACCESS:
            verdict = self._auth.verify_request(request)
            if verdict is not Verdict.ALLOWED:
                return _Refusal(self._auth, verdict)
        if name in self.children:
            return self.children[name]
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
    endpoint string (e.g. "systemd:domain=INET:index=0"); `plotters` lists every
    plotter's status (default: only `device`'s).
    """

    def __init__(self, config: WebSocketConfig, jobs: JobControl, device: DeviceStatus,
                 bus: EventBus, reactor: Any, *,
                 health: Callable[[], bool | dict[str, Any]] | None = None,
                 endpoint: str | None = None, device_type: str | None = None,
                 audit: AuditLog | None = None,
                 plotters: Callable[[], list[dict[str, Any]]] | None = None):
        self.config = config
        self._jobs = jobs
        self._device = device
        self._plotters = plotters or (lambda: [device.status()])
        self._bus = bus
        self._reactor = reactor
        self._endpoint = endpoint
        self._clients: set[StreamProtocol] = set()
        self.monitor = SystemMonitor(jobs, device, reactor, connections=self._count_clients,
                                     health=health, device_type=device_type)
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
        root = Root(self.auth, StaticFiles(str(STATIC)))
        root.putChild(b"health", HealthResource(self.monitor))
        root.putChild(b"api", APIResource(self._jobs, self._device, self._reactor,
                                          plotters=self._plotters))
        root.putChild(b"metrics", MetricsResource(self.metrics))
        root.putChild(b"ws", WebSocketGate(self.factory))
        return APISite(root, max_body_size=self.config.max_upload_size)

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
        self._unsubscribe = self._bus.subscribe(self.factory.publish)
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
