"""What can go wrong talking to the plotter, in the user's words."""

from __future__ import annotations


class DeviceError(Exception):
    """Any failure of the plotter connection or of a command it was sent."""


class EBBError(DeviceError):
    """The board refused a command: it answered with an error line (`!...`)."""

    def __init__(self, command: str, message: str):
        self.command = command
        self.message = message
        super().__init__(f"the plotter refused {command!r}: {message}")


class DeviceTimeout(DeviceError):
    """The board did not answer a command in time; the device counts as lost."""

    def __init__(self, command: str, seconds: float):
        self.command = command
        self.seconds = seconds
        super().__init__(f"the plotter did not answer {command!r} within {seconds:g} s")


class DeviceLost(DeviceError):
    """The connection to the plotter is gone (unplugged, closed or timed out)."""
