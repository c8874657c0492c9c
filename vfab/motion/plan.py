"""What the planner hands to the job runner: EBB commands with their times and positions."""

from __future__ import annotations

from functools import partial
from operator import attrgetter
from typing import Any, Callable, NamedTuple

import attr
import numpy as np

from .ebb import TICKS_PER_S


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

#: The kinds of motion command a row of MOVE_DTYPE holds.
LM, SM = 0, 1
#: One EBB motion command as the planner emits it and a plan file stores it:
#: numbers only, so millions of them cost a few dozen bytes each, and the
#: command's text is made only for the moves about to be sent.
#: LM: `LM,p1,d1,a1,p2,d2,a2,3` (rate, steps, accel per axis); SM: `SM,p1,d1,d2`
#: (ms, steps per axis). `ticks` is the firmware's time (40 µs ticks), `end_steps`
#: the absolute motor steps afterwards, `end_mm` the planned point, `distance`
#: the mm along the path, `path` the path it belongs to.
MOVE_DTYPE = np.dtype([
    ("kind", "u1"), ("p1", "<i4"), ("d1", "<i4"), ("a1", "<i8"), ("p2", "<i4"),
    ("d2", "<i4"), ("a2", "<i8"), ("ticks", "<i4"), ("end_steps", "<i4", (2,)),
    ("end_mm", "<f8", (2,)), ("distance", "<f8"), ("path", "<i4")])

#: Rows per bulk conversion: each runs as one C call holding the interpreter lock,
#: so chunks of a few milliseconds let the reactor thread in between them.
BULK_CHUNK = 16384


def bulk(make: Callable[[tuple], Any], *columns: Any) -> list[Any]:
    """`[make(row) for row in zip(*columns)]`, built in C a chunk at a time; numpy
    columns become Python numbers (as `tolist` gives them)."""
    rows: list[Any] = []
    for start in range(0, len(columns[0]), BULK_CHUNK):
        chunk = [column[start:start + BULK_CHUNK] for column in columns]
        chunk = [part.tolist() if isinstance(part, np.ndarray) else part for part in chunk]
        rows.extend(map(make, zip(*chunk)))
    return rows


_LM_TEXT = "LM,%d,%d,%d,%d,%d,%d,3".__mod__
_SM_TEXT = "SM,%d,%d,%d".__mod__


def _commands(rows: np.ndarray) -> list[str]:
    """The EBB command text of each row."""
    lm = rows["kind"] == LM
    if lm.all():
        return bulk(_LM_TEXT, rows["p1"], rows["d1"], rows["a1"], rows["p2"], rows["d2"],
                    rows["a2"])
    if not lm.any():
        return bulk(_SM_TEXT, rows["p1"], rows["d1"], rows["d2"])
    commands: list[str] = [""] * len(rows)
    for index, command in zip(np.flatnonzero(lm).tolist(), _commands(rows[lm])):
        commands[index] = command
    for index, command in zip(np.flatnonzero(~lm).tolist(), _commands(rows[~lm])):
        commands[index] = command
    return commands


def moves_from_rows(rows: np.ndarray) -> list["Move"]:
    """The Moves of MOVE_DTYPE rows (the runner sends Moves)."""
    durations = rows["ticks"] / TICKS_PER_S
    end_steps, end_mm = rows["end_steps"], rows["end_mm"]
    return bulk(new_move, _commands(rows), durations,
                bulk(tuple, end_steps[:, 0], end_steps[:, 1]),
                bulk(tuple, end_mm[:, 0], end_mm[:, 1]), rows["distance"])


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

    def draw_mm(self) -> float:
        """The pen-down distance of every move."""
        return sum(move.distance_mm for layer in self.layers for path in layer.paths
                   for move in path.draw)

    def drawn_before(self, layer: int, path: int, move: int) -> tuple[float, int]:
        """(pen-down mm, paths) done before move `move` of path `path` of `layer`."""
        done, paths = 0.0, 0
        for li, layer_plan in enumerate(self.layers):
            for pi, path_plan in enumerate(layer_plan.paths):
                if (li, pi) < (layer, path):
                    done += sum(m.distance_mm for m in path_plan.draw)
                    paths += 1
                elif (li, pi) == (layer, path):
                    done += sum(m.distance_mm for m in path_plan.draw[:move])
        return done, paths
