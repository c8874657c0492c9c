"""Connect a host protocol straight to an EBBEmulator, without a pty: for unit tests.

Bytes cross in both directions through the clock (callLater(delay), 0 unless a
serial link's latency is wanted), never re-entrantly, so a test drives
everything with `Clock.advance`.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone, ConnectionLost

from vfab.simulator.core import EBBEmulator


class LoopbackPort:
    """A minimal transport: the protocol's writes go to the emulator and back."""

    def __init__(self, protocol: Protocol, emulator: EBBEmulator, clock: IReactorTime,
                 delay: float = 0.0):
        """`delay`: seconds bytes take in each direction (half a round trip)."""
        self.delay = delay
        self.protocol = protocol
        self.emulator = emulator
        self.clock = clock
        self.connected = True
        self.written: list[bytes] = []
        emulator.send = self._to_host
        emulator.disconnect = self._unplugged
        emulator.connected = True
        protocol.makeConnection(self)

    def write(self, data: bytes) -> None:
        if self.connected:
            self.written.append(data)
            self.clock.callLater(self.delay, self._to_board, data)

    def _to_board(self, data: bytes) -> None:
        # Bytes still on the way when the cable was pulled are lost with it; they
        # must not reach the board's next connection.
        if self.connected:
            self.emulator.data_received(data)

    def writeSequence(self, data) -> None:  # noqa: N802 (Twisted name)
        for chunk in data:
            self.write(chunk)

    def _to_host(self, data: bytes) -> None:
        if self.connected:
            self.clock.callLater(self.delay, self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if self.connected:
            self.protocol.dataReceived(data)

    def _unplugged(self) -> None:
        self._close(Failure(ConnectionLost("the virtual plotter was unplugged")))

    def loseConnection(self) -> None:  # noqa: N802 (Twisted name)
        self._close(Failure(ConnectionDone()))

    abortConnection = loseConnection

    def _close(self, reason: Failure) -> None:
        if not self.connected:
            return
        self.connected = False
        self.emulator.connected = False
        self.clock.callLater(0, self.protocol.connectionLost, reason)

    def getPeer(self):  # noqa: N802 (Twisted name)
        return None

    getHost = getPeer
