"""Speed profiles along polylines: trapezoids per segment, slowed at corners.

Every straight segment gets a constant-acceleration profile (accelerate,
cruise, decelerate) between its entry and exit speeds. Corner speeds follow
junction deviation as in GRBL and saxi, v² = a·δ·sin(θ/2) / (1 − sin(θ/2)),
with θ the angle between the incoming (reversed) and outgoing directions: a
straight continuation is not limited, a reversal stops. A forward and a
backward pass then keep every speed change within the acceleration, and
every path starts and ends at rest.

Each profile is cut into pieces of constant acceleration, one EBB command
each. The firmware needs a few milliseconds per command, so no piece is
shorter than `min_move_s`: a segment's speed is capped so the whole segment
lasts that long, and phases shorter than that are merged with a neighbour
(a merged piece changes speed linearly, at less than the acceleration).

Everything is vectorised over all segments of all paths at once: the passes
use the closed form w[i] = S[i] + min_j<=i (cap[j] - S[j]) of the recurrence
w[i] = min(cap[i], w[i-1] + 2·a·L), with S the running sum of 2·a·L, so a
million segments plan in numpy without a Python loop per segment.
"""

from __future__ import annotations

import attr
import numpy as np
import shapely

#: The EBB steps at most once per 40 µs tick; stay a little under 25 kHz.
MAX_MOTOR_STEPS_PER_S = 24_000.0

#: Shortest command the firmware is given (USB and parsing keep up with this).
MIN_MOVE_S = 0.004
#: What the planner aims for, so the firmware's tick rounding stays above MIN_MOVE_S.
PLAN_MIN_MOVE_S = 0.0045


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Limits:
    """How one kind of motion may move: pen-down drawing or pen-up travel."""

    speed: float  # mm/s
    accel: float  # mm/s²
    cornering: float  # junction deviation, mm
    steps_per_mm: float
    min_move_s: float = PLAN_MIN_MOVE_S


@attr.s(frozen=True, slots=True, eq=False)
class Pieces:
    """Constant-acceleration pieces of straight segments, path after path.

    Arrays of one row per piece, except `path_start`, `path_end` and
    `path_length` with one row per input path.
    """

    path: np.ndarray = attr.ib()  # which input path each piece belongs to
    start_mm: np.ndarray = attr.ib()  # (n, 2)
    end_mm: np.ndarray = attr.ib()  # (n, 2)
    start_speed: np.ndarray = attr.ib()  # mm/s
    end_speed: np.ndarray = attr.ib()  # mm/s
    length: np.ndarray = attr.ib()  # mm
    duration: np.ndarray = attr.ib()  # s, as planned (before the firmware's rounding)
    path_start: np.ndarray = attr.ib()  # (paths, 2) first point of each path
    path_end: np.ndarray = attr.ib()  # (paths, 2) last point of each path
    path_length: np.ndarray = attr.ib()  # (paths,) length of the simplified polyline


