"""The plotter side of the feeding benchmarks: the emulator behind a slow serial link.

The emulator sits behind a LoopbackPort with a real serial link's round trip:
each direction is delayed on the reactor, so a reply reaches the host a full
round trip after its command left. `LagMonitor` is a 10 ms LoopingCall that records
how late each of its calls ran: the reactor's stalls.
"""

from __future__ import annotations

import attr
from twisted.internet import defer, task

from vfab.plotter.ebb import EBBProtocol
from vfab.plotter.plotter import Plotter
from vfab.simulator import EBBEmulator, LoopbackPort, Recording


class LagMonitor:
    """How late a LoopingCall of `interval` seconds runs, call after call."""

    def __init__(self, reactor, interval: float = 0.010):
        self.reactor = reactor
        self.interval = interval
        self.lags: list[float] = []
        self._last = None
        self._call = task.LoopingCall(self._tick)
        self._call.clock = reactor

    def start(self) -> None:
        self._last = self.reactor.seconds()
        self._call.start(self.interval, now=False)

    def stop(self) -> None:
        self._call.stop()

    def _tick(self) -> None:
        now = self.reactor.seconds()
        self.lags.append(max(0.0, now - self._last - self.interval))
        self._last = now


@attr.s(auto_attribs=True)
class FakeDevice:
    """What the runner tells the device service; the benchmark needs none of it."""

    def update_position(self, x_mm: float, y_mm: float, pen_down: bool) -> None:
        pass


@defer.inlineCallbacks
def connect(reactor, settings, *, round_trip: float, speed: float = 1.0,
            firmware: str = "2.8.1"):
    """A Plotter on an emulator behind a link of `round_trip` seconds, taken over as
    the daemon does; fires with both."""
    emulator = EBBEmulator(reactor, speed=speed, recording=Recording(),
                           firmware_version=firmware)
    protocol = EBBProtocol(reactor, timeout=30.0)
    LoopbackPort(protocol, emulator, reactor, delay=round_trip / 2.0)
    yield protocol.version()
    yield protocol.take_over()
    plotter = Plotter(protocol, settings)
    yield plotter.motors_on()
    return plotter, emulator
