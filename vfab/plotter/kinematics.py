"""AxiDraw kinematics: millimetres on the page <-> motor step counts.

The AxiDraw is a CoreXY-like ("mixed-axis") machine. In axis steps (80 per mm
at 16x microstepping) motor 1 turns by x + y and motor 2 by x - y. Origin at
the home corner, x to the right, y down (away from home), as the SVG page.
This module is shared by the motion planner and the plotter; keep it stable.
"""

from __future__ import annotations

#: Axis steps per millimetre at 16x microstepping (2032 steps per inch).
STEPS_PER_MM_16X = 80.0

#: EM command code of each microstepping mode (EM,<code>,<code>).
MICROSTEP_CODES: dict[int, int] = {16: 1, 8: 2, 4: 3, 2: 4, 1: 5}


def steps_per_mm(microstepping: int = 16) -> float:
    """Axis steps per millimetre at `microstepping` (16, 8, 4, 2 or 1)."""
    if microstepping not in MICROSTEP_CODES:
        raise ValueError(f"microstepping must be one of 16, 8, 4, 2, 1, got {microstepping!r}")
    return STEPS_PER_MM_16X * microstepping / 16


def mm_to_motor_steps(x_mm: float, y_mm: float, microstepping: int = 16) -> tuple[int, int]:
    """The motor (motor1, motor2) step position of the point (x_mm, y_mm), rounded."""
    k = steps_per_mm(microstepping)
    return round((x_mm + y_mm) * k), round((x_mm - y_mm) * k)


def motor_steps_to_mm(m1: float, m2: float, microstepping: int = 16) -> tuple[float, float]:
    """The point (x_mm, y_mm) at motor step position (m1, m2)."""
    k = steps_per_mm(microstepping)
    return (m1 + m2) / (2 * k), (m1 - m2) / (2 * k)


def microstep_code(microstepping: int) -> int:
    """The EM command's code for `microstepping` (16x -> 1 ... 1x -> 5)."""
    steps_per_mm(microstepping)  # validates
    return MICROSTEP_CODES[microstepping]


def microstepping_of_code(code: int) -> int:
    """The microstepping that an EM code selects (1 -> 16x ... 5 -> 1x)."""
    for microstepping, known in MICROSTEP_CODES.items():
        if known == code:
            return microstepping
    raise ValueError(f"EM code must be 1-5, got {code!r}")
