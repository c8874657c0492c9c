"""Security and robustness against the real daemon process (the issue "Security and robustness").

One daemon with authentication, the audit log, an Origin list and tight limits
serves most tests (fewer than ten wrong keys in all, so its rate limit never
trips); the rate limit, the key-in-logs check and start-up refusals get
daemons of their own. Every wait is bounded.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import psutil
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.daemon_process import DaemonProcess, read_to_the_end, run_vfab
from tests.keyless_flood import KeylessFlood
from vfab.web.auth import exposure_warning, limit_unit
from vfab.web.ws import key_token

KEY = "k3y-THAT-must-never-be-logged-7f3a9c"
GOOD_ORIGIN = "http://dashboard.example"
MAX_CONNECTIONS = 4
MAX_MESSAGE = 4096
MAX_UPLOAD = 256 * 1024
WAIT = 15.0
SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="50mm" height="50mm" '
       b'viewBox="0 0 50 50"><path d="M5 5 L40 40 L5 40"/></svg>')
AUTH = {"X-API-Key": KEY}


def svg_body(inner: str, size: str = 'width="50mm" height="50mm" viewBox="0 0 50 50"') -> bytes:
    return f'<svg xmlns="http://www.w3.org/2000/svg" {size}>{inner}</svg>'.encode()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path_factory.mktemp("secured"), {
        "websocket": {"authenticate": True, "api_key": KEY, "allowed_origins": [GOOD_ORIGIN],
                      "max_connections": MAX_CONNECTIONS, "max_message_size": MAX_MESSAGE,
                      "max_upload_size": MAX_UPLOAD},
        "logging": {"audit": True, "security_events": True, "level": "debug"},
    }).start()
    yield process
    process.stop()


def ws(daemon: DaemonProcess, query: str = "", headers: dict[str, str] | None = None,
       origin: str | None = None, subprotocols: list[str] | None = None) -> ClientConnection:
    return connect(daemon.ws_url + query, additional_headers=headers, origin=origin,
                   subprotocols=subprotocols, proxy=None, compression=None,
                   open_timeout=WAIT, close_timeout=WAIT, ping_interval=None, max_size=None)


def receive(client: ClientConnection, kind: str | None = None) -> dict[str, Any]:
    """The next message (of `kind`, skipping others), within WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        message = json.loads(client.recv(timeout=max(0.1, deadline - time.monotonic())))
        if kind is None or message["type"] == kind:
            return message


def healthy(daemon: DaemonProcess) -> None:
    assert daemon.process.poll() is None, daemon.log
    status, body = daemon.request("GET", "/health")
    assert status == 200 and body["status"] in ("healthy", "degraded"), body


def audit_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    path = daemon.workspace / "logs" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_audit(daemon: DaemonProcess, event: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for record in audit_events(daemon):
            if record["event"] == event:
                return record
        time.sleep(0.05)
    raise AssertionError(f"no {event} in the audit log: {audit_events(daemon)}")


# -- 1. authentication -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/jobs", "/api/device", "/metrics",
                                  "/api/jobs/nope", "/nothing-here"])
def test_every_endpoint_but_health_needs_the_key(daemon: DaemonProcess, path: str) -> None:
    status, body = daemon.request("GET", path)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert daemon.request("GET", "/health")[0] == 200


@pytest.mark.parametrize("path", ["/", "/index.html", "/app.js", "/style.css"])
def test_the_dashboards_files_need_no_key_and_hold_no_data(daemon: DaemonProcess,
                                                          path: str) -> None:
    """SPEC section 3: a browser loads the dashboard, then asks its user for the key."""
    status, job = daemon.request(
        "POST", "/api/jobs?name=secret-name",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10mm" height="10mm">'
        b'<line x1="1" y1="1" x2="5" y2="5" stroke="black"/></svg>',
        {"Content-Type": "image/svg+xml", "X-API-Key": KEY})
    assert status == 201, job
    request = urllib.request.Request(daemon.url + path)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    assert "secret-name" not in text and job["id"] not in text


