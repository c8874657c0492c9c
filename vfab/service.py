"""The daemon's service tree and its ordered start and stop.

`MultiService` starts children in order but stops them all at once, and the
daemon needs a strict order both ways, so `VfabService` sequences them itself:

start: database opened and migrated -> HTTP/WebSocket server listening ->
       device services started, one per plotter (these three before twistd
       drops root) -> queue service started -> hooks ready.
stop:  stop accepting jobs -> let the active plots finish or pause them at a
       safe point -> close WebSocket clients (1001) -> park every plotter ->
       close the database.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from vfab.audit import AuditLog
from vfab.config import Config, database_location
from vfab.disk import DiskSpace
from vfab.events import EventBus
from vfab.farmlink import FarmLink
from vfab.geometry import SVGLimits
from vfab.hooks import HookService
from vfab.jobs.queue import QueueService
from vfab.performance import PerformanceLog
from vfab.plotter.ebb import SerialCounts
from vfab.plotter.service import DeviceService
from vfab.store.jobstore import DatabaseError, JobStore
from vfab.systemd import ActivationError, activation_endpoint, tell_systemd
from vfab.web.server import WebService
from vfab.workspace_lock import WorkspaceInUse, WorkspaceLock

_log = Logger()


class StartupError(RuntimeError):
    """Start-up cannot go on; the message is the one-line reason shown to the operator."""


def make_private_dir(path: Path, owner: tuple[int, int] | None) -> None:
    """Create a folder readable only by the daemon's user (0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if owner is not None and os.geteuid() == 0:
        os.chown(path, *owner)


