"""A damaged or lost database is found at start, by `vfab check database` and at
run time, and named: never an empty queue or "healthy" over a broken file (issue 14.3)."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import fail
from twisted.logger import formatEvent, globalLogPublisher
from websockets.sync.client import connect

from tests.daemon_process import DaemonProcess, run_vfab
from vfab.config import Config, DeviceConfig
from vfab.jobs.errors import DatabaseDamaged
from vfab.jobs.scheduler import SchedulerState
from vfab.service import VfabService
from vfab.store.jobstore import DatabaseError, JobStore
from vfab.store.migrations import migrate
from plotting_site import Site

PAGE = 4096


def none_config(tmp_path: Path) -> str:
    config = tmp_path / "config.yaml"
    config.write_text("device:\n  type: none\n")
    return str(config)


def database_with_jobs(path: Path, jobs: int = 200) -> None:
    """A real job database of several pages, checkpointed into the one file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    connection = sqlite3.connect(path)
    migrate(connection)
    with connection:
        for number in range(jobs):
            connection.execute(
                "INSERT INTO jobs (id, name, state, created_at, svg_file) VALUES (?, ?, ?, ?, ?)",
                (f"job{number}", "a name " * 10, "completed", "2026-12-07T10:00:00.000Z",
                 f"job{number}.svg"))
    connection.close()


