"""Logging: the configured format, levels, size rotation, SIGUSR1 reopening (by hand
and through the shipped logrotate snippet), and the lines the troubleshooting
guide greps for (ERROR, websocket, performance) on the real daemon."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from websockets.sync.client import connect

from tests.daemon_process import DaemonProcess, run_vfab, wait_until
from vfab.config import ConfigError, LoggingConfig
from vfab.logs import check_format, make_observer, open_log_file
from vfab.events import EventBus
from vfab.performance import PerformanceLog, performance_line
from vfab.tap import Options

ETC = Path(__file__).parent.parent / "etc"
SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="40mm" height="40mm" '
       b'viewBox="0 0 40 40"><path d="M5 5 L35 5 L35 35" stroke="black" fill="none"/></svg>')


def event(text: str, level: LogLevel = LogLevel.info, namespace: str = "vfab.test", **more):
    return {"log_format": text, "log_level": level, "log_namespace": namespace,
            "log_time": 1_700_000_000.25, **more}


def observed(config: LoggingConfig, *events: dict) -> str:
    out = io.StringIO()
    observer = make_observer(config, None, stdout=out)
    for one in events:
        observer(one)
    return out.getvalue()


# -- format and level ------------------------------------------------------------

def test_the_default_format_is_pythons():
    text = observed(LoggingConfig(), event("hello {who}", who="plotter"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,250 - vfab.test - INFO - "
                        r"hello plotter\n", text)


def test_any_log_record_field_can_be_used():
    config = LoggingConfig(format="%(levelname)s|%(levelno)d|%(name)s|%(process)d|%(message)s")
    text = observed(config, event("boom", LogLevel.error, "vfab.jobs"))
    assert text == f"ERROR|40|vfab.jobs|{os.getpid()}|boom\n"


def test_a_failure_brings_its_traceback():
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    text = observed(LoggingConfig(format="%(levelname)s %(message)s"),
                    event("it broke", LogLevel.critical, log_failure=failure))
    assert text.startswith("CRITICAL it broke\n") and "ZeroDivisionError" in text


def test_the_level_filters():
    config = LoggingConfig(level="warning", format="%(levelname)s %(message)s")
    text = observed(config, event("chatter", LogLevel.debug), event("news"),
                    event("careful", LogLevel.warn), event("broken", LogLevel.error))
    assert text == "WARNING careful\nERROR broken\n"


@pytest.mark.parametrize("bad", ["%(nosuchfield)s", "%(message)", "%(message)d", "plain"])
def test_a_bad_format_names_the_key(bad):
    with pytest.raises(ConfigError) as caught:
        check_format(bad)
    assert caught.value.problems[0].startswith("logging.format: ")


def test_the_command_line_level_wins_over_the_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"logging": {"level": "error"}}))
    options = Options()
    options.parseOptions(["--config", str(config), "--log-level", "DEBUG"])
    assert options.config.logging.level == "debug"
    options = Options()
    options.parseOptions(["--config", str(config)])
    assert options.config.logging.level == "error"


def test_the_daemon_refuses_a_bad_format_with_exit_2(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"logging": {"format": "%(when)s %(message)s"}}))
    result = run_vfab("daemon", "--config", str(config), "--port", "0", "--host", "127.0.0.1",
                      "--workspace", str(tmp_path / "ws"))
    assert result.returncode == 2
    assert "logging.format" in result.stderr and "when" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- the file ----------------------------------------------------------------------

def test_the_file_is_created_private(tmp_path):
    path = tmp_path / "logs" / "vfab.log"
    log_file = open_log_file(path, LoggingConfig())
    log_file.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_rotation_by_size_keeps_backup_count_files(tmp_path):
    path = tmp_path / "vfab.log"
    config = LoggingConfig(max_size=300, backup_count=3, format="%(message)s")
    log_file = open_log_file(path, config)
    observer = make_observer(config, log_file, stdout=io.StringIO())
    for number in range(100):
        observer(event(f"line {number:03d} " + "x" * 40))
    log_file.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["vfab.log", "vfab.log.1", "vfab.log.2", "vfab.log.3"]
    for name in names:
        assert (tmp_path / name).stat().st_size <= 300 + 50
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    # The newest lines are in vfab.log, the next older in vfab.log.1.
    assert "line 099" in path.read_text()
    assert int(re.findall(r"line (\d+)", (tmp_path / "vfab.log.1").read_text())[-1]) < 99


def test_backup_count_0_leaves_rotation_to_logrotate(tmp_path):
    config = LoggingConfig(max_size=100, backup_count=0, format="%(message)s")
    log_file = open_log_file(tmp_path / "vfab.log", config)
    observer = make_observer(config, log_file, stdout=io.StringIO())
    for number in range(50):
        observer(event(f"line {number}"))
    log_file.close()
    assert [p.name for p in tmp_path.iterdir()] == ["vfab.log"]


# -- the performance line ------------------------------------------------------------

def test_the_performance_line_compares_plotting_time_with_the_estimate():
    """Plotting time, not the wall time from start to end (paused for hours here)."""
    job = {"id": "j1", "name": "poster", "state": "completed", "pen_down_mm": 2500.0,
           "estimated_seconds": 100.0, "progress": 1.0, "plotting_seconds": 110.5,
           "started_at": "2026-01-01T10:00:00.000Z", "finished_at": "2026-01-01T12:01:50.500Z"}
    text, fields = performance_line(job)
    line = text.format(**fields)
    assert line == ("performance: job j1 (poster) plotted in 110.5 s (estimate 100.0 s, +10%), "
                    "2.50 m pen down")
    assert performance_line({**job, "started_at": None}) is None


def test_the_performance_line_of_the_virtual_plotter_compares_like_with_like():
    """At simulator_speed 4 a 33.6 s plot is 33.6 s, against the estimate here
    (an AxiDraw's 132 s beside it), not 134 s against 132 s."""
    job = {"id": "j1", "name": "sample", "state": "completed", "pen_down_mm": 900.0,
           "estimated_seconds": 132.0, "progress": 1.0, "plotting_seconds": 33.6,
           "started_at": "2026-01-01T10:00:00.000Z", "finished_at": "2026-01-01T10:00:40.000Z"}
    text, fields = performance_line(job, time_factor=4.0)
    assert text.format(**fields) == (
        "performance: job j1 (sample) plotted in 33.6 s (estimate 33.0 s here "
        "(132.0 s on an AxiDraw), +2%), 0.90 m pen down")


def test_the_performance_line_is_logged_when_a_job_ends():
    lines: list[str] = []

    def observe(event: dict) -> None:
        if "performance" in event.get("log_format", ""):
            lines.append(formatEvent(event))

    bus = EventBus()
    PerformanceLog(bus, time_factor=1.0)
    job = {"id": "j1", "name": "poster", "state": "cancelled", "pen_down_mm": 2500.0,
           "estimated_seconds": 100.0, "progress": 0.25, "plotting_seconds": 20.0,
           "started_at": "2026-01-01T10:00:00.000Z", "finished_at": "2026-01-01T12:00:00.000Z"}
    globalLogPublisher.addObserver(observe)
    try:
        for state in ("paused", "interrupted", "cancelled"):
            bus.publish("jobs", {"type": "job_state_change", "job_id": "j1",
                                 "to_state": state, "job": {**job, "state": state}})
    finally:
        globalLogPublisher.removeObserver(observe)
    assert lines == ["performance: job j1 (poster) cancelled after 20.0 s at 25% "
                     "(estimate 100.0 s, -80% for the whole plot)"]


# -- on the real daemon ------------------------------------------------------------


def test_the_daemon_log_file_greps_and_reopens(tmp_path):
    daemon = DaemonProcess(tmp_path, {
        "device": {"type": "simulator", "simulator_speed": 20},
        "logging": {"backup_count": 0},
        # A hook that cannot start: an ERROR line, and the plot goes on regardless.
        "hooks": {"job_queued": [{"command": [str(tmp_path / "no-such-hook")]}]},
    })
    log = daemon.workspace / "logs" / "vfab.log"
    try:
        daemon.start()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        with connect(daemon.ws_url, open_timeout=10) as client:
            client.send('{"type": "PING"}')
            assert "pong" in client.recv(timeout=10)
        status, job = daemon.submit(SVG, "logged")
        assert status == 201
        daemon.wait_for_job(job["id"], {"completed"}, timeout=60)
        daemon.wait_for_log(r"performance: job " + job["id"])
        daemon.wait_for_log(r"websocket client .* left")
        text = log.read_text()
        assert " - ERROR - " in text and "no-such-hook" in text
        assert re.search(r"websocket client 127\.0\.0\.1 connected", text)
        assert re.search(rf"performance: job {job['id']} \(logged\) plotted in [\d.]+ s "
                         r"\(estimate [\d.]+ s here \([\d.]+ s on an AxiDraw\), [+-]\d+%\)", text)

        # logrotate's way: rename, then SIGUSR1; the daemon writes a new file.
        log.rename(log.with_name("vfab.log.old"))
        daemon.process.send_signal(signal.SIGUSR1)
        wait_until(lambda: log.exists() and "reopened (SIGUSR1)" in log.read_text(),
                 "a new log file")
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert "reopened" not in log.with_name("vfab.log.old").read_text()
        assert daemon.process.poll() is None

        if shutil.which("logrotate"):
            run_shipped_logrotate(tmp_path, log, daemon.process.pid)
            wait_until(lambda: log.exists() and "reopened (SIGUSR1)" in log.read_text(),
                     "a new log file after logrotate")
            assert "reopened" in log.with_name("vfab.log.1").read_text()
    finally:
        code = daemon.stop()
    assert code == 0


def run_shipped_logrotate(tmp_path: Path, log: Path, pid: int) -> None:
    """etc/logrotate.vfab with this test's path, user and a kill -USR1 of the daemon."""
    text = (ETC / "logrotate.vfab").read_text()
    text = text.replace("/var/lib/vfab/logs/vfab.log", str(log))
    import grp
    import pwd
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    text = text.replace("create 0600 vfab vfab", f"create 0600 {user} {group}")
    text = re.sub(r"postrotate\n.*?endscript",
                  f"postrotate\n        kill -USR1 {pid}\n    endscript", text, flags=re.S)
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text)
    result = subprocess.run(["logrotate", "--force", "--state", str(tmp_path / "state"),
                             str(conf)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr


def test_the_shipped_logrotate_snippet_parses(tmp_path):
    if not shutil.which("logrotate"):
        pytest.skip("logrotate is not installed")
    import grp
    import pwd
    text = (ETC / "logrotate.vfab").read_text().replace(
        "vfab vfab", f"{pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}")
    conf = tmp_path / "vfab"
    conf.write_text(text)
    result = subprocess.run(["logrotate", "--debug", "--state", str(tmp_path / "state"),
                             str(conf)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "error" not in result.stderr.lower(), result.stderr
    assert "Handling 1 logs" in result.stderr
