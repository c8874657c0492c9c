"""How the daemon is doing, for /health, the `system_status` message and metrics.

One place computes the figures so that /health, the WebSocket and /metrics
never disagree.
"""

from __future__ import annotations

from typing import Any, Callable

import psutil
from twisted.internet.interfaces import IReactorTime

from vfab.jobs.control import DeviceStatus, JobControl
from vfab.web.timestamps import utc_timestamp

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
_SEVERITY = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}

#: Device states in which the plotter is lost or broken.
_DEVICE_TROUBLE = frozenset({"disconnected", "error"})
#: Device states in which the plotter answers.
DEVICE_CONNECTED = frozenset({"idle", "plotting", "paused"})


class SystemMonitor:
    """Computes health and system status from the queue, the device and the host.

    `health` is the daemon's own verdict on what the web face cannot see (the
    store): False means broken ("unhealthy"); or a dict that may hold "status"
    (healthy/degraded/unhealthy) and detail keys, which /health shows. The
    worse of its status and the device's wins. With `device_type` "none" no
    plotter is expected, so a missing one does not degrade health. `plotters`
    lists every plotter's status; with more than one, /health and
    `system_status` also name each plotter's state (`device` is the first's).
    """

    def __init__(self, jobs: JobControl, device: DeviceStatus, clock: IReactorTime, *,
                 connections: Callable[[], int] = lambda: 0,
                 health: Callable[[], bool | dict[str, Any]] | None = None,
                 device_type: str | None = None,
                 plotters: Callable[[], list[dict[str, Any]]] | None = None):
        self._jobs = jobs
        self._plotters = plotters
        self._device = device
        self._clock = clock
        self._connections = connections
        self._health = health
        self._device_required = device_type != "none"
        self._started = clock.seconds()
        # The first cpu_percent(None) call only sets the baseline; prime it now.
        psutil.cpu_percent(interval=None)

    def uptime(self) -> float:
        return round(self._clock.seconds() - self._started, 3)

    def device_state(self) -> str:
        return str(self._device.status().get("status", "disconnected"))

    def health(self) -> dict[str, Any]:
        """The /health document: status, uptime, device state and the caller's details."""
        device = self.device_state()
        status = HEALTHY
        if self._device_required and device in _DEVICE_TROUBLE:
            status = DEGRADED
        details: dict[str, Any] = {}
        if self._health is not None:
            verdict = self._health()
            if isinstance(verdict, dict):
                details = dict(verdict)
                reported = details.pop("status", HEALTHY)
            else:
                reported = HEALTHY if verdict else UNHEALTHY
            if _SEVERITY.get(reported, _SEVERITY[UNHEALTHY]) > _SEVERITY[status]:
                status = reported if reported in _SEVERITY else UNHEALTHY
        health = {**details, "status": status, "uptime": self.uptime(), "device": device}
        farm = self.plotter_states()
        if len(farm) > 1:
            health["plotters"] = farm
        return health

    def plotter_states(self) -> dict[str, str]:
        """Each plotter's name and state, in the configuration's order."""
        if self._plotters is None:
            return {}
        return {str(status.get("plotter")): str(status.get("status", "disconnected"))
                for status in self._plotters()}

    def system_status(self) -> dict[str, Any]:
        """The `system_status` WebSocket message."""
        health = self.health()
        return {
            "type": "system_status",
            "timestamp": utc_timestamp(self._clock.seconds()),
            "status": health["status"],
            "uptime": health["uptime"],
            "active_jobs": self._jobs.active_jobs(),
            "queue_length": self._jobs.queue_length(),
            "memory_usage": round(psutil.virtual_memory().percent / 100.0, 4),
            "cpu_usage": round(psutil.cpu_percent(interval=None) / 100.0, 4),
            "connections": self._connections(),
            "device": health["device"],
            **({"plotters": health["plotters"]} if "plotters" in health else {}),
        }
