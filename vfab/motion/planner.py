"""From a Drawing and the device settings to EBB commands with exact times.

Positions are planned in absolute motor steps: every command ends at the
rounded step position of its planned end point, and its step counts are the
difference from where the previous command ended. Rounding never accumulates
and the carriage ends exactly where the plan says, to the step.

With `use_lm` (firmware 2.7+) every constant-acceleration piece becomes one
`LM` command whose time is the firmware's own, to the 40 µs tick. Without it,
pieces become `SM` commands of constant speed: accelerating pieces are cut
into 10 ms slices, steady ones into slices of at most 0.5 s (so a slow axis
never drops under the firmware's 1.31 steps/s), all in whole milliseconds.

Planning is pure (no reactor, no I/O), so it may run in a thread.
"""

from __future__ import annotations

import math
from typing import Any

import attr
import numpy as np

from vfab.config import DeviceConfig
from vfab.geometry.drawing import Drawing
from vfab.plotter.kinematics import steps_per_mm

from . import ebb
from .pen import pen_moves
from .plan import LM, MOVE_DTYPE, SM, LayerPlan, Move, MotionPlan, PathPlan, moves_from_rows
from .profile import Limits, Pieces, cut_long_pieces, plan_pieces

HOME = (0.0, 0.0)
#: SM slices: accelerating pieces are cut this fine (ms) ...
SM_ACCEL_SLICE_MS = 10
#: ... and steady pieces this coarse, so 1 step per slice is still >= 1.31 steps/s.
SM_STEADY_SLICE_MS = 500
#: The shortest SM command (ms).
SM_MIN_MS = 4
#: The longest move: the runner pauses between moves, so a pause takes effect
#: within about two of these (the one running and the one queued behind it).
MAX_MOVE_S = 0.25


def pen_down_limits(config: DeviceConfig) -> Limits:
    return Limits(speed=config.speed_pen_down, accel=config.accel_pen_down,
                  cornering=config.cornering, steps_per_mm=steps_per_mm(config.microstepping))


def pen_up_limits(config: DeviceConfig) -> Limits:
    return Limits(speed=config.speed_pen_up, accel=config.accel_pen_up,
                  cornering=config.cornering, steps_per_mm=steps_per_mm(config.microstepping))


def chord_tolerance(config: DeviceConfig) -> float:
    """How far the motion may cut across dropped vertices: half the curve tolerance."""
    return config.tolerance / 2.0


def _to_steps(points: np.ndarray, per_mm: float) -> np.ndarray:
    """Absolute (motor1, motor2) steps, rounded exactly as kinematics.mm_to_motor_steps."""
    x, y = points[:, 0], points[:, 1]
    return np.stack([np.rint((x + y) * per_mm), np.rint((x - y) * per_mm)], axis=1).astype(np.int64)


def _from_previous(end_steps: np.ndarray, path: np.ndarray,
                   path_start_steps: np.ndarray) -> np.ndarray:
    """Each command's start: the previous command's end, or its path's start."""
    start = np.empty_like(end_steps)
    if len(end_steps):
        start[1:] = end_steps[:-1]
        first = np.ones(len(path), dtype=bool)
        first[1:] = path[1:] != path[:-1]
        start[first] = path_start_steps[path[first]]
    return start


def _rows(path: np.ndarray, end_steps: np.ndarray, end_mm: np.ndarray,
          distance: np.ndarray, ticks: np.ndarray) -> np.ndarray:
    """MOVE_DTYPE rows with these columns (the command's own are filled in after)."""
    rows = np.zeros(len(path), dtype=MOVE_DTYPE)
    rows["path"], rows["end_steps"], rows["end_mm"] = path, end_steps, end_mm
    rows["distance"], rows["ticks"] = distance, ticks
    return rows


def _lm_rows(pieces: Pieces, per_mm: float) -> np.ndarray:
    end_steps = _to_steps(pieces.end_mm, per_mm)
    start_steps = _from_previous(end_steps, pieces.path, _to_steps(pieces.path_start, per_mm))
    delta = end_steps - start_steps
    moving = np.any(delta != 0, axis=1)
    delta, end_steps = delta[moving], end_steps[moving]
    u0, u1 = pieces.start_speed[moving], pieces.end_speed[moving]
    ticks = np.maximum(np.rint(pieces.duration[moving] * ebb.TICKS_PER_S), 1).astype(np.int64)
    start_fraction = 2.0 * u0 / (u0 + u1)
    rate1, accel1 = ebb.lm_axis_parameters(delta[:, 0], ticks, start_fraction)
    rate2, accel2 = ebb.lm_axis_parameters(delta[:, 1], ticks, start_fraction)
    actual = ebb.lm_ticks(rate1, delta[:, 0], accel1, rate2, delta[:, 1], accel2)
    rows = _rows(pieces.path[moving], end_steps, pieces.end_mm[moving],
                 pieces.length[moving], actual)
    # Sent with Clear (3): both accumulators start at zero, as the times here assume.
    rows["kind"] = LM
    rows["p1"], rows["d1"], rows["a1"] = rate1, delta[:, 0], accel1
    rows["p2"], rows["d2"], rows["a2"] = rate2, delta[:, 1], accel2
    return rows


