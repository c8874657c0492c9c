"""Pen lift and lower commands, timed as the AxiDraw software times them.

The servo time for a move between the up and down heights (percent) is the
4th-power blend of the servo's own transit time (2.69 ms per % + 45 ms) and
the control signal's sweep time (200 ms per 100 % at 100 % rate, so
200 · distance / rate ms), truncated to whole ms; zero when the heights are
within 0.9 %. pen_delay_up / pen_delay_down are added. The SP command's
duration parameter is that total: the EBB holds the next motion that long.
The numbers come from vfab.plotter.pen so the plotter and the plan agree.
"""

from __future__ import annotations

from vfab.config import DeviceConfig
from vfab.plotter.pen import PenServo

from .plan import PenMove


def pen_moves(config: DeviceConfig) -> tuple[PenMove, PenMove]:
    """(raise, lower): `SP,1,<ms>` and `SP,0,<ms>` with their durations."""
    servo = PenServo.from_config(config)
    raise_ms = max(0, int(servo.raise_ms))
    lower_ms = max(0, int(servo.lower_ms))
    return (PenMove(command=f"SP,1,{raise_ms}", duration_s=raise_ms / 1000.0),
            PenMove(command=f"SP,0,{lower_ms}", duration_s=lower_ms / 1000.0))
