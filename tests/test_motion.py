"""Motion planning: speed profiles, EBB commands, exact step counts and times."""

from __future__ import annotations

import math
from pathlib import Path

import attr
import numpy as np
import pytest

from vfab.config import DeviceConfig
from vfab.geometry import Drawing, Layer, load_svg, optimize
from vfab.motion import (
    MIN_MOVE_S,
    estimate_seconds,
    pen_moves,
    plan_drawing,
    plan_path,
    plan_travel,
    resume_path,
)
from vfab.motion.planner import MAX_MOVE_S, pen_down_limits
from vfab.motion.profile import plan_pieces
from vfab.plotter.kinematics import mm_to_motor_steps

SAMPLE = Path(__file__).resolve().parent.parent / "vfab" / "samples" / "sample.svg"
TICK = 1 / 25000
STEP = 1 << 31
CONFIG = DeviceConfig()
K = 80.0  # steps per mm at 16x


# --- reference firmware, written from the EBB command reference -------------------------


def reference_axis(rate: int, steps: int, accel: int, *, check_rate: bool = True) -> int:
    """Ticks an LM axis runs, simulated tick by tick as the firmware does."""
    if steps == 0:
        return 0
    current = rate - int(accel / 2)  # C division: truncates toward zero
    accumulator = taken = ticks = 0
    while taken < abs(steps):
        ticks += 1
        current += accel
        if check_rate:
            assert current > 0, "the rate fell to zero or below before the last step"
        accumulator += current
        if accumulator >= STEP:
            taken += 1
            accumulator -= STEP
        assert ticks < 5_000_000
    return ticks