class VfabService(MultiService):
    """The root of the daemon's services."""

    def __init__(self, config: Config, workspace: Path, reactor: Any, *,
                 owner: tuple[int, int] | None = None, log_observer: Any = None,
                 handle_signals: bool = False, audit: AuditLog | None = None):
        super().__init__()
        self.audit = audit or AuditLog()
        self.config = config
        self.workspace = workspace
        self._reactor = reactor
        self._owner = owner
        self._log_observer = log_observer
        self._handle_signals = handle_signals
        self._stop_requested = False
        self._privileged_started = False
        self._lock = WorkspaceLock(workspace)
        self.bus = EventBus()
        self.disk = DiskSpace(workspace, self.bus, reactor)
        host = config.host()
        self.store = JobStore(database_location(config.database.url, workspace),
                              reactor=reactor, pool_size=config.database.pool_size,
                              max_overflow=config.database.max_overflow,
                              drawings=workspace / "jobs", on_disk_full=self.disk.noticed_full,
                              host=host)
        # One device service per plotter; a `device:`-only configuration keeps its
        # simulator's drawing where it always was.
        self.devices = [
            DeviceService(plotter.device, self.bus, reactor, plotter=plotter.name, host=host,
                          tags=plotter.tags,
                          # On a farm the id tells the plotters apart; alone it stays the type.
                          device_id=plotter.name if config.plotters else None,
                          record_dir=workspace / "simulator" / (
                              plotter.name if config.plotters else ""))
            for plotter in config.plotters_here()]
        for device in self.devices[1:]:  # service names are unique; the first stays "device"
            device.setName(f"device {device.plotter_name}")
        #: The first plotter: the one /api/device and /health show.
        self.device = self.devices[0]
        self.queue = QueueService(store=self.store, devices=self.devices, bus=self.bus,
                                  jobs_dir=workspace / "jobs", reactor=reactor, disk=self.disk,
                                  limits=SVGLimits(config.uploads.max_elements,
                                                   config.uploads.max_coordinates))
        try:
            endpoint = activation_endpoint(reactor)
        except ActivationError as error:
            raise StartupError(f"socket activation: {error}") from None
        self.web = WebService(config.websocket, self.queue, self.device, self.bus, reactor,
                              health=self._health, device_type=config.device.type,
                              audit=self.audit, endpoint=endpoint,
                              max_upload_size=config.uploads.max_size,
                              max_concurrent_uploads=config.uploads.max_concurrent,
                              upload_room=self.disk.room_for_upload,
                              plotters=self.queue.plotters)
        self.bus.subscribe(self.web.metrics.on_message)
        self.web.metrics.count_serial(self._serial_counts)
        self.performance = PerformanceLog(
            self.bus, config.device.simulator_speed if config.device.type == "simulator" else 1.0)
        self.hooks = HookService(config.hooks, self.bus, reactor)
        #: A farm's link to its other hosts (PostgreSQL only).
        self.farm: FarmLink | None = None
        if self.store.engine == "postgresql":
            self.farm = FarmLink(url=config.database.url, host=host, store=self.store,
                                 queue=self.queue, bus=self.bus, reactor=reactor,
                                 heartbeat_interval=config.farm.heartbeat_interval,
                                 host_timeout=config.farm.host_timeout)
        for child in (self.web, *self.devices, self.queue, self.hooks):
            child.setServiceParent(self)
        if self.farm is not None:
            self.farm.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd, hand the daemon's log observer to the application: twistd's
        documented place for it, used unless `--logger` names another."""
        super().setServiceParent(parent)
        if self._log_observer is not None and hasattr(parent, "setComponent") \
                and parent.getComponent(ILogObserver, None) is None:
            parent.setComponent(ILogObserver, self._log_observer)

    def _serial_counts(self) -> SerialCounts:
        """The serial counters of every plotter, added up."""
        return SerialCounts(commands=sum(d.serial_counts.commands for d in self.devices),
                            errors=sum(d.serial_counts.errors for d in self.devices))

    def _health(self) -> dict[str, Any]:
        """What the web face cannot see: a store that is closed or damaged makes
        /health "unhealthy"; a full disk, a plotter after the first that is
        missing, or any plotter retrying to connect "degraded"; `reason` says why."""
        if not self.store.is_open:
            return {"status": "unhealthy", "reason": "the database is closed"}
        if self.store.damage is not None:
            return {"status": "unhealthy", "reason": self.store.damage}
        if self.disk.full is not None:
            return {"status": "degraded", "disk": "full", "reason": self.disk.full}
        for device in self.devices:
            if device.config.type != "none" and device.reconnecting:
                return {"status": "degraded",
                        "reason": f"plotter {device.plotter_name} is not answering; "
                                  "reconnecting"}
        for device in self.devices[1:]:
            status = device.status()["status"]
            if device.config.type != "none" and status in ("disconnected", "error"):
                return {"status": "degraded",
                        "reason": f"plotter {device.plotter_name} is {status}"}
        return {}

    # -- start ------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """The steps that may need root: the database files, the port, the device."""
        if self._privileged_started:
            return
        self._privileged_started = True
        Service.privilegedStartService(self)
        self._step("database", self._open_database)
        self._step("HTTP/WebSocket server", self._listen)
        for device in self.devices:
            self._step(f"device service of plotter {device.plotter_name}", device.startService)
            _log.info("device service started ({type}): plotter {plotter}",
                      plotter=device.plotter_name, type=device.config.type)

    def startService(self) -> None:
        self.privilegedStartService()
        Service.startService(self)
        self.disk.start()
        self._step("queue service", self.queue.startService)
        self._step("hooks", self.hooks.startService)
        if self.farm is not None:
            self._step("farm link", self.farm.startService)
        self._reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        """The reactor runs: from now on requests are served and signals mean a clean stop."""
        if self._handle_signals:
            self._install_signal_handlers()
        self._report_identity()
        _log.info("vfab ready: http://{host}:{port}/ (WebSocket at /ws)",
                  host=self.config.websocket.host, port=self.web.port)
        tell_systemd("READY=1")

    def _report_identity(self) -> None:
        """Say whom the daemon runs as: twistd has dropped root (if asked) by now."""
        ids = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
               "egid": os.getegid()}
        if self._owner is not None:
            _log.info("privileges dropped: running as uid {uid}, gid {gid}", **ids)
            self.audit.record("privileges_dropped", None, **ids)
        elif os.geteuid() == 0:
            _log.warn("running as root: pass --user and --group (e.g. a dedicated user in "
                      "the dialout group) so that the daemon drops root after binding")
        self.audit.record("daemon_started", None, pid=os.getpid(),
                          host=self.config.websocket.host, port=self.web.port,
                          authenticate=self.config.websocket.authenticate, **ids)

    def _step(self, what: str, action: Any) -> None:
        try:
            action()
        except StartupError:
            raise
        except DatabaseError as error:  # its message names the database already
            raise StartupError(str(error)) from None
        except OSError as error:
            raise StartupError(f"{what}: {error}") from None

    def _open_database(self) -> None:
        make_private_dir(self.workspace, self._owner)
        try:
            self._lock.acquire()
        except WorkspaceInUse as error:
            raise StartupError(str(error)) from None
        if self._owner is not None and os.geteuid() == 0:
            os.chown(self._lock.path, *self._owner)
        self.store.open()
        if self._owner is not None and os.geteuid() == 0 and self.store.path is not None:
            for suffix in ("", "-wal", "-shm"):
                path = Path(f"{self.store.path}{suffix}")
                if path.exists():
                    os.chown(path, *self._owner)
        _log.info("database opened and migrated: {path}", path=self.store.where)

    def _listen(self) -> None:
        if not self.config.websocket.enabled:
            _log.warn("websocket.enabled is false: no HTTP API and no WebSocket")
            return
        listening = self.web.startService()
        result: list[Any] = []
        listening.addBoth(result.append)
        if not result:
            raise StartupError("HTTP/WebSocket server: the listening port did not open")
        if isinstance(result[0], Failure):
            raise StartupError(result[0].getErrorMessage())

    def _install_signal_handlers(self) -> None:
        """A clean stop on SIGTERM or SIGINT exits 0, as the contract says (twistd's own
        handlers make the process die of the signal instead)."""
        def stop(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stop_requested:
                _log.info("received {signal} again: already shutting down", signal=name)
                return
            self._stop_requested = True
            _log.info("received {signal}, shutting down", signal=name)
            self._reactor.callFromThread(self._reactor.stop)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    # -- stop -------------------------------------------------------------------

    @inlineCallbacks
    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        tell_systemd("STOPPING=1")
        _log.info("shutdown: stop accepting jobs")
        self.queue.stop_accepting()
        yield self._stop_step("active job", self.queue)
        yield self._stop_step("hooks", self.hooks)
        _log.info("shutdown: closing WebSocket clients")
        yield self._stop_step("HTTP/WebSocket server", self.web)
        _log.info("shutdown: parking the device (pen up, motors off) of every plotter")
        yield DeferredList([self._stop_step(f"plotter {device.plotter_name}", device)
                            for device in self.devices])
        if self.farm is not None and self.farm.running:
            self.farm.stopService()
        self.disk.stop()
        self.store.close()
        self._lock.release()
        _log.info("shutdown complete")
        self.audit.record("daemon_stopped", None, pid=os.getpid())
        self.audit.close()

    @inlineCallbacks
    def _stop_step(self, what: str, service: Service) -> Deferred[None]:
        if not service.running:
            return
        try:
            yield service.stopService()
        except Exception:
            _log.failure("shutdown: stopping the {what} failed", what=what)
