"""The real daemon process: start-up order, options, PID file, daemonizing,
exit codes, graceful shutdown and jobs surviving a restart."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.daemon_process import DaemonProcess, run_vfab
from vfab.store.migrations import SCHEMA_VERSION, migrate

SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="100mm" height="100mm" '
       b'viewBox="0 0 100 100"><path d="M 10 10 L 90 10 L 90 90" fill="none" '
       b'stroke="black"/></svg>')

START_ORDER = [
    r"configuration loaded and validated",
    r"database opened and migrated",
    r"listening on http://127\.0\.0\.1:\d+",
    r"device service started",
    r"queue service started",
    r"hooks ready",
    r"vfab ready",
]
STOP_ORDER = [
    r"shutdown: stop accepting jobs",
    r"queue service stopped",
    r"shutdown: closing WebSocket clients",
    r"shutdown: parking the device",
    r"database .* closed",
    r"shutdown complete",
]


def none_config(tmp_path: Path) -> str:
    """A configuration file with no plotter."""
    config = tmp_path / "config.yaml"
    config.write_text("device:\n  type: none\n")
    return str(config)


def assert_in_order(log: str, patterns: list[str]) -> None:
    position = 0
    for pattern in patterns:
        match = re.compile(pattern).search(log, position)
        assert match, f"{pattern!r} missing (or out of order) in:\n{log}"
        position = match.end()


@pytest.mark.parametrize("twistd", [False, True], ids=["vfab-daemon", "twistd"])
def test_starts_in_order_serves_and_stops_cleanly(tmp_path, twistd):
    daemon = DaemonProcess(tmp_path, twistd=twistd).start()
    try:
        status, health = daemon.request("GET", "/health")
        assert status == 200
        assert health["status"] == "healthy" and health["device"] == "disconnected"
        assert health["uptime"] >= 0
        status, job = daemon.submit(SVG, name="square")
        assert status == 201 and job["state"] == "queued"
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.log
    assert_in_order(daemon.log, START_ORDER)
    assert_in_order(daemon.log, STOP_ORDER)


def modern_editable_install(tmp_path: Path) -> Path:
    """A fresh venv holding this tree as `pip install -e .` makes it (setuptools'
    default editable mode, which hides `twisted/plugins`); it sees the tests'
    packages through a .pth file, but no other copy of vfab. Returns its bin."""
    if not importlib.metadata.entry_points(group="distutils.commands", name="bdist_wheel"):
        pytest.skip("an editable install without build isolation needs wheel "
                    "(or setuptools >= 70.1): run make install")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = next(venv.glob("lib/python*/site-packages"))
    seen = [str(Path(entry).resolve()) for entry in sys.path
            if entry and Path(entry).is_dir() and not (Path(entry) / "vfab").exists()]
    (site_packages / "tests-packages.pth").write_text("\n".join(seen) + "\n")
    project = Path(__file__).resolve().parent.parent
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--no-index", "--no-deps", "--no-build-isolation", "-e", str(project)],
                   check=True, cwd=tmp_path, env=without_pythonpath())
    return venv / "bin"


def without_pythonpath() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def test_vfab_daemon_runs_after_a_modern_editable_install(tmp_path):
    bin_dir = modern_editable_install(tmp_path)
    daemon = DaemonProcess(tmp_path / "run", {"device": {"type": "simulator"}},
                           vfab=[str(bin_dir / "vfab")], env=without_pythonpath()).start()
    try:
        status, health = daemon.request("GET", "/health")
        assert status == 200
    finally:
        assert daemon.stop() == 0, daemon.log


def test_sigint_is_a_clean_stop_too(tmp_path):
    daemon = DaemonProcess(tmp_path).start()
    assert daemon.stop(signal.SIGINT) == 0, daemon.log


def test_websocket_subscribe_snapshots_and_state_changes(tmp_path):
    daemon = DaemonProcess(tmp_path).start()
    try:
        with connect(daemon.ws_url, open_timeout=10, close_timeout=10) as ws:
            ws.send(json.dumps({"type": "SUBSCRIBE", "channels": ["all"]}))
            first = json.loads(ws.recv(timeout=10))
            assert first["type"] == "subscribed"
            assert sorted(first["channels"]) == ["device", "jobs", "system"]
            snapshots = {json.loads(ws.recv(timeout=10))["type"] for _ in range(3)}
            assert snapshots == {"system_status", "job_list", "device_status"}
            status, job = daemon.submit(SVG, name="square")
            assert status == 201
            while True:
                message = json.loads(ws.recv(timeout=10))
                if message["type"] == "job_state_change":
                    break
            assert message["job_id"] == job["id"] and message["to_state"] == "queued"
            assert message["timestamp"].endswith("Z")
            ws.send(json.dumps({"type": "ping"}))
            while json.loads(ws.recv(timeout=10))["type"] != "pong":
                pass
    finally:
        assert daemon.stop() == 0, daemon.log


def test_a_closed_websocket_client_hears_going_away_at_shutdown(tmp_path):
    daemon = DaemonProcess(tmp_path).start()
    with connect(daemon.ws_url, open_timeout=10, close_timeout=10) as ws:
        daemon.process.send_signal(signal.SIGTERM)
        with pytest.raises(Exception):
            while True:
                ws.recv(timeout=20)
        assert ws.close_code == 1001
    assert daemon.stop() == 0


def test_jobs_survive_a_restart(tmp_path):
    daemon = DaemonProcess(tmp_path).start()
    try:
        _, first = daemon.submit(SVG, name="first", priority=1)
        _, second = daemon.submit(SVG, name="second")
    finally:
        assert daemon.stop() == 0
    again = DaemonProcess(tmp_path).start()
    try:
        status, listing = again.request("GET", "/api/jobs")
        assert status == 200
        assert [(job["id"], job["state"]) for job in listing["jobs"]] == [
            (second["id"], "queued"), (first["id"], "queued")]
        assert (tmp_path / "workspace" / "jobs" / f"{first['id']}.svg").read_bytes() == SVG
    finally:
        assert again.stop() == 0


def test_a_config_error_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("websocket:\n  port: abc\n")
    result = run_vfab("daemon", "--config", str(config), "--workspace", str(tmp_path / "w"))
    assert result.returncode == 2
    assert "websocket.port: expected an integer 1-65535, got 'abc'" in result.stderr


def test_an_unknown_key_and_a_missing_named_config_exit_2(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("device:\n  modle: V3/A4\n")
    result = run_vfab("daemon", "-c", str(config), "-w", str(tmp_path / "w"))
    assert result.returncode == 2
    assert "device.modle: unknown key (did you mean 'model'?)" in result.stderr
    result = run_vfab("daemon", "-c", str(tmp_path / "missing.yaml"), "-w", str(tmp_path / "w"))
    assert result.returncode == 2 and "no such file" in result.stderr


def test_bad_options_exit_2(tmp_path):
    result = run_vfab("daemon", "--port", "abc", "-w", str(tmp_path / "w"))
    assert result.returncode == 2
    # The option and what it takes, without twistd's "Parameter type enforcement failed".
    assert result.stderr == ("vfab: --port: expected an integer 0-65535 "
                             "(0 = any free port), got 'abc'\n")
    twistd = subprocess.run([str(Path(sys.executable).parent / "twistd"), "-n", "vfab",
                             "--nice", "99"], capture_output=True, text=True, timeout=60)
    assert twistd.returncode == 2
    assert twistd.stderr == "vfab: --nice: expected an integer -20..19, got '99'\n"
    result = run_vfab("daemon", "--log-level", "loud", "-w", str(tmp_path / "w"))
    assert result.returncode == 2 and "--log-level" in result.stderr
    help_text = run_vfab("daemon", "--help")
    assert help_text.returncode == 0 and "--daemonize" in help_text.stdout


def test_a_port_in_use_exits_1_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_vfab("daemon", "-h", "127.0.0.1", "-p", str(port),
                          "-w", str(tmp_path / "w"), "-c", none_config(tmp_path))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreadable_database_exits_1(tmp_path):
    workspace = tmp_path / "w"
    workspace.mkdir(mode=0o700)
    (workspace / "vfab.db").write_bytes(b"not a database" * 1000)
    result = run_vfab("daemon", "-h", "127.0.0.1", "-p", "0", "-w", str(workspace),
                      "-c", none_config(tmp_path))
    assert result.returncode == 1
    assert "database" in result.stderr and "Traceback" not in result.stderr


def test_a_database_of_a_newer_schema_exits_1_with_one_line(tmp_path):
    workspace = tmp_path / "w"
    workspace.mkdir(mode=0o700)
    connection = sqlite3.connect(workspace / "vfab.db")
    migrate(connection)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    result = run_vfab("daemon", "-h", "127.0.0.1", "-p", "0", "-w", str(workspace),
                      "-c", none_config(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"vfab: cannot start: database {workspace / 'vfab.db'}: the database has schema "
        f"version {SCHEMA_VERSION + 1} but this vfab knows only {SCHEMA_VERSION}: "
        f"upgrade vfab or use another database"]
    assert "Traceback" not in result.stdout


def test_a_database_url_this_build_cannot_open_exits_2_with_one_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("device:\n  type: none\n"
                      "database:\n  url: mysql://vfab@db.example/vfab\n")
    result = run_vfab("daemon", "-h", "127.0.0.1", "-p", "0", "-w", str(tmp_path / "w"),
                      "-c", str(config))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("vfab: database.url: expected sqlite:///FILE or "
                                    "postgresql://")
    assert "Traceback" not in result.stdout


def test_a_postgresql_server_out_of_reach_at_start_exits_1_with_one_line(tmp_path):
    """SPEC: a database that cannot be opened is a start-up failure (1), not a
    configuration error (2): the URL is right, the server is not there."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text("device:\n  type: none\n"
                      f"database:\n  url: postgresql://vfab@127.0.0.1:{port}/vfab\n")
    result = run_vfab("daemon", "-h", "127.0.0.1", "-p", "0", "-w", str(tmp_path / "w"),
                      "-c", str(config))
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert f"database postgresql://vfab@127.0.0.1:{port}/vfab" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def _wait_for_exit(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not exit")


def test_daemonize_returns_once_listening_with_a_pid_file(tmp_path):
    workspace, pid_file = tmp_path / "w", tmp_path / "vfab.pid"
    config = none_config(tmp_path)
    result = run_vfab("daemon", "--daemonize", "--pid-file", str(pid_file), "-h", "127.0.0.1",
                      "-p", "0", "-w", str(workspace), "-c", config)
    assert result.returncode == 0, result.stderr
    pid = int(pid_file.read_text())
    try:
        log = (workspace / "logs" / "vfab.log").read_text()
        port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", log).group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
        # A live PID file refuses a second daemon.
        second = run_vfab("daemon", "--daemonize", "--pid-file", str(pid_file),
                          "-h", "127.0.0.1", "-p", "0", "-w", str(tmp_path / "w2"),
                          "-c", config)
        assert second.returncode != 0
        assert str(pid) in second.stderr + second.stdout
    finally:
        os.kill(pid, signal.SIGTERM)
        _wait_for_exit(pid)
    assert not pid_file.exists()
    assert "shutdown complete" in (workspace / "logs" / "vfab.log").read_text()


def test_a_stale_pid_file_is_replaced(tmp_path):
    pid_file = tmp_path / "vfab.pid"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file.write_text(str(dead.pid))
    daemon = DaemonProcess(tmp_path, extra=["--pid-file", str(pid_file)]).start()
    try:
        assert int(pid_file.read_text()) == daemon.process.pid
    finally:
        assert daemon.stop() == 0
    assert not pid_file.exists()


def test_daemonize_reports_a_failed_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_vfab("daemon", "--daemonize", "-h", "127.0.0.1", "-p", str(port),
                          "-w", str(tmp_path / "w"), "-c", none_config(tmp_path))
    assert result.returncode != 0
    assert "Address already in use" in result.stderr


def test_log_level_and_nice(tmp_path):
    # The config file says info; the command line's debug wins.
    daemon = DaemonProcess(tmp_path, extra=["--log-level", "debug", "--nice", "5"]).start()
    try:
        assert os.getpriority(os.PRIO_PROCESS, daemon.process.pid) >= 5
        assert " - DEBUG - " in daemon.log
    finally:
        assert daemon.stop() == 0


def test_workspace_is_private(tmp_path):
    daemon = DaemonProcess(tmp_path).start()
    try:
        workspace = Path(daemon.workspace)
        assert workspace.stat().st_mode & 0o777 == 0o700
        assert (workspace / "vfab.db").stat().st_mode & 0o777 == 0o600
        assert (workspace / "logs" / "vfab.log").stat().st_mode & 0o777 == 0o600
    finally:
        assert daemon.stop() == 0


def test_the_cli_finds_no_daemon_in_words(tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = run_vfab("list", "jobs", "--url", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"no daemon at http://127.0.0.1:{port}" in result.stderr
    assert "is `vfab daemon` running?" in result.stderr