@pytest.mark.parametrize("headers, query", [
    ({"X-API-Key": KEY}, ""),
    ({"Authorization": f"Bearer {KEY}"}, ""),
    ({}, f"?api_key={KEY}"),
])
def test_each_way_of_sending_the_key(daemon: DaemonProcess, headers: dict[str, str],
                                     query: str) -> None:
    assert daemon.request("GET", f"/api/jobs{query}", headers=headers)[0] == 200


def test_websocket_upgrade_by_header_query_or_auth_message(daemon: DaemonProcess) -> None:
    for client in (ws(daemon, headers=AUTH), ws(daemon, query=f"?api_key={KEY}")):
        with client:
            client.send(json.dumps({"type": "PING"}))
            assert receive(client)["type"] == "pong"
    with ws(daemon) as client:
        client.send(json.dumps({"type": "SUBSCRIBE", "channels": ["all"]}))
        assert receive(client)["error_code"] == "auth_required"
        client.send(json.dumps({"type": "AUTH", "api_key": KEY}))
        assert receive(client)["type"] == "authenticated"
        client.send(json.dumps({"type": "PING"}))
        assert receive(client)["type"] == "pong"


def test_websocket_wrong_key_is_401_at_upgrade_and_4401_by_auth(daemon: DaemonProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        ws(daemon, headers={"X-API-Key": "wrong"})
    assert refused.value.response.status_code == 401
    with ws(daemon) as client:
        client.send(json.dumps({"type": "AUTH", "api_key": "also wrong"}))
        with pytest.raises(ConnectionClosed) as closed:
            receive(client)
        assert closed.value.rcvd.code == 4401
    record = wait_for_audit(daemon, "auth_failed")
    assert record["client"] == "127.0.0.1" and record["detail"]["reason"] == "wrong API key"


def test_authenticate_without_key_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("websocket:\n  authenticate: true\n")
    result = run_vfab("daemon", "--port", "0", "--workspace", str(tmp_path / "w"),
                      "--config", str(config))
    assert result.returncode == 2
    assert "websocket.api_key" in result.stderr


def test_exposure_warning_is_for_non_loopback_without_auth() -> None:
    assert exposure_warning("127.0.0.1", False) is None
    assert exposure_warning("::1", False) is None
    assert exposure_warning("0.0.0.0", True) is None
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        assert "SECURITY WARNING" in exposure_warning(host, False)


def test_loopback_bind_has_no_exposure_warning_and_a_readable_key_file_is_flagged(
        daemon: DaemonProcess) -> None:
    assert "listening on" in daemon.log and "which other machines can reach" not in daemon.log
    # DaemonProcess writes the config with the default umask: 0644, key inside.
    assert daemon.config_path.stat().st_mode & 0o044
    line = daemon.wait_for_log(r"SECURITY WARNING: .*config.yaml holds websocket.api_key")
    assert "chmod 600" in line and KEY not in line
    assert wait_for_audit(daemon, "config_readable")["detail"]["mode"] == "0o644"


def test_rate_limit_retry_after_audit_and_the_key_never_logged(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, {
        "websocket": {"authenticate": True, "api_key": KEY},
        "logging": {"audit": True, "security_events": True, "level": "debug"}})
    daemon.config_path.chmod(0o600)
    daemon.start()
    try:
        assert "holds websocket.api_key" not in daemon.log
        # The good key every way, over HTTP and the WebSocket.
        assert daemon.request("GET", "/api/jobs", headers=AUTH)[0] == 200
        assert daemon.request("GET", "/api/jobs",
                              headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        assert daemon.request("GET", f"/api/jobs?api_key={KEY}&limit=1")[0] == 200
        for client in (ws(daemon, headers=AUTH), ws(daemon, query=f"?api_key={KEY}"), ws(daemon)):
            with client:
                client.send(json.dumps({"type": "AUTH", "api_key": KEY}))
                assert receive(client)["type"] in ("authenticated", "error")
        # Then ten wrong keys, and the eleventh attempt is refused however good.
        for _ in range(10):
            assert daemon.request("GET", "/api/jobs", headers={"X-API-Key": "guess"})[0] == 401
        status, body = daemon.request("GET", "/api/jobs", headers=AUTH)
        assert status == 429 and body["error"]["code"] == "too_many_attempts"
        with pytest.raises(urllib.error.HTTPError) as blocked:
            urllib.request.urlopen(urllib.request.Request(daemon.url + "/api/jobs", headers=AUTH),
                                   timeout=WAIT)
        assert blocked.value.code == 429
        assert 1 <= int(blocked.value.headers["Retry-After"]) <= 60
        with pytest.raises(InvalidStatus) as refused:
            ws(daemon, headers=AUTH)
        assert refused.value.response.status_code == 429
        assert daemon.request("GET", "/health")[0] == 200
    finally:
        assert daemon.stop() == 0
    events = audit_events(daemon)
    kinds = [record["event"] for record in events]
    assert kinds[0] == "daemon_started" and kinds[-1] == "daemon_stopped"
    assert kinds.count("auth_failed") == 10
    assert kinds.count("rate_limited") == 1  # once a window, however many attempts
    for record in events:
        assert set(record) == {"timestamp", "event", "client", "detail"}
        assert record["timestamp"].endswith("Z")
    assert (daemon.workspace / "logs" / "audit.log").stat().st_mode & 0o777 == 0o600
    assert "security event rate_limited from 127.0.0.1" in daemon.log
    # The key appears nowhere: stdout, the main log, the audit log.
    for path in (daemon.workspace / "logs").iterdir():
        assert KEY not in path.read_text(errors="replace"), path
    assert KEY not in daemon.log


def test_the_key_is_never_logged_however_it_is_sent(tmp_path: Path) -> None:
    """Every way of sending the key, accepted or not: no log file the daemon writes
    holds it, raw or percent-encoded (issue 14, item 2)."""
    daemon = DaemonProcess(tmp_path, {
        "websocket": {"authenticate": True, "api_key": KEY},
        "logging": {"audit": True, "security_events": True, "level": "debug"}})
    daemon.config_path.chmod(0o600)
    encoded = "".join(f"%{byte:02X}" for byte in KEY.encode())
    token = key_token(KEY)  # the dashboard's way: a Sec-WebSocket-Protocol token
    daemon.start()
    try:
        accepted = [
            ("/api/jobs", {"X-API-Key": KEY}),
            ("/api/jobs", {"Authorization": f"Bearer {KEY}"}),
            (f"/api/jobs?api_key={KEY}", {}),
            (f"/api/jobs?limit=1&api_key={KEY}", {}),
            (f"/api/jobs?api_key={encoded}", {}),
            (f"/api/jobs?api%5Fkey={KEY}", {}),
        ]
        for path, headers in accepted:
            assert daemon.request("GET", path, headers=headers)[0] == 200, path
        refused = [
            ("GET", f"/api/jobs?x=1;api_key={KEY}", None, {}),
            ("GET", f"/api/jobs?x=1%3Bapi_key%3D{KEY}", None, {}),
            ("POST", "/api/jobs", f"api_key={KEY}".encode(),
             {"Content-Type": "application/x-www-form-urlencoded"}),
            ("POST", "/api/jobs?name=form", (
                f"--b\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\n{KEY}\r\n"
                f"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.svg\"\r\n"
                f"\r\n").encode() + SVG + b"\r\n--b--\r\n",
             {"Content-Type": "multipart/form-data; boundary=b"}),
        ]
        for method, path, body, headers in refused:
            assert daemon.request(method, path, body, headers)[0] == 401, path
        for client in (ws(daemon, headers=AUTH), ws(daemon, query=f"?api_key={KEY}"),
                       ws(daemon, query=f"?api_key={encoded}"),
                       ws(daemon, query=f"?x=1;api_key={KEY}"), ws(daemon),
                       ws(daemon, subprotocols=["vfab", token])):
            with client:
                client.send(json.dumps({"type": "AUTH", "api_key": KEY}))
                assert receive(client)["type"] == "authenticated"
                client.send(json.dumps({"type": "PING"}))
                assert receive(client)["type"] == "pong"
        with pytest.raises(InvalidStatus) as refused:  # a bad token: wrong, and not logged
            ws(daemon, subprotocols=["vfab", token + "%"])
        assert refused.value.response.status_code == 401
    finally:
        assert daemon.stop() == 0
    logs = {path: path.read_text(errors="replace")
            for path in (daemon.workspace / "logs").iterdir()}
    assert {path.name for path in logs} >= {"vfab.log", "audit.log"}
    assert '"GET /api/jobs?limit=1" 200' in logs[daemon.workspace / "logs" / "vfab.log"]
    for where, text in [*logs.items(), ("stdout", daemon.log)]:
        for form in (KEY, encoded, encoded.lower(), token.removeprefix("vfab.key.")):
            assert form not in text, (where, form)


def test_a_keyless_flood_never_keeps_out_the_dashboard(tmp_path: Path) -> None:
    """Issue 14 item 1 against the real daemon: twenty keyless clients from one
    address reopen as each is refused or closed, while the dashboard's way in (the
    key as a subprotocol token) is tried twenty times: it gets in every time."""
    daemon = DaemonProcess(tmp_path, {"websocket": {"authenticate": True, "api_key": KEY}})
    daemon.config_path.chmod(0o600)
    daemon.start()
    try:
        admitted = 0
        with KeylessFlood(daemon.ws_url):
            for _ in range(20):
                with ws(daemon, subprotocols=["vfab", key_token(KEY)]) as client:
                    assert client.subprotocol == "vfab"
                    client.send(json.dumps({"type": "PING"}))
                    admitted += receive(client)["type"] == "pong"
        assert admitted == 20
    finally:
        assert daemon.stop() == 0


# -- 3. limits --------------------------------------------------------------------------


def test_origin_not_allowed_is_403(daemon: DaemonProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        ws(daemon, headers=AUTH, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["error"]["code"] == "origin_not_allowed"
    assert wait_for_audit(daemon, "origin_refused")["detail"]["origin"] == "http://evil.example"
    with ws(daemon, headers=AUTH, origin=GOOD_ORIGIN) as client:
        client.send(json.dumps({"type": "PING"}))
        assert receive(client)["type"] == "pong"


def test_max_connections_is_503_and_existing_clients_stay(daemon: DaemonProcess) -> None:
    clients = [ws(daemon, headers=AUTH) for _ in range(MAX_CONNECTIONS)]
    try:
        with pytest.raises(InvalidStatus) as refused:
            ws(daemon, headers=AUTH)
        assert refused.value.response.status_code == 503
        for client in clients:
            client.send(json.dumps({"type": "PING"}))
            assert receive(client)["type"] == "pong"
        assert wait_for_audit(daemon, "connection_limit")["client"] == "127.0.0.1"
    finally:
        for client in clients:
            client.close()
    deadline = time.monotonic() + WAIT
    while True:  # the server counts them gone once the close handshake ends
        try:
            ws(daemon, headers=AUTH).close()
            break
        except InvalidStatus:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_too_large_frame_closes_1009_and_daemon_stays(daemon: DaemonProcess) -> None:
    with ws(daemon, headers=AUTH) as client:
        client.send(json.dumps({"type": "PING", "pad": "x" * (MAX_MESSAGE * 2)}))
        with pytest.raises(ConnectionClosed) as closed:
            receive(client)
        assert closed.value.rcvd.code == 1009
    healthy(daemon)


def test_upload_too_large_is_413(daemon: DaemonProcess) -> None:
    big = svg_body('<path d="M1 1L2 2"/>' + " " * MAX_UPLOAD)
    status, body = daemon.request("POST", "/api/jobs?name=big", big,
                                  {**AUTH, "Content-Type": "image/svg+xml"})
    assert status == 413 and body["error"]["code"] == "too_large"
    healthy(daemon)


def test_a_chunked_body_over_the_limit_is_413_as_soon_as_it_passes_it(
        daemon: DaemonProcess) -> None:
    """No Content-Length to refuse up front: the 413 must come once the limit is
    passed, not after however much the client cares to send (300 MB were read
    and dropped without an answer)."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=WAIT)
    sock.sendall(f"POST /api/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                 f"Content-Type: image/svg+xml\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    piece = 64 * 1024
    chunk = b"%x\r\n" % piece + b" " * piece + b"\r\n"
    answer = b""
    for _ in range(20 * MAX_UPLOAD // piece):
        try:
            sock.sendall(chunk)
        except OSError:
            break
        sock.settimeout(0.05)
        try:
            answer = sock.recv(65536)
        except socket.timeout:
            continue
        if answer:
            break
    sock.settimeout(WAIT)
    while answer and b"}}" not in answer:
        answer += sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b'"too_large"' in answer and str(MAX_UPLOAD).encode() in answer
    healthy(daemon)


#: How long the daemon kept a refused connection before issue 14's fix (then reset).
OLD_LINGER_SECONDS = 5.0


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_a_refused_client_still_sending_after_the_old_cutoff_reads_its_413(
        daemon: DaemonProcess, chunked: bool) -> None:
    """A client that sends its whole body before it reads (urllib, requests) got
    a reset 5.2 s after its 413 and never saw the answer. It sends here, at a
    slow client's pace, for longer than that, then reads: the whole 413, then
    a clean end."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=WAIT)
    framing = (b"Transfer-Encoding: chunked" if chunked
               else b"Content-Length: %d" % (1000 * MAX_UPLOAD))
    sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
                 + b"\r\nContent-Type: image/svg+xml\r\n" + framing + b"\r\n\r\n")
    piece = b" " * 16384
    if chunked:
        piece = b"%x\r\n%s\r\n" % (len(piece), piece)
    started = time.monotonic()
    while time.monotonic() - started < OLD_LINGER_SECONDS + 1.5:
        sock.sendall(piece)  # a reset here is the defect too
        time.sleep(0.01)  # the client's pace (about 1.5 MB/s), not a wait for an event
    answer = read_to_the_end(sock, WAIT)
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(body)["error"]["code"] == "too_large"
    healthy(daemon)


def test_the_limit_passed_by_the_last_chunk_with_the_end_in_the_same_write_is_one_413(
        daemon: DaemonProcess) -> None:
    """The race at the end of a chunked body: the excess, the terminating chunk
    and a second request arrive together. One 413, then the end: the body is not
    taken as a job, the second request is not served."""
    jobs_before = len(daemon.request("GET", "/api/jobs", headers=AUTH)[1]["jobs"])
    body = svg_body('<path d="M1 1L2 2"/>')
    first = body + b" " * (MAX_UPLOAD - len(body) - 100)
    last = b" " * 101  # passes the limit by one byte
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=WAIT)
    sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
                 + b"\r\nContent-Type: image/svg+xml\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n%s\r\n" % (len(first), first) + b"%x\r\n%s\r\n" % (len(last), last)
                 + b"0\r\n\r\n" + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = read_to_the_end(sock, WAIT)
    sock.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(rest)["error"]["code"] == "too_large"  # and nothing after it
    assert len(daemon.request("GET", "/api/jobs", headers=AUTH)[1]["jobs"]) == jobs_before
    healthy(daemon)


FORM_PART = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.svg"\r\n\r\n'
             + SVG + b"\r\n--B--\r\n")


@pytest.mark.parametrize("content_type", ["multipart/form-data",
                                          "multipart/form-data; boundary=X; boundary=B",
                                          "multipart/form-data; boundary="])
def test_a_form_without_a_usable_boundary_is_a_json_400(daemon: DaemonProcess,
                                                        content_type: str) -> None:
    status, reply = daemon.request("POST", "/api/jobs", FORM_PART,
                                   {**AUTH, "Content-Type": content_type})
    assert status == 400 and reply["error"]["code"] == "invalid_input", reply
    assert "boundary" in reply["error"]["message"]
    healthy(daemon)


@pytest.mark.parametrize("content_type", [b"multipart/form-data; boundary=B",
                                          b"application/x-www-form-urlencoded"])
def test_twisted_web_never_reads_a_form_body_whole_on_the_reactor(
        monkeypatch: pytest.MonkeyPatch, content_type: bytes) -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure
    from twisted.web import http
    from twisted.web.resource import Resource

    from vfab.web.server import APISite

    def whole_body(*args: Any) -> None:
        raise AssertionError("twisted.web parsed the form body in memory")

    monkeypatch.setattr(http, "_getMultiPartArgs", whole_body)
    monkeypatch.setattr(http, "parse_qs", whole_body)
    seen: list[bytes] = []

    class Leaf(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            seen.append(request.content.read())
            return b"{}"

    channel = APISite(Leaf(), max_body_size=MAX_UPLOAD).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type
                         + b"\r\nContent-Length: %d\r\n\r\n" % len(FORM_PART) + FORM_PART)
    assert seen == [FORM_PART]
    assert transport.value().startswith(b"HTTP/1.1 200")
    channel.connectionLost(Failure(ConnectionDone()))


class RawWebSocket:
    """A WebSocket client on a bare socket that can stop reading, as a stalled browser would."""

    def __init__(self, port: int, path: str):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(WAIT)
        self.sock.connect(("127.0.0.1", port))
        nonce = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
                           f"X-API-Key: {KEY}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send_text(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        header = b"\x81" + (bytes([0x80 | len(payload)]) if len(payload) < 126
                            else b"\xfe" + struct.pack("!H", len(payload)))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def closed_by_server(self) -> bool:
        """Read everything the server sent; True once it has cut the connection."""
        self.sock.settimeout(WAIT)
        try:
            while self.sock.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        return True


