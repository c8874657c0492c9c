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
    here = np.asarray(steps, dtype=float)
    if start.at is not None and _distance(here, np.asarray(start.at, float)) <= MATCH_STEPS:
        return start  # where the saved position left it: nothing done since
    for count, (done, a, b, drawing) in enumerate(_segments(paths, start, microstepping)):
        if count > TRAIL_MOVES + 8:
            break
        a_, b_ = np.asarray(a, float), np.asarray(b, float)
        if count == 0:
            if not drawing:
                # A run may begin anywhere: the travel to the saved path starts
                # where the carriage was (if known), not where the plan expects it.
                on_the_way = _distance(here, b_) <= MATCH_STEPS or (
                    start.at is not None and _point_segment_distance(
                        here, np.asarray(start.at, float), b_) <= MATCH_STEPS)
                if on_the_way:
                    return start
                continue
            if _distance(here, a_) <= MATCH_STEPS:
                return start
        if _distance(here, b_) <= MATCH_STEPS:
            return done
        if _point_segment_distance(here, a_, b_) <= MATCH_STEPS:
            if drawing:
                return Position(done.layer, done.path, done.move - 1, inside=steps)
            return done  # on the way to the path: travel on from here
    return start


def _distance(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.hypot(*(p - q)))


def _point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    along = b - a
    length2 = float(along @ along)
    t = 0.0 if length2 == 0 else min(1.0, max(0.0, float((p - a) @ along) / length2))
    return _distance(p, a + t * along)


def _points_to_segments(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each point p[i] to segment a[i]-b[i]."""
    along = b - a
    length2 = np.maximum(np.sum(along * along, axis=-1), 1e-12)
    t = np.clip(np.sum((p - a) * along, axis=-1) / length2, 0.0, 1.0)
    return np.hypot(*np.moveaxis(p - (a + t[..., None] * along), -1, 0))


def _cross(o: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u[..., 0] - o[..., 0]) * (v[..., 1] - o[..., 1]) \
        - (u[..., 1] - o[..., 1]) * (v[..., 0] - o[..., 0])


def segment_distances(p0: np.ndarray, p1: np.ndarray, q0: np.ndarray, q1: np.ndarray
                      ) -> np.ndarray:
    """Distance between segment p0-p1 and each segment q0[i]-q1[i]."""
    p0b, p1b = np.broadcast_to(p0, q0.shape), np.broadcast_to(p1, q0.shape)
    crossing = (_cross(q0, q1, p0b) * _cross(q0, q1, p1b) < 0) \
        & (_cross(p0b, p1b, q0) * _cross(p0b, p1b, q1) < 0)
    nearest = np.minimum.reduce([_points_to_segments(p0b, q0, q1),
                                 _points_to_segments(p1b, q0, q1),
                                 _points_to_segments(q0, p0b, p1b),
                                 _points_to_segments(q1, p0b, p1b)])
    return np.where(crossing, 0.0, nearest)


class Trail:
    """The segments the carriage was sent along since the last durable save.

    Checked before every move, so they are kept in one preallocated array
    (rows: start x, start y, end x, end y in motor steps) rather than built
    into one each time.
    """

    def __init__(self) -> None:
        self._segments = np.empty((TRAIL_MOVES + 1, 4))
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
        p0, p1 = np.asarray(start, float), np.asarray(end, float)
        earlier = self._segments[:count - 1]
        if len(earlier) and segment_distances(p0, p1, earlier[:, :2], earlier[:, 2:]
                                              ).min() < AMBIGUOUS_STEPS:
            return True
        # The segment just before shares `start`; beyond a few steps from it the
        # new one must keep away from it (it does unless the path turns back sharply).
        length = _distance(p0, p1)
        if length <= 2 * AMBIGUOUS_STEPS:
            return False
        away = p0 + (p1 - p0) * (2 * AMBIGUOUS_STEPS / length)
        last = self._segments[count - 1:count]
        return bool(segment_distances(away, p1, last[:, :2], last[:, 2:]).min()
                    < AMBIGUOUS_STEPS)

    def add(self, start: Steps, end: Steps) -> None:
        if self._count == len(self._segments):  # past the limit: a save is under way
            self._segments = np.resize(self._segments, (2 * len(self._segments), 4))
        self._segments[self._count] = (*start, *end)
        self._count += 1

    def saved_at(self, sequence: int) -> None:
        """A save of the position reached before segment `sequence` is durable: the
        walk starts there, so only the segments from it on matter."""
        drop = max(0, min(sequence - self._first_sequence, self._count))
        if drop:
            kept = self._count - drop
            self._segments[:kept] = self._segments[drop:self._count]
            self._count = kept
            self._first_sequence += drop
