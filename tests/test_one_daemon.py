"""The daemon as a process among others: one per workspace, a log that outlives a
broken stdout, and a calm answer to an impatient second Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from tests.daemon_process import READY, DaemonProcess
from vfab.workspace_lock import WorkspaceInUse, WorkspaceLock


def test_a_second_lock_on_a_workspace_names_the_holder(tmp_path):
    first = WorkspaceLock(tmp_path)
    first.acquire()
    try:
        second = WorkspaceLock(tmp_path)
        try:
            second.acquire()
        except WorkspaceInUse as error:
            assert re.search(r"PID \d+", str(error))
        else:
            raise AssertionError("two locks on one workspace")
    finally:
        first.release()
    WorkspaceLock(tmp_path).acquire()  # free again once released


def test_a_second_daemon_on_the_same_workspace_refuses_to_start(tmp_path):
    first = DaemonProcess(tmp_path / "one").start()
    try:
        second = DaemonProcess(tmp_path / "two")
        second.workspace = first.workspace
        index = second.argv.index("--workspace")
        second.argv[index + 1] = str(first.workspace)
        result = subprocess.run(second.argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert f"PID {first.process.pid}" in result.stdout + result.stderr
        assert first.process.poll() is None  # the first one is untouched
    finally:
        assert first.stop() == 0


def log_file(workspace: Path) -> Path:
    return workspace / "logs" / "vfab.log"


def test_the_log_file_goes_on_when_stdout_breaks(tmp_path):
    """`vfab daemon ... | head -3`: stdout closes; the file must not stop with it."""
    daemon = DaemonProcess(tmp_path)
    process = subprocess.Popen(daemon.argv, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        for line in process.stdout:
            if READY.search(line) or time.monotonic() > deadline:
                break
        process.stdout.close()  # what `head` does once it has its lines
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = log_file(daemon.workspace).read_text()
    assert "shutdown complete" in text


def test_a_second_signal_during_shutdown_is_no_traceback(tmp_path):
    """Ctrl-C, and Ctrl-C again while the plot is being paused and parked."""
    daemon = DaemonProcess(tmp_path, {"device": {"type": "simulator", "simulator_speed": 1.0,
                                                 "shutdown_grace": 3.0}}).start()
    status, job = daemon.submit(LONG_LINE)
    assert status == 201
    daemon.wait_for_log(f"job {job['id']}: queued -> plotting")
    daemon.process.send_signal(signal.SIGINT)
    daemon.wait_for_log("letting job")
    code = daemon.stop(signal.SIGTERM)
    assert code == 0
    assert "already shutting down" in daemon.log
    assert "Traceback" not in daemon.log and "ReactorNotRunning" not in daemon.log


LONG_LINE = (b'<svg xmlns="http://www.w3.org/2000/svg" width="200mm" height="200mm" '
             b'viewBox="0 0 200 200"><path d="M10 10 L190 10 L190 190 L10 190 Z" '
             b'stroke="black" fill="none"/></svg>')
