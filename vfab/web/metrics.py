"""GET /metrics: Prometheus series named vfab_*.

Each WebService has its own CollectorRegistry, so that several daemons in one
process (tests) do not share or clash over series.
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from vfab.jobs.control import JobControl
from vfab.jobs.states import STATES
from vfab.web.api import render_later
from vfab.web.responses import method_not_allowed
from vfab.web.system import DEVICE_CONNECTED, SystemMonitor


class WebMetrics:
    """The series; gauges are read when scraped, counters as things happen."""

    def __init__(self, jobs: JobControl, monitor: SystemMonitor,
                 connections: Callable[[], int]):
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
