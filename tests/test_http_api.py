"""The HTTP API (contract section 3) over a real port, against fake jobs and device."""

from __future__ import annotations

import json
import re
from io import BytesIO
from urllib.parse import quote, unquote
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from tests.web_fakes import WebHarness
from vfab.jobs.states import COMPLETED, PAUSED, PLOTTING, QUEUED
from vfab.web.api import render_later
from vfab.web.query import scrubbed_uri
from vfab.web import server
from vfab.web.server import ListenError, WebService

SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10mm" height="10mm"><path d="M0 0L5 5"/></svg>'
KEY = "s3cret-key"
TIMEOUT = 10


class Reply:
    def __init__(self, status: int, headers: Headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None

    def error_code(self) -> str:
        error = self.json()["error"]
        assert set(error) == {"code", "message"} and error["message"]
        return error["code"]


@implementer(IBodyProducer)
class UnsizedBody:
    """A body without a length, so Agent sends it chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes):
        self._data = data

    def startProducing(self, consumer: Any) -> Deferred[None]:
        for start in range(0, len(self._data), 4096):
            consumer.write(self._data[start:start + 4096])
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


async def call(web: WebHarness, method: str, path: str, body: bytes | IBodyProducer | None = None,
               headers: dict[str, str] | None = None) -> Reply:
    request_headers = Headers({k: [v] for k, v in (headers or {}).items()})
    if isinstance(body, bytes):
        body = FileBodyProducer(BytesIO(body))
    requested = Agent(reactor).request(method.encode(), web.url(path), request_headers, body)
    response = await requested.addTimeout(TIMEOUT, reactor)
    content = await readBody(response).addTimeout(TIMEOUT, reactor)
    return Reply(response.code, response.headers, content)


def multipart(fields: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    boundary = "vfab-test-boundary-1234"
    parts = []
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if filename is not None:
            head += "Content-Type: image/svg+xml\r\n"
        parts.append(head.encode() + b"\r\n" + value + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest_twisted.async_yield_fixture
async def serve():
    started: list[WebHarness] = []

    async def start(**config: Any) -> WebHarness:
        web = WebHarness(**config)
        await web.service.startService()
        started.append(web)
        return web

    yield start
    for web in started:
        await web.service.stopService()


@pytest.fixture
def logged():
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- /health -------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_health_reports_status_uptime_and_device(serve):
    web = await serve()
    web.clock.advance(42)
    reply = await call(web, "GET", "/health")
    assert reply.status == 200
    assert reply.header("Content-Type").startswith("application/json")
    assert reply.json() == {"status": "healthy", "uptime": 42.0, "device": "idle"}


@pytest_twisted.ensureDeferred
async def test_health_is_degraded_without_device_and_unhealthy_with_broken_store(serve):
    web = await serve()
    web.device.state["status"] = "disconnected"
    assert (await call(web, "GET", "/health")).json()["status"] == "degraded"
    web.store_ok = False
    reply = await call(web, "GET", "/health")
    assert reply.status == 200
    assert reply.json()["status"] == "unhealthy"


@pytest_twisted.ensureDeferred
async def test_health_not_degraded_when_no_device_is_configured(serve):
    web = await serve(device_type="none")
    web.device.state["status"] = "disconnected"
    assert (await call(web, "GET", "/health")).json()["status"] == "healthy"


@pytest_twisted.ensureDeferred
async def test_health_and_system_status_name_every_plotters_state(serve):
    """On a farm one `device` state would hide the others: each plotter is named."""
    second = {"plotter": "b3", "status": "plotting"}
    web = await serve(plotters=lambda: [web.device.status(), second])
    web.device.state["plotter"] = "a4"
    reply = await call(web, "GET", "/health")
    assert reply.json()["plotters"] == {"a4": "idle", "b3": "plotting"}
    assert reply.json()["device"] == "idle"
    second["status"] = "error"
    status = web.service.monitor.system_status()
    assert status["plotters"] == {"a4": "idle", "b3": "error"}
    assert status["device"] == "idle"


# -- POST /api/jobs -----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_submit_raw_svg(serve):
    web = await serve()
    reply = await call(web, "POST", "/api/jobs?name=cat&priority=3&preset=fast", SVG,
                       {"Content-Type": "image/svg+xml"})
    assert reply.status == 201
    job = reply.json()
    assert job["name"] == "cat" and job["priority"] == 3 and job["state"] == QUEUED
    assert reply.header("Location") == f"/api/jobs/{job['id']}"
    assert web.jobs.submitted == [{"name": "cat", "svg": SVG, "priority": 3, "preset": "fast"}]


@pytest_twisted.ensureDeferred
async def test_submit_raw_svg_without_name_is_untitled(serve):
    web = await serve()
    reply = await call(web, "POST", "/api/jobs", SVG, {"Content-Type": "image/svg+xml"})
    assert reply.status == 201
    assert reply.json()["name"] == "untitled"
    assert web.jobs.submitted[0]["priority"] == 0


@pytest_twisted.ensureDeferred
async def test_submit_multipart_with_name_and_exact_bytes(serve):
    web = await serve()
    svg = SVG.replace(b"<path", "<!-- café ✓ -->\r\n<path".encode())
    body, content_type = multipart([("name", b"Flower", None), ("priority", b"5", None),
                                    ("file", svg, "flower.svg")])
    reply = await call(web, "POST", "/api/jobs", body, {"Content-Type": content_type})
    assert reply.status == 201, reply.body
    assert reply.json()["name"] == "Flower"
    assert web.jobs.submitted[0]["svg"] == svg
    assert web.jobs.submitted[0]["priority"] == 5


@pytest_twisted.ensureDeferred
async def test_submit_multipart_name_defaults_to_file_stem(serve):
    web = await serve()
    body, content_type = multipart([("file", SVG, "plots/my drawing.svg")])
    reply = await call(web, "POST", "/api/jobs", body, {"Content-Type": content_type})
    assert reply.status == 201
    assert reply.json()["name"] == "my drawing"


@pytest_twisted.ensureDeferred
async def test_submit_multipart_without_file_is_400(serve):
    web = await serve()
    body, content_type = multipart([("name", b"x", None)])
    reply = await call(web, "POST", "/api/jobs", body, {"Content-Type": content_type})
    assert reply.status == 400
    assert reply.error_code() == "invalid_input"


@pytest.mark.parametrize("body, query, status, code", [
    (b"hello, not a drawing", "", 400, "invalid_svg"),
    (b"", "", 400, "invalid_svg"),
    (SVG.replace(b"<path", b"<g id='out-of-travel'/><path"), "", 422, "out_of_travel"),
    (SVG, "?preset=nonesuch", 400, "invalid_input"),
    (SVG, "?priority=high", 400, "invalid_input"),
])
@pytest_twisted.ensureDeferred
async def test_submit_errors(serve, body, query, status, code):
    web = await serve()
    reply = await call(web, "POST", f"/api/jobs{query}", body, {"Content-Type": "image/svg+xml"})
    assert reply.status == status
    assert reply.error_code() == code


@pytest_twisted.ensureDeferred
async def test_submit_while_shutting_down_is_503(serve):
    web = await serve()
    web.jobs.accepting = False
    reply = await call(web, "POST", "/api/jobs", SVG, {"Content-Type": "image/svg+xml"})
    assert reply.status == 503
    assert reply.error_code() == "not_accepting"


@pytest_twisted.ensureDeferred
async def test_submit_too_large_is_413_by_content_length_and_by_count(serve):
    web = await serve(max_upload_size=1024)
    big = SVG + b" " * 2000
    reply = await call(web, "POST", "/api/jobs", big, {"Content-Type": "image/svg+xml"})
    assert reply.status == 413
    assert reply.error_code() == "too_large"
    reply = await call(web, "POST", "/api/jobs", UnsizedBody(big),
                       {"Content-Type": "image/svg+xml"})
    assert reply.status == 413
    assert web.jobs.submitted == []
    small = await call(web, "POST", "/api/jobs", SVG, {"Content-Type": "image/svg+xml"})
    assert small.status == 201


# -- reading jobs ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_list_jobs_newest_first_with_state_and_limit(serve):
    web = await serve()
    first = web.jobs.add("first")
    second = web.jobs.add("second", state=PLOTTING)
    third = web.jobs.add("third")
    reply = await call(web, "GET", "/api/jobs")
    assert reply.status == 200
    assert [j["id"] for j in reply.json()["jobs"]] == [third["id"], second["id"], first["id"]]
    reply = await call(web, "GET", "/api/jobs?state=queued")
    assert [j["id"] for j in reply.json()["jobs"]] == [third["id"], first["id"]]
    reply = await call(web, "GET", "/api/jobs?limit=1")
    assert [j["id"] for j in reply.json()["jobs"]] == [third["id"]]
    assert (await call(web, "GET", "/api/jobs/")).status == 200


@pytest.mark.parametrize("query", ["?state=sleeping", "?limit=none", "?limit=0"])
@pytest_twisted.ensureDeferred
async def test_list_jobs_bad_query_is_400(serve, query):
    web = await serve()
    reply = await call(web, "GET", f"/api/jobs{query}")
    assert reply.status == 400
    assert reply.error_code() == "invalid_input"


OUT_OF_RANGE = [str(10**30), str(10**23), str(-10**30), "1000001", "-1000001",
                "1_000", "\u0663", "9" * 5000, "0x10", "1e3", "0" * 30 + "1000001",
                "-" + "0" * 30 + "1000001", "0" * 5000 + "9" * 5000, "--1", "+-1", "0-1"]


@pytest.mark.parametrize("value", OUT_OF_RANGE)
@pytest_twisted.ensureDeferred
async def test_every_numeric_parameter_refuses_what_it_cannot_hold(serve, value):
    """priority (query and form field) and limit: 400 naming the range, never 500."""
    web = await serve()
    replies = [
        await call(web, "POST", f"/api/jobs?priority={quote(value)}", SVG,
                   {"Content-Type": "image/svg+xml"}),
        await call(web, "POST", "/api/jobs", *_form_with_priority(value)),
        await call(web, "GET", f"/api/jobs?limit={quote(value)}"),
    ]
    for reply, name, allowed in zip(replies, ("priority", "priority", "limit"),
                                    ("from -1000000 to 1000000", "from -1000000 to 1000000",
                                     "from 1 to 1000000")):
        assert reply.status == 400 and reply.error_code() == "invalid_input"
        message = reply.json()["error"]["message"]
        assert message.startswith(f"{name}: expected an integer {allowed}, got ")
        assert len(message) < 120
    assert web.jobs.submitted == []


def _form_with_priority(value: str) -> tuple[bytes, dict[str, str]]:
    body, content_type = multipart([("priority", value.encode(), None), ("file", SVG, "a.svg")])
    return body, {"Content-Type": content_type}


@pytest.mark.parametrize("query, priority", [("?priority=1000000", 1_000_000),
                                             ("?priority=-1000000", -1_000_000),
                                             ("?priority=+7", 7), ("?priority=%207%20", 7),
                                             ("?priority=0000000000000000000000005", 5),
                                             ("?priority=-" + "0" * 5000 + "1000000",
                                              -1_000_000),
                                             ("?priority=+" + "0" * 40, 0)])
@pytest_twisted.ensureDeferred
async def test_priorities_at_the_ends_of_the_range_are_taken(serve, query, priority):
    web = await serve()
    reply = await call(web, "POST", f"/api/jobs{query}", SVG, {"Content-Type": "image/svg+xml"})
    assert reply.status == 201 and web.jobs.submitted[0]["priority"] == priority
    reply = await call(web, "POST", "/api/jobs", *_form_with_priority(unquote(query[10:])))
    assert reply.status == 201 and web.jobs.submitted[1]["priority"] == priority


@pytest_twisted.ensureDeferred
async def test_a_limit_is_read_by_its_value_however_many_zeros_lead(serve):
    web = await serve()
    web.jobs.add("first")
    second = web.jobs.add("second")
    reply = await call(web, "GET", "/api/jobs?limit=" + "0" * 30 + "1")
    assert reply.status == 200 and [j["id"] for j in reply.json()["jobs"]] == [second["id"]]


@pytest_twisted.ensureDeferred
async def test_get_job_and_unknown_job(serve):
    web = await serve()
    job = web.jobs.add("one")
    reply = await call(web, "GET", f"/api/jobs/{job['id']}")
    assert reply.status == 200
    assert reply.json() == job
    reply = await call(web, "GET", "/api/jobs/nope")
    assert reply.status == 404
    assert reply.error_code() == "not_found"


@pytest_twisted.ensureDeferred
async def test_preview(serve):
    web = await serve()
    job = web.jobs.add("one")
    reply = await call(web, "GET", f"/api/jobs/{job['id']}/preview")
    assert reply.status == 200
    assert reply.json()["width_mm"] == 100.0
    assert (await call(web, "GET", "/api/jobs/nope/preview")).status == 404


# -- changing jobs ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_pause_resume_cancel(serve):
    web = await serve()
    job = web.jobs.add("one", state=PLOTTING)
    reply = await call(web, "POST", f"/api/jobs/{job['id']}/pause")
    assert reply.status == 200 and reply.json()["state"] == PAUSED
    reply = await call(web, "POST", f"/api/jobs/{job['id']}/pause")
    assert reply.status == 409
    assert reply.error_code() == "invalid_state"
    reply = await call(web, "POST", f"/api/jobs/{job['id']}/resume")
    assert reply.status == 200 and reply.json()["state"] == PLOTTING
    reply = await call(web, "POST", f"/api/jobs/{job['id']}/cancel")
    assert reply.status == 200 and reply.json()["state"] == "cancelled"
    assert (await call(web, "POST", f"/api/jobs/{job['id']}/resume")).status == 409
    assert (await call(web, "POST", "/api/jobs/nope/cancel")).status == 404


@pytest_twisted.ensureDeferred
async def test_delete_only_finished_jobs(serve):
    web = await serve()
    done = web.jobs.add("done", state=COMPLETED)
    waiting = web.jobs.add("waiting")
    reply = await call(web, "DELETE", f"/api/jobs/{done['id']}")
    assert reply.status == 204 and reply.body == b""
    assert done["id"] not in web.jobs.jobs
    reply = await call(web, "DELETE", f"/api/jobs/{waiting['id']}")
    assert reply.status == 409
    assert reply.error_code() == "invalid_state"
    assert (await call(web, "DELETE", "/api/jobs/nope")).status == 404


# -- device, metrics, dashboard ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_device_status(serve):
    web = await serve()
    reply = await call(web, "GET", "/api/device")
    assert reply.status == 200
    status = reply.json()
    assert status.pop("timestamp").endswith("Z")
    assert status == web.device.status()


@pytest_twisted.ensureDeferred
async def test_metrics(serve):
    web = await serve()
    web.jobs.add("a")
    web.jobs.add("b")
    web.jobs.add("c", state=PLOTTING)
    web.clock.advance(7)
    reply = await call(web, "GET", "/metrics")
    assert reply.status == 200
    assert reply.header("Content-Type").startswith("text/plain")
    text = reply.body.decode()
    assert 'vfab_jobs{state="queued"} 2.0' in text
    assert 'vfab_jobs{state="plotting"} 1.0' in text
    assert 'vfab_jobs{state="failed"} 0.0' in text
    assert "vfab_queue_length 2.0" in text
    assert "vfab_active_jobs 1.0" in text
    assert "vfab_websocket_connections 0.0" in text
    assert "vfab_websocket_messages_sent_total 0.0" in text
    assert "vfab_device_connected 1.0" in text
    assert "vfab_uptime_seconds 7.0" in text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert all(name.startswith("vfab_") for name in names)


@pytest_twisted.ensureDeferred
async def test_metrics_registries_are_per_service(serve):
    first = await serve()
    second = await serve()
    assert first.service.metrics.registry is not second.service.metrics.registry


@pytest_twisted.ensureDeferred
async def test_dashboard(serve):
    web = await serve()
    reply = await call(web, "GET", "/")
    assert reply.status == 200
    assert reply.header("Content-Type").startswith("text/html")
    assert b"/api/jobs" in reply.body and b"/health" in reply.body


# -- unknown paths and methods ------------------------------------------------------------

@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/nothing-here", 404, None),
    ("GET", "/api/nothing", 404, None),
    ("GET", "/api/jobs/x/y/z", 404, None),
    ("GET", "/health/more", 404, None),
    ("GET", "/%ff", 404, None),
    ("PUT", "/api/jobs", 405, "GET, POST"),
    ("POST", "/api/jobs/x", 405, "GET, DELETE"),
    ("GET", "/api/jobs/x/pause", 405, "POST"),
    ("POST", "/health", 405, "GET"),
    ("DELETE", "/api/device", 405, "GET"),
    ("POST", "/metrics", 405, "GET"),
    ("POST", "/", 405, "GET"),
])
@pytest_twisted.ensureDeferred
async def test_unknown_path_and_wrong_method_answer_json(serve, method, path, status, allow):
    web = await serve()
    reply = await call(web, method, path)
    assert reply.status == status
    assert reply.error_code() == ("not_found" if status == 404 else "method_not_allowed")
    assert reply.header("Allow") == allow


# -- authentication ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/jobs", "/api/device", "/metrics", "/nothing"])
@pytest_twisted.ensureDeferred
async def test_auth_required_everywhere_but_health(serve, path):
    web = await serve(authenticate=True, api_key=KEY)
    reply = await call(web, "GET", path)
    assert reply.status == 401
    assert reply.error_code() == "unauthorized"
    assert reply.header("WWW-Authenticate").startswith("Bearer")
    reply = await call(web, "GET", path, headers={"X-API-Key": "wrong"})
    assert reply.status == 401
    assert (await call(web, "GET", "/health")).status == 200


@pytest.mark.parametrize("path, headers", [
    ("/api/jobs", {"X-API-Key": KEY}),
    ("/api/jobs", {"Authorization": f"Bearer {KEY}"}),
    ("/api/jobs", {"Authorization": f"bearer {KEY}"}),
    (f"/api/jobs?api_key={KEY}", {}),
    (f"/?api_key={KEY}", {}),
])
@pytest_twisted.ensureDeferred
async def test_auth_each_way_of_sending_the_key(serve, path, headers):
    web = await serve(authenticate=True, api_key=KEY)
    reply = await call(web, "GET", path, headers=headers)
    assert reply.status == 200


@pytest_twisted.ensureDeferred
async def test_auth_failures_are_rate_limited_per_address(serve):
    web = await serve(authenticate=True, api_key=KEY)
    for _ in range(10):
        assert (await call(web, "GET", "/api/jobs", headers={"X-API-Key": "guess"})).status == 401
    reply = await call(web, "GET", "/api/jobs", headers={"X-API-Key": KEY})
    assert reply.status == 429
    assert reply.error_code() == "too_many_attempts"
    assert int(reply.header("Retry-After")) == 60
    assert (await call(web, "GET", "/health")).status == 200
    web.clock.advance(61)
    assert (await call(web, "GET", "/api/jobs", headers={"X-API-Key": KEY})).status == 200


@pytest_twisted.ensureDeferred
async def test_the_key_never_reaches_the_log(serve, logged):
    web = await serve(authenticate=True, api_key=KEY)
    await call(web, "GET", f"/api/jobs?state=queued&api_key={KEY}")
    await call(web, "GET", "/api/jobs?api_key=wrong-guess")
    text = "\n".join(formatEvent(event) for event in logged)
    assert "/api/jobs?state=queued" in text
    assert KEY not in text and "wrong-guess" not in text


def test_scrubbed_uri_strips_the_key():
    assert scrubbed_uri(b"/api/jobs?api_key=abc&state=queued") == "/api/jobs?state=queued"
    assert scrubbed_uri(b"/?api_key=abc") == "/"
    assert scrubbed_uri(b"/health") == "/health"
    # Pairs that may hide the key (a `;` inside a value, an encoded one) go too.
    assert scrubbed_uri(b"/api/jobs?x=1;api_key=abc&limit=2") == "/api/jobs?limit=2"
    assert scrubbed_uri(b"/api/jobs?x=1%3Bapi_key%3Dabc") == "/api/jobs"
    assert scrubbed_uri(b"/api/jobs?api%5Fkey=abc") == "/api/jobs"


@pytest_twisted.ensureDeferred
async def test_a_key_after_a_semicolon_is_neither_accepted_nor_logged(serve, logged):
    web = await serve(authenticate=True, api_key=KEY)
    reply = await call(web, "GET", f"/api/jobs?x=1;api_key={KEY}")
    assert reply.status == 401 and reply.error_code() == "unauthorized"
    assert (await call(web, "GET", f"/api/jobs?x=1&api_key={KEY}")).status == 200
    text = "\n".join(formatEvent(event) for event in logged)
    assert "/api/jobs?x=1" in text and KEY not in text


@pytest_twisted.ensureDeferred
async def test_a_key_in_a_form_body_is_refused(serve):
    web = await serve(authenticate=True, api_key=KEY)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = await call(web, "POST", "/api/jobs", f"api_key={KEY}".encode(), form)
    assert reply.status == 401 and reply.error_code() == "unauthorized"
    body, content_type = multipart([("api_key", KEY.encode(), None), ("file", SVG, "a.svg")])
    reply = await call(web, "POST", "/api/jobs", body, {"Content-Type": content_type})
    assert reply.status == 401 and reply.error_code() == "unauthorized"


class RawExchange(Protocol):
    """Sends bytes as they are and keeps everything the server answers until it
    hangs up, or until the answer is complete (`hang_up`: then this side hangs up)."""

    def __init__(self, request: bytes, hang_up: bool = True):
        self.request = request
        self.hang_up = hang_up
        self.received = b""
        self.lost: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        head, found, body = self.received.partition(b"\r\n\r\n")
        length = re.search(rb"\r\nContent-Length: (\d+)", head)
        if self.hang_up and found and length and len(body) >= int(length.group(1)):
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(self.received)


async def raw(web: WebHarness, request: bytes, hang_up: bool = True
              ) -> tuple[int, dict[str, str], Any]:
    """(status, headers, decoded JSON body) of one raw request."""
    exchange = RawExchange(request, hang_up)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", web.port), exchange)
    answer = await exchange.lost.addTimeout(TIMEOUT, reactor)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split(" ")[1]), headers, json.loads(body) if body else None


@pytest.mark.parametrize("authenticate", [False, True])
@pytest_twisted.ensureDeferred
async def test_options_star_is_405_in_json_like_every_other_options(serve, authenticate):
    web = await serve(authenticate=authenticate, api_key=KEY if authenticate else None)
    status, headers, body = await raw(
        web, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert headers["Allow"] == "GET, HEAD, POST, DELETE"
    status, _, body = await raw(web, b"GET * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404 and body["error"]["code"] == "not_found"


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * 100_000 + b"\r\n",                         # one line too long
    b"".join(b"X-Many-%d: %s\r\n" % (i, b"b" * 1000) for i in range(20)),  # too many together
])
@pytest_twisted.ensureDeferred
async def test_headers_too_large_are_431_in_json(serve, headers):
    web = await serve()
    status, reply_headers, body = await raw(
        web, b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n")
    assert status == 431 and body["error"]["code"] == "headers_too_large"
    assert "16384 bytes" in body["error"]["message"]
    assert reply_headers["Connection"] == "close"
    assert (await call(web, "GET", "/health")).status == 200


@pytest_twisted.ensureDeferred
async def test_headers_just_within_the_limit_are_served(serve):
    web = await serve()
    status, _, body = await raw(web, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
                                + b"a" * 15_000 + b"\r\nConnection: close\r\n\r\n")
    assert status == 200 and body["status"] == "healthy"


@pytest.mark.parametrize("extra, status", [(0, 200), (1, 431)])
@pytest_twisted.ensureDeferred
async def test_the_header_limit_is_counted_as_twisted_counts_it(serve, extra, status):
    """The 431 check keeps its own count of header bytes (twisted.web's is
    private): it must agree with twisted.web's to the byte, or a request just
    over the limit gets twisted.web's bare 400 instead of our 431."""
    web = await serve()
    head = [b"GET /health HTTP/1.1", b"Host: x", b"Connection: close", b"X-Big: "]
    fill = HTTPChannel.totalHeadersSize - sum(len(line) for line in head) + extra
    head[-1] += b"a" * fill
    answer, _, body = await raw(web, b"\r\n".join(head) + b"\r\n\r\n")
    assert answer == status
    if status == 431:
        assert body["error"]["code"] == "headers_too_large"


@pytest.mark.parametrize("extra, status", [(0, 200), (1, 431)])
@pytest_twisted.ensureDeferred
async def test_the_header_count_is_limited_as_twisted_limits_it(serve, extra, status):
    web = await serve()
    fields = b"".join(b"X%d: a\r\n" % number
                      for number in range(HTTPChannel.maxHeaders - 2 + extra))
    answer, _, body = await raw(web, b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields
                                + b"Connection: close\r\n\r\n")
    assert answer == status
    if status == 431:
        assert body["error"]["message"] == (
            f"the request has more than {HTTPChannel.maxHeaders} header fields")


@pytest.mark.parametrize("length", [b"1000000000000000000000000000000", b"9" * 5000,
                                    b"1025", b"0" * 100 + b"1025"])
@pytest_twisted.ensureDeferred
async def test_a_body_declared_too_large_is_413_at_once(serve, length):
    """No body follows: the answer must not wait for one (it did, until the idle
    timeout), nor read the number with int() (5000 digits is a ValueError)."""
    web = await serve(max_upload_size=1024)
    status, headers, body = await raw(
        web, b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/svg+xml\r\n"
             b"Content-Length: " + length + b"\r\n\r\n")
    assert status == 413 and body["error"]["code"] == "too_large"
    assert "1024 bytes" in body["error"]["message"] and len(body["error"]["message"]) < 160
    assert headers["Connection"] == "close"
    assert web.jobs.submitted == []
    assert (await call(web, "GET", "/health")).status == 200


@pytest_twisted.ensureDeferred
async def test_a_client_that_sends_the_body_anyway_still_reads_the_413(serve):
    """Closing with the body unread would reset the connection under a client
    that is still sending it (urllib does), and it would never see the 413."""
    web = await serve(max_upload_size=1024)
    status, _, body = await raw(
        web, b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/svg+xml\r\n"
             b"Content-Length: 8000000\r\n\r\n" + b" " * 8_000_000)
    assert status == 413 and body["error"]["code"] == "too_large"


@pytest_twisted.ensureDeferred
async def test_a_refused_client_that_never_hangs_up_is_let_go(serve, monkeypatch):
    monkeypatch.setattr(server, "LINGER_IDLE_SECONDS", 0.2)
    web = await serve(max_upload_size=1024)
    status, _, _ = await raw(web, b"POST /api/jobs HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 2048\r\n\r\n", hang_up=False)
    assert status == 413  # and the server hung up: raw() waits for that


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1e3", b"0x10", b"1_000", b"",
                                    "\u0663".encode(), b"12 34"])