def _sm_rows(pieces: Pieces, per_mm: float) -> np.ndarray:
    duration = pieces.duration
    total_ms = np.maximum(np.ceil(duration * 1000.0 - 1e-6), SM_MIN_MS).astype(np.int64)
    steady = np.isclose(pieces.start_speed, pieces.end_speed, rtol=1e-9, atol=1e-9)
    slice_ms = np.where(steady, SM_STEADY_SLICE_MS, SM_ACCEL_SLICE_MS)
    slices = np.maximum(-(-total_ms // slice_ms), 1)
    piece = np.repeat(np.arange(len(duration)), slices)
    # Slice k of a piece covers [k, k + 1] / slices of it, in whole milliseconds.
    first_of_piece = np.cumsum(slices) - slices
    k = np.arange(len(piece)) - np.repeat(first_of_piece, slices) + 1
    end_ms = np.rint(k * total_ms[piece] / slices[piece]).astype(np.int64)
    start_ms = np.rint((k - 1) * total_ms[piece] / slices[piece]).astype(np.int64)
    # Distance along the piece at each slice end, on the planned speed ramp
    # stretched to the whole-millisecond duration.
    fraction = end_ms / total_ms[piece]
    u0, u1 = pieces.start_speed[piece], pieces.end_speed[piece]
    along = pieces.length[piece] * (fraction * u0 + fraction ** 2 * (u1 - u0) / 2.0) \
        / ((u0 + u1) / 2.0)
    along = np.clip(along, 0.0, pieces.length[piece])
    start, end = pieces.start_mm[piece], pieces.end_mm[piece]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(pieces.length[piece] > 0, along / pieces.length[piece], 1.0)
    end_mm = start + (end - start) * share[:, None]
    last = k == slices[piece]
    end_mm[last] = end[last]
    path = pieces.path[piece]
    end_steps = _to_steps(end_mm, per_mm)
    start_steps = _from_previous(end_steps, path, _to_steps(pieces.path_start, per_mm))
    delta = end_steps - start_steps
    ms = end_ms - start_ms
    previous_along = np.zeros(len(piece))
    previous_along[1:] = along[:-1]
    previous_along[k == 1] = 0.0
    distance = along - previous_along
    rows = _rows(path, end_steps, end_mm, distance, ms * (ebb.TICKS_PER_S // 1000))
    rows["kind"] = SM
    rows["p1"], rows["d1"], rows["d2"] = ms, delta[:, 0], delta[:, 1]
    return rows


def plan_rows(paths: list[np.ndarray], limits: Limits, *, use_lm: bool, tolerance: float
              ) -> tuple[np.ndarray, Pieces]:
    """Every path's moves as MOVE_DTYPE rows, path after path (no Python object per
    move), and the pieces they were made from."""
    pieces = cut_long_pieces(plan_pieces(paths, limits, tolerance), MAX_MOVE_S)
    make = _lm_rows if use_lm else _sm_rows
    return _in_chunks(make, pieces, limits.steps_per_mm), pieces


#: Pieces made into rows at once: the rows of a piece depend only on it and on
#: the pieces before it in its path, so making them a few paths at a time gives
#: the same rows, without the temporaries of a million pieces at once.
ROWS_CHUNK = 1 << 17


def _in_chunks(make: Any, pieces: Pieces, per_mm: float) -> np.ndarray:
    """`make(pieces, per_mm)`, made ROWS_CHUNK pieces (whole paths) at a time."""
    count = len(pieces.path)
    if count <= ROWS_CHUNK:
        return make(pieces, per_mm)
    starts = np.unique(np.searchsorted(pieces.path, pieces.path[::ROWS_CHUNK])).tolist()
    chunks = [make(_slice(pieces, low, high), per_mm)
              for low, high in zip(starts, starts[1:] + [count])]
    rows = np.empty(sum(len(chunk) for chunk in chunks), dtype=MOVE_DTYPE)
    done = 0
    chunks.reverse()
    while chunks:  # each chunk freed as soon as it is copied
        chunk = chunks.pop()
        rows[done:done + len(chunk)] = chunk
        done += len(chunk)
        del chunk
    return rows


def _slice(pieces: Pieces, low: int, high: int) -> Pieces:
    """Pieces [low, high), with every path's figures (numbered as before)."""
    return Pieces(path=pieces.path[low:high], start_mm=pieces.start_mm[low:high],
                  end_mm=pieces.end_mm[low:high], start_speed=pieces.start_speed[low:high],
                  end_speed=pieces.end_speed[low:high], length=pieces.length[low:high],
                  duration=pieces.duration[low:high], path_start=pieces.path_start,
                  path_end=pieces.path_end, path_length=pieces.path_length)


def _planned(paths: list[np.ndarray], limits: Limits, *, use_lm: bool, tolerance: float
             ) -> tuple[list[Move], list[int], list[float], Pieces]:
    """Every path's moves in one list, where each path's moves begin (and the end),
    the moves' durations and the pieces."""
    rows, pieces = plan_rows(paths, limits, use_lm=use_lm, tolerance=tolerance)
    moves = moves_from_rows(rows)
    bounds = np.searchsorted(rows["path"], np.arange(len(paths) + 1)).tolist()
    return moves, bounds, (rows["ticks"] / ebb.TICKS_PER_S).tolist(), pieces


def plan_moves(paths: list[np.ndarray], limits: Limits, *, use_lm: bool,
               tolerance: float) -> tuple[list[tuple[Move, ...]], Pieces]:
    """Moves for each polyline, from rest to rest, all planned together."""
    moves, bounds, _, pieces = _planned(paths, limits, use_lm=use_lm, tolerance=tolerance)
    grouped = [tuple(moves[start:end]) for start, end in zip(bounds, bounds[1:])]
    return grouped, pieces


def plan_path(points: np.ndarray, config: DeviceConfig, *, use_lm: bool = True) -> tuple[Move, ...]:
    """Pen-down moves along one polyline (mm), from rest at its first point to rest at its last."""
    moves, _ = plan_moves([np.asarray(points, dtype=np.float64)], pen_down_limits(config),
                          use_lm=use_lm, tolerance=chord_tolerance(config))
    return moves[0]


def resume_path(path: PathPlan, moves_done: int, config: DeviceConfig, *,
                use_lm: bool = True, start_mm: tuple[float, float] | None = None
                ) -> list[tuple[Move, int | None]]:
    """The rest of a path after `moves_done` of its moves, planned again from rest.

    The remaining moves of the original plan start at speed; after a pause
    the carriage is at rest, so the remainder is re-planned through the same
    points (where each remaining move ended), without simplifying them away.
    With each new move comes how many of the path's planned moves are done
    once it is, or None when it ends between two planned points. The count is
    found by walking both in order, never by looking a point up: a path may
    pass through the same point many times. `start_mm` is where the carriage
    stands when that is inside the next move rather than at its start.
    """
    if moves_done >= len(path.draw):
        return []
    if moves_done <= 0 and start_mm is None:
        return [(move, index + 1) for index, move in enumerate(path.draw)]
    planned = path.draw[moves_done:]
    first = start_mm if start_mm is not None else path.draw[moves_done - 1].end_mm
    points = np.array([first] + [move.end_mm for move in planned])
    moves, _ = plan_moves([points], pen_down_limits(config), use_lm=use_lm, tolerance=0.0)
    result: list[tuple[Move, int | None]] = []
    done = moves_done
    for move in moves[0]:
        # Consecutive planned moves end on different steps, so the next planned
        # end is reached exactly when a new move ends on its steps.
        if done < len(path.draw) and move.end_steps == path.draw[done].end_steps:
            done += 1
            result.append((move, done))
        else:
            result.append((move, None))
    return result


def plan_travel(from_mm: tuple[float, float], to_mm: tuple[float, float], config: DeviceConfig,
                *, use_lm: bool = True) -> tuple[Move, ...]:
    """Pen-up moves in a straight line from rest at `from_mm` to rest at `to_mm`."""
    moves, _ = plan_moves([np.array([from_mm, to_mm], dtype=np.float64)], pen_up_limits(config),
                          use_lm=use_lm, tolerance=0.0)
    return moves[0]


@attr.s(frozen=True, slots=True, eq=False)
class DrawingRows:
    """A drawing's plan as MOVE_DTYPE rows: each path's pen-down moves and the pen-up
    travel to it, with per-path figures; what plan_drawing and a plan file are made of.

    `draw_bounds[p]:draw_bounds[p + 1]` are path p's rows of `draw`, likewise for
    `travel`; their `path` column numbers the paths from 0.
    """

    draw: np.ndarray = attr.ib()
    draw_bounds: np.ndarray = attr.ib()
    travel: np.ndarray = attr.ib()
    travel_bounds: np.ndarray = attr.ib()
    start_mm: np.ndarray = attr.ib()  # (paths, 2)
    end_mm: np.ndarray = attr.ib()  # (paths, 2)
    length_mm: np.ndarray = attr.ib()  # (paths,)
    #: Pen-up travel from the last path's end back home.
    home_s: float = attr.ib()


def _bounds(rows: np.ndarray, count: int) -> np.ndarray:
    return np.searchsorted(rows["path"], np.arange(count + 1))


def _travel_rows(starts: np.ndarray, ends: np.ndarray, config: DeviceConfig, use_lm: bool
                 ) -> np.ndarray:
    """plan_travel for each (start, end), planned together, as rows."""
    if len(starts) == 0:
        return np.zeros(0, dtype=MOVE_DTYPE)
    rows, _ = plan_rows(list(np.stack([starts, ends], axis=1)), pen_up_limits(config),
                        use_lm=use_lm, tolerance=0.0)
    return rows


def plan_drawing_rows(paths: list[np.ndarray], config: DeviceConfig, *, use_lm: bool = True
                      ) -> DrawingRows:
    """Pen-down moves of every path and the pen-up travel to each, as rows."""
    draw, pieces = plan_rows(paths, pen_down_limits(config), use_lm=use_lm,
                             tolerance=chord_tolerance(config))
    starts, ends, lengths = pieces.path_start, pieces.path_end, pieces.path_length
    del pieces  # a few hundred MB at a million segments, not needed for the travel
    # Pen-up travel (as plan_travel plans it) to each path from the end of the one
    # before (home for the first), all planned together; then from the last home.
    previous = np.vstack([np.array([HOME]), ends[:-1]]) if len(paths) else np.zeros((0, 2))
    travel = _travel_rows(previous, starts, config, use_lm)
    home = _travel_rows(ends[-1:], np.array([HOME]), config, use_lm)
    home_s = float(np.sum(home["ticks"]) / ebb.TICKS_PER_S) if len(paths) else 0.0
    return DrawingRows(draw=draw, draw_bounds=_bounds(draw, len(paths)), travel=travel,
                       travel_bounds=_bounds(travel, len(paths)), start_mm=starts,
                       end_mm=ends, length_mm=lengths, home_s=home_s)


def plan_drawing(drawing: Drawing, config: DeviceConfig, *, use_lm: bool = True) -> MotionPlan:
    """The whole plot: per layer and path, the pen-down moves and the travel times."""
    paths = [path for layer in drawing.layers for path in layer.paths]
    rows = plan_drawing_rows(paths, config, use_lm=use_lm)
    draws, travels = moves_from_rows(rows.draw), moves_from_rows(rows.travel)
    travel_durations = (rows.travel["ticks"] / ebb.TICKS_PER_S).tolist()
    draw_bounds, travel_bounds = rows.draw_bounds.tolist(), rows.travel_bounds.tolist()
    up, down = pen_moves(config)

    start_list, end_list = rows.start_mm.tolist(), rows.end_mm.tolist()
    lengths = rows.length_mm.tolist()
    layers, number = [], 0
    for layer_index, layer in enumerate(drawing.layers):
        plans = []
        for path_index in range(len(layer.paths)):
            travel_from, travel_to = travel_bounds[number], travel_bounds[number + 1]
            start_x, start_y = start_list[number]
            end_x, end_y = end_list[number]
            plans.append(PathPlan(
                index=path_index,
                start_mm=(start_x, start_y),
                end_mm=(end_x, end_y),
                draw=tuple(draws[draw_bounds[number]:draw_bounds[number + 1]]),
                length_mm=lengths[number],
                travel_s=sum(travel_durations[travel_from:travel_to]),
                travel=tuple(travels[travel_from:travel_to]),
            ))
            number += 1
        layers.append(LayerPlan(index=layer_index, name=layer.name, paths=tuple(plans)))
    plan = MotionPlan(layers=tuple(layers), estimated_seconds=0.0, pen_up=up, pen_down=down,
                      home_s=rows.home_s)
    return attr.evolve(plan, estimated_seconds=estimate_seconds(plan))


def estimate_seconds(plan: MotionPlan) -> float:
    """Time the plotter takes: per path travel, pen down, draw, pen up; then travel home."""
    pen = (plan.pen_up.duration_s if plan.pen_up else 0.0) + \
        (plan.pen_down.duration_s if plan.pen_down else 0.0)
    total = plan.home_s
    for layer in plan.layers:
        for path in layer.paths:
            total += path.travel_s + pen + path.draw_s
    return float(total) if math.isfinite(total) else float("inf")
