"""A daemon with two virtual plotters, as a process: jobs that name a plotter or
require tags are each plotted once, on a plotter that matches, every stroke whole."""

from __future__ import annotations

import json
import urllib.request

import numpy as np

from tests.daemon_process import DaemonProcess, run_vfab, wait_until

PLOTTERS = [{"name": "left", "tags": ["a3", "fine"]}, {"name": "right", "tags": ["a4"]}]
#: (the query of each job, which plotters may take it).
ASKS = [({"plotter": "left"}, {"left"}), ({"tags": "a4"}, {"right"}), ({}, {"left", "right"}),
        ({"tags": "a3,fine"}, {"left"}), ({"plotter": "right"}, {"right"}),
        ({}, {"left", "right"}), ({"tags": "fine"}, {"left"}), ({}, {"left", "right"})]


def square(number: int) -> tuple[bytes, list[tuple[float, float]]]:
    """Job `number`'s own square (its place and size tell it apart) and its corners."""
    x, y, size = 10 + 35 * (number % 4), 10 + 35 * (number // 4), 10 + 2 * number
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="200mm" height="200mm" '
           f'viewBox="0 0 200 200"><rect x="{x}" y="{y}" width="{size}" height="{size}" '
           f'fill="none" stroke="black"/></svg>').encode()
    return svg, [(x, y), (x + size, y), (x + size, y + size), (x, y + size)]


def strokes_of(daemon: DaemonProcess, plotter: str) -> list[np.ndarray]:
    path = daemon.workspace / "simulator" / plotter / "strokes.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []
    return [np.asarray(stroke, float) for stroke in record["strokes"] if len(stroke) > 1]


def length(strokes: list[np.ndarray]) -> float:
    return sum(float(np.sum(np.linalg.norm(np.diff(s, axis=0), axis=1))) for s in strokes)


def near(strokes: list[np.ndarray], point: tuple[float, float]) -> bool:
    return any(np.min(np.linalg.norm(s - point, axis=1)) <= 0.1 for s in strokes)


def test_two_virtual_plotters_each_plot_the_jobs_they_may_take(tmp_path):
    daemon = DaemonProcess(tmp_path, {
        "device": {"type": "simulator", "model": "V3/A4", "simulator_speed": 20},
        "plotters": PLOTTERS}).start()
    try:
        status, answer = daemon.request("GET", "/api/plotters")
        assert status == 200
        plotters = {plotter["plotter"]: plotter for plotter in answer["plotters"]}
        assert list(plotters) == ["left", "right"]
        assert plotters["left"]["tags"] == ["a3", "fine"] and plotters["left"]["host"]
        assert [plotters[name]["device_id"] for name in plotters] == ["left", "right"]
        _, device = daemon.request("GET", "/api/device")
        assert device["plotter"] == "left"
        wait_until(lambda: daemon.request("GET", "/health")[1].get("plotters")
                   == {"left": "idle", "right": "idle"}, "/health naming both plotters idle")

        refused = [daemon.submit(square(0)[0], plotter="middle"),
                   daemon.submit(square(0)[0], tags="a2"),
                   daemon.submit(square(0)[0], plotter="right", tags="a3")]
        assert [code for code, _ in refused] == [422, 422, 422]
        assert {body["error"]["code"] for _, body in refused} == {"no_plotter"}

        jobs = []
        for number, (query, _) in enumerate(ASKS):
            code, job = daemon.submit(square(number)[0], name=f"square {number}", **query)
            assert code == 201, job
            jobs.append(job["id"])
        done = [daemon.wait_for_job(job_id, {"completed", "failed", "cancelled"}, timeout=300)
                for job_id in jobs]
        expected = {"left": 0.0, "right": 0.0}
        for number, (job, (query, may)) in enumerate(zip(done, ASKS)):
            assert job["state"] == "completed", job
            assert job["plotter"] in may and job["host"] == plotters["left"]["host"]
            expected[job["plotter"]] += 4 * (10 + 2 * number)
        assert all(expected.values())
        for name, total in expected.items():
            wait_until(lambda: abs(length(strokes_of(daemon, name)) - total) <= 0.005 * total,
                       f"plotter {name}'s record of {total} mm", timeout=60)
        for number, job in enumerate(done):
            corners = square(number)[1]
            mine = strokes_of(daemon, job["plotter"])
            other = strokes_of(daemon, "right" if job["plotter"] == "left" else "left")
            assert all(near(mine, corner) for corner in corners), number
            assert not any(near(other, corner) for corner in corners), number

        listed = run_vfab("list", "plotters", "--url", daemon.url)
        assert listed.returncode == 0, listed.stderr
        assert "left" in listed.stdout and "a3,fine" in listed.stdout
        overall = run_vfab("status", "--url", daemon.url)
        assert "plotter  left: idle" in overall.stdout
        assert "plotter  right: idle" in overall.stdout
        drawing = tmp_path / "one.svg"
        drawing.write_bytes(square(1)[0])
        added = run_vfab("add", "job", "tagged", str(drawing), "--tag", "a3", "--tag", "fine",
                         "--url", daemon.url)
        assert added.returncode == 0, added.stderr
        job = daemon.wait_for_job(added.stdout.strip(), {"completed"}, timeout=120)
        assert job["plotter"] == "left" and job["tags"] == ["a3", "fine"]
        nowhere = run_vfab("add", "job", "x", str(drawing), "--plotter", "middle",
                           "--url", daemon.url)
        assert nowhere.returncode == 1 and "middle" in nowhere.stderr
        with urllib.request.urlopen(daemon.url + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert 'vfab_plotter_connected{host="' in metrics
        assert 'plotter="right"} 1.0' in metrics
        assert 'vfab_plotter_plots_total{outcome="completed",plotter="left"}' in metrics
    finally:
        assert daemon.stop() == 0, daemon.log
