"""Where an interrupted plot really got to, from the board's step counters.

A daemon that is killed, or loses its cable, has saved a position that can
be behind the carriage: the board goes on with the moves it took, and the
daemon saves its progress only now and then. When the board kept power, its
step counters say where the carriage stopped; `locate` walks the plan from
the saved position and finds the first place that point lies on.

"First" is right only if the carriage cannot have been at that point twice
since the save. `Trail` keeps the segments sent since the last durable save
and tells the runner when the next move would come close to one of them (a
path that doubles back, closes, or crosses itself): the runner saves its
position first, so that the walk from the saved position is never ambiguous.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from vfab.jobs.position import Position
from vfab.motion import PathPlan
from vfab.plotter.kinematics import mm_to_motor_steps

#: A carriage this close (motor steps) to a planned point or segment is on it.
MATCH_STEPS = 2.0
#: Two segments closer than this share a point that matches both.
AMBIGUOUS_STEPS = 2 * MATCH_STEPS + 1.0
#: The trail is cut by a save after this many moves, so that `locate`
#: never walks further than this many moves past the saved position.
TRAIL_MOVES = 256
HOME = (0.0, 0.0)

Steps = tuple[int, int]


def _segments(paths: tuple[PathPlan, ...], start: Position, microstepping: int
              ) -> Iterator[tuple[Position, Steps, Steps, bool]]:
    """(position once done, from, to, pen down) for the planned moves from `start` on,
    to the end of its layer: the travel to each path, then its strokes."""
    for pi in range(start.path, len(paths)):
        path = paths[pi]
        first = start.move if pi == start.path else 0
        if first == 0:
            came_from = paths[pi - 1].end_mm if pi else HOME
            previous = mm_to_motor_steps(*path.start_mm, microstepping)
            yield (Position(start.layer, pi, 0), mm_to_motor_steps(*came_from, microstepping),
                   previous, False)
        else:
            previous = tuple(path.draw[first - 1].end_steps)
        for mi in range(first, len(path.draw)):
            end = tuple(path.draw[mi].end_steps)
            yield Position(start.layer, pi, mi + 1), previous, end, True
            previous = end


def locate(paths: tuple[PathPlan, ...], start: Position, steps: Steps, microstepping: int
           ) -> Position:
    """Where to continue for a carriage at `steps`, saved at `start` (with `inside` set
    when it stands inside a stroke). Not found on the trail: `start` itself."""
    here = (float(steps[0]), float(steps[1]))
    if start.at is not None and _distance(here, start.at) <= MATCH_STEPS:
        return start  # where the saved position left it: nothing done since
    for count, (done, a, b, drawing) in enumerate(_segments(paths, start, microstepping)):
        if count > TRAIL_MOVES + 8:
            break
        if count == 0:
            if not drawing:
                # A run may begin anywhere: the travel to the saved path starts
                # where the carriage was (if known), not where the plan expects it.
                on_the_way = _distance(here, b) <= MATCH_STEPS or (
                    start.at is not None
                    and _point_segment_distance(here, start.at, b) <= MATCH_STEPS)
                if on_the_way:
                    return start
                continue
            if _distance(here, a) <= MATCH_STEPS:
                return start
        if _distance(here, b) <= MATCH_STEPS:
            return done
        if _point_segment_distance(here, a, b) <= MATCH_STEPS:
            if drawing:
                return Position(done.layer, done.path, done.move - 1, inside=steps)
            return done  # on the way to the path: travel on from here
    return start


Point = tuple[float, float]


def _distance(p: Point, q: Point) -> float:
    return math.hypot(p[0] - q[0], p[1] - q[1])


def _point_segment_distance(p: Point, a: Point, b: Point) -> float:
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else min(1.0, max(0.0, ((p[0] - ax) * dx + (p[1] - ay) * dy)
                                                / length2))
    return math.hypot(p[0] - (ax + t * dx), p[1] - (ay + t * dy))


def _cross(o: Point, u: Point, v: Point) -> float:
    return (u[0] - o[0]) * (v[1] - o[1]) - (u[1] - o[1]) * (v[0] - o[0])


def segment_distance(p0: Point, p1: Point, q0: Point, q1: Point) -> float:
    """Distance between segments p0-p1 and q0-q1 (0 where they cross)."""
    if _cross(q0, q1, p0) * _cross(q0, q1, p1) < 0 and \
            _cross(p0, p1, q0) * _cross(p0, p1, q1) < 0:
        return 0.0
    return min(_point_segment_distance(p0, q0, q1), _point_segment_distance(p1, q0, q1),
               _point_segment_distance(q0, p0, p1), _point_segment_distance(q1, p0, p1))


class Trail:
    """The segments the carriage was sent along since the last durable save.

    Checked before every move, on the reactor: each segment's bounding box is
    kept beside it in preallocated arrays, so that one vectorised test picks the
    few segments near the next move and only those are measured exactly.
    """

    def __init__(self) -> None:
        self._segments = np.empty((TRAIL_MOVES + 1, 4))  # start x, y, end x, y (steps)
        self._boxes = np.empty((TRAIL_MOVES + 1, 4))  # min x, min y, max x, max y
        self._count = 0
        self._first_sequence = 0  # the sequence number of row 0

    @property
    def sent(self) -> int:
        """Sequence number of the next segment."""
        return self._first_sequence + self._count

    def needs_save_before(self, start: Steps, end: Steps) -> bool:
        """Would the carriage, sent from `start` to `end`, pass a point it passed since the
        last save (or has the trail grown too long to walk)?"""
        count = self._count
        if count >= TRAIL_MOVES:
            return True
        if not count or start == end:
            return False
        p0 = (float(start[0]), float(start[1]))
        p1 = (float(end[0]), float(end[1]))
        for x0, y0, x1, y1 in self._near(count - 1, p0, p1):
            if segment_distance(p0, p1, (x0, y0), (x1, y1)) < AMBIGUOUS_STEPS:
                return True
        # The segment just before shares `start`; beyond a few steps from it the
        # new one must keep away from it (it does unless the path turns back sharply).
        length = _distance(p0, p1)
        if length <= 2 * AMBIGUOUS_STEPS:
            return False
        share = 2 * AMBIGUOUS_STEPS / length
        away = (p0[0] + (p1[0] - p0[0]) * share, p0[1] + (p1[1] - p0[1]) * share)
        x0, y0, x1, y1 = self._segments[count - 1].tolist()
        return segment_distance(away, p1, (x0, y0), (x1, y1)) < AMBIGUOUS_STEPS

    def _near(self, count: int, p0: Point, p1: Point) -> list[list[float]]:
        """The first `count` segments whose boxes come within AMBIGUOUS_STEPS of
        the move's box: the only ones that can be that near the move."""
        if count <= 0:
            return []
        boxes = self._boxes[:count]
        near = ((boxes[:, 0] < max(p0[0], p1[0]) + AMBIGUOUS_STEPS)
                & (boxes[:, 2] > min(p0[0], p1[0]) - AMBIGUOUS_STEPS)
                & (boxes[:, 1] < max(p0[1], p1[1]) + AMBIGUOUS_STEPS)
                & (boxes[:, 3] > min(p0[1], p1[1]) - AMBIGUOUS_STEPS))
        return self._segments[:count][near].tolist()

    def add(self, start: Steps, end: Steps) -> None:
        if self._count == len(self._segments):  # past the limit: a save is under way
            self._segments = np.resize(self._segments, (2 * len(self._segments), 4))
            self._boxes = np.resize(self._boxes, (2 * len(self._boxes), 4))
        (x0, y0), (x1, y1) = start, end
        self._segments[self._count] = (x0, y0, x1, y1)
        self._boxes[self._count] = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        self._count += 1

    def saved_at(self, sequence: int) -> None:
        """A save of the position reached before segment `sequence` is durable: the
        walk starts there, so only the segments from it on matter."""
        drop = max(0, min(sequence - self._first_sequence, self._count))
        if drop:
            kept = self._count - drop
            self._segments[:kept] = self._segments[drop:self._count]
            self._boxes[:kept] = self._boxes[drop:self._count]
            self._count = kept
            self._first_sequence += drop
