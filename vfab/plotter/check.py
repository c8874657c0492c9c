"""`vfab check device`: is the plotter there, and which firmware does it run?

Blocking and self-contained on purpose (pyserial, one `V` query), so that it
works while the daemon is stopped and gives a plain answer.
"""

from __future__ import annotations

from typing import Callable

import serial
from twisted.internet.task import Clock

from vfab.config import DeviceConfig
from vfab.plotter.ebb import parse_version
from vfab.plotter.ports import find_ebb_port

Say = Callable[[str], object]


def check_device(config: DeviceConfig, say: Say, problem: Callable[[str], int]) -> int:
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
        with serial.Serial(path, config.baud_rate, timeout=min(config.timeout, 5.0)) as port:
            port.reset_input_buffer()
            port.write(b"V\r")
            line = port.readline().decode("ascii", "replace").strip()
    except (serial.SerialException, OSError) as error:
        return problem(f"cannot open the plotter at {path}: {error} (is it plugged in, and "
                       f"is this user in the dialout group?)")
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
