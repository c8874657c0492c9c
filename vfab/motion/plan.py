"""What the planner hands to the job runner: EBB commands with their times and positions."""

from __future__ import annotations

from functools import partial
from operator import attrgetter
from typing import NamedTuple

import attr


class Move(NamedTuple):
    """One EBB motion command (LM or SM) and where it leaves the carriage.

    `end_steps` are absolute motor steps (motor1, motor2) from home, exactly
    where the firmware will be once the command is done; `end_mm` is the
    planned point they were rounded from. `duration_s` is the firmware's own
    time for the command, to the 40 µs tick.

    A plot has millions of these, so a Move is an immutable named tuple
    (built in bulk by the planner) rather than an attrs class.
    """

    command: str
    duration_s: float
    end_steps: tuple[int, int]
    end_mm: tuple[float, float]
    distance_mm: float


#: Move from a (command, duration_s, end_steps, end_mm, distance_mm) tuple, without
#: a Python call per Move: `map(new_move, zip(...))` builds them in C.
new_move = partial(tuple.__new__, Move)
_duration = attrgetter("duration_s")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PenMove:
    """An SP command: `SP,1,<ms>` raises, `SP,0,<ms>` lowers; the ms are the wait for the pen."""

    command: str
    duration_s: float


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PathPlan:
    """The pen-down moves of one path: from `start_mm` at rest to `end_mm` at rest.

    `draw` is empty for a path too small to move the motors (a dot: lower
    and raise the pen). `travel_s` is the pen-up travel to `start_mm` from
    where the previous path ended (home for the first), as plan_travel plans it;
    `travel` are those moves.
    """

    index: int
    start_mm: tuple[float, float]
    end_mm: tuple[float, float]
    draw: tuple[Move, ...]
    length_mm: float
    travel_s: float = 0.0
    travel: tuple[Move, ...] = ()

    @property
    def draw_s(self) -> float:
        return sum(map(_duration, self.draw))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LayerPlan:
    index: int
    name: str
    paths: tuple[PathPlan, ...]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MotionPlan:
    """A whole drawing: travel from home, pen down, draw, pen up, ..., travel home."""

    layers: tuple[LayerPlan, ...]
    estimated_seconds: float
    pen_up: PenMove | None = None
    pen_down: PenMove | None = None
    #: Pen-up travel from the last path's end back home.
    home_s: float = 0.0

    @property
    def path_count(self) -> int:
        return sum(len(layer.paths) for layer in self.layers)
