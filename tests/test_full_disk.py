"""A full disk: every write fails cleanly, deleting still frees space, and health
and `system_alert` say so until space is back (issue 14.4).

The tests that need a real full disk mount a small tmpfs (root only); they are
skipped, with the reason, where that is not allowed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from websockets.sync.client import connect
from twisted.internet import reactor
from twisted.internet.testing import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.daemon_process import DaemonProcess, wait_until
from vfab.audit import AuditLog
from vfab.disk import CHECK_SECONDS, RESERVE_FILE, DiskSpace
from vfab.events import EventBus
from vfab.jobs.errors import DiskFull
from vfab.logs import LineObserver
from vfab.simulator.recording import Recording
from vfab.store.jobstore import JobStore
from tests.test_jobstore import make_job
from plotting_site import Site
from test_jobs_in_process import PAGE_FRAME
from twisted.internet.defer import fail
from vfab.jobs import states
from vfab.jobs.runner import RunnerState

SQUARE = (b'<svg xmlns="http://www.w3.org/2000/svg" width="40mm" height="40mm" '
          b'viewBox="0 0 40 40"><path d="M5 5 H35 V35 H5 Z"/></svg>')


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs of its own, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk`; returns the file to remove to give them back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"x" * size)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


# -- the disk watch ------------------------------------------------------------------

class Free:
    def __init__(self, free: int):
        self.free = free

    def __call__(self) -> int:
        return self.free


def watch(tmp_path, free: Free):
    bus, alerts, clock = EventBus(), [], Clock()
    bus.subscribe(lambda channel, message: alerts.append((channel, message)))
    disk = DiskSpace(tmp_path, bus, clock, free_bytes=free, min_free=1000, reserve=100)
    disk.start()
    return disk, alerts, clock


def test_a_full_disk_is_alerted_once_and_clears_by_itself(tmp_path):
    free = Free(10_000)
    disk, alerts, clock = watch(tmp_path, free)
    assert disk.full is None and alerts == []
    disk.noticed_full("the drawing of job x")
    disk.noticed_full("the job database")
    assert "the drawing of job x" in disk.full
    assert [(channel, message["type"], message["severity"], message["title"])
            for channel, message in alerts] == [("system", "system_alert", "error", "Disk full")]
    free.free = 10
    clock.advance(CHECK_SECONDS)
    assert disk.full is not None and len(alerts) == 1
    free.free = 10_000
    clock.advance(CHECK_SECONDS)
    assert disk.full is None
    assert [message["title"] for _, message in alerts] == ["Disk full", "Disk space back"]
    disk.stop()


def test_little_free_space_counts_as_full_without_a_failed_write(tmp_path):
    disk, alerts, clock = watch(tmp_path, Free(10))
    assert "KiB free" in disk.full and alerts[0][1]["title"] == "Disk full"
    disk.stop()


def test_the_reserve_is_kept_while_there_is_room_and_released_once(tmp_path):
    free = Free(10_000)
    disk, _, clock = watch(tmp_path, free)
    assert (tmp_path / RESERVE_FILE).stat().st_size == 100
    assert disk.release_reserve("delete job x") is True
    assert disk.release_reserve("delete job y") is False
    free.free = 10
    clock.advance(CHECK_SECONDS)
    assert not (tmp_path / RESERVE_FILE).exists()  # not taken back from a full disk
    free.free = 10_000
    clock.advance(CHECK_SECONDS)
    assert (tmp_path / RESERVE_FILE).exists()
    disk.stop()


# -- the log ---------------------------------------------------------------------------

class FullThenRoom:
    """A stream on a disk that is full for the first `full` writes."""

    def __init__(self, full: int):
        self.full = full
        self.written: list[str] = []

    def write(self, text: str) -> None:
        if self.full:
            self.full -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written.append(text)

    def flush(self) -> None:
        pass


def test_the_log_goes_on_after_a_full_disk_and_says_what_was_lost():
    stream = FullThenRoom(full=2)
    observer = LineObserver(stream, "%(levelname)s %(message)s")
    for number in range(3):
        observer({"log_format": f"line {number}", "log_level": None})
    assert not observer.broken
    assert stream.written == ["(2 log line(s) were lost while the disk was full)\n"
                              "INFO line 2\n"]


def test_while_the_disk_is_full_the_log_file_keeps_only_warnings_and_worse():
    """Every request's access line would take the room a full disk keeps for
    the daemon's progress (measured: 12 KiB for 148 requests)."""
    stream, full = FullThenRoom(full=0), [True]
    observer = LineObserver(stream, "%(levelname)s %(message)s")
    observer.spare_while(lambda: full[0])
    observer({"log_format": "GET /health 200", "log_level": LogLevel.info})
    observer({"log_format": "debug", "log_level": LogLevel.debug})
    observer({"log_format": "progress not saved", "log_level": LogLevel.error})
    full[0] = False
    observer({"log_format": "GET /health 200", "log_level": LogLevel.info})
    assert stream.written == [
        "(2 log line(s) below warning were not written while the disk was full)\n"
        "ERROR progress not saved\n",
        "INFO GET /health 200\n"]


