"""Finding and opening the plotter's serial port."""

from __future__ import annotations

from typing import Callable, Iterable, Protocol as TypingProtocol

from serial.tools.list_ports import comports
from twisted.internet.serialport import SerialPort

#: The EiBotBoard's USB vendor and product ids (04D8:FD92).
EBB_VID = 0x04D8
EBB_PID = 0xFD92


class PortOpener(TypingProtocol):
    """Opens `path` for `protocol`; raises (e.g. serial.SerialException, OSError) if it cannot."""

    def __call__(self, protocol, path: str, reactor, baudrate: int): ...


def open_serial_port(protocol, path: str, reactor, baudrate: int) -> SerialPort:
    """The real opener: Twisted's SerialPort (raises at once when the device is missing)."""
    return SerialPort(protocol, path, reactor, baudrate=baudrate)


def find_ebb_port(list_ports: Callable[[], Iterable] = comports) -> str | None:
    """The device path of the first USB serial port that is an EiBotBoard, or None."""
    for port in list_ports():
        if getattr(port, "vid", None) == EBB_VID and getattr(port, "pid", None) == EBB_PID:
            return port.device
        if (getattr(port, "description", "") or "").startswith("EiBotBoard"):
            return port.device
    return None
