"""Pen-lift servo settings computed from the plot settings as the AxiDraw software does.

Heights are percentages of the servo range and rates percentages of full speed;
the board wants pulse widths in 83.3 ns units and slew rates per 24 ms servo
period. The pen-move times let the motion wait for the pen (SP duration).
"""

from __future__ import annotations

import attr

from vfab.config import DeviceConfig

#: Servo pulse width at 0 % and 100 % height, in 1/12 MHz (83.3 ns) units.
SERVO_MIN = 9855
SERVO_MAX = 27831
#: ms for the control signal to sweep 0-100 % at a 100 % rate.
SERVO_SWEEP_TIME_MS = 200.0
#: Physical pen travel time of a fast sweep: slope * distance + min (ms, ms per %).
SERVO_MOVE_MIN_MS = 45.0
SERVO_MOVE_SLOPE_MS = 2.69
#: One RC servo period (8 channels of 3 ms, the SC,8,8 configuration) in
#: seconds per percent of rate: the board adds the rate once per period.
SERVO_PERIOD_PER_PERCENT = 0.24


@attr.s(frozen=True, auto_attribs=True)
class PenServo:
    """What the board is told about the pen: SC,4 / SC,5 / SC,11 / SC,12, and SP durations."""

    up_position: int
    down_position: int
    raise_rate: int
    lower_rate: int
    raise_ms: int
    lower_ms: int

    @classmethod
    def from_config(cls, config: DeviceConfig) -> "PenServo":
        span = SERVO_MAX - SERVO_MIN
        rate_scale = span * SERVO_PERIOD_PER_PERCENT / SERVO_SWEEP_TIME_MS
        return cls(
            up_position=int(round(SERVO_MIN + span / 100.0 * config.pen_pos_up)),
            down_position=int(round(SERVO_MIN + span / 100.0 * config.pen_pos_down)),
            raise_rate=max(1, int(round(rate_scale * config.pen_rate_raise))),
            lower_rate=max(1, int(round(rate_scale * config.pen_rate_lower))),
            raise_ms=_move_ms(config, config.pen_rate_raise) + int(round(config.pen_delay_up)),
            lower_ms=_move_ms(config, config.pen_rate_lower) + int(round(config.pen_delay_down)),
        )

    def commands(self) -> list[str]:
        """The SC lines that configure the servo (8 channels, so a 24 ms period)."""
        return [
            "SC,8,8",
            f"SC,4,{self.up_position}",
            f"SC,5,{self.down_position}",
            f"SC,11,{self.raise_rate}",
            f"SC,12,{self.lower_rate}",
        ]


def _move_ms(config: DeviceConfig, rate_percent: float) -> int:
    """Time for the pen to travel between heights: a 4th-power blend of servo and sweep times."""
    distance = abs(config.pen_pos_up - config.pen_pos_down)
    if distance < 0.9:
        return 0
    fast = SERVO_MOVE_SLOPE_MS * distance + SERVO_MOVE_MIN_MS
    sweep = SERVO_SWEEP_TIME_MS * distance / rate_percent
    return int((fast ** 4 + sweep ** 4) ** 0.25)