def test_a_client_that_stops_reading_is_dropped_and_memory_stays_flat(
        daemon: DaemonProcess) -> None:
    headers = {**AUTH, "Content-Type": "image/svg+xml"}
    for number in range(30):  # queued jobs (no device): a big job_list snapshot
        assert daemon.request("POST", f"/api/jobs?name=filler-{number}", SVG, headers)[0] == 201
    rss = psutil.Process(daemon.process.pid)
    before = rss.memory_info().rss
    slow = RawWebSocket(daemon.port, "/ws")
    with ws(daemon, headers=AUTH) as reader:
        reader.send(json.dumps({"type": "SUBSCRIBE", "channels": ["all"]}))
        receive(reader, "job_list")
        # Each SUBSCRIBE makes the server send every snapshot again: the slow
        # client asks for far more than its buffers and the 1 MiB limit hold.
        subscribe = json.dumps({"type": "SUBSCRIBE", "channels": ["all"]})
        deadline = time.monotonic() + WAIT
        try:
            while "reads too slowly" not in daemon.log:
                assert time.monotonic() < deadline, "the slow client was never dropped"
                for _ in range(50):
                    slow.send_text(subscribe)
                daemon.request("POST", "/api/jobs?name=traffic", SVG, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # dropped while we were still writing
        daemon.wait_for_log("dropping WebSocket client 127.0.0.1: it reads too slowly")
        assert slow.closed_by_server()
        record = wait_for_audit(daemon, "slow_client_dropped")
        assert record["detail"]["backlog_bytes"] > record["detail"]["limit_bytes"]
        # The well-behaved client was not affected.
        reader.send(json.dumps({"type": "PING"}))
        assert receive(reader, "pong")["type"] == "pong"
    grown = rss.memory_info().rss - before
    assert grown < 40 * 1024 * 1024, f"the daemon grew by {grown / 2**20:.1f} MiB"
    healthy(daemon)


# -- 4. hostile input ---------------------------------------------------------------------

BILLION_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa">'
                  + b"".join(b'<!ENTITY %c "%s">' % (98 + i, (b"&%c;" % (97 + i)) * 10)
                             for i in range(9))
                  + b']><svg xmlns="http://www.w3.org/2000/svg"><text>&j;</text></svg>')