def reference_axis_fast(rate: int, steps: int, accel: int) -> int:
    """The same by bisection on the accumulator's closed form (big integers)."""
    if steps == 0:
        return 0
    target = abs(steps) * STEP
    base = rate - int(accel / 2)

    def received(k: int) -> int:
        return k * base + accel * k * (k + 1) // 2

    low, high = 1, 1
    if accel < 0:
        # The rate base + k*accel stays positive only up to this tick; past it
        # the accumulator falls (and the firmware would roll the rate over).
        high = max(1, -(-base // -accel) - 1)
        assert received(high) >= target, "the axis would stall before its last step"
    while received(high) < target:
        high *= 2
    while low < high:
        middle = (low + high) // 2
        if received(middle) >= target:
            high = middle
        else:
            low = middle + 1
    return max(low, abs(steps))


def reference_duration(command: str, *, exact: bool = False) -> float:
    """Seconds the EBB takes to run an LM or SM command."""
    name, *fields = command.split(",")
    values = [int(v) for v in fields]
    if name == "SM":
        return values[0] / 1000
    assert name == "LM" and len(values) == 7 and values[6] == 3  # Clear: both accumulators
    r1, s1, a1, r2, s2, a2 = values[:6]
    axis = reference_axis if exact else reference_axis_fast
    return max(axis(r1, s1, a1), axis(r2, s2, a2)) * TICK


def command_steps(command: str) -> tuple[int, int]:
    name, *fields = command.split(",")
    values = [int(v) for v in fields]
    return (values[1], values[4]) if name == "LM" else (values[1], values[2])


def lm_axis_speeds(command: str) -> list[tuple[float, float]]:
    """(start, end) step rates in steps/s of each axis of an LM, from its parameters."""
    values = [int(v) for v in command.split(",")[1:]]
    speeds = []
    for rate, steps, accel in (values[0:3], values[3:6]):
        if steps == 0:
            speeds.append((0.0, 0.0))
            continue
        ticks = reference_axis_fast(rate, steps, accel)
        first = rate - int(accel / 2) + accel
        last = rate - int(accel / 2) + ticks * accel
        speeds.append((first / STEP / TICK, last / STEP / TICK))
    return speeds


def carriage_speed(f1: float, f2: float, sign1: int, sign2: int) -> float:
    vx = (sign1 * f1 + sign2 * f2) / (2 * K)
    vy = (sign1 * f1 - sign2 * f2) / (2 * K)
    return math.hypot(vx, vy)


def check_moves_exact(moves, start_mm, end_mm):
    """Steps add up to the target exactly and every move ends where it says."""
    position = mm_to_motor_steps(*start_mm)
    for move in moves:
        d1, d2 = command_steps(move.command)
        position = (position[0] + d1, position[1] + d2)
        assert position == move.end_steps
        assert move.end_steps == mm_to_motor_steps(*move.end_mm)
    assert position == mm_to_motor_steps(*end_mm)


# --- speed profile -----------------------------------------------------------------------------


def test_long_line_reaches_the_speed_limit_and_stops():
    moves = plan_path(np.array([[10.0, 10.0], [210.0, 10.0]]), CONFIG)
    speeds = [lm_axis_speeds(move.command)[0] for move in moves]
    assert speeds[0][0] < 0.5 * K  # starts at rest (under half a mm/s)
    assert speeds[-1][1] < 0.05 * CONFIG.speed_pen_down * K  # ends near rest
    top = max(max(start, end) for start, end in speeds)
    assert top == pytest.approx(CONFIG.speed_pen_down * K, rel=0.01)
    # Accelerating, cruising, decelerating, each cut into moves of at most
    # MAX_MOVE_S so that a pause is never long in coming.
    accel_time = CONFIG.speed_pen_down / CONFIG.accel_pen_down
    assert max(m.duration_s for m in moves) <= MAX_MOVE_S + 1e-4
    cruise = 200 / CONFIG.speed_pen_down - accel_time
    assert len(moves) == 2 * math.ceil(accel_time / MAX_MOVE_S - 1e-9) \
        + math.ceil(cruise / MAX_MOVE_S - 1e-9)
    speeds_mm = [(a / K, b / K) for a, b in speeds]
    for (_, end), (start, _) in zip(speeds_mm, speeds_mm[1:]):
        assert start == pytest.approx(end, abs=1.0)  # one speed ramp, no jumps
    assert sum(m.duration_s for m in moves) == pytest.approx(
        200 / CONFIG.speed_pen_down + accel_time, rel=0.01)
    check_moves_exact(moves, (10.0, 10.0), (210.0, 10.0))


def test_speed_and_acceleration_limits_hold_everywhere():
    rng = np.random.default_rng(2)
    points = np.cumsum(rng.normal(0, 3, (400, 2)), axis=0) + 150
    for move in plan_path(points, CONFIG):
        (f1a, f1b), (f2a, f2b) = lm_axis_speeds(move.command)
        s1, s2 = (1 if v >= 0 else -1 for v in command_steps(move.command))
        for f1, f2 in ((f1a, f2a), (f1b, f2b)):
            assert carriage_speed(f1, f2, s1, s2) <= CONFIG.speed_pen_down * 1.03 + 0.5
        change = abs(carriage_speed(f1b, f2b, s1, s2) - carriage_speed(f1a, f2a, s1, s2))
        assert change / move.duration_s <= CONFIG.accel_pen_down * 1.05 + 20


def corner_speed(angle_degrees: float) -> float:
    """Planned speed at the vertex of a path turning by `angle_degrees`."""
    turn = math.radians(angle_degrees)
    points = np.array([[0.0, 0.0], [50.0, 0.0], [50 + 50 * math.cos(turn), 50 * math.sin(turn)]])
    pieces = plan_pieces([points + 100], pen_down_limits(CONFIG), 0.0)
    at_vertex = np.isclose(pieces.end_mm, [150.0, 100.0]).all(axis=1)
    return float(pieces.end_speed[at_vertex][0])


def test_corners_slow_down_sharper_is_slower():
    angles = (0, 20, 45, 90, 135, 170, 180)
    speeds = [corner_speed(angle) for angle in angles]
    assert speeds[0] == pytest.approx(CONFIG.speed_pen_down)  # straight on
    assert speeds[1] == pytest.approx(CONFIG.speed_pen_down)  # a gentle bend needs no slowing
    assert all(a > b for a, b in zip(speeds[1:], speeds[2:]))
    assert speeds[-1] == pytest.approx(0.0, abs=1e-9)  # a reversal stops
    for angle, speed in zip(angles[2:-1], speeds[2:-1]):
        # v^2 = a * delta * sin(theta / 2) / (1 - sin(theta / 2)), theta = 180 - turn
        s = math.sin(math.radians(180 - angle) / 2)
        expected = math.sqrt(CONFIG.accel_pen_down * CONFIG.cornering * s / (1 - s))
        assert speed == pytest.approx(expected, rel=1e-6)


def test_cornering_setting_matters():
    looser = attr.evolve(CONFIG, cornering=0.5)
    turn = np.array([[100.0, 100.0], [150.0, 100.0], [150.0, 150.0]])
    tight = plan_pieces([turn], pen_down_limits(CONFIG), 0.0)
    loose = plan_pieces([turn], pen_down_limits(looser), 0.0)
    assert loose.duration.sum() < tight.duration.sum()


# --- exactness and firmware limits ------------------------------------------------------------


def tiny_wiggle(count: int, seed: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, 0.03, (count, 2)) + [0.02, 0.01]
    return np.cumsum(np.vstack([[[100.0, 100.0]], steps]), axis=0)


@pytest.mark.parametrize("use_lm", [True, False])
def test_thousands_of_tiny_segments_end_exactly_on_target(use_lm):
    points = tiny_wiggle(5000)
    moves = plan_path(points, CONFIG, use_lm=use_lm)
    check_moves_exact(moves, tuple(points[0]), tuple(points[-1]))
    total = np.sum([command_steps(m.command) for m in moves], axis=0)
    start, end = mm_to_motor_steps(*points[0]), mm_to_motor_steps(*points[-1])
    assert tuple(total) == (end[0] - start[0], end[1] - start[1])


@pytest.mark.parametrize("points", [
    tiny_wiggle(3000, seed=9),
    np.array([[10.0, 10.0], [10.02, 10.0]]),  # shorter than a firmware move at full speed
    np.array([[10.0, 10.0], [10.3, 10.0], [10.3, 10.3], [10.0, 10.3], [10.0, 10.0]]),
    np.array([[50.0, 50.0], [50.1, 50.0]] * 50) + np.arange(100)[:, None] * [0.0, 0.2],
])
def test_no_move_shorter_than_the_firmware_minimum(points):
    for use_lm in (True, False):
        for move in plan_path(points, CONFIG, use_lm=use_lm):
            assert reference_duration(move.command) >= MIN_MOVE_S, move.command


def test_lm_durations_are_the_firmwares_to_the_tick():
    points = np.vstack([tiny_wiggle(300, seed=7), [[120.0, 180.0], [20.0, 20.0]]])
    moves = plan_path(points, CONFIG) + plan_travel((20.0, 20.0), (400.0, 290.0), CONFIG)
    for move in moves:
        # Tick by tick; also fails if an axis's rate ever falls to zero before its last step.
        assert move.duration_s == pytest.approx(reference_duration(move.command, exact=True),
                                                abs=1e-12)


def test_sm_variant_whole_milliseconds_and_step_rates_in_range():
    points = np.vstack([tiny_wiggle(500), [[200.0, 120.0], [201.0, 250.0]]])
    moves = plan_path(points, CONFIG, use_lm=False)
    assert all(move.command.startswith("SM,") for move in moves)
    for move in moves:
        ms, s1, s2 = (int(v) for v in move.command.split(",")[1:])
        assert ms >= 4 and move.duration_s == ms / 1000
        for steps in (s1, s2):
            if steps:
                assert 1.31 <= abs(steps) / (ms / 1000) <= 25000
    check_moves_exact(moves, tuple(points[0]), tuple(points[-1]))
    lm = plan_path(points, CONFIG)
    assert sum(m.duration_s for m in moves) == pytest.approx(sum(m.duration_s for m in lm), rel=0.05)


def test_microstepping_scales_steps():
    coarse = attr.evolve(CONFIG, microstepping=8)
    moves = plan_travel((0.0, 0.0), (100.0, 0.0), coarse)
    assert moves[-1].end_steps == (4000, 4000)
    assert sum(command_steps(m.command)[0] for m in moves) == 4000


# --- travel, pen, resume ----------------------------------------------------------------------


def test_travel_uses_pen_up_speed_and_starts_and_ends_at_rest():
    moves = plan_travel((0.0, 0.0), (300.0, 0.0), CONFIG)
    check_moves_exact(moves, (0.0, 0.0), (300.0, 0.0))
    speeds = [lm_axis_speeds(m.command)[0] for m in moves]
    assert max(max(s) for s in speeds) == pytest.approx(CONFIG.speed_pen_up * K, rel=0.01)
    assert speeds[0][0] < K and speeds[-1][1] < 0.05 * CONFIG.speed_pen_up * K
    assert plan_travel((5.0, 5.0), (5.0, 5.0), CONFIG) == ()


def test_pen_times_follow_the_axidraw_formula():
    up, down = pen_moves(CONFIG)
    distance = CONFIG.pen_pos_up - CONFIG.pen_pos_down

    def servo_ms(rate):
        return int(((2.69 * distance + 45) ** 4 + (200 * distance / rate) ** 4) ** 0.25)

    assert up.command == f"SP,1,{servo_ms(CONFIG.pen_rate_raise)}"
    assert down.command == f"SP,0,{servo_ms(CONFIG.pen_rate_lower)}"
    assert up.duration_s == servo_ms(CONFIG.pen_rate_raise) / 1000
    delayed = attr.evolve(CONFIG, pen_delay_up=250, pen_delay_down=100)
    up2, down2 = pen_moves(delayed)
    assert up2.duration_s == pytest.approx(up.duration_s + 0.25)
    assert down2.duration_s == pytest.approx(down.duration_s + 0.1)
    same = attr.evolve(CONFIG, pen_pos_up=50, pen_pos_down=50, pen_delay_up=10)
    assert pen_moves(same)[0].command == "SP,1,10"


def test_resume_mid_path_replans_from_rest_to_the_same_end():
    drawing = Drawing(layers=(Layer("a", [np.array([[10, 10], [100, 10], [100, 80]], float)]),),
                      width_mm=200, height_mm=200)
    path = plan_drawing(drawing, CONFIG).layers[0].paths[0]
    rest = resume_path(path, 2, CONFIG)
    moves = [move for move, _ in rest]
    check_moves_exact(moves, path.draw[1].end_mm, path.end_mm)
    assert lm_axis_speeds(moves[0].command)[0][0] < K
    # Every planned end after the second is reached once, in order, by a new move.
    reached = [(done, move.end_steps) for move, done in rest if done is not None]
    assert reached == [(index + 1, path.draw[index].end_steps)
                       for index in range(2, len(path.draw))]
    assert resume_path(path, 0, CONFIG) == [(move, i + 1) for i, move in enumerate(path.draw)]
    assert resume_path(path, len(path.draw), CONFIG) == []


def test_resume_counts_a_path_that_passes_the_same_point_again():
    """Hatching merged into one path goes back and forth through its own vertices:
    the count of planned moves done must follow the path, not a point lookup."""
    points = np.array([[10, 10], [60, 10], [10, 10], [60, 10], [10, 10], [60, 10]], float)
    drawing = Drawing(layers=(Layer("a", [points]),), width_mm=200, height_mm=200)
    path = plan_drawing(drawing, CONFIG).layers[0].paths[0]
    for done in range(1, len(path.draw)):
        rest = resume_path(path, done, CONFIG)
        counts = [count for _, count in rest if count is not None]
        assert counts == list(range(done + 1, len(path.draw) + 1))
        assert rest[-1][0].end_steps == path.draw[-1].end_steps


# --- whole plans and the estimate ------------------------------------------------------------------


def sample_drawing() -> Drawing:
    return optimize(load_svg(SAMPLE.read_bytes()), CONFIG.merge_tolerance)


@pytest.mark.parametrize("use_lm", [True, False])
def test_estimate_agrees_with_the_reference_firmware(use_lm):
    drawing = sample_drawing()
    plan = plan_drawing(drawing, CONFIG, use_lm=use_lm)
    up, down = pen_moves(CONFIG)
    total = 0.0
    position = (0.0, 0.0)
    for layer, source in zip(plan.layers, drawing.layers):
        assert layer.name == source.name
        for path in layer.paths:
            travel = plan_travel(position, path.start_mm, CONFIG, use_lm=use_lm)
            check_moves_exact(travel, position, path.start_mm)
            check_moves_exact(path.draw, path.start_mm, path.end_mm)
            for move in travel + path.draw:
                measured = reference_duration(move.command)
                assert move.duration_s == pytest.approx(measured, abs=1e-12)
                total += measured
            total += up.duration_s + down.duration_s
            position = path.end_mm
    for move in plan_travel(position, (0.0, 0.0), CONFIG, use_lm=use_lm):
        total += reference_duration(move.command)
    assert plan.estimated_seconds == pytest.approx(total, rel=1e-9)
    assert estimate_seconds(plan) == pytest.approx(plan.estimated_seconds, rel=1e-12)
    assert 120 <= plan.estimated_seconds <= 240  # a 2-4 minute sample


def test_estimate_agrees_with_the_simulator_timing_if_present():
    timing = pytest.importorskip("vfab.simulator.timing")
    plan = plan_drawing(sample_drawing(), CONFIG)
    moves = [move for layer in plan.layers for path in layer.paths for move in path.draw]
    simulated = 0.0
    for move in moves:
        values = [int(v) for v in move.command.split(",")[1:]]
        assert values[6] == 3  # each LM clears both accumulators: its time is exact
        result, _ = timing.lm_timing(*values[:6], accumulators=(0, 0))
        assert not result.rolled_over
        simulated += result.seconds
    planned = sum(move.duration_s for move in moves)
    assert simulated == pytest.approx(planned, rel=1e-9)


def test_plan_structure_and_dots():
    dot = np.array([[50.0, 50.0], [50.001, 50.0]])  # less than a step: pen down and up only
    line = np.array([[10.0, 10.0], [20.0, 10.0]])
    drawing = Drawing(layers=(Layer("first", [line]), Layer("second", [dot])),
                      width_mm=100, height_mm=100)
    plan = plan_drawing(drawing, CONFIG)
    assert [(layer.index, layer.name) for layer in plan.layers] == [(0, "first"), (1, "second")]
    first, second = plan.layers[0].paths[0], plan.layers[1].paths[0]
    assert first.index == 0 and first.start_mm == (10.0, 10.0) and first.end_mm == (20.0, 10.0)
    assert first.length_mm == pytest.approx(10.0)
    assert second.draw == ()
    assert first.travel_s == pytest.approx(sum(m.duration_s for m in plan_travel(
        (0.0, 0.0), (10.0, 10.0), CONFIG)))


def test_planning_many_segments_is_practical():
    import time

    rng = np.random.default_rng(3)
    paths = [np.clip(np.cumsum(rng.normal(0, 1.0, (101, 2)), axis=0) + rng.uniform(50, 250, 2), 0, 290)
             for _ in range(1000)]
    drawing = Drawing(layers=(Layer("many", paths),), width_mm=300, height_mm=300)
    started = time.perf_counter()
    plan = plan_drawing(drawing, CONFIG)  # 100k segments
    elapsed = time.perf_counter() - started
    assert plan.path_count == 1000
    assert elapsed < 10


def test_moves_are_immutable_and_keep_their_fields():
    moves = plan_path(np.array([[0.0, 0.0], [10.0, 5.0], [20.0, 0.0]]), CONFIG)
    move = moves[0]
    assert (move.command, move.duration_s, move.end_steps, move.end_mm, move.distance_mm) \
        == tuple(move)
    assert isinstance(move.end_steps[0], int) and isinstance(move.duration_s, float)
    with pytest.raises(AttributeError):
        move.command = "SM,1,0,0"


def test_prepare_leaves_the_garbage_collector_as_it_was():
    import gc

    from vfab.jobs.prepare import prepare

    svg = (b'<svg xmlns="http://www.w3.org/2000/svg" width="100mm" height="100mm" '
           b'viewBox="0 0 100 100"><path d="M10 10 L50 50 L90 10"/></svg>')
    assert gc.isenabled()
    prepare(svg, CONFIG)
    assert gc.isenabled()
    gc.disable()
    try:
        prepare(svg, CONFIG)
        assert not gc.isenabled()
    finally:
        gc.enable()
