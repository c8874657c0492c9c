"""A plot survives people, power and cables: the real daemon against the virtual
plotter run as its own process (`python -m vfab.simulator`), with faults.

Each interrupted plot is finished and the union of the recorded strokes is
compared with an uninterrupted plot of the same job: nothing drawn twice,
nothing skipped.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from websockets.sync.client import connect

from tests.daemon_process import DaemonProcess, run_vfab
from tests.test_runner import ONE_LAYER, TWO_LAYERS, assert_same_drawing

SPEED = 10


_running: list["SimulatorProcess"] = []


@pytest.fixture(autouse=True)
def no_simulator_left_behind():
    """A failing test still stops the simulators it started."""
    yield
    while _running:
        process = _running.pop().process
        if process.poll() is None:
            process.kill()
            process.wait(10)


class SimulatorProcess:
    """The virtual plotter on a pty, as its own process, with a stable link path."""

    def __init__(self, tmp_path: Path, *flags: str, name: str = "sim", record: bool = True):
        """`record=False`: keep no record on disk. A long benchmark wants none, and
        its million strokes would be rewritten after every plot and at the stop."""
        self.link = tmp_path / f"{name}-tty"
        self.record_dir = tmp_path / f"{name}-record" if record else None
        recording = ["--record-dir", str(self.record_dir)] if record else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vfab.simulator", "--link", str(self.link),
             "--speed", str(SPEED), *recording, *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _running.append(self)
        deadline = time.monotonic() + 20
        while not self.link.is_symlink():
            assert time.monotonic() < deadline, "the simulator did not start"
            assert self.process.poll() is None, self.process.stdout.read()
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> dict | None:
        """Stop it and return what it drew (None if it kept no record)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate(timeout=10)
            raise AssertionError(f"the simulator did not stop within 30 s:\n{output}") from None
        if self.record_dir is None:
            return None
        return json.loads((self.record_dir / "strokes.json").read_text())


def strokes_of(record: dict) -> list[np.ndarray]:
    return [np.asarray(stroke, float) for stroke in record["strokes"] if len(stroke) > 1]


def daemon_for(tmp_path: Path, simulator: SimulatorProcess, **device) -> DaemonProcess:
    settings = {"type": "axidraw", "port": str(simulator.link), "model": "V3/A4",
                "timeout": 5, "reconnect_max_delay": 0.5, "progress_save_interval": 0.2,
                **device}
    return DaemonProcess(tmp_path / "daemon", {"device": settings}).start()