XXE = (b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       b'<svg xmlns="http://www.w3.org/2000/svg"><text>&x;</text></svg>')
DOCTYPE_PARAMETER = (b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY % p SYSTEM '
                     b'"http://127.0.0.1:1/evil.dtd"> %p;]><svg xmlns="http://www.w3.org/2000/svg"/>')
GZIP_BOMB = gzip.compress(b"<svg>" + b" " * (50 * 1024 * 1024) + b"</svg>", 9)
MANY_SEGMENTS = svg_body('<path d="M1 1' + "l.001 0" * 600_000 + '"/>')
NESTED = svg_body("<g>" * 5000 + '<path d="M1 1L2 2"/>' + "</g>" * 5000)

HOSTILE = [
    ("billion laughs", BILLION_LAUGHS, 400, "invalid_svg"),
    ("XXE", XXE, 400, "invalid_svg"),
    ("DOCTYPE parameter entity", DOCTYPE_PARAMETER, 400, "invalid_svg"),
    ("gzip bomb", GZIP_BOMB, 400, "invalid_svg"),
    ("gigantic coordinates", svg_body('<path d="M0 0L1e300 1e300"/>'), 400, "invalid_svg"),
    ("NaN", svg_body('<path d="M0 0L NaN 5"/>'), 400, "invalid_svg"),
    ("infinity", svg_body('<line x1="0" y1="0" x2="inf" y2="3"/>'), 400, "invalid_svg"),
    ("empty drawing", svg_body(""), 400, "invalid_svg"),
    ("empty body", b"", 400, "invalid_svg"),
    ("hidden root", svg_body('<path d="M1 1L9 9"/>', 'style="display: none"'), 400,
     "invalid_svg"),
    ("deep nesting", NESTED, 400, "invalid_svg"),
    ("millions of segments", MANY_SEGMENTS, 413, "too_large"),
    ("three million segments through <use>", svg_body(
        '<path id="p" d="M1 1' + "l.001 0" * 10_000 + '"/>' + '<use href="#p"/>' * 300),
     400, "invalid_svg"),
    ("not UTF-8", b'<svg xmlns="http://www.w3.org/2000/svg"><desc>\xff\xfe\xc3</desc></svg>',
     400, "invalid_svg"),
    ("truncated", SVG[:40], 400, "invalid_svg"),
    ("binary", os.urandom(2048), 400, "invalid_svg"),
    ("not svg", b"<html><body>hi</body></html>", 400, "invalid_svg"),
    ("outside the travel", svg_body('<path d="M0 0L1000 0"/>',
                                    'width="1000mm" height="50mm" viewBox="0 0 1000 50"'),
     422, "out_of_travel"),
]


