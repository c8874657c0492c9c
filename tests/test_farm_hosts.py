"""Several daemons (hosts) on one PostgreSQL queue, as processes: a job received by
one host is plotted by another, its drawing carried by the database; every host
hears every other's events within a second."""

from __future__ import annotations

import json
import threading
import time

from websockets.sync.client import connect

from tests.daemon_process import DaemonProcess, run_vfab, wait_until
from tests.test_farm_daemon import length, square, strokes_of

#: Seconds between heartbeats in these tests (the default is 5).
BEAT = 0.5


def host(tmp_path, name: str, url: str, plotters: list[dict] | None = None,
         **farm: float) -> DaemonProcess:
    """A daemon named `name` on the farm at `url`: virtual plotters, or none at all."""
    config = {"database": {"url": url},
              "farm": {"host": name, "heartbeat_interval": BEAT, **farm}}
    if plotters:
        config["device"] = {"type": "simulator", "model": "V3/A4", "simulator_speed": 20}
        config["plotters"] = plotters
    return DaemonProcess(tmp_path / name, config)


class Events:
    """Every `jobs` message a daemon's WebSocket sends, with when it arrived."""

    def __init__(self, daemon: DaemonProcess):
        self.messages: list[tuple[float, dict]] = []
        self._socket = connect(daemon.ws_url, open_timeout=10)
        self._socket.send(json.dumps({"type": "SUBSCRIBE", "channels": ["jobs", "device"]}))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for frame in self._socket:
                self.messages.append((time.monotonic(), json.loads(frame)))
        except OSError:
            return

    def arrivals(self, kind: str, job_id: str) -> dict[str, float]:
        """When each `to_state` (job_state_change) or the first progress arrived."""
        seen: dict[str, float] = {}
        for moment, message in list(self.messages):
            if message.get("type") != kind or message.get("job_id") != job_id:
                continue
            key = message.get("to_state", "progress")
            seen.setdefault(key, moment)
        return seen

    def close(self) -> None:
        self._socket.close()
        self._thread.join(10)


def test_a_job_received_by_one_host_is_plotted_by_another(tmp_path, postgres_url):
    studio = host(tmp_path, "studio", postgres_url,
                  [{"name": "left", "tags": ["a4"]}]).start()
    desk = host(tmp_path, "desk", postgres_url).start()  # no plotter of its own
    watchers: list[Events] = []
    try:
        wait_until(lambda: any(p["plotter"] == "left"
                               for p in desk.request("GET", "/api/plotters")[1]["plotters"]),
                   "the desk to know the studio's plotter", timeout=30)
        watchers = [Events(studio), Events(desk)]
        code, job = desk.submit(square(3)[0], name="sent to the desk", tags="a4")
        assert code == 201, job
        done = desk.wait_for_job(job["id"], {"completed", "failed"}, timeout=120)
        assert (done["state"], done["plotter"], done["host"]) == ("completed", "left", "studio")
        wait_until(lambda: abs(length(strokes_of(studio, "left")) - 4 * 16) < 0.5,
                   "the studio's plotter to have drawn the square", timeout=30)
        # The drawing went through the database: no host keeps it as a file.
        for daemon in (studio, desk):
            assert list((daemon.workspace / "jobs").glob("*.svg")) == []
        assert studio.request("GET", f"/api/jobs/{job['id']}")[1]["state"] == "completed"

        at_studio = watchers[0].arrivals("job_state_change", job["id"])
        at_desk = watchers[1].arrivals("job_state_change", job["id"])
        assert {"queued", "plotting", "completed"} <= set(at_desk) & set(at_studio)
        for state in ("plotting", "completed"):  # told by the studio, heard at the desk
            assert at_desk[state] - at_studio[state] < 1.0, (state, at_desk, at_studio)
        assert watchers[1].arrivals("job_progress", job["id"])  # progress too
        plotters = desk.request("GET", "/api/plotters")[1]["plotters"]
        assert [(p["plotter"], p["host"]) for p in plotters][-1] == ("left", "studio")

        checked = run_vfab("check", "database", "--config", str(desk.config_path))
        assert checked.returncode == 0, checked.stderr
        assert "database OK: postgresql://vfab@127.0.0.1:" in checked.stdout
        assert "2 host(s)" in checked.stdout
    finally:
        for watcher in watchers:
            watcher.close()
        assert desk.stop() == 0, desk.log
        assert studio.stop() == 0, studio.log

