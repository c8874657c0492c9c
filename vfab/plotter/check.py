"""`vfab check device`: is the plotter there, and which firmware does it run?

Blocking and self-contained on purpose (pyserial, one `V` query), so that it
works while the daemon is stopped and gives a plain answer. The port is
opened exclusively; run it with the daemon stopped (a running daemon's
device status is at GET /api/device).
"""

from __future__ import annotations

import errno
from typing import Callable

import serial
from twisted.internet.task import Clock

from vfab.config import DeviceConfig
from vfab.plotter.ebb import parse_version
from vfab.plotter.ports import find_ebb_port

Say = Callable[[str], object]


def check_device(config: DeviceConfig, say: Say, problem: Callable[[str], int]) -> int:
    """Ask the configured plotter its firmware version; 0 when it answered, else 1."""
    if config.type == "none":
        say("device OK: device.type is none (no plotter configured; jobs wait in the queue)")
        return 0
    if config.type == "simulator":
        from vfab.simulator.core import EBBEmulator

        replies: list[bytes] = []
        emulator = EBBEmulator(Clock())
        emulator.send = replies.append
        emulator.data_received(b"V\r")
        version = b"".join(replies).decode("ascii", "replace").strip()
        say(f"device OK: the built-in virtual plotter ({version})")
        return 0
    path = config.port
    if path == "auto":
        found = find_ebb_port()
        if found is None:
            return problem("device.port is auto but no EiBotBoard (USB 04D8:FD92) is "
                           "connected: plug the AxiDraw in and switch it on")
        path = found
    try:
        with serial.Serial(path, config.baud_rate, timeout=min(config.timeout, 5.0),
                           exclusive=True) as port:
            port.reset_input_buffer()
            port.write(b"V\r")
            line = port.readline().decode("ascii", "replace").strip()
    except (serial.SerialException, OSError) as error:
        return problem(f"cannot open the plotter at {path}: {_advice(error)} ({error})")
    if not line:
        return problem(f"{path} is open but nothing answered the version query: is it an "
                       f"AxiDraw (EiBotBoard)?")
    try:
        version = parse_version(line)
    except ValueError:
        return problem(f"{path} answered {line!r}, which is not an EiBotBoard version")
    shown = ".".join(str(part) for part in version)
    say(f"device OK: AxiDraw at {path}, firmware {shown} ({line})")
    return 0


def _advice(error: Exception) -> str:
    """What an operator can do about a port that would not open."""
    code = getattr(error, "errno", None)
    if code == errno.ENOENT:
        return "no such port: is the AxiDraw plugged in and switched on? (device.port: auto " \
               "finds it)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied: add the daemon's user to the dialout group"
    if code in (errno.EBUSY, errno.EAGAIN) or "lock" in str(error).lower():
        return "the port is in use: stop the daemon (or another program) first"
    return "is it plugged in, and is this user in the dialout group?"