@pytest.mark.parametrize("body, status, code", [case[1:] for case in HOSTILE],
                         ids=[case[0] for case in HOSTILE])
def test_hostile_uploads_get_a_clear_error_and_the_daemon_stays_healthy(
        daemon: DaemonProcess, body: bytes, status: int, code: str) -> None:
    before = len(os.listdir(daemon.workspace / "jobs"))
    got, reply = daemon.request("POST", "/api/jobs?name=hostile", body,
                                {**AUTH, "Content-Type": "image/svg+xml"})
    assert (got, reply["error"]["code"]) == (status, code), reply
    assert reply["error"]["message"]
    assert len(os.listdir(daemon.workspace / "jobs")) == before  # nothing stored
    healthy(daemon)


@pytest.mark.parametrize("name", ["../../../../tmp/evil", "/etc/passwd", "a/b\\c", "..", "%2e%2e"])
def test_names_with_path_separators_stay_names(daemon: DaemonProcess, name: str) -> None:
    outside = set(os.listdir(daemon.workspace.parent))
    status, job = daemon.request("POST", f"/api/jobs?name={quote(name)}", SVG,
                                 {**AUTH, "Content-Type": "image/svg+xml"})
    assert status == 201 and job["name"] == name
    # Stored drawings and plans are named by the daemon, never after the job.
    assert all(re.fullmatch(r"[0-9a-f]{12}\.(svg|plan)", f) for f in os.listdir(daemon.workspace / "jobs"))
    assert set(os.listdir(daemon.workspace.parent)) == outside
    assert not Path("/tmp/evil").exists()


