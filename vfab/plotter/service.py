"""The device service: keeps the plotter connected, reports its status, parks it at shutdown.

For `device.type: axidraw` it opens the configured serial port (or the first
EiBotBoard USB device for `auto`); for `simulator` it starts the virtual plotter
on a pty in this reactor and opens that through the same SerialPort path; for
`none` it stays disconnected. A missing or lost device never stops the daemon:
the service reports `disconnected` and retries with backoff, as ClientService
does. Every status change is published on the bus's `device` channel.

For the job runner: `plotter` (a connected Plotter or None), `when_connected()`,
`on_lost(callback)`, `set_job()`, `update_position()` and `park()`.

Home: on connect the motors are enabled, which zeroes the board's step
counters, so wherever the carriage stands then is the origin (as with the
AxiDraw software: park the carriage in the home corner before connecting).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import serial
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from vfab.config import DeviceConfig, host_name, plotter_name_of_host
from vfab.events import EventBus
from vfab.plotter.ebb import EBBProtocol, SerialCounts
from vfab.plotter.errors import DeviceError, DeviceLost, EBBError, DeviceTimeout
from vfab.plotter.kinematics import motor_steps_to_mm
from vfab.plotter.pen import PenServo
from vfab.plotter.plotter import Plotter, motors_kept
from vfab.plotter.ports import PortOpener, find_ebb_port, open_serial_port

if TYPE_CHECKING:
    from vfab.simulator import Faults

log = Logger()

STATUSES = ("disconnected", "connecting", "idle", "plotting", "paused", "error")
#: Firmware older than this is not supported by the contract (it may still work).
OLDEST_FIRMWARE = (2, 5, 0)
#: SR (servo power timeout) exists from this firmware on.
SR_FIRMWARE = (2, 6, 0)
#: Position-only status updates are published at most this often (seconds).
POSITION_INTERVAL = 0.1
#: How long stopService waits for the port to report closed.
CLOSE_TIMEOUT = 5.0

LostCallback = Callable[[Failure], None]


class DeviceService(Service):
    """Owns the plotter connection for the daemon's lifetime."""

    name = "device"

    def __init__(self, config: DeviceConfig, bus: EventBus, reactor, *,
                 port_opener: PortOpener | None = None,
                 record_dir: str | os.PathLike | None = None,
                 device_id: str | None = None,
                 list_ports: Callable | None = None,
                 retry_policy: Callable[[int], float] | None = None,
                 simulator_faults: "Faults | None" = None,
                 plotter: str | None = None, host: str | None = None,
                 tags: tuple[str, ...] = ()):
        """`record_dir`: where the virtual plotter writes its drawing (type simulator);
        `device_id`: the status's id (default: the device type); `plotter`, `host`
        and `tags`: the farm's name of this plotter (default: the host's), its host
        and its tags, which the status carries; `list_ports`, `retry_policy` (attempt -> seconds) and
        `simulator_faults` are for tests.
        """
        self.config = config
        self.plotter_name = plotter or plotter_name_of_host()
        self.host = host or host_name()
        self.tags = tags
        self.bus = bus
        self.reactor = reactor
        self.record_dir = record_dir
        self.device_id = device_id or config.type
        self._port_opener = port_opener or open_serial_port
        self._list_ports = list_ports
        self._retry_policy = retry_policy or backoffPolicy(maxDelay=config.reconnect_max_delay)
        self._simulator_faults = simulator_faults
        self.simulator = None  # the VirtualPlotter for type simulator
        self._status = "disconnected"
        self._port: str | None = None
        self._firmware: str | None = None
        self._job_id: str | None = None
        self._pen = "up"
        self._position = (0.0, 0.0)
        self._protocol: EBBProtocol | None = None
        self._plotter: Plotter | None = None
        self._waiters: list[Deferred] = []
        self._lost_callbacks: list[LostCallback] = []
        self._failed_attempts = 0
        self._retry_call = None
        self._position_call = None
        self._last_publish = float("-inf")
        self._stopping = False
        self._connected_before = False
        #: Serial commands and failures since start, for the metrics.
        self.serial_counts = SerialCounts()
        self._position_kept = False

    # -- status -------------------------------------------------------------

    def status(self) -> dict:
        """The `device_status` message (without timestamp; the web layer adds it)."""
        return {
            "type": "device_status",
            "device_id": self.device_id,
            "status": self._status,
            "port": self._port,
            "firmware_version": self._firmware,
            "current_job_id": self._job_id,
            "pen": self._pen,
            "position_mm": [round(self._position[0], 3), round(self._position[1], 3)],
            "plotter": self.plotter_name,
            "host": self.host,
            "tags": list(self.tags),
            # How much faster than an AxiDraw the virtual plotter runs: estimates
            # (an AxiDraw's time) divided by it are the time a plot takes here.
            **({"simulator_speed": self.config.simulator_speed}
               if self.config.type == "simulator" else {}),
        }

    def _publish(self) -> None:
        if self._position_call is not None and self._position_call.active():
            self._position_call.cancel()
        self._position_call = None
        self._last_publish = self.reactor.seconds()
        self.bus.publish("device", self.status())

    @property
    def reconnecting(self) -> bool:
        """Whether a "connecting" is a retry for a plotter that was lost or did not
        answer: the plotter is missing although the status looks hopeful."""
        return self._status == "connecting" and (self._connected_before
                                                  or self._failed_attempts > 0)

    def _set(self, **fields: Any) -> None:
        """Change status fields; publish if anything changed."""
        changed = False
        for name, value in fields.items():
            if getattr(self, "_" + name) != value:
                setattr(self, "_" + name, value)
                changed = True
        if changed:
            self._publish()

    def _alert(self, severity: str, title: str, message: str) -> None:
        self.bus.publish("system", {"type": "system_alert", "severity": severity,
                                    "title": title, "message": message})

    # -- for the job runner ---------------------------------------------------

    @property
    def plotter(self) -> Plotter | None:
        """The connected plotter, or None while there is none."""
        return self._plotter

    @property
    def position_kept(self) -> bool:
        """The board kept power since it was last driven: its step counters, found
        running on this connection, still say where the carriage stopped."""
        return self._plotter is not None and self._position_kept

    def when_connected(self) -> Deferred:
        """Fires with the Plotter once connected (at once if it is); fails if the service stops."""
        if self._plotter is not None:
            return defer.succeed(self._plotter)
        waiter: Deferred = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters
                                    else None)
        self._waiters.append(waiter)
        return waiter

    def on_lost(self, callback: LostCallback) -> Callable[[], None]:
        """Call `callback(reason)` whenever a connected plotter is lost; returns an unsubscribe.

        The reason is a Failure of DeviceLost or DeviceTimeout. Moves in flight
        fail with DeviceLost too; the service reconnects by itself.
        """
        self._lost_callbacks.append(callback)
        return lambda: self._lost_callbacks.remove(callback) \
            if callback in self._lost_callbacks else None

    def set_job(self, job_id: str | None, state: str = "plotting") -> None:
        """The runner's job and whether it is `plotting` or `paused`; None means no job."""
        if job_id is not None and state not in ("plotting", "paused"):
            raise ValueError(f"job state must be 'plotting' or 'paused', got {state!r}")
        fields: dict[str, Any] = {"job_id": job_id}
        if self._plotter is not None:
            fields["status"] = state if job_id is not None else "idle"
        self._set(**fields)

    def update_position(self, x_mm: float, y_mm: float, pen_down: bool) -> None:
        """Where the pen is now (mm from home) and whether it is down; published at most 10/s."""
        pen = "down" if pen_down else "up"
        if pen != self._pen:
            self._position = (x_mm, y_mm)
            self._set(pen=pen)
            return
        if (x_mm, y_mm) == self._position:
            return
        self._position = (x_mm, y_mm)
        wait = self._last_publish + POSITION_INTERVAL - self.reactor.seconds()
        if wait <= 0:
            self._publish()
        elif self._position_call is None:
            self._position_call = self.reactor.callLater(wait, self._publish)

    @defer.inlineCallbacks
    def park(self):
        """Raise the pen, go home, switch the motors off and leave the board as it
        boots; does nothing when disconnected, never fails.

        Home first: the board zeroes its step counters when the motors come on
        again, so a carriage left elsewhere would shift every later drawing.
        """
        plotter = self._plotter
        if plotter is None:
            return None
        try:
            yield plotter.pen_up()
            self._set(pen="up")
            yield plotter.wait_idle()
            steps = yield plotter.query_steps()
            if tuple(steps) != (0, 0):
                yield plotter.home(self.config.speed_pen_up)
                self.update_position(0.0, 0.0, pen_down=False)
            yield plotter.motors_off()
            yield plotter.protocol.release()
        except DeviceError as error:
            log.warn("could not park the plotter: {error}", error=str(error))
        return None

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 (Twisted name)
        super().startService()
        self._stopping = False
        self._publish()  # the starting point, for whoever listens from the start
        if self.config.type == "none":
            log.info("no plotter configured (device.type: none)")
            return
        if self.config.type == "simulator":
            self._start_simulator()
        self._connect()

    def _start_simulator(self) -> None:
        from vfab.simulator import start_virtual_plotter  # only the simulator needs it
        self.simulator = start_virtual_plotter(
            self.reactor, speed=self.config.simulator_speed, record_dir=self.record_dir,
            faults=self._simulator_faults, page_mm=self.config.travel_mm,
            firmware=self.config.firmware)

    @defer.inlineCallbacks
    def stopService(self):  # noqa: N802 (Twisted name)
        """Park the plotter, close the port, stop the simulator; bounded by the device timeout."""
        self._stopping = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        yield self.park()
        protocol, self._protocol, self._plotter = self._protocol, None, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()
            closed = protocol.when_closed()
            closed.addTimeout(CLOSE_TIMEOUT, self.reactor)
            try:
                yield closed
            except defer.TimeoutError:
                log.warn("the plotter's port did not close within {seconds} s",
                         seconds=CLOSE_TIMEOUT)
        if self.simulator is not None:
            self.simulator.stop()
            self.simulator = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(DeviceLost("the device service stopped"))
        self._set(status="disconnected", firmware=None)
        yield defer.maybeDeferred(super().stopService)

    # -- connecting ------------------------------------------------------------

    def _device_path(self) -> str | None:
        if self.simulator is not None:
            return self.simulator.path
        if self.config.port == "auto":
            return find_ebb_port(self._list_ports) if self._list_ports else find_ebb_port()
        return self.config.port

    def _connect(self) -> None:
        self._retry_call = None
        if self._stopping:
            return
        path = self._device_path()
        if path is None:
            self._attempt_failed("no AxiDraw found: no USB device 04D8:FD92 is plugged in",
                                 "disconnected")
            return
        self._set(status="connecting", port=path)
        protocol = EBBProtocol(self.reactor, self.config.timeout, counts=self.serial_counts)
        protocol.on_lost = lambda reason: self._lost(protocol, reason)
        try:
            self._port_opener(protocol, path, self.reactor, self.config.baud_rate)
        except (serial.SerialException, OSError, ValueError) as error:
            self._attempt_failed(f"cannot open the plotter port {path}: {error}", "disconnected")
            return
        self._protocol = protocol
        self._handshake(protocol).addCallbacks(
            self._connected, self._handshake_failed,
            callbackArgs=(protocol,), errbackArgs=(protocol,))

    @defer.inlineCallbacks
    def _handshake(self, protocol: EBBProtocol):
        """Version, pen servo settings, pen up, servo power timeout; whether the board
        kept its step counters."""
        version = yield protocol.version()
        log.info("plotter on {port}: {text}", port=self._port, text=protocol.version_text)
        yield protocol.take_over()
        if version < OLDEST_FIRMWARE:
            log.warn("plotter firmware {version} is older than 2.5.0; please update it",
                     version=".".join(map(str, version)))
        yield protocol.configure_pen(self.config)
        yield protocol.pen(True, PenServo.from_config(self.config).raise_ms)
        if version >= SR_FIRMWARE:
            yield protocol.servo_timeout(int(self.config.servo_timeout * 1000))
        # Motors still on at our microstepping mean the board kept power since we
        # last drove it: its step counters still say where the carriage is, and
        # enabling the motors again would zero them. Motors that are off stay off
        # until a plot needs them: the carriage can be pushed home by hand, and a
        # board that lost power still says so to the next connection (a daemon
        # killed before it plots must not leave counters that look kept).
        kept = yield motors_kept(protocol, self.config.microstepping)
        self._position_kept = kept
        if kept:
            steps = yield protocol.query_steps()
            self._position = motor_steps_to_mm(steps[0], steps[1], self.config.microstepping)
            log.info("the plotter kept its position: the carriage is at "
                     "({x:.1f}, {y:.1f}) mm", x=self._position[0], y=self._position[1])
        else:
            self._position = (0.0, 0.0)
        return version

    def _connected(self, version: tuple[int, int, int], protocol: EBBProtocol) -> None:
        if self._stopping or protocol.lost or protocol is not self._protocol:
            return
        self._failed_attempts = 0
        self._plotter = Plotter(protocol, self.config)
        status = "idle" if self._job_id is None else "paused"
        self._set(status=status, firmware=".".join(map(str, version)), pen="up")
        log.info("plotter connected on {port}", port=self._port)
        if self._connected_before and not self._position_kept:
            self._alert("warning", "Plotter position lost",
                        f"The plotter on {self._port} was reset or lost power and no longer "
                        "knows where the carriage is. Move the carriage to the home corner "
                        "(pen up) before resuming an interrupted job.")
        self._connected_before = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._plotter)

    def _handshake_failed(self, failure: Failure, protocol: EBBProtocol) -> None:
        if protocol is self._protocol:
            self._protocol = None
        if protocol.transport is not None and not protocol.lost:
            protocol.transport.loseConnection()
        if self._stopping:
            return
        if failure.check(EBBError, DeviceTimeout, ValueError):
            self._attempt_failed(f"the device on {self._port} does not answer like an "
                                 f"AxiDraw: {failure.getErrorMessage()}", "error")
        elif failure.check(DeviceError):
            self._attempt_failed(failure.getErrorMessage(), "disconnected")
        else:
            log.failure("unexpected failure connecting to the plotter", failure)
            self._attempt_failed(failure.getErrorMessage(), "error")

    def _attempt_failed(self, message: str, status: str) -> None:
        """Report the failed attempt and schedule the next one with backoff."""
        self._failed_attempts += 1
        delay = self._retry_policy(self._failed_attempts)
        log.warn("{message}; retrying in {delay:.1f} s", message=message, delay=delay)
        self._set(status=status, firmware=None)
        if not self._stopping:
            self._retry_call = self.reactor.callLater(delay, self._connect)

    def _lost(self, protocol: EBBProtocol, reason: Failure) -> None:
        """A connected plotter went away: tell everyone, then reconnect."""
        if self._plotter is None or self._plotter.protocol is not protocol:
            return  # an attempt that never connected; its handshake reports it
        self._plotter = None
        self._protocol = None
        message = reason.getErrorMessage()
        log.warn("lost the plotter on {port}: {message}", port=self._port, message=message)
        if self._stopping:
            return
        self._set(status="disconnected", firmware=None)
        self._alert("error", "Plotter disconnected",
                    f"Lost the plotter on {self._port}: {message}. Reconnecting.")
        for callback in list(self._lost_callbacks):
            try:
                callback(reason)
            except Exception:  # one bad subscriber must not stop the others
                log.failure("plotter-lost callback {callback!r} failed", callback=callback)
        self._failed_attempts = 0
        self._retry_call = self.reactor.callLater(0, self._connect)
