"""Uploads go to disk a piece at a time, off the reactor, and become a job's drawing
by a rename, or go (issue 13: submission)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import tracemalloc
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.daemon_process import DaemonProcess, read_to_the_end
from vfab.config import ConfigError, DeviceConfig, config_from_dict
from vfab.geometry import SVGError, SVGLimits, load_svg
from vfab.geometry import svg as svg_module
from vfab.geometry.svg import MAX_COORDINATES, MAX_ELEMENTS
from vfab.events import EventBus
from vfab.jobs.errors import DiskFull
from vfab.jobs.files import DrawingFiles
from vfab.jobs.queue import QueueService
from vfab.plotter.service import DeviceService
from vfab.store.jobstore import JobStore
from vfab.web import multipart
from vfab.web.multipart import MultipartError, copy_form

from plotting_site import Site
from test_full_disk import small_disk  # noqa: F401 (a fixture)
from test_jobs_in_process import PAGE_FRAME

BOUNDARY = "vfab-test-boundary-1234"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}".encode()


def form(fields: list[tuple[str, bytes, str | None]], boundary: str = BOUNDARY) -> bytes:
    parts = []
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
                     + value + b"\r\n")
    return b"preamble\r\n" + b"".join(parts) + f"--{boundary}--\r\n".encode()


class ShortReads(io.BytesIO):
    """A body that hands out at most `most` bytes a read, as a socket or pipe may."""

    def __init__(self, data: bytes, most: int):
        super().__init__(data)
        self.most = most

    def read(self, size: int = -1) -> bytes:
        return super().read(self.most if size < 0 else min(size, self.most))


def read_form(body: bytes, content_type: bytes = CONTENT_TYPE, most: int = 1 << 30):
    out = io.BytesIO()
    fields, filename = copy_form(ShortReads(body, most), content_type, out)
    return out.getvalue(), fields, filename


# -- the multipart reader -----------------------------------------------------------------

#: Content that looks like the boundary in part, or whole but not after a line break.
_TRICKY = st.sampled_from([b"\r\n", b"\r\n--", b"--" + BOUNDARY.encode(), b"\r\n--vfab",
                           b"\r", b"-", b"x" * 50, b"\xff\x00"])


@settings(max_examples=200, deadline=None)
@given(content=st.lists(_TRICKY | st.binary(max_size=20), max_size=30).map(b"".join).filter(
           lambda content: b"\r\n--" + BOUNDARY.encode() not in content),  # (the delimiter)
       chunk=st.integers(1, 64))
def test_the_file_comes_out_exactly_whatever_the_pieces(content, chunk):
    body = form([("name", b" Flower ", None), ("file", content, "dir/flower.svg"),
                 ("priority", b"5", None)])
    svg, fields, filename = read_form(body, most=chunk)
    assert svg == content
    assert fields == {"name": "Flower", "priority": "5"}
    assert filename == "dir/flower.svg"


def test_the_first_of_each_field_counts_and_other_fields_are_dropped():
    body = form([("file", b"<svg/>", None), ("file", b"second", None),
                 ("name", b"one", None), ("name", b"two", None), ("other", b"x" * 100, None)])
    assert read_form(body) == (b"<svg/>", {"name": "one", "other": "x" * 100}, None)


def test_a_quoted_boundary_and_padding_after_it():
    body = form([("file", b"<svg/>", None)], boundary="a b").replace(b"--a b\r\n", b"--a b \r\n", 1)
    assert read_form(body, b'multipart/form-data; boundary="a b"')[0] == b"<svg/>"


@pytest.mark.parametrize("body, content_type, says", [
    (form([("name", b"x", None)]), CONTENT_TYPE, "no 'file' field"),
    (form([("file", b"<svg/>", None)])[:-10], CONTENT_TYPE, "ends before its closing boundary"),
    (b"", CONTENT_TYPE, "ends before its closing boundary"),
    (form([("file", b"<svg/>", None)]), b"multipart/form-data", "no valid boundary"),
    (form([("name", b"x" * (multipart.MAX_FIELD_SIZE + 1), None), ("file", b"<svg/>", None)]),
     CONTENT_TYPE, "larger than"),
    (form([("file", b"PHN2Zy8+", None)]).replace(
        b"\r\n\r\nPHN2", b"\r\nContent-Transfer-Encoding: base64\r\n\r\nPHN2"),
     CONTENT_TYPE, "Content-Transfer-Encoding"),
])
def test_a_form_that_cannot_be_read_says_why(body, content_type, says):
    with pytest.raises(MultipartError, match=says):
        read_form(body, content_type)


def test_a_big_form_is_never_held_in_memory(tmp_path):
    """A 32 MB file field passes through a buffer of about one piece."""
    content = os.urandom(1 << 20) * 32
    body_file = tmp_path / "body"
    body_file.write_bytes(form([("name", b"big", None), ("file", content, "big.svg")]))
    del content
    out_path = tmp_path / "out"
    with body_file.open("rb") as body, out_path.open("wb") as out:
        tracemalloc.start()
        try:
            copy_form(body, CONTENT_TYPE, out)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert out_path.stat().st_size == 32 << 20
    assert peak < 4 * multipart.CHUNK, peak


# -- spooling and adopting a drawing file -------------------------------------------------

def test_a_spooled_upload_is_complete_or_absent(tmp_path):
    files = DrawingFiles(tmp_path)
    path, answer = files.spool(lambda out: out.write(b"<svg/>"))
    assert path.read_bytes() == b"<svg/>" and answer == 6 and path.parent == tmp_path

    def broken(out):
        out.write(b"half a drawing")
        raise MultipartError("cut short")

    with pytest.raises(MultipartError):
        files.spool(broken)

    def no_space(out):
        out.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull, match="could not write the uploaded drawing"):
        files.spool(no_space)
    assert list(tmp_path.iterdir()) == [path]
    assert files.adopt("abc", path) == "abc.svg"
    assert [p.name for p in tmp_path.iterdir()] == ["abc.svg"]


def test_an_upload_becomes_the_jobs_drawing_or_goes(tmp_path):
    site = Site(tmp_path)
    files = site.life.queue.files
    upload, _ = files.spool(lambda out: out.write(PAGE_FRAME))
    job_id = site.submit(upload)
    assert not upload.exists()
    assert (files.directory / f"{job_id}.svg").read_bytes() == PAGE_FRAME

    refused, _ = files.spool(lambda out: out.write(b"<svg xmlns='http://www.w3.org/2000/svg'>"))
    with pytest.raises(Exception, match="well-formed"):
        site.submit(refused)
    assert sorted(p.name for p in files.directory.iterdir()) == [f"{job_id}.plan",
                                                                 f"{job_id}.svg"]


def test_uploads_a_crash_left_behind_are_removed_at_start(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / ".upload-0123456789abcdef.partial").write_bytes(b"<svg")
    (jobs / ".0123456789ab.plan.0a1b2c3d.partial").write_bytes(b"VFABPLAN")  # a killed child's
    (jobs / "kept.svg").write_bytes(b"<svg/>")
    Site(tmp_path)
    assert [p.name for p in jobs.iterdir()] == ["kept.svg"]


@pytest_twisted.inlineCallbacks
def test_an_upload_is_written_in_a_thread_and_a_full_disk_is_told_on_the_reactor(tmp_path):
    from twisted.internet import reactor

    store = JobStore(tmp_path / "vfab.db", reactor=reactor)
    store.open()
    full: list[tuple[str, str]] = []

    class Disk:
        def noticed_full(self, what):
            full.append((what, threading.current_thread().name))

        def release_reserve(self, purpose):
            return False

    bus, settings = EventBus(), DeviceConfig(type="none")
    device = DeviceService(settings, bus, reactor, record_dir=tmp_path / "simulator")
    queue = QueueService(store=store, devices=[device], bus=bus,
                         jobs_dir=tmp_path / "jobs", reactor=reactor, disk=Disk())
    queue.startService()
    try:
        threads = []

        def fill(out):
            threads.append(threading.current_thread())
            out.write(b"<svg/>")
            return "filled"

        path, answer = yield queue.receive(fill)
        assert answer == "filled" and path.read_bytes() == b"<svg/>"
        assert threads[0] is not threading.main_thread()

        def no_space(out):
            raise OSError(errno.ENOSPC, "No space left on device")

        with pytest.raises(DiskFull):
            yield queue.receive(no_space)
        assert full == [("the uploaded drawing", threading.main_thread().name)]
        assert [p.name for p in (tmp_path / "jobs").iterdir()] == [path.name]
    finally:
        yield queue.stopService()
        store.close()


# -- through the daemon -------------------------------------------------------------------

def post_form(daemon: DaemonProcess, body: bytes) -> tuple[int, dict]:
    return daemon.request("POST", "/api/jobs", body, {"Content-Type": CONTENT_TYPE.decode()})


def test_a_multipart_upload_through_the_daemon(tmp_path):
    daemon = DaemonProcess(tmp_path).start()
    try:
        status, job = post_form(daemon, form([("name", b"Frame", None),
                                              ("file", PAGE_FRAME, "frame.svg")]))
        assert status == 201 and job["name"] == "Frame"
        jobs = daemon.workspace / "jobs"
        assert (jobs / f"{job['id']}.svg").read_bytes() == PAGE_FRAME
        status, error = post_form(daemon, form([("file", b"<svg", "bad.svg")]))
        assert status == 400 and error["error"]["code"] == "invalid_svg"
        status, error = post_form(daemon, form([("file", b"<svg/>", None)])[:-8])
        assert status == 400 and "closing boundary" in error["error"]["message"]
        assert sorted(p.name for p in jobs.iterdir()) == [f"{job['id']}.plan",
                                                          f"{job['id']}.svg"]
    finally:
        assert daemon.stop() == 0


def test_a_declared_length_over_the_limit_is_413_before_the_body(tmp_path):
    daemon = DaemonProcess(tmp_path, {"uploads": {"max_size": "1KB"}}).start()
    try:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as client:
            client.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: image/svg+xml\r\nContent-Length: 1000000000\r\n\r\n"
                           + b" " * 5000)
            answer = b""
            while b"}}" not in answer:
                piece = client.recv(4096)
                assert piece, answer
                answer += piece
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ")
        error = json.loads(body)["error"]
        assert error["code"] == "too_large" and "1024 bytes (uploads.max_size)" in error["message"]
        status, job = daemon.submit(PAGE_FRAME)
        assert status == 201
    finally:
        assert daemon.stop() == 0


# -- the limits ------------------------------------------------------------------------

def test_the_limits_are_configuration_keys_and_the_old_name_still_works():
    config = config_from_dict({"uploads": {"max_size": "2MB", "max_elements": 10,
                                           "max_coordinates": 20}})
    assert (config.uploads.max_size, config.uploads.max_elements,
            config.uploads.max_coordinates) == (2 << 20, 10, 20)
    assert config_from_dict({"websocket": {"max_upload_size": 100}}).uploads.max_size == 100
    defaults = config_from_dict({}).uploads
    assert (defaults.max_size, defaults.max_elements, defaults.max_coordinates) == (
        50 << 20, MAX_ELEMENTS, MAX_COORDINATES)


@pytest.mark.parametrize("data, says", [
    ({"uploads": {"max_coordinate": 5}}, "uploads.max_coordinate: unknown key "
                                         "(did you mean 'max_coordinates'?)"),
    ({"upload": {}}, "upload: unknown key (did you mean 'uploads'?)"),
    ({"uploads": {"max_elements": 0}}, "uploads.max_elements: expected an integer >= 1, got 0"),
    ({"uploads": {"max_size": "lots"}}, "uploads.max_size: expected a size such as '10MB'"),
    ({"websocket": {"max_upload_size": 1}, "uploads": {"max_size": 2}},
     "websocket.max_upload_size: the old name of uploads.max_size"),
])
def test_a_bad_limit_names_its_key(data, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        config_from_dict(data)


def polylines(count: int, segments: int = 10) -> bytes:
    """`count` polylines of `segments` segments each, on an A4 page."""
    line = " ".join(f"{10 + i % 180},{10 + (i * 7) % 250}" for i in range(segments + 1))
    return (b'<svg xmlns="http://www.w3.org/2000/svg" width="200mm" height="280mm" '
            b'viewBox="0 0 200 280">' + f'<polyline points="{line}"/>'.encode() * count
            + b"</svg>")


def test_a_drawing_of_a_million_segments_is_within_the_default_limits():
    """Counted only: reading it would take a minute (benchmarks/bench_submit.py)."""
    root = svg_module._parse_safely(polylines(100_000).decode(), SVGLimits())
    svg_module._check_expansion(root, SVGLimits())


@pytest.mark.parametrize("limits, says", [
    (SVGLimits(max_elements=1000), "more than 1,000 elements (counting <use> copies; "
                                   "uploads.max_elements)"),
    (SVGLimits(max_coordinates=5000), "more than 5,000 coordinates"),
])
def test_the_count_stops_at_the_limit(limits, says, monkeypatch):
    """The parse ends where the limit is passed, not at the end of the file."""
    counted: list[int] = []
    real_count = svg_module._count_numbers

    def count(element, limit):
        counted.append(1)
        return real_count(element, limit)

    monkeypatch.setattr(svg_module, "_count_numbers", count)
    with pytest.raises(SVGError, match=re.escape(says)):
        load_svg(polylines(100_000), limits=limits)
    assert len(counted) < 2000


def test_the_queue_reads_with_the_configured_limits(tmp_path):
    site = Site(tmp_path)
    site.life.queue._limits = SVGLimits(max_elements=3)
    with pytest.raises(SVGError, match="more than 3 elements"):
        site.submit(polylines(3))
    site.submit(polylines(2))


# -- uploads at once, and the disk's room for them ---------------------------------------

def upload_channel(clock, **site_options):
    """One connection to an APISite whose resource answers every body at once."""
    from test_refused_bodies import Bodies, HalfClosingTransport
    from vfab.web.server import APISite

    site = site_options.pop("site", None) or APISite(Bodies(), max_body_size=1 << 30,
                                                     **site_options)
    channel = site.buildProtocol(None)
    channel.callLater = clock.callLater
    transport = HalfClosingTransport()
    channel.makeConnection(transport)
    return site, channel, transport


def upload_head(length: int | None, key: str | None = None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    key_line = b"X-API-Key: %s\r\n" % key.encode() if key else b""
    return (b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/svg+xml\r\n"
            + key_line + framing + b"\r\n\r\n")


def test_more_uploads_at_once_than_the_cap_is_503_with_retry_after_before_the_body():
    """Each upload holds about twice its size on disk while it is read (twisted.web's
    spool, then the drawing); parallel uploads were not bounded."""
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from test_refused_bodies import answers
    from vfab.web.server import UPLOAD_RETRY_SECONDS

    clock = Clock()
    site, first, _ = upload_channel(clock, max_uploads=2)
    _, second, _ = upload_channel(clock, site=site)
    first.dataReceived(upload_head(100_000) + b" " * 1000)
    second.dataReceived(upload_head(None) + b"3e8\r\n" + b" " * 1000 + b"\r\n")
    assert len(site.uploads) == 2
    _, third, transport = upload_channel(clock, site=site)
    third.dataReceived(upload_head(100_000) + b" " * 1000)
    [(status, body)] = answers(transport)
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert body["error"]["code"] == "too_many_uploads"
    assert "uploads.max_concurrent" in body["error"]["message"]
    assert b"Retry-After: %d\r\n" % UPLOAD_RETRY_SECONDS in transport.value()
    assert len(site.uploads) == 2 and transport.write_closed
    third.connectionLost(Failure(ConnectionDone()))

    first.connectionLost(Failure(ConnectionDone()))  # a client gave up: its place is free
    _, fourth, transport = upload_channel(clock, site=site)
    fourth.dataReceived(upload_head(4) + b"<svg")
    assert [status for status, _ in answers(transport)] == [b"HTTP/1.1 200 OK"]
    assert len(site.uploads) == 1  # answered: only the chunked one is left
    for channel in (second, fourth):
        channel.connectionLost(Failure(ConnectionDone()))
    assert site.uploads == {}


def test_a_request_without_a_body_is_no_upload():
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from test_refused_bodies import answers

    clock = Clock()
    site, channel, transport = upload_channel(clock, max_uploads=1)
    site.uploads[object()] = 0  # the one place is taken
    channel.dataReceived(b"POST /api/jobs/x/cancel HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [status for status, _ in answers(transport)] == [b"HTTP/1.1 200 OK"] * 2
    channel.connectionLost(Failure(ConnectionDone()))


def test_with_a_key_required_a_body_without_it_is_401_before_it_is_read():
    """Else clients without the key could take every upload's place (and fill the
    temporary directory with bodies they send for nothing)."""
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from test_refused_bodies import answers
    from vfab.web.auth import APIKeyCheck

    clock = Clock()
    auth = APIKeyCheck("k3y", True, clock)
    site, channel, transport = upload_channel(clock, max_uploads=1, auth=auth)
    channel.dataReceived(upload_head(100_000) + b" " * 1000)
    [(status, body)] = answers(transport)
    assert status == b"HTTP/1.1 401 Unauthorized" and body["error"]["code"] == "unauthorized"
    assert b'WWW-Authenticate: Bearer realm="vfab"' in transport.value()
    assert site.uploads == {}
    _, channel, transport = upload_channel(clock, site=site)
    channel.dataReceived(upload_head(100_000, key="wrong"))
    assert answers(transport)[0][1]["error"]["message"] == "the API key is wrong"
    _, keyed, transport = upload_channel(clock, site=site)
    keyed.dataReceived(upload_head(4, key="k3y") + b"<svg")
    assert [status for status, _ in answers(transport)] == [b"HTTP/1.1 200 OK"]
    for each in (channel, keyed):
        each.connectionLost(Failure(ConnectionDone()))


class FreeBytes:
    def __init__(self, free: int):
        self.free = free

    def __call__(self) -> int:
        return self.free


def test_an_upload_whose_declared_size_would_take_the_reserve_is_507_at_once(tmp_path):
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from test_refused_bodies import answers
    from vfab.disk import DiskSpace

    clock = Clock()
    disk = DiskSpace(tmp_path, EventBus(), clock, free_bytes=FreeBytes(10 << 20),
                     min_free=1 << 20, temp_dir=tmp_path)  # spool and drawing: one disk
    site, channel, transport = upload_channel(clock, room=disk.room_for_upload)
    channel.dataReceived(upload_head(5 << 20))  # twice 5 MiB > 10 MiB free - 1 MiB kept
    [(status, body)] = answers(transport)
    assert status == b"HTTP/1.1 507 Insufficient Storage"
    assert body["error"]["code"] == "insufficient_storage"
    assert body["error"]["message"] == (
        f"an upload of 5.0 MiB needs 10.0 MiB on the disk of {tmp_path}, which has "
        f"10.0 MiB free, and 1.0 MiB are kept for the daemon's own writes")
    assert site.uploads == {}

    _, fits, transport = upload_channel(clock, site=site)
    fits.dataReceived(upload_head(3 << 20) + b" " * 1024)  # 6 MiB of the 9 MiB
    assert transport.value() == b"" and len(site.uploads) == 1
    _, after, transport = upload_channel(clock, site=site)
    after.dataReceived(upload_head(2 << 20))  # fits alone, not with the one under way
    [(status, body)] = answers(transport)
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert body["error"]["code"] == "too_many_uploads"
    assert "the uploads under way will take the room" in body["error"]["message"]
    for each in (channel, fits, after):
        each.connectionLost(Failure(ConnectionDone()))


def test_the_upload_cap_is_a_configuration_key():
    assert config_from_dict({}).uploads.max_concurrent == 4
    assert config_from_dict({"uploads": {"max_concurrent": 1}}).uploads.max_concurrent == 1
    with pytest.raises(ConfigError, match=re.escape("uploads.max_concurrent: expected an "
                                                    "integer")):
        config_from_dict({"uploads": {"max_concurrent": 0}})


def test_the_daemon_caps_uploads_at_once(tmp_path):
    daemon = DaemonProcess(tmp_path, {"uploads": {"max_concurrent": 2}}).start()
    held = []
    try:
        for _ in range(2):  # two slow uploads under way
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            sock.sendall(upload_head(1 << 20) + b" " * 1000)
            held.append(sock)
        request = urllib.request.Request(daemon.url + "/api/jobs", data=PAGE_FRAME,
                                         method="POST",
                                         headers={"Content-Type": "image/svg+xml"})
        deadline = time.monotonic() + 10
        while True:  # the two are admitted once the daemon has read their headers
            status, error = daemon.request("POST", "/api/jobs", PAGE_FRAME,
                                           {"Content-Type": "image/svg+xml"})
            if status == 503 or time.monotonic() > deadline:
                break
        assert status == 503 and error["error"]["code"] == "too_many_uploads", error
        try:
            urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as refused:
            assert refused.headers["Retry-After"] == "10"
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            status, job = daemon.submit(PAGE_FRAME)
            if status == 201 or time.monotonic() > deadline:
                break
        assert status == 201, job
    finally:
        for sock in held:
            sock.close()
        assert daemon.stop() == 0


def test_the_daemon_refuses_at_once_an_upload_its_disk_cannot_take(small_disk):
    """A declared size that would leave less than the daemon keeps for its own
    writes: 507 before a byte is read (it was read, spooled and copied until the
    disk was full)."""
    daemon = DaemonProcess(small_disk / "site").start()
    try:
        free = shutil.disk_usage(small_disk).free
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/svg+xml\r\n"
                     b"Content-Length: %d\r\n\r\n" % (free - (512 << 10)))
        answer = read_to_the_end(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 507 Insufficient Storage\r\n"), answer[:200]
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "insufficient_storage"
        assert "kept for the daemon's own writes" in error["message"]
        assert daemon.submit(PAGE_FRAME)[0] == 201
    finally:
        assert daemon.stop() == 0


def test_a_chunked_upload_is_507_as_soon_as_its_copy_would_take_the_reserve(tmp_path):
    """A body of no declared size cannot be checked on its headers: it was spooled
    until the disk was full (taking the room kept for the daemon's own writes),
    and the spool kept that room for the 30 s the connection lingers. It is now
    checked as it streams, and its spool is given back with the 507."""
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from test_refused_bodies import answers
    from vfab.disk import DiskSpace

    clock = Clock()
    free = FreeBytes(3 << 20)
    disk = DiskSpace(tmp_path, EventBus(), clock, free_bytes=free, min_free=1 << 20,
                     temp_dir=tmp_path)  # spool and drawing: one disk
    site, channel, transport = upload_channel(clock, room=disk.room_for_upload)
    channel.dataReceived(upload_head(None))
    [request] = site.uploads
    piece = 64 << 10
    for _ in range(16):  # 1 MiB spooled: its copy leaves exactly the 1 MiB kept
        channel.dataReceived(b"%x\r\n" % piece + b" " * piece + b"\r\n")
        free.free -= piece  # what the spool took
    assert transport.value() == b""
    spool = request.content
    channel.dataReceived(b"%x\r\n" % piece + b" " * piece + b"\r\n")
    [(status, body)] = answers(transport)
    assert status == b"HTTP/1.1 507 Insufficient Storage"
    assert body["error"]["code"] == "insufficient_storage"
    assert body["error"]["message"] == (
        f"an upload of no declared size has passed 1.1 MiB, and copying it to the drawing "
        f"would leave less than 1.0 MiB free on the disk of {tmp_path} (2.0 MiB free), "
        f"which is kept for the daemon's own writes")
    assert spool.closed and site.uploads == {} and transport.write_closed
    channel.dataReceived(b"%x\r\n" % piece + b" " * piece + b"\r\n0\r\n\r\n")  # dropped
    assert len(answers(transport)) == 1
    channel.connectionLost(Failure(ConnectionDone()))


def test_the_daemon_refuses_a_chunked_upload_before_it_takes_the_reserve(small_disk):
    """On a 3 MB disk that holds the workspace and the temporary directory: the
    upload is refused with the reserve untouched, and leaves no byte behind."""
    temp = small_disk / "tmp"
    temp.mkdir()
    daemon = DaemonProcess(small_disk / "site", env={**os.environ, "TMPDIR": str(temp)}).start()
    try:
        free = shutil.disk_usage(small_disk).free
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/svg+xml\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        piece = 64 << 10
        try:
            for _ in range(2 * free // piece):
                sock.sendall(b"%x\r\n" % piece + b" " * piece + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon had answered and stopped reading
        answer = read_to_the_end(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 507 Insufficient Storage\r\n"), answer[:300]
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert "kept for the daemon's own writes" in error["message"], error
        assert list(temp.iterdir()) == []
        assert shutil.disk_usage(small_disk).free >= free - (64 << 10)
        assert daemon.request("GET", "/health")[1]["status"] == "healthy"
        assert daemon.submit(PAGE_FRAME)[0] == 201
    finally:
        assert daemon.stop() == 0
    assert "disk is full" not in daemon.log