@pytest.mark.parametrize("path", [f"/api/jobs?name=big&priority={10**30}",
                                  f"/api/jobs?name=big&priority=-{10**30}",
                                  f"/api/jobs?limit={10**23}"])
def test_numbers_too_big_for_the_database_are_400(daemon: DaemonProcess, path: str) -> None:
    method = "POST" if "priority" in path else "GET"
    status, reply = daemon.request(method, path, SVG if method == "POST" else None,
                                   {**AUTH, "Content-Type": "image/svg+xml"})
    assert status == 400 and reply["error"]["code"] == "invalid_input", reply
    assert " from " in reply["error"]["message"]
    healthy(daemon)


@pytest.mark.parametrize("name", ["bad\nname", "tab\tname", "nul\x00name", "bell\x07"])
def test_names_with_control_characters_are_400(daemon: DaemonProcess, name: str) -> None:
    status, reply = daemon.request("POST", f"/api/jobs?name={quote(name)}", SVG,
                                   {**AUTH, "Content-Type": "image/svg+xml"})
    assert status == 400 and reply["error"]["code"] == "invalid_input"


@pytest.mark.parametrize("job_id", ["..%2F..%2Fvfab.db", "..", "%00", "a%0Ab", "x" * 5000])
def test_hostile_job_ids_are_404(daemon: DaemonProcess, job_id: str) -> None:
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/cancel")):
        status, reply = daemon.request(method, f"/api/jobs/{job_id}{suffix}", headers=AUTH)
        assert status in (404, 405) and reply["error"]["code"] in ("not_found",
                                                                   "method_not_allowed")
    assert (daemon.workspace / "vfab.db").exists()
    healthy(daemon)