@pytest_twisted.ensureDeferred
async def test_a_content_length_that_is_not_a_number_is_400_in_json(serve, length):
    web = await serve()
    status, _, body = await raw(
        web, b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
             + b"\r\n\r\n")
    assert status == 400 and body["error"]["code"] == "invalid_content_length"
    assert body["error"]["message"].startswith("Content-Length: expected a number of bytes")


@pytest_twisted.ensureDeferred
async def test_a_body_of_exactly_the_limit_is_read(serve):
    svg = SVG + b" " * (1024 - len(SVG))
    web = await serve(max_upload_size=1024)
    status, _, body = await raw(
        web, b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/svg+xml\r\n"
             b"Connection: close\r\nContent-Length: 0001024\r\n\r\n" + svg)
    assert status == 201 and web.jobs.submitted[0]["svg"] == svg


# -- deferred answers and lifecycle --------------------------------------------------------

def test_a_client_that_hung_up_is_not_answered(logged):
    request = DummyRequest([b"jobs"])
    waiting: Deferred[dict[str, Any]] = Deferred()
    render_later(request, lambda: waiting, lambda req, job: req.write(b"late"))
    request.processingFailed(Exception("connection lost"))  # what a hang-up does
    waiting.callback({"id": "x"})
    assert request.written == []
    assert not [e for e in logged if e.get("log_failure")]


