"""GET /metrics: the series fed from the event bus (on fakes), and a scrape of the real
daemon after a plot on the virtual plotter."""

from __future__ import annotations

import urllib.request
from typing import Any

import attr
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import succeed
from websockets.sync.client import connect

from tests.daemon_process import DaemonProcess
from vfab.events import EventBus
from vfab.web.metrics import WebMetrics

SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="40mm" height="40mm" '
       b'viewBox="0 0 40 40"><path d="M5 5 L35 5 L35 35" stroke="black" fill="none"/></svg>')


class FakeJobs:
    def __init__(self, jobs: list[dict[str, Any]] | None = None):
        self.jobs = jobs or []

    def list(self, state=None, limit=None):
        return succeed(list(self.jobs))

    def queue_length(self) -> int:
        return sum(job["state"] == "queued" for job in self.jobs)

    def active_jobs(self) -> int:
        return sum(job["state"] in ("plotting", "paused") for job in self.jobs)


class FakeMonitor:
    device = "idle"

    def device_state(self) -> str:
        return self.device

    def uptime(self) -> float:
        return 12.5


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scraped(metrics: WebMetrics) -> dict[tuple[str, tuple], float]:
    result = []
    metrics.scrape().addCallback(result.append)
    return samples(result[0].decode("utf-8"))


def change(job_id: str, from_state: str | None, to_state: str, **job: Any) -> dict[str, Any]:
    return {"type": "job_state_change", "job_id": job_id, "from_state": from_state,
            "to_state": to_state, "reason": "test",
            "job": {"id": job_id, "name": job_id, "state": to_state, **job}}


def progress(job_id: str, value: float) -> dict[str, Any]:
    return {"type": "job_progress", "job_id": job_id, "progress": value}


def test_gauges_are_read_when_scraped():
    jobs = FakeJobs([{"state": "queued"}, {"state": "queued"}, {"state": "completed"}])
    monitor = FakeMonitor()
    metrics = WebMetrics(jobs, monitor, connections=lambda: 3)
    found = scraped(metrics)
    assert found[("vfab_jobs", (("state", "queued"),))] == 2
    assert found[("vfab_jobs", (("state", "completed"),))] == 1
    assert found[("vfab_jobs", (("state", "interrupted"),))] == 0
    assert found[("vfab_queue_length", ())] == 2
    assert found[("vfab_websocket_connections", ())] == 3
    assert found[("vfab_device_connected", ())] == 1
    monitor.device = "disconnected"
    assert scraped(metrics)[("vfab_device_connected", ())] == 0


def test_job_counters_follow_the_bus():
    bus = EventBus()
    metrics = WebMetrics(FakeJobs(), FakeMonitor(), connections=lambda: 0)
    bus.subscribe(metrics.on_message)
    # A 2 m drawing: half, a pause, on to three quarters, then done.
    bus.publish("jobs", change("a", None, "queued", pen_down_mm=2000.0))
    bus.publish("jobs", change("a", "queued", "plotting", pen_down_mm=2000.0, progress=0.0))
    bus.publish("jobs", progress("a", 0.5))
    bus.publish("jobs", change("a", "plotting", "paused", pen_down_mm=2000.0, progress=0.5))
    bus.publish("jobs", change("a", "paused", "plotting", pen_down_mm=2000.0, progress=0.5))
    bus.publish("jobs", progress("a", 0.75))
    bus.publish("jobs", change("a", "plotting", "completed", pen_down_mm=2000.0, progress=1.0,
                               started_at="2026-01-01T10:00:00.000Z",
                               finished_at="2026-01-01T10:02:00.000Z"))
    # A 1 m drawing that fails at 40 %, and one cancelled before it started.
    bus.publish("jobs", change("b", "queued", "plotting", pen_down_mm=1000.0, progress=0.0))
    bus.publish("jobs", progress("b", 0.4))
    bus.publish("jobs", change("b", "plotting", "failed", pen_down_mm=1000.0, progress=0.4))
    bus.publish("jobs", change("c", "queued", "cancelled", pen_down_mm=500.0))
    found = scraped(metrics)
    assert found[("vfab_plots_completed_total", ())] == 1
    assert found[("vfab_plots_failed_total", ())] == 1
    assert found[("vfab_plots_cancelled_total", ())] == 1
    assert found[("vfab_pen_down_meters_total", ())] == pytest.approx(2.4)
    assert found[("vfab_plot_duration_seconds_count", ())] == 1
    assert found[("vfab_plot_duration_seconds_sum", ())] == 120
    assert found[("vfab_plot_duration_seconds_bucket", (("le", "120.0"),))] == 1
    assert found[("vfab_plot_duration_seconds_bucket", (("le", "60.0"),))] == 0


def test_a_job_resumed_after_a_restart_counts_only_what_is_left():
    metrics = WebMetrics(FakeJobs(), FakeMonitor(), connections=lambda: 0)
    metrics.on_message("jobs", change("a", "interrupted", "plotting", pen_down_mm=1000.0,
                                      progress=0.6))
    metrics.on_message("jobs", change("a", "plotting", "completed", pen_down_mm=1000.0,
                                      progress=1.0))
    assert scraped(metrics)[("vfab_pen_down_meters_total", ())] == pytest.approx(0.4)


@attr.s(auto_attribs=True)
class SerialCounters:
    commands: int = 0
    errors: int = 0


def test_serial_counters_come_from_the_device_once_wired():
    metrics = WebMetrics(FakeJobs(), FakeMonitor(), connections=lambda: 0)
    assert not any(name.startswith("vfab_serial") for name, _ in scraped(metrics))
    counters = SerialCounters()
    metrics.count_serial(lambda: counters)
    counters.commands, counters.errors = 1234, 2
    found = scraped(metrics)
    assert found[("vfab_serial_commands_total", ())] == 1234
    assert found[("vfab_serial_errors_total", ())] == 2


def test_the_daemon_serves_metrics_after_a_plot(tmp_path):
    daemon = DaemonProcess(tmp_path, {"device": {"type": "simulator", "simulator_speed": 20}})
    try:
        daemon.start()
        status, job = daemon.submit(SVG, "measured")
        assert status == 201
        daemon.wait_for_job(job["id"], {"completed"}, timeout=60)
        with connect(daemon.ws_url, open_timeout=10) as client:
            client.send('{"type": "SUBSCRIBE", "channels": ["jobs"]}')
            assert "subscribed" in client.recv(timeout=10)
            with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as response:
                assert response.headers["Content-Type"].startswith("text/plain")
                found = samples(response.read().decode("utf-8"))
    finally:
        code = daemon.stop()
    assert code == 0
    assert found[("vfab_plots_completed_total", ())] == 1
    assert found[("vfab_plots_failed_total", ())] == 0
    assert found[("vfab_jobs", (("state", "completed"),))] == 1
    assert found[("vfab_queue_length", ())] == 0
    assert found[("vfab_device_connected", ())] == 1
    assert found[("vfab_websocket_connections", ())] == 1
    assert found[("vfab_websocket_messages_sent_total", ())] >= 2
    assert found[("vfab_plot_duration_seconds_count", ())] == 1
    assert 0 < found[("vfab_plot_duration_seconds_sum", ())] < 60
    # Two 30 mm strokes.
    assert found[("vfab_pen_down_meters_total", ())] == pytest.approx(0.060, rel=0.01)
    assert found[("vfab_serial_commands_total", ())] > 10
    assert found[("vfab_serial_errors_total", ())] == 0
    assert all(name.startswith("vfab_") for name, _ in found)