def test_a_security_event_on_a_full_disk_fails_nothing_and_is_counted_later():
    stream = FullThenRoom(full=1)
    audit = AuditLog(stream, clock=Clock())
    audit.record("auth_failed", "127.0.0.1")  # would have been a 500 for the client
    audit.record("auth_failed", "127.0.0.2")
    lost, record = (json.loads(line) for line in stream.written[0].splitlines())
    assert lost["event"] == "records_lost" and lost["detail"]["count"] == 1
    assert record["client"] == "127.0.0.2"


# -- the files on a real full disk -------------------------------------------------------

def test_the_virtual_plotter_leaves_no_half_record_on_a_full_disk(small_disk):
    recording = Recording()
    recording.pen_changed(up=False)
    recording.moved([(float(x % 100), float(x // 100)) for x in range(20000)])
    fill(small_disk)
    with pytest.raises(OSError):
        recording.write(small_disk / "simulator")
    assert [path.name for path in (small_disk / "simulator").iterdir()
            if path.name.endswith(".part")] == []


@pytest_twisted.inlineCallbacks
def test_the_store_names_a_full_disk(small_disk):
    told = []
    store = JobStore(small_disk / "vfab.db", reactor=reactor, on_disk_full=told.append)
    store.open()
    try:
        yield store.add(make_job("before"))
        fill(small_disk)
        with pytest.raises(DiskFull):
            for number in range(100):  # past what the last free pages hold
                yield store.add(make_job(f"job{number}"))
        assert told and told[0] == "the job database"
    finally:
        store.close()


def leave_free(filler: Path, room: int) -> None:
    """Give `room` bytes of a filled disk back (as releasing the reserve does)."""
    os.truncate(filler, filler.stat().st_size - room)


@pytest_twisted.inlineCallbacks
def test_progress_saves_on_a_full_disk_use_a_bounded_room(small_disk):
    """The room a full disk still has (the 256 KiB reserve, given back) lasted 64
    progress saves, about 2 minutes at the default 2 s: the write-ahead log grew
    by a page a save, up to SQLite's 1000-page checkpoint (4 MB). Saves now fit in
    a log of a few pages, written over again: a plot's hour of saves goes
    through, and the job's end can still be recorded after it."""
    store = JobStore(small_disk / "vfab.db", reactor=reactor)
    store.open()
    try:
        yield store.add(make_job("plotting"))
        yield store.transition("plotting", states.PLOTTING, "started")
        leave_free(fill(small_disk), 256 << 10)
        free = shutil.disk_usage(small_disk).free
        for number in range(1800):  # an hour of saves, 2 s apart
            yield store.save_progress("plotting", number / 1800, {"x": number, "y": number})
        used = free - shutil.disk_usage(small_disk).free
        assert used <= 160 << 10, used
        yield store.transition("plotting", states.COMPLETED, "done")
        assert (yield store.get("plotting")).progress == 1799 / 1800
    finally:
        store.close()


def test_a_plan_that_does_not_fit_is_disk_full_and_leaves_nothing(small_disk):
    """Issue 13: the plan is written by the submission's child; on a full disk it is
    DiskFull (507) and no half-written plan stays."""
    from vfab.config import DeviceConfig
    from vfab.jobs.prepare import write_plan

    strokes = "".join(f'<path d="M{x} 5 L{x + 0.5} 35 L{x + 0.7} 5"/>' for x in range(5, 300))
    svg = (b'<svg xmlns="http://www.w3.org/2000/svg" width="300mm" height="200mm" '
           b'viewBox="0 0 300 200">' + strokes.encode() + b'</svg>')
    filler = fill(small_disk)
    with pytest.raises(DiskFull, match="the plan"):
        write_plan(svg, DeviceConfig(), small_disk / "job.plan")
    assert sorted(path.name for path in small_disk.iterdir()) == ["filler"]
    filler.unlink()
    figures = write_plan(svg, DeviceConfig(), small_disk / "job.plan")
    assert figures["paths"] == 295 and (small_disk / "job.plan").exists()


def test_a_submission_whose_plan_meets_a_full_disk_leaves_no_file(tmp_path, monkeypatch):
    from vfab.motion import planfile

    def full(self, **fields):
        raise OSError(errno.ENOSPC, "No space left on device")

    site = Site(tmp_path)
    monkeypatch.setattr(planfile.PlanWriter, "finish", full)
    submitting = site.life.queue.submit("job", SQUARE)
    failures = []
    submitting.addErrback(failures.append)
    assert failures and failures[0].check(DiskFull)
    assert "the plan" in str(failures[0].value)
    assert list(site.jobs_dir.iterdir()) == []
    monkeypatch.undo()
    job_id = site.submit(SQUARE)
    assert sorted(path.name for path in site.jobs_dir.iterdir()) == [f"{job_id}.plan",
                                                                     f"{job_id}.svg"]
    site.stop()


def test_the_daemon_on_a_full_disk(small_disk):
    daemon = DaemonProcess(small_disk / "site", {
        "device": {"type": "simulator", "simulator_speed": 20}}).start()
    try:
        status, done = daemon.submit(SQUARE, "done")
        daemon.wait_for_job(done["id"], {"completed"})
        assert (daemon.workspace / RESERVE_FILE).exists()
        ws = connect(daemon.ws_url, open_timeout=10, close_timeout=10)
        ws.send(json.dumps({"type": "SUBSCRIBE", "channels": ["system"]}))
        assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"
        filler = fill(small_disk)

        status, body = daemon.submit(SQUARE, "on a full disk")
        assert status == 507 and body["error"]["code"] == "insufficient_storage"
        form = (b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + SQUARE
                + b"\r\n--b--\r\n")
        status, body = daemon.request("POST", "/api/jobs", form,
                                      {"Content-Type": "multipart/form-data; boundary=b"})
        assert status == 507 and body["error"]["code"] == "insufficient_storage"
        jobs = daemon.workspace / "jobs"
        assert sorted(path.name for path in jobs.iterdir()) == [f"{done['id']}.plan",
                                                                f"{done['id']}.svg"]
        health = wait_until(lambda: (lambda h: h if h["status"] != "healthy" else None)(
            daemon.request("GET", "/health")[1]), what="health to say the disk is full")
        assert health["status"] == "degraded" and health["disk"] == "full"
        assert "full" in health["reason"]

        status, _ = daemon.request("DELETE", f"/api/jobs/{done['id']}")
        assert status == 204
        assert daemon.request("GET", f"/api/jobs/{done['id']}")[0] == 404
        assert not (jobs / f"{done['id']}.svg").exists()
        assert not (jobs / f"{done['id']}.plan").exists()

        filler.unlink()
        wait_until(lambda: daemon.request("GET", "/health")[1]["status"] == "healthy",
                   what="health to clear once space is back")
        alerts = []
        while len(alerts) < 2:
            message = json.loads(ws.recv(timeout=30))
            if message["type"] == "system_alert":
                alerts.append((message["severity"], message["title"]))
        assert alerts == [("error", "Disk full"), ("info", "Disk space back")]
        ws.close()
        status, again = daemon.submit(SQUARE, "after")
        assert status == 201
        daemon.wait_for_job(again["id"], {"completed"})
        assert daemon.request("GET", "/api/device")[1]["status"] == "idle"
    finally:
        assert daemon.stop() == 0
    assert "Unhandled error in Deferred" not in daemon.log
    assert "released the 256 KiB reserve" in daemon.log and "disk space is back" in daemon.log


# -- the end of a plot on a full disk -----------------------------------------------------

def test_a_plot_that_ends_on_a_full_disk_is_recorded_once_space_is_back(tmp_path):
    site = Site(tmp_path)
    store = site.life.store
    real, full = store.transition, [True]

    def transition(job_id, to_state, reason, **fields):
        if full[0] and to_state == states.COMPLETED:
            return fail(DiskFull("the job database"))
        return real(job_id, to_state, reason, **fields)

    store.transition = transition
    job_id = site.submit(PAGE_FRAME)
    site.wait_for(lambda: site.life.queue.scheduler.state.value == "ending", limit=600)
    site.advance(60)
    assert site.state(job_id) == states.PLOTTING  # still waiting for room
    full[0] = False
    site.advance(10)
    assert site.state(job_id) == states.COMPLETED


def test_progress_that_cannot_be_saved_for_space_is_said_once_and_the_plot_goes_on(tmp_path):
    site = Site(tmp_path)
    store = site.life.store
    store.save_progress = lambda *args, **kwargs: fail(DiskFull("the job database"))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        job_id = site.submit(PAGE_FRAME)
        site.wait_for(lambda: site.state(job_id) == states.COMPLETED, limit=600)
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [formatEvent(event) for event in events
            if "save the progress" in str(event.get("log_format", ""))]
    assert len(said) == 1 and job_id in said[0]  # once, not at every move
    assert "the disk is full" in said[0]
    assert not [event for event in events if event.get("log_failure")]  # one line


def test_a_submission_the_database_cannot_hold_leaves_no_drawing(tmp_path):
    site = Site(tmp_path)
    store = site.life.store
    real_transaction = store._pool.runInteraction
    error = sqlite3.OperationalError("database or disk is full")  # SQLite's own answer
    error.sqlite_errorcode = sqlite3.SQLITE_FULL
    store._pool.runInteraction = lambda interaction, *args: (
        fail(error) if interaction.__name__ == "insert" else real_transaction(interaction, *args))
    with pytest.raises(DiskFull):
        site.submit(PAGE_FRAME)
    assert list(site.life.queue.files.directory.glob("*")) == []


def lines_svg(count: int) -> bytes:
    """A drawing of `count` long strokes: minutes of plotting at the real speed."""
    paths = "".join(f'<path d="M10 {10 + 2 * n} H200"/>' for n in range(count))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="220mm" height="200mm" '
            f'viewBox="0 0 220 200">{paths}</svg>').encode()


def test_a_plot_on_a_full_disk_takes_a_bounded_room_and_its_end_is_recorded(small_disk):
    """The daemon plots on with 256 KiB left, saving its progress 10 times a
    second (the room went in 64 saves) and answering a monitor's requests (their
    log lines took room too): what it writes stays within the WAL's few pages,
    the log file keeps still, and the cancel is recorded."""
    daemon = DaemonProcess(small_disk / "site", {
        "device": {"type": "simulator", "progress_save_interval": 0.1}}).start()
    try:
        _, plotting = daemon.submit(lines_svg(80), "plotting")
        daemon.wait_for_job(plotting["id"], {"plotting"})
        filler = fill(small_disk)
        leave_free(filler, 256 << 10)
        wait_until(lambda: daemon.request("GET", "/health")[1].get("disk") == "full",
                   what="health to say the disk is full")
        log = daemon.workspace / "logs" / "vfab.log"
        free, log_size = shutil.disk_usage(small_disk).free, log.stat().st_size
        started = time.monotonic()
        while time.monotonic() - started < 12:  # 120 saves; a monitor's requests
            assert daemon.request("GET", "/health")[0] == 200
            time.sleep(0.1)  # the monitor's pace
        used = free - shutil.disk_usage(small_disk).free
        assert used <= 160 << 10, used
        assert log.stat().st_size == log_size
        status, job = daemon.request("POST", f"/api/jobs/{plotting['id']}/cancel")
        assert (status, job["state"]) == (200, "cancelled"), job
        filler.unlink()
        wait_until(lambda: "below warning were not written" in log.read_text(),
                   what="the log to say what it left out")
    finally:
        assert daemon.stop() == 0
    assert "Unhandled error in Deferred" not in daemon.log


def test_cancel_works_on_a_full_disk_so_that_delete_can_free_space(small_disk):
    """Every job unfinished and the disk full: DELETE is 409 (finished jobs only),
    so cancel must still go through, for a queued job and for the plotting one."""
    daemon = DaemonProcess(small_disk / "site", {"device": {"type": "simulator"}}).start()
    try:
        _, plotting = daemon.submit(lines_svg(80), "plotting")
        _, queued = daemon.submit(SQUARE, "queued")
        daemon.wait_for_job(plotting["id"], {"plotting"})
        assert (daemon.workspace / RESERVE_FILE).exists()
        fill(small_disk)
        assert daemon.request("DELETE", f"/api/jobs/{queued['id']}")[0] == 409

        status, job = daemon.request("POST", f"/api/jobs/{queued['id']}/cancel")
        assert (status, job["state"]) == (200, "cancelled"), job
        assert daemon.request("DELETE", f"/api/jobs/{queued['id']}")[0] == 204

        started = time.monotonic()
        status, job = daemon.request("POST", f"/api/jobs/{plotting['id']}/cancel")
        assert time.monotonic() - started < 20
        assert (status, job["state"]) == (200, "cancelled"), job
        device = daemon.request("GET", "/api/device")[1]
        assert device["pen"] == "up" and device["current_job_id"] is None
    finally:
        assert daemon.stop() == 0
    assert "Unhandled error in Deferred" not in daemon.log


def test_cancelling_the_plot_when_its_end_cannot_be_recorded_answers_at_once(tmp_path):
    """No room even for the cancel (the reserve is gone): the plot stops, pen up,
    and the request fails with a 507 that says so, rather than wait for space;
    the cancel is recorded by itself once there is room."""
    site = Site(tmp_path)
    store = site.life.store
    real, full = store.transition, [True]

    def transition(job_id, to_state, reason, **fields):
        if full[0] and to_state == states.CANCELLED:
            return fail(DiskFull("the job database"))
        return real(job_id, to_state, reason, **fields)

    store.transition = transition
    job_id = site.submit(PAGE_FRAME)
    site.wait_for(lambda: site.state(job_id) == states.PLOTTING)
    site.advance(2)
    with pytest.raises(DiskFull) as refused:
        site.settle(site.life.queue.cancel(job_id), limit=60)
    assert f"that job {job_id} is cancelled" in str(refused.value)
    assert "recorded by itself once space is freed" in str(refused.value)
    assert site.board.pen_up
    assert site.life.queue.scheduler.runner.state is RunnerState.DONE  # the plot stopped
    full[0] = False
    site.advance(10)
    assert site.state(job_id) == states.CANCELLED


def test_cancelling_the_plot_on_a_full_disk_without_a_reserve_never_hangs(small_disk):
    daemon = DaemonProcess(small_disk / "site", {"device": {"type": "simulator"}}).start()
    try:
        _, plotting = daemon.submit(lines_svg(80), "plotting")
        daemon.wait_for_job(plotting["id"], {"plotting"})
        (daemon.workspace / RESERVE_FILE).unlink()
        filler = fill(small_disk)
        time.sleep(3)  # the plot goes on: its progress saves meet the full disk
        started = time.monotonic()
        status, body = daemon.request("POST", f"/api/jobs/{plotting['id']}/cancel")
        took = time.monotonic() - started
        assert took < 20, took
        if status == 507:  # no room at all: said so, and recorded once there is
            assert body["error"]["code"] == "insufficient_storage"
            assert "recorded by itself" in body["error"]["message"]
        else:
            assert (status, body["state"]) == (200, "cancelled"), body
        assert daemon.request("GET", "/api/device")[1]["pen"] == "up"
        filler.unlink()
        daemon.wait_for_job(plotting["id"], {"cancelled"}, timeout=30)
        assert daemon.request("GET", "/api/device")[1]["current_job_id"] is None
    finally:
        assert daemon.stop() == 0
    assert "Unhandled error in Deferred" not in daemon.log


def test_a_request_body_that_meets_a_full_disk_is_a_json_507(monkeypatch) -> None:
    """twisted.web spools a large body to a temporary file (in $TMPDIR, not the
    workspace): on a full disk that was an "Unhandled Error" traceback and a
    dropped connection with no answer."""
    import tempfile as tempfile_module

    from twisted.internet.testing import StringTransport
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    from twisted.web import http
    from twisted.web.resource import Resource

    from vfab.web.server import APISite

    class FullFile:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    monkeypatch.setattr(http, "_getContentFile", lambda length: FullFile())
    channel = APISite(Resource(), max_body_size=1 << 20).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/svg+xml\r\n"
                         b"Content-Length: 200000\r\n\r\n" + b" " * 65536)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 507"), answer
    reply = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert reply["error"]["code"] == "insufficient_storage"
    assert tempfile_module.gettempdir() in reply["error"]["message"]
    channel.connectionLost(Failure(ConnectionDone()))