def test_work_that_fails_because_the_client_hung_up_is_not_a_logged_failure(logged):
    """A client that hangs up while its upload is copied closes the body under the
    copying thread ("read of closed file"): that was a CRITICAL traceback."""
    request = DummyRequest([b"jobs"])
    request.method, request.path = b"POST", b"/api/jobs"
    waiting: Deferred[dict[str, Any]] = Deferred()
    render_later(request, lambda: waiting, lambda req, job: req.write(b"late"))
    request.processingFailed(Exception("connection lost"))
    waiting.errback(ValueError("read of closed file"))
    assert request.written == []
    assert not [e for e in logged if e.get("log_failure")]


@pytest_twisted.ensureDeferred
async def test_slow_job_calls_are_answered_later(serve):
    web = await serve()
    job = web.jobs.add("one")
    web.jobs.hold = True
    answer = call(web, "GET", f"/api/jobs/{job['id']}")
    pending = Deferred.fromCoroutine(answer)
    for _ in range(100):
        if web.jobs.held:
            break
        await call(web, "GET", "/health")
    assert not pending.called
    web.jobs.release()
    reply = await pending
    assert reply.status == 200 and reply.json()["id"] == job["id"]


@pytest_twisted.ensureDeferred
async def test_port_zero_is_reported_and_port_in_use_fails_clearly(serve):
    web = await serve()
    assert web.port > 0
    clash = WebService(web.config, web.jobs, web.device, web.bus, web.reactor,
                       endpoint=f"tcp:{web.port}:interface=127.0.0.1")
    with pytest.raises(ListenError) as raised:
        await clash.startService()
    message = str(raised.value)
    assert f"{web.port}" in message and "\n" not in message
    assert not clash.running
    await clash.stopService()


