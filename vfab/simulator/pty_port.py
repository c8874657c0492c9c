"""Serve the virtual EBB on a pseudo-terminal, so hosts open it like a USB serial port.

The emulator sits on the master side of `os.openpty()` inside the reactor; the
slave's path (e.g. /dev/pts/7) is what a host opens with pyserial or Twisted's
SerialPort. We keep a slave descriptor open ourselves, so that a host closing
and reopening the port does not hang up the master.
"""

from __future__ import annotations

import os
import tty
from pathlib import Path

from twisted.internet import abstract, fdesc
from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger
from twisted.python.failure import Failure

from vfab.simulator.core import EBBEmulator

log = Logger()


class PtyMaster(abstract.FileDescriptor):
    """The master end of a pty as a Twisted transport feeding an EBBEmulator."""

    def __init__(self, reactor: IReactorFDSet, emulator: EBBEmulator):
        super().__init__(reactor)
        self.emulator = emulator
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no CR/LF translation
        fdesc.setNonBlocking(self._master)
        self.slave_path = os.ttyname(self._slave)
        self.connected = 1
        emulator.send = self.write
        emulator.disconnect = self.close
        emulator.connected = True
        self.startReading()

    def fileno(self) -> int:
        return self._master

    def doRead(self):  # noqa: N802 (Twisted name)
        return fdesc.readFromFD(self._master, self.emulator.data_received)

    def writeSomeData(self, data: bytes):  # noqa: N802 (Twisted name)
        return fdesc.writeToFD(self._master, data)

    def close(self) -> None:
        """Hang up now: the host's next read sees the device gone."""
        if self._master < 0:
            return
        self.stopReading()
        self.stopWriting()
        self.emulator.connected = False
        for fd in (self._master, self._slave):
            os.close(fd)
        self._master = self._slave = -1
        self.connected = 0
        self.disconnected = 1

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 (Twisted name)
        super().connectionLost(reason)
        self.close()


class VirtualPlotter:
    """The virtual plotter on a pty: start it, point a host at `path`, stop it to get the drawing.

    `link` is an optional symlink kept pointing at the current pty, so a host
    can be configured with a stable path; `replug()` simulates unplugging and
    plugging the USB cable back in (a new pty, same emulator).
    """

    def __init__(self, reactor, emulator: EBBEmulator, link: str | os.PathLike | None = None):
        self.reactor = reactor
        self.emulator = emulator
        self.link = Path(link) if link is not None else None
        self._master: PtyMaster | None = None

    @property
    def path(self) -> str | None:
        """The device path a host should open (the symlink if there is one)."""
        if self._master is None:
            return None
        return str(self.link) if self.link is not None else self._master.slave_path

    @property
    def pty_path(self) -> str | None:
        return self._master.slave_path if self._master is not None else None

    def start(self) -> str:
        """Open a pty and serve the emulator on it; returns the path to open."""
        self._master = PtyMaster(self.reactor, self.emulator)
        if self.link is not None:
            partial = self.link.with_name(self.link.name + ".new")
            if partial.is_symlink() or partial.exists():
                partial.unlink()
            os.symlink(self._master.slave_path, partial)
            os.replace(partial, self.link)
        log.info("virtual plotter listening on {path}", path=self.path)
        return self.path  # type: ignore[return-value]

    def drop(self) -> None:
        """Fault: hang up the pty, as a pulled USB cable."""
        if self._master is not None:
            self._master.close()

    def replug(self) -> str:
        """A new pty for the same board (the counters and drawing survive); returns its path."""
        self.drop()
        return self.start()

    def stop(self) -> None:
        """Finish accepted moves, write the drawing, close the pty and remove the link."""
        self.emulator.stop()
        self.drop()
        self._master = None
        if self.link is not None and self.link.is_symlink():
            self.link.unlink()