def write_garbage_page(path: Path, page: int = 3) -> None:
    with open(path, "r+b") as file:
        file.seek(PAGE * page)
        file.write(b"\xde\xad\xbe\xef" * (PAGE // 4))


def drawings_in(workspace: Path) -> Path:
    jobs = workspace / "jobs"
    jobs.mkdir(parents=True, mode=0o700)
    (jobs / "0123456789ab.svg").write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    return jobs


def start_daemon(tmp_path: Path, workspace: Path):
    return run_vfab("daemon", "-h", "127.0.0.1", "-p", "0", "-w", str(workspace),
                    "-c", none_config(tmp_path))


def check_database(tmp_path: Path, workspace: Path):
    return run_vfab("check", "database", "--config", none_config(tmp_path),
                    "--workspace", str(workspace))


# -- at start -------------------------------------------------------------------------

def test_a_page_of_garbage_is_refused_at_open(tmp_path):
    path = tmp_path / "vfab.db"
    database_with_jobs(path)
    write_garbage_page(path)
    with pytest.raises(DatabaseError, match=f"database {path} is damaged"):
        JobStore(path, reactor=reactor).open()


@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_a_lost_database_beside_drawings_is_refused_naming_both(tmp_path, kind):
    jobs = drawings_in(tmp_path)
    path = tmp_path / "vfab.db"
    if kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(DatabaseError) as raised:
        JobStore(path, reactor=reactor, drawings=jobs).open()
    assert str(path) in str(raised.value) and str(jobs) in str(raised.value)
    assert "1 job drawing" in str(raised.value)
    assert path.exists() == (kind == "empty")  # nothing was created over the loss


def test_a_new_database_without_drawings_starts_as_before(tmp_path):
    (tmp_path / "jobs").mkdir()
    store = JobStore(tmp_path / "vfab.db", reactor=reactor, drawings=tmp_path / "jobs")
    store.open()
    store.close()


def test_the_daemon_refuses_an_empty_database_beside_drawings_in_one_line(tmp_path):
    workspace = tmp_path / "w"
    jobs = drawings_in(workspace)
    (workspace / "vfab.db").write_bytes(b"")
    result = start_daemon(tmp_path, workspace)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(workspace / "vfab.db") in lines[0] and str(jobs) in lines[0]


#: Garbage over page 3 is found on opening; over page 2 only quick_check finds it,
#: and its report holds a newline.
DAMAGED_PAGES = [3, 2]


@pytest.mark.parametrize("page", DAMAGED_PAGES)
def test_the_daemon_refuses_a_damaged_database_in_one_line(tmp_path, page):
    workspace = tmp_path / "w"
    database_with_jobs(workspace / "vfab.db")
    write_garbage_page(workspace / "vfab.db", page)
    result = start_daemon(tmp_path, workspace)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"database {workspace / 'vfab.db'} is damaged" in lines[0]


# -- vfab check database --------------------------------------------------------------

@pytest.mark.parametrize("page", DAMAGED_PAGES)
def test_check_database_finds_a_page_of_garbage(tmp_path, page):
    workspace = tmp_path / "w"
    database_with_jobs(workspace / "vfab.db")
    assert check_database(tmp_path, workspace).returncode == 0
    write_garbage_page(workspace / "vfab.db", page)
    result = check_database(tmp_path, workspace)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"database {workspace / 'vfab.db'} is damaged" in lines[0]
    assert "OK" not in result.stdout


def test_check_database_finds_an_empty_database_beside_drawings(tmp_path):
    workspace = tmp_path / "w"
    jobs = drawings_in(workspace)
    (workspace / "vfab.db").write_bytes(b"")
    result = check_database(tmp_path, workspace)
    assert result.returncode == 1
    assert str(workspace / "vfab.db") in result.stderr and str(jobs) in result.stderr


# -- at run time ----------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_damage_found_at_run_time_makes_health_unhealthy_with_the_reason(tmp_path):
    service = VfabService(Config(device=DeviceConfig(type="none")), tmp_path, reactor)
    database_with_jobs(service.store.path)
    service.store.open()
    try:
        assert service.web.monitor.health()["status"] == "healthy"
        # Damaged after the check at start: every page but the schema's.
        for page in range(1, service.store.path.stat().st_size // PAGE):
            write_garbage_page(service.store.path, page)
        with pytest.raises(DatabaseDamaged, match="is damaged"):
            yield service.store.list()
        health = service.web.monitor.health()
        assert health["status"] == "unhealthy"
        assert f"database {service.store.path} is damaged" in health["reason"]
    finally:
        service.store.close()


def test_a_database_damaged_under_the_daemon_is_a_503_that_says_what_to_do(tmp_path):
    """Every request is 503 naming the damage and the way out, and the log says it
    once: not a 500 with a traceback per request."""
    daemon = DaemonProcess(tmp_path)
    database_with_jobs(daemon.workspace / "vfab.db")
    daemon.start()
    try:
        assert daemon.request("GET", "/api/jobs/job5")[0] == 200
        path = daemon.workspace / "vfab.db"
        # What the daemon wrote at start (its claims) goes from the WAL into the
        # file first, so that the damage is what the daemon reads.
        checkpoint = sqlite3.connect(path)
        checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        checkpoint.close()
        for page in range(1, path.stat().st_size // PAGE):
            write_garbage_page(path, page)
        replies = [daemon.request("GET", "/api/jobs"), daemon.request("GET", "/api/jobs/job5"),
                   daemon.request("POST", "/api/jobs/job5/cancel"),
                   daemon.request("DELETE", "/api/jobs/job5"),
                   daemon.submit(b"<svg xmlns='http://www.w3.org/2000/svg' width='9mm' "
                                 b"height='9mm'><path d='M1 1L5 5'/></svg>")]
        for status, body in replies:
            assert status == 503, body
            assert body["error"]["code"] == "database_damaged"
            message = body["error"]["message"]
            assert f"database {path} is damaged" in message
            assert "vfab check database" in message and "backup" in message
        health = daemon.request("GET", "/health")[1]
        assert health["status"] == "unhealthy" and "is damaged" in health["reason"]
        with urllib.request.urlopen(daemon.url + "/", timeout=30) as page:
            assert page.status == 200  # the dashboard, waiting for what the WebSocket says
        with connect(daemon.ws_url, open_timeout=10, close_timeout=10) as ws:
            ws.send(json.dumps({"type": "SUBSCRIBE", "channels": ["jobs"]}))
            assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"
            error = json.loads(ws.recv(timeout=10))
            assert error["type"] == "error" and error["error_code"] == "database_damaged"
            assert "vfab check database" in error["error_message"]
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log
    said = [line for line in daemon.log.splitlines() if "is damaged" in line]
    assert len(said) == 1, said


def test_the_queue_meeting_a_damaged_database_adds_no_traceback_to_the_log(tmp_path):
    """The store says it once; the scheduler's retries and the job counts keep quiet."""
    site = Site(tmp_path)
    site.advance(1)
    store = site.life.store
    damaged = DatabaseDamaged(f"database {store.path} is damaged (test)")
    store.next_to_plot = lambda plotter: fail(damaged)
    store.counts = lambda: fail(damaged)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        site.life.queue.recorder.refresh()
        site.life.queue.scheduler.wake()
        site.advance(60)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [formatEvent(event) for event in events if event.get("log_failure")] == []


def test_a_database_damaged_before_the_queue_settled_its_jobs_adds_no_traceback(
        tmp_path, monkeypatch):
    """The damage can come between the daemon's start and its first look at which
    plotter holds which job (the 503 test's race on a loaded machine): the store
    says it once, the queue's start keeps quiet and its plotters still start."""
    site = Site(tmp_path)
    site.stop()
    damaged = DatabaseDamaged("database is damaged (test)")
    monkeypatch.setattr(JobStore, "adopt", lambda store, plotters: fail(damaged))
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        site.start()
        site.advance(1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [formatEvent(event) for event in events if event.get("log_failure")] == []
    assert site.life.queue.scheduler.state is not SchedulerState.STOPPED
