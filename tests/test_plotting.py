"""End to end: the real daemon plots SVGs on the virtual plotter.

The expected geometry is written out by hand (not read back through vfab's
own SVG code), and the plotter's recorded pen-down strokes must follow it
within 0.1 mm with the same total length (0.5 %).
"""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
from websockets.sync.client import connect

from tests.daemon_process import DaemonProcess

SPEED = 50  # the virtual plotter runs this many times faster than a real one

# 1 user unit = 1 mm. Two Inkscape layers; transforms, nested groups, an arc.
LAYERED_SVG = b"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:inkscape="http://www.inkscape.org/namespaces/inkscape"
     width="200mm" height="150mm" viewBox="0 0 200 150">
  <g inkscape:groupmode="layer" inkscape:label="black" id="layer1">
    <line x1="10" y1="10" x2="60" y2="10" stroke="black"/>
    <rect x="10" y="20" width="20" height="10" fill="none" stroke="black"/>
    <circle cx="100" cy="50" r="15" fill="none" stroke="black"/>
    <g transform="translate(20,80) rotate(90)">
      <line x1="0" y1="0" x2="30" y2="0" stroke="black"/>
    </g>
    <g transform="translate(5,0)"><g transform="scale(2)">
      <line x1="50" y1="60" x2="60" y2="60" stroke="black"/>
    </g></g>
    <path d="M 150 100 A 20 20 0 0 1 190 100" fill="none" stroke="black"/>
  </g>
  <g inkscape:groupmode="layer" inkscape:label="red" id="layer2">
    <polyline points="120,130 180,130 180,140" fill="none" stroke="red"/>
  </g>