WS_HOSTILE = [
    ("{", "invalid_json"),
    ('{"type": "PING"', "invalid_json"),
    ("[" * 2000 + "]" * 2000, "invalid_json"),
    ('{"a":' * 600 + "1" + "}" * 600, "invalid_message"),
    ("1" * 4000, "invalid_message"),
    ("null", "invalid_message"),
    ('["PING"]', "invalid_message"),
    ('{"type": 7}', "invalid_message"),
    ('{"type": "EXPLODE"}', "unknown_type"),
    ('{"type": "SUBSCRIBE", "channels": {"x": 1}}', "invalid_message"),
    ('{"type": "SUBSCRIBE", "channels": ["../../etc"]}', "unknown_channel"),
    ('{"type": "PING", "unknown_field": [1, 2, 3]}', None),
    ('{"type": "COMMAND", "command": "rm -rf", "job_id": "x"}', None),
    ('{"type": "COMMAND", "command": "cancel", "job_id": "../vfab.db"}', None),
    ('{"type": "COMMAND", "command": "cancel", "job_id": ["x"]}', None),
    ('{"type": "AUTH", "api_key": {"$ne": 1}}', "invalid_message"),
    ('{"type": "AUTH", "api_key": null}', "invalid_message"),
]


def test_hostile_websocket_messages_get_errors_and_the_connection_stays(
        daemon: DaemonProcess) -> None:
    with ws(daemon, headers=AUTH) as client:
        for text, code in WS_HOSTILE:
            client.send(text)
            reply = receive(client)
            if code is None:
                assert reply["type"] in ("pong", "command_result")
                assert reply.get("ok") is not True
            else:
                assert reply["type"] == "error" and reply["error_code"] == code, (text, reply)
        client.send(b"\x00\xff binary")
        assert receive(client)["error_code"] == "binary_not_supported"
        client.send("\udcff".encode("utf-8", "surrogatepass"))  # not UTF-8 in a binary frame
        assert receive(client)["error_code"] == "binary_not_supported"
        client.send(json.dumps({"type": "PING"}))
        assert receive(client)["type"] == "pong"
    healthy(daemon)


def test_limit_unit_groups_ipv6_by_64() -> None:
    assert limit_unit("2001:db8::1") == limit_unit("2001:db8::ffff:1") == "2001:db8::/64"
    assert limit_unit("::ffff:10.1.2.3") == "10.1.2.3"
    assert limit_unit("10.1.2.3") == "10.1.2.3"