@pytest_twisted.ensureDeferred
async def test_listening_is_logged_with_the_bound_port(serve, logged):
    web = await serve()
    text = "\n".join(formatEvent(event) for event in logged)
    assert f"listening on http://127.0.0.1:{web.port}" in text



@pytest_twisted.ensureDeferred
async def test_unexpected_errors_are_logged_500s_in_json(serve, logged):
    web = await serve()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the fake broke")

    web.jobs.get = broken
    web.device.status = broken
    for path in ["/api/jobs/x", "/api/device"]:
        reply = await call(web, "GET", path)
        assert reply.status == 500
        assert reply.error_code() == "internal_error"
        assert "the fake broke" not in reply.body.decode()
    failures = [e for e in logged if e.get("log_failure") is not None]
    assert len(failures) == 2
    for event in failures:
        event["log_failure"].trap(RuntimeError)


@pytest_twisted.ensureDeferred
async def test_submit_for_a_plotter_with_tags(serve):
    web = await serve()
    reply = await call(web, "POST", "/api/jobs?name=cat&plotter=left&tags=a3,%20fine&tags=pen",
                       SVG, {"Content-Type": "image/svg+xml"})
    assert reply.status == 201
    assert web.jobs.submitted[0]["plotter"] == "left"
    assert web.jobs.submitted[0]["tags"] == ("a3", "fine", "pen")
    body, content_type = multipart([("file", SVG, "cat.svg"), ("tags", b"a4", None)])
    reply = await call(web, "POST", "/api/jobs", body, {"Content-Type": content_type})
    assert reply.status == 201 and web.jobs.submitted[1]["tags"] == ("a4",)


@pytest_twisted.ensureDeferred
async def test_submit_that_no_plotter_can_take_is_422(serve):
    web = await serve()
    reply = await call(web, "POST", "/api/jobs?plotter=nowhere", SVG,
                       {"Content-Type": "image/svg+xml"})
    assert reply.status == 422
    assert reply.json()["error"]["code"] == "no_plotter"
    reply = await call(web, "POST", "/api/jobs?plotter=no%20such", SVG,
                       {"Content-Type": "image/svg+xml"})
    assert reply.status == 400 and "plotter:" in reply.json()["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_plotters_lists_every_plotter(serve):
    web = await serve()
    reply = await call(web, "GET", "/api/plotters")
    assert reply.status == 200
    (status,) = reply.json()["plotters"]
    assert status.pop("timestamp").endswith("Z")
    assert status == web.device.status()
    reply = await call(web, "POST", "/api/plotters")
    assert reply.status == 405