def _simplify(points: np.ndarray, owner: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Drop vertices within `tolerance` of the chord (Douglas-Peucker); ends are kept."""
    if tolerance <= 0 or len(points) == 0:
        return points, owner
    lines = shapely.linestrings(points, indices=owner)
    simple = shapely.simplify(lines, tolerance, preserve_topology=False)
    coordinates, index = shapely.get_coordinates(simple, return_index=True)
    # shapely numbers the geometries 0..k-1 in the order of the distinct owners.
    present = np.unique(owner)
    return coordinates.astype(np.float64), present[index]


def plan_pieces(paths: list[np.ndarray], limits: Limits, chord_tolerance: float) -> Pieces:
    """Plan every path from rest to rest; see the module docstring."""
    # A one-point path would be a dot: give it a second point so it stays a path.
    paths = [path if len(path) >= 2 else np.repeat(np.asarray(path).reshape(-1, 2), 2, axis=0)
             for path in paths]
    count = len(paths)
    if count:
        sizes = np.array([len(path) for path in paths])
        points = np.concatenate([np.asarray(path, dtype=np.float64).reshape(-1, 2)
                                 for path in paths])
        owner = np.repeat(np.arange(count), sizes)
    else:
        points, owner = np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    path_start = np.zeros((count, 2))
    path_end = np.zeros((count, 2))
    if count:
        ends = np.cumsum(sizes)
        path_start[:] = points[ends - sizes]
        path_end[:] = points[ends - 1]

    points, owner = _simplify(points, owner, chord_tolerance)
    # Consecutive duplicates draw nothing and have no direction.
    if len(points):
        keep = np.ones(len(points), dtype=bool)
        keep[1:] = (owner[1:] != owner[:-1]) | np.any(points[1:] != points[:-1], axis=1)
        points, owner = points[keep], owner[keep]

    first = np.ones(len(points), dtype=bool)
    last = np.ones(len(points), dtype=bool)
    first[1:] = owner[1:] != owner[:-1]
    last[:-1] = owner[1:] != owner[:-1]

    # Segment j runs from vertex j to j + 1; it is real when both belong to one path.
    delta = points[1:] - points[:-1]
    valid = owner[1:] == owner[:-1]
    length = np.where(valid, np.hypot(delta[:, 0], delta[:, 1]), 0.0)
    valid &= length > 0
    safe = np.where(valid, length, 1.0)
    unit = delta / safe[:, None]

    path_length = np.bincount(owner[:-1][valid], weights=length[valid], minlength=count) \
        if len(points) > 1 else np.zeros(count)

    # Segment speed caps: the configured speed, the motors' step rate, and
    # short enough a segment may not go faster than lasting min_move_s.
    axis_load = np.maximum(np.abs(unit[:, 0] + unit[:, 1]), np.abs(unit[:, 0] - unit[:, 1]))
    motor_cap = MAX_MOTOR_STEPS_PER_S / (limits.steps_per_mm * np.maximum(axis_load, 1e-12))
    segment_cap = np.minimum(np.minimum(limits.speed, motor_cap), length / limits.min_move_s)
    segment_cap = np.where(valid, segment_cap, 0.0)
    # A million segments make each array here 8-16 MB: what is no longer
    # needed goes as the plan proceeds, so that they are not all held at once.
    del delta, safe, axis_load, motor_cap

    accel = limits.accel
    # Vertex caps (squared speeds): rest at path ends, junction deviation inside.
    vertex_cap = np.zeros(len(points))
    inner = ~(first | last)
    if inner.any():
        index = np.nonzero(inner)[0]
        incoming, outgoing = unit[index - 1], unit[index]
        cos_theta = -np.einsum("ij,ij->i", incoming, outgoing)
        sin_half = np.sqrt(np.clip((1.0 - cos_theta) / 2.0, 0.0, 1.0))
        with np.errstate(divide="ignore"):
            junction = np.where(sin_half < 1.0 - 1e-9,
                                accel * limits.cornering * sin_half / (1.0 - sin_half), np.inf)
        around = np.minimum(segment_cap[index - 1], segment_cap[index]) ** 2
        vertex_cap[index] = np.minimum(junction, around)
        del index, incoming, outgoing, cos_theta, sin_half, junction, around
    del inner

    # Forward and backward passes in closed form (see module docstring).
    reach = np.zeros(len(points))
    reach[1:] = 2.0 * accel * length
    total = np.cumsum(reach)
    forward = total + np.minimum.accumulate(vertex_cap - total)
    backward = np.minimum.accumulate((vertex_cap + total)[::-1])[::-1] - total
    speed2 = np.clip(np.minimum(forward, backward), 0.0, None)
    speed2[first | last] = 0.0
    del reach, total, forward, backward, vertex_cap, first, last

    # Per real segment: entry, exit and cruise speeds and the phase lengths.
    seg = np.nonzero(valid)[0]
    L = length[seg]
    w0, w1 = speed2[seg], speed2[seg + 1]
    cap2 = segment_cap[seg] ** 2
    del speed2, segment_cap, length, valid
    peak2 = np.minimum(cap2, (2.0 * accel * L + w0 + w1) / 2.0)
    peak2 = np.maximum(peak2, np.maximum(w0, w1))
    v0, v1, vc = np.sqrt(w0), np.sqrt(w1), np.sqrt(peak2)
    d_accel = np.clip((peak2 - w0) / (2.0 * accel), 0.0, L)
    d_decel = np.clip((peak2 - w1) / (2.0 * accel), 0.0, L - d_accel)
    d_cruise = np.maximum(L - d_accel - d_decel, 0.0)

    tmin = limits.min_move_s
    with np.errstate(divide="ignore", invalid="ignore"):
        t_accel = np.where(d_accel > 0, 2.0 * d_accel / (v0 + vc), 0.0)
        t_cruise = np.where(d_cruise > 0, d_cruise / vc, 0.0)
        t_decel = np.where(d_decel > 0, 2.0 * d_decel / (vc + v1), 0.0)
    keep_accel = t_accel >= tmin
    keep_decel = t_decel >= tmin

    # Case 1: accelerate, cruise, decelerate, each long enough.
    three = keep_accel & keep_decel & (t_cruise >= tmin)
    # Case 2: two pieces split at a point b of the cruise (speed vc there),
    # each piece lasting at least tmin; keep a whole phase when possible.
    b_low = np.maximum(d_accel, tmin * (v0 + vc) / 2.0)
    b_high = np.minimum(d_accel + d_cruise, L - tmin * (vc + v1) / 2.0)
    middle = np.clip(d_accel + d_cruise / 2.0, b_low, b_high)
    split = np.where(keep_accel & (d_accel <= b_high), d_accel,
                     np.where(keep_decel & (d_accel + d_cruise >= b_low),
                              d_accel + d_cruise, middle))
    two = ~three & (b_low <= b_high)
    # Case 3: too short for two pieces. One piece from v0 to v1 when that is
    # not a crawl; otherwise two halves through a speed vm that keeps each
    # half at least tmin long and within the acceleration.
    rest = ~three & ~two
    single = rest & (v0 + v1 >= L / (2.0 * tmin))
    halves = rest & ~single
    vm = np.minimum(L / tmin - np.maximum(v0, v1), np.sqrt(np.minimum(w0, w1) + accel * L))

    # Boundaries of each segment: 0, b1, b2, L with their speeds; keep flags.
    s = np.zeros((len(seg), 4))
    v = np.zeros((len(seg), 4))
    k = np.zeros((len(seg), 4), dtype=bool)
    s[:, 3], v[:, 0], v[:, 3] = L, v0, v1
    k[:, 0] = k[:, 3] = True
    s[:, 1] = np.where(three, d_accel, np.where(two, split, L / 2.0))
    v[:, 1] = np.where(halves, vm, vc)
    k[:, 1] = three | two | halves
    s[:, 2] = d_accel + d_cruise
    v[:, 2] = vc
    k[:, 2] = three
    del w0, w1, cap2, peak2, d_decel, t_accel, t_cruise, t_decel, keep_accel, keep_decel
    del b_low, b_high, middle, split, rest, single, vm, three, two, halves
    del v0, v1, vc, d_accel, d_cruise

    flat_s, flat_v = s[k], v[k]
    flat_seg = np.repeat(np.arange(len(seg)), k.sum(axis=1))
    same = flat_seg[1:] == flat_seg[:-1]
    piece_seg = flat_seg[:-1][same]
    s_from, s_to = flat_s[:-1][same], flat_s[1:][same]
    u_from, u_to = flat_v[:-1][same], flat_v[1:][same]
    del s, v, k, flat_s, flat_v, flat_seg, same

    origin = points[seg[piece_seg]]
    direction = unit[seg[piece_seg]]
    start = origin + direction * s_from[:, None]
    end = origin + direction * s_to[:, None]
    del origin, direction
    # Segment ends exactly at their vertices, so no rounding creeps in.
    at_end = s_to >= L[piece_seg]
    end[at_end] = points[seg[piece_seg][at_end] + 1]
    at_start = s_from <= 0
    start[at_start] = points[seg[piece_seg][at_start]]
    piece_length = s_to - s_from
    duration = 2.0 * piece_length / (u_from + u_to)
    return Pieces(path=owner[seg[piece_seg]], start_mm=start, end_mm=end, start_speed=u_from,
                  end_speed=u_to, length=piece_length, duration=duration,
                  path_start=path_start, path_end=path_end, path_length=path_length)


def cut_long_pieces(pieces: Pieces, max_seconds: float) -> Pieces:
    """Cut pieces longer than `max_seconds` into equal-time parts on the same speed ramp,
    so that a pause, which waits for the move under way, is never long in coming."""
    parts = np.maximum(np.ceil(pieces.duration / max_seconds - 1e-9), 1).astype(np.int64)
    if not len(parts) or parts.max() == 1:
        return pieces
    piece = np.repeat(np.arange(len(parts)), parts)
    k = np.arange(len(piece)) - np.repeat(np.cumsum(parts) - parts, parts)
    n = parts[piece]
    u0, u1, total = pieces.start_speed[piece], pieces.end_speed[piece], pieces.duration[piece]
    length = pieces.length[piece]
    start_speed = u0 + (u1 - u0) * k / n
    end_speed = u0 + (u1 - u0) * (k + 1) / n

    def along(fraction: np.ndarray) -> np.ndarray:
        """Distance covered after `fraction` of the piece's time."""
        t = fraction * total
        return u0 * t + (u1 - u0) * t * t / (2.0 * total)

    s_from, s_to = along(k / n), along((k + 1) / n)
    last = k == n - 1
    s_to[last] = length[last]
    with np.errstate(divide="ignore", invalid="ignore"):
        share_from = np.where(length > 0, s_from / length, 0.0)
        share_to = np.where(length > 0, s_to / length, 1.0)
    a, b = pieces.start_mm[piece], pieces.end_mm[piece]
    start_mm = a + (b - a) * share_from[:, None]
    end_mm = a + (b - a) * share_to[:, None]
    start_mm[k == 0] = a[k == 0]
    end_mm[last] = b[last]
    return Pieces(path=pieces.path[piece], start_mm=start_mm, end_mm=end_mm,
                  start_speed=start_speed, end_speed=end_speed, length=s_to - s_from,
                  duration=total / n, path_start=pieces.path_start,
                  path_end=pieces.path_end, path_length=pieces.path_length)