def wait_for_device(daemon: DaemonProcess, status: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    device: dict = {}
    while time.monotonic() < deadline:
        _, device = daemon.request("GET", "/api/device")
        if device["status"] == status:
            return
        time.sleep(0.02)
    raise AssertionError(f"the device never became {status}: {device}\n{daemon.log}")


def wait_for_progress(daemon: DaemonProcess, job_id: str, at_least: float) -> dict:
    deadline = time.monotonic() + 60
    job: dict = {}
    while time.monotonic() < deadline:
        _, job = daemon.request("GET", f"/api/jobs/{job_id}")
        if job["progress"] >= at_least or job["state"] in ("completed", "failed", "cancelled"):
            assert job["state"] == "plotting", job
            return job
        time.sleep(0.01)
    raise AssertionError(f"no progress: {job}")


def plot_one_layer(tmp_path, simulator: SimulatorProcess, name: str) -> None:
    """A daemon on `simulator` plots ONE_LAYER to completion, then stops cleanly."""
    daemon = daemon_for(tmp_path, simulator)
    try:
        wait_for_device(daemon, "idle")
        _, job = daemon.submit(ONE_LAYER, name=name)
        assert daemon.wait_for_job(job["id"], {"completed", "failed"})["state"] == "completed"
    finally:
        assert daemon.stop() == 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[np.ndarray]:
    """An uninterrupted plot of the job."""
    tmp_path = tmp_path_factory.mktemp("reference")
    simulator = SimulatorProcess(tmp_path)
    plot_one_layer(tmp_path, simulator, "reference")
    return strokes_of(simulator.stop())


#: The 3.x boards (as new, and as another program leaves one), as simulator flags.
BOARDS_3X = [("--firmware", "3.0.3"),
             ("--firmware", "3.0.3", "--future-syntax", "--fifo-depth", "32", "--no-ok")]
BOARD_IDS_3X = ["3.0.3", "3.0.3 left in future syntax, FIFO 32, no OK"]
#: Every generation of board.
BOARDS = [("--firmware", "2.8.1"), *BOARDS_3X]
BOARD_IDS = ["2.8.1", *BOARD_IDS_3X]


@pytest.mark.parametrize("board", BOARDS_3X, ids=BOARD_IDS_3X)
def test_a_3x_board_in_any_state_plots_the_drawing(tmp_path, reference, board):
    simulator = SimulatorProcess(tmp_path, *board)
    daemon = daemon_for(tmp_path, simulator)
    try:
        wait_for_device(daemon, "idle")
        _, job = daemon.submit(ONE_LAYER, name="3.x")
        done = daemon.wait_for_job(job["id"], {"completed", "failed"})
        assert done["state"] == "completed", done
        _, device = daemon.request("GET", "/api/device")
        assert device["firmware_version"] == "3.0.3"
    finally:
        assert daemon.stop() == 0, daemon.log
    assert_same_drawing(strokes_of(simulator.stop()), reference)


@pytest.mark.parametrize("board", BOARDS, ids=BOARD_IDS)
def test_a_pulled_cable_interrupts_and_a_person_resumes(tmp_path, reference, board):
    simulator = SimulatorProcess(tmp_path, "--drop-after", "120", *board)
    daemon = daemon_for(tmp_path, simulator)
    try:
        wait_for_device(daemon, "idle")
        with connect(daemon.ws_url, open_timeout=10) as ws:
            ws.send(json.dumps({"type": "subscribe", "channels": ["system"]}))
            _, job = daemon.submit(ONE_LAYER, name="cable")
            lost = daemon.wait_for_job(job["id"], {"interrupted", "completed", "failed"})
            assert lost["state"] == "interrupted", lost
            assert 0 < lost["progress"] < 1
            alerts = []
            deadline = time.monotonic() + 10
            while not any(a.get("title") == "Plot interrupted" for a in alerts):
                assert time.monotonic() < deadline, alerts
                message = json.loads(ws.recv(timeout=10))
                if message["type"] == "system_alert":
                    alerts.append(message)
        _, history = daemon.request("GET", f"/api/jobs/{job['id']}")
        assert history["state"] == "interrupted"
        # The cable is plugged back in: the device comes back, the job waits for a person.
        simulator.signal(signal.SIGUSR1)
        wait_for_device(daemon, "idle")
        assert daemon.request("GET", f"/api/jobs/{job['id']}")[1]["state"] == "interrupted"
        status, resumed = daemon.request("POST", f"/api/jobs/{job['id']}/resume")
        assert status == 200, resumed
        done = daemon.wait_for_job(job["id"], {"completed", "failed"})
        assert done["state"] == "completed", done
    finally:
        assert daemon.stop() == 0, daemon.log
    assert_same_drawing(strokes_of(simulator.stop()), reference)


@pytest.mark.parametrize("board", BOARDS, ids=BOARD_IDS)
def test_a_killed_daemon_resumes_after_a_restart(tmp_path, reference, board):
    simulator = SimulatorProcess(tmp_path, *board)
    daemon = daemon_for(tmp_path, simulator)
    wait_for_device(daemon, "idle")
    _, job = daemon.submit(ONE_LAYER, name="killed")
    wait_for_progress(daemon, job["id"], 0.4)
    daemon.kill()  # kill -9
    again = daemon_for(tmp_path, simulator)
    try:
        wait_for_device(again, "idle")
        job = again.request("GET", f"/api/jobs/{job['id']}")[1]
        assert job["state"] == "interrupted" and job["progress"] > 0
        assert again.request("POST", f"/api/jobs/{job['id']}/resume")[0] == 200
        assert again.wait_for_job(job["id"], {"completed", "failed"})["state"] == "completed"
    finally:
        assert again.stop() == 0, again.log
    assert_same_drawing(strokes_of(simulator.stop()), reference)


@pytest.mark.parametrize("board", BOARDS, ids=BOARD_IDS)
def test_sigterm_pauses_at_a_safe_point_and_the_plot_resumes(tmp_path, reference, board):
    simulator = SimulatorProcess(tmp_path, *board)
    daemon = daemon_for(tmp_path, simulator, shutdown_grace=0)
    wait_for_device(daemon, "idle")
    _, job = daemon.submit(ONE_LAYER, name="stopped")
    wait_for_progress(daemon, job["id"], 0.3)
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log
    assert "paused at a safe point" in daemon.log
    again = daemon_for(tmp_path, simulator)
    try:
        wait_for_device(again, "idle")
        stopped = again.request("GET", f"/api/jobs/{job['id']}")[1]
        assert stopped["state"] == "interrupted" and 0 < stopped["progress"] < 1
        assert again.request("POST", f"/api/jobs/{job['id']}/resume")[0] == 200
        assert again.wait_for_job(job["id"], {"completed", "failed"})["state"] == "completed"
    finally:
        assert again.stop() == 0
    assert_same_drawing(strokes_of(simulator.stop()), reference)


@pytest.mark.parametrize("board", BOARDS, ids=BOARD_IDS)
def test_pause_resume_and_cancel_from_http_websocket_and_cli(tmp_path, reference, board):
    # At a fifth of the usual speed the plot lasts about 8 s, so that each request
    # (a CLI run takes well under a second) reaches a job that is still plotting.
    simulator = SimulatorProcess(tmp_path, "--speed", str(SPEED / 5), *board)
    daemon = daemon_for(tmp_path, simulator)
    try:
        wait_for_device(daemon, "idle")
        _, job = daemon.submit(ONE_LAYER, name="controlled")
        wait_for_progress(daemon, job["id"], 0.2)
        status, paused = daemon.request("POST", f"/api/jobs/{job['id']}/pause")
        assert status == 200 and paused["state"] == "paused"
        _, device = daemon.request("GET", "/api/device")
        assert device["status"] == "paused" and device["pen"] == "up"
        status, again = daemon.request("POST", f"/api/jobs/{job['id']}/pause")
        assert status == 409 and again["error"]["code"] == "invalid_state"
        with connect(daemon.ws_url, open_timeout=10) as ws:
            ws.send(json.dumps({"type": "COMMAND", "command": "resume", "job_id": job["id"]}))
            while (answer := json.loads(ws.recv(timeout=10)))["type"] != "command_result":
                pass
            assert answer["ok"] and answer["job"]["state"] == "plotting"
        result = run_vfab("pause", job["id"], "--url", daemon.url)
        assert result.returncode == 0 and "paused" in result.stdout
        result = run_vfab("resume", job["id"], "--url", daemon.url)
        assert result.returncode == 0
        assert daemon.wait_for_job(job["id"], {"completed", "failed"})["state"] == "completed"
        # A second job, cancelled mid-plot from the CLI, ends with the pen up at home.
        _, second = daemon.submit(ONE_LAYER, name="cancelled")
        wait_for_progress(daemon, second["id"], 0.2)
        result = run_vfab("cancel", second["id"], "--url", daemon.url)
        assert result.returncode == 0 and "cancelled" in result.stdout
        wait_for_device(daemon, "idle")
        _, device = daemon.request("GET", "/api/device")
        assert device["pen"] == "up" and device["position_mm"] == [0.0, 0.0]
    finally:
        assert daemon.stop() == 0, daemon.log
    drawn = strokes_of(simulator.stop())
    # The first job drew exactly the drawing; the cancelled one drew part of it again.
    first_length = sum(float(np.sum(np.linalg.norm(np.diff(s, axis=0), axis=1)))
                       for s in reference)
    total = sum(float(np.sum(np.linalg.norm(np.diff(s, axis=0), axis=1))) for s in drawn)
    assert first_length < total < 2 * first_length


@pytest.mark.parametrize("board", BOARDS, ids=BOARD_IDS)
def test_the_prg_button_continues_after_a_pen_change(tmp_path, board):
    simulator = SimulatorProcess(tmp_path, *board)
    daemon = daemon_for(tmp_path, simulator)
    try:
        wait_for_device(daemon, "idle")
        _, job = daemon.submit(TWO_LAYERS, name="two pens")
        waiting = daemon.wait_for_job(job["id"], {"awaiting_pen", "completed", "failed"})
        assert waiting["state"] == "awaiting_pen"
        simulator.signal(signal.SIGUSR2)  # the operator presses the button
        assert daemon.wait_for_job(job["id"], {"completed", "failed"})["state"] == "completed"
    finally:
        assert daemon.stop() == 0
    assert len(strokes_of(simulator.stop())) == 2


@pytest.mark.parametrize("firmware", ["2.8.1", "3.0.3"])  # 3.x: the error line ends in OK
def test_a_firmware_error_fails_the_job_with_the_boards_message(tmp_path, firmware):
    simulator = SimulatorProcess(tmp_path, "--error-at", "60", "--firmware", firmware)
    daemon = daemon_for(tmp_path, simulator)
    try:
        wait_for_device(daemon, "idle")
        _, job = daemon.submit(ONE_LAYER, name="error")
        failed = daemon.wait_for_job(job["id"], {"failed", "completed"})
        assert failed["state"] == "failed"
        assert "simulated fault" in failed["error"]
        wait_for_device(daemon, "idle")
        assert daemon.request("GET", "/api/device")[1]["pen"] == "up"
    finally:
        assert daemon.stop() == 0
    simulator.stop()


def test_a_silent_board_counts_as_lost(tmp_path):
    simulator = SimulatorProcess(tmp_path, "--silent-after", "80")
    daemon = daemon_for(tmp_path, simulator, timeout=1)
    try:
        wait_for_device(daemon, "idle")
        _, job = daemon.submit(ONE_LAYER, name="silent")
        lost = daemon.wait_for_job(job["id"], {"interrupted", "failed", "completed"})
        assert lost["state"] == "interrupted"
        _, events = daemon.request("GET", f"/api/jobs/{job['id']}")
        assert events["progress"] > 0
        assert "did not answer" in daemon.log
        # Its retries say "connecting", but /health must not take that for a plotter.
        wait_for_device(daemon, "connecting")
        status, health = daemon.request("GET", "/health")
        assert status == 200 and health["status"] == "degraded", health
        assert "not answering" in health["reason"] or health["device"] == "error", health
    finally:
        assert daemon.stop() == 0
    simulator.stop()


def test_a_simulator_without_a_record_plots_and_writes_none(tmp_path):
    """The memory benchmark's simulator keeps no record, so that it stops at once
    after a million strokes; it still plots what the daemon sends."""
    simulator = SimulatorProcess(tmp_path, record=False)
    plot_one_layer(tmp_path, simulator, "unrecorded")
    assert simulator.stop() is None
    assert not any(path.name.endswith("record") for path in tmp_path.iterdir())
