"""GET /metrics: Prometheus series named vfab_*.

Gauges are read when scraped; counters follow the event bus (`on_message`),
so the job runner and the WebSocket know nothing of Prometheus. Each
WebService has its own CollectorRegistry, so that several daemons in one
process (tests) do not share or clash over series.
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any, Callable, Iterator, Protocol

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from vfab.jobs.control import JobControl
from vfab.jobs.states import STATES
from vfab.performance import plot_seconds
from vfab.web.api import render_later
from vfab.web.responses import method_not_allowed
from vfab.web.system import DEVICE_CONNECTED, SystemMonitor

#: Plot durations run from a minute to hours.
PLOT_SECONDS_BUCKETS = (30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
#: States that end a stretch of drawing (the pen-down distance is settled then).
_STOPPED = frozenset({"completed", "failed", "cancelled", "interrupted"})


class SerialCounts(Protocol):
    """What the device side offers for the serial counters (both only ever grow)."""

    commands: int  # EBB commands sent since the daemon started
    errors: int    # commands answered with an error, or not answered in time


class _SerialCollector:
    """vfab_serial_commands_total / vfab_serial_errors_total, read at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], SerialCounts] | None = None

    def describe(self) -> list[Metric]:
        return []  # registering must not call collect() before a source is wired

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        counts = self.source()
        yield CounterMetricFamily("vfab_serial_commands", "EBB commands sent to the plotter",
                                  value=counts.commands)
        yield CounterMetricFamily("vfab_serial_errors",
                                  "EBB commands that failed or were not answered in time",
                                  value=counts.errors)


class _PlotterCollector:
    """vfab_plotter_connected{plotter, host}: one series per plotter, read at scrape time."""

    def __init__(self, plotters: Callable[[], list[dict[str, Any]]]):
        self._plotters = plotters

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("vfab_plotter_connected",
                                   "1 when the plotter answers, else 0",
                                   labels=["plotter", "host"])
        for status in self._plotters():
            family.add_metric([str(status.get("plotter")), str(status.get("host"))],
                              1.0 if status.get("status") in DEVICE_CONNECTED else 0.0)
        yield family


class WebMetrics:
    """The series; gauges are read when scraped, counters as things happen.

    The unlabelled device series are the first plotter's (the one a
    single-plotter daemon has); the `vfab_plotter_*` series carry a `plotter`
    label, one per plotter of the farm."""

    def __init__(self, jobs: JobControl, monitor: SystemMonitor,
                 connections: Callable[[], int],
                 plotters: Callable[[], list[dict[str, Any]]] | None = None):
        self._jobs = jobs
        self.registry = CollectorRegistry()
        self._jobs_by_state = Gauge("vfab_jobs", "Jobs in the store, by state",
                                    ["state"], registry=self.registry)
        for state in STATES:
            self._jobs_by_state.labels(state=state).set(0)
        Gauge("vfab_queue_length", "Jobs waiting in the queue",
              registry=self.registry).set_function(jobs.queue_length)
        Gauge("vfab_active_jobs", "Jobs holding the plotter",
              registry=self.registry).set_function(jobs.active_jobs)
        Gauge("vfab_websocket_connections", "Open WebSocket connections",
              registry=self.registry).set_function(connections)
        Gauge("vfab_device_connected", "1 when the plotter answers, else 0",
              registry=self.registry).set_function(
                  lambda: 1.0 if monitor.device_state() in DEVICE_CONNECTED else 0.0)
        Gauge("vfab_uptime_seconds", "Seconds since the web service started",
              registry=self.registry).set_function(monitor.uptime)
        self.messages_sent = Counter("vfab_websocket_messages_sent",
                                     "Messages sent to WebSocket clients",
                                     registry=self.registry)
        self.plots = {
            outcome: Counter(f"vfab_plots_{outcome}", f"Plots {outcome} since the daemon started",
                             registry=self.registry)
            for outcome in ("completed", "failed", "cancelled")}
        self.plot_seconds = Histogram(
            "vfab_plot_duration_seconds",
            "Wall time of completed plots, first move to last (pauses included)",
            buckets=PLOT_SECONDS_BUCKETS, registry=self.registry)
        self.pen_down_meters = Counter("vfab_pen_down_meters",
                                       "Distance drawn with the pen down",
                                       registry=self.registry)
        self._serial = _SerialCollector()
        self.registry.register(self._serial)
        if plotters is not None:
            self.registry.register(_PlotterCollector(plotters))
        self.plotter_plots = Counter("vfab_plotter_plots", "Plots that ended, by plotter "
                                     "and outcome", ["plotter", "outcome"],
                                     registry=self.registry)
        #: job id -> (pen-down mm of the whole job, progress already counted).
        self._drawing: dict[str, tuple[float, float]] = {}

    def count_serial(self, source: Callable[[], SerialCounts]) -> None:
        """Expose the device's serial counters; `source` is called at every scrape."""
        self._serial.source = source

    def on_message(self, channel: str, message: dict[str, Any]) -> None:
        """Feed the job counters from the event bus."""
        if channel != "jobs":
            return
        kind = message.get("type")
        if kind == "job_progress":
            self._drew(str(message.get("job_id")), message.get("progress"))
        elif kind == "job_state_change":
            self._state_changed(message)

    def _state_changed(self, message: dict[str, Any]) -> None:
        job = message.get("job") or {}
        job_id, to_state = str(message.get("job_id")), message.get("to_state")
        if to_state == "plotting" and job_id not in self._drawing:
            self._drawing[job_id] = (float(job.get("pen_down_mm") or 0.0),
                                     float(job.get("progress") or 0.0))
        elif to_state in _STOPPED:
            self._drew(job_id, 1.0 if to_state == "completed" else job.get("progress"))
            self._drawing.pop(job_id, None)
        if to_state in self.plots:
            self.plots[to_state].inc()
            if job.get("plotter"):
                self.plotter_plots.labels(plotter=str(job["plotter"]), outcome=to_state).inc()
        if to_state == "completed":
            seconds = plot_seconds(job)
            if seconds is not None:
                self.plot_seconds.observe(seconds)

    def _drew(self, job_id: str, progress: Any) -> None:
        if job_id not in self._drawing or not isinstance(progress, (int, float)):
            return
        total_mm, counted = self._drawing[job_id]
        if progress > counted:
            self.pen_down_meters.inc((progress - counted) * total_mm / 1000.0)
            self._drawing[job_id] = (total_mm, float(progress))

    def scrape(self) -> Deferred[bytes]:
        """Count the jobs by state, then render every series as text."""
        def counted(jobs: list[dict[str, Any]]) -> bytes:
            tally = Tally(job.get("state") for job in jobs)
            for state in STATES:
                self._jobs_by_state.labels(state=state).set(tally.get(state, 0))
            return generate_latest(self.registry)

        return self._jobs.list().addCallback(counted)


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: WebMetrics):
        super().__init__()
        self._metrics = metrics

    def render(self, request: IRequest) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, [b"GET"])
        return render_later(request, self._metrics.scrape, _text)


def _text(request: IRequest, text: bytes) -> None:
    request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
    request.setHeader(b"Content-Length", b"%d" % len(text))
    request.write(text)
    request.finish()