</svg>"""


def segment_distance(points, a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    ab = b - a
    t = np.clip(((points - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def circle_distance(points, center, radius):
    return np.abs(np.linalg.norm(points - np.asarray(center, float), axis=1) - radius)


def arc_distance(points, center, radius):
    """The upper half circle (y <= center y, the SVG's y grows down)."""
    d = circle_distance(points, center, radius)
    above = points[:, 1] <= center[1] + 0.05
    return np.where(above, d, np.inf)


LAYERED_SHAPES = [
    (lambda p: segment_distance(p, (10, 10), (60, 10)), 50.0),
    (lambda p: np.min([segment_distance(p, a, b) for a, b in [
        ((10, 20), (30, 20)), ((30, 20), (30, 30)), ((30, 30), (10, 30)),
        ((10, 30), (10, 20))]], axis=0), 60.0),
    (lambda p: circle_distance(p, (100, 50), 15), 2 * math.pi * 15),
    (lambda p: segment_distance(p, (20, 80), (20, 110)), 30.0),
    (lambda p: segment_distance(p, (105, 120), (125, 120)), 20.0),
    (lambda p: arc_distance(p, (170, 100), 20), math.pi * 20),
    (lambda p: np.minimum(segment_distance(p, (120, 130), (180, 130)),
                          segment_distance(p, (180, 130), (180, 140))), 70.0),
]

# Inches and pixels: 96 px per inch, no viewBox.
UNITS_SVG = b"""<svg xmlns="http://www.w3.org/2000/svg" width="8in" height="6in">
  <line x1="96" y1="96" x2="192" y2="96" stroke="black"/>
  <path d="M 96 192 C 96 240, 192 240, 192 192" fill="none" stroke="black"/>
</svg>"""


def cubic(t, p0, p1, p2, p3):
    t = t[:, None]
    return ((1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2
            + t ** 3 * p3)


_MM = 25.4 / 96
_CURVE = cubic(np.linspace(0, 1, 4001), *(np.array(p, float) * _MM for p in
                                          [(96, 192), (96, 240), (192, 240), (192, 192)]))
UNITS_SHAPES = [
    (lambda p: segment_distance(p, (25.4, 25.4), (50.8, 25.4)), 25.4),
    (lambda p: np.min(np.linalg.norm(p[:, None, :] - _CURVE[None, :, :], axis=2), axis=1),
     float(np.sum(np.linalg.norm(np.diff(_CURVE, axis=0), axis=1)))),
]


def start_plotter_daemon(tmp_path, **device):
    settings = {"type": "simulator", "simulator_speed": SPEED, **device}
    return DaemonProcess(tmp_path, {"device": settings}).start()


def wait_for_device(daemon, status="idle", timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, device = daemon.request("GET", "/api/device")
        if device["status"] == status:
            return device
        time.sleep(0.05)
    raise AssertionError(f"device never {status}: {device}\n{daemon.log}")


def recorded(daemon, timeout=30.0):
    """The virtual plotter's record, once it has been written after the plot."""
    path = daemon.workspace / "simulator" / "strokes.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass  # caught mid-write; read again
        time.sleep(0.05)
    raise AssertionError(f"no record at {path}\n{daemon.log}")


def check_strokes(record, shapes):
    points = np.vstack([np.asarray(stroke, float) for stroke in record["strokes"]])
    distance = np.min([shape(points) for shape, _ in shapes], axis=0)
    assert distance.max() <= 0.1, f"a stroke strays {distance.max():.3f} mm from the drawing"
    expected = sum(length for _, length in shapes)
    drawn = sum(float(np.sum(np.linalg.norm(np.diff(np.asarray(s, float), axis=0), axis=1)))
                for s in record["strokes"])
    assert abs(drawn - expected) / expected <= 0.005, (drawn, expected)
    # Every part of every shape was drawn: sample each shape densely against the strokes.
    return drawn


class ProgressListener(threading.Thread):
    """Collects job messages from the WebSocket while a plot runs."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.messages: list[dict] = []
        self.subscribed = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        with connect(self.url, open_timeout=10, close_timeout=5) as ws:
            ws.send(json.dumps({"type": "subscribe", "channels": ["jobs"]}))
            while not self.stop.is_set():
                try:
                    message = json.loads(ws.recv(timeout=0.2))
                except TimeoutError:
                    continue
                if message["type"] == "subscribed":
                    self.subscribed.set()
                self.messages.append(message)


def test_a_layered_drawing_is_plotted_exactly(tmp_path):
    daemon = start_plotter_daemon(tmp_path)
    listener = ProgressListener(daemon.ws_url)
    try:
        wait_for_device(daemon)
        listener.start()
        assert listener.subscribed.wait(10)
        status, job = daemon.submit(LAYERED_SVG, name="layers")
        assert status == 201, job
        assert job["layers"] == 2 and job["paths"] == 7
        assert abs(job["pen_down_mm"] - sum(length for _, length in LAYERED_SHAPES)) < 0.5
        waiting = daemon.wait_for_job(job["id"], {"awaiting_pen", "completed", "failed"})
        assert waiting["state"] == "awaiting_pen", waiting
        status, resumed = daemon.request("POST", f"/api/jobs/{job['id']}/resume")
        assert status == 200 and resumed["state"] == "plotting"
        done = daemon.wait_for_job(job["id"], {"completed", "failed"})
        assert done["state"] == "completed", done
        assert done["progress"] == 1.0
        record = recorded(daemon)
        check_strokes(record, LAYERED_SHAPES)
        # The estimate comes from the plan and matches what the plotter took.
        assert abs(record["motion_seconds"] - job["estimated_seconds"]) \
            <= 0.02 * record["motion_seconds"], (record["motion_seconds"], job)
    finally:
        listener.stop.set()
        listener.join(10)
        assert daemon.stop() == 0, daemon.log
    progress = [m for m in listener.messages if m["type"] == "job_progress"]
    values = [m["progress"] for m in progress]
    assert values[0] < 0.05 and values[-1] == 1.0
    assert values == sorted(values)
    assert {"progress_percentage", "current_layer", "total_layers", "paths_done",
            "total_paths", "elapsed_seconds", "eta_seconds"} <= set(progress[-1])
    changes = [(m["from_state"], m["to_state"]) for m in listener.messages
               if m["type"] == "job_state_change"]
    assert changes == [(None, "queued"), ("queued", "plotting"), ("plotting", "awaiting_pen"),
                       ("awaiting_pen", "plotting"), ("plotting", "completed")]
    stamps = [m["timestamp"] for m in progress]
    assert all(stamp.endswith("Z") for stamp in stamps)


def test_units_and_curves_are_plotted_exactly(tmp_path):
    daemon = start_plotter_daemon(tmp_path)
    try:
        wait_for_device(daemon)
        status, job = daemon.submit(UNITS_SVG, name="units")
        assert status == 201, job
        done = daemon.wait_for_job(job["id"], {"completed", "failed"})
        assert done["state"] == "completed", done
        check_strokes(recorded(daemon), UNITS_SHAPES)
        _, device = daemon.request("GET", "/api/device")
        assert device["pen"] == "up" and device["position_mm"] == [0.0, 0.0]
        assert device["firmware_version"] == "2.8.1"
    finally:
        assert daemon.stop() == 0, daemon.log


def test_jobs_run_by_priority(tmp_path):
    daemon = start_plotter_daemon(tmp_path, type="none")
    try:
        ids = [daemon.submit(UNITS_SVG, name=name, priority=priority)[1]["id"]
               for name, priority in (("low", 0), ("high", 5), ("later low", 0))]
    finally:
        assert daemon.stop() == 0
    again = start_plotter_daemon(tmp_path)
    try:
        finished = [again.wait_for_job(job_id, {"completed"}) for job_id in ids]
        order = sorted(finished, key=lambda job: job["started_at"])
        assert [job["name"] for job in order] == ["high", "low", "later low"]
    finally:
        assert again.stop() == 0


def test_a_drawing_outside_the_travel_is_refused(tmp_path):
    daemon = start_plotter_daemon(tmp_path, model="MiniKit")
    try:
        status, answer = daemon.submit(LAYERED_SVG, name="too big")
        assert status == 422
        assert answer["error"]["code"] == "out_of_travel"
        assert "MiniKit" in answer["error"]["message"]
        status, answer = daemon.submit(b"this is not svg", name="junk")
        assert status == 400 and answer["error"]["code"] == "invalid_svg"
        assert daemon.request("GET", "/health")[0] == 200
    finally:
        assert daemon.stop() == 0
