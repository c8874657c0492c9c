"""`locate`: where an interrupted plot got to, from the step counters and the plan."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from plotting_site import SETTINGS
from vfab.geometry import Drawing, Layer
from vfab.jobs.carriage import Trail, locate
from vfab.jobs.position import Position
from vfab.motion.planner import plan_drawing
from vfab.plotter.kinematics import mm_to_motor_steps

MICROSTEPPING = SETTINGS.microstepping


def paths_of(*points: list[tuple[float, float]]):
    drawing = Drawing(layers=[Layer(name="1", paths=[np.array(p, float) for p in points])],
                      width_mm=100, height_mm=100)
    return plan_drawing(drawing, SETTINGS).layers[0].paths


def steps(x: float, y: float) -> tuple[int, int]:
    return tuple(int(v) for v in mm_to_motor_steps(x, y, MICROSTEPPING))


def test_a_carriage_where_the_position_left_it_has_done_nothing_since():
    """Home is also the middle of the path: only `at` tells the two apart."""
    paths = paths_of([(0, 5), (0, 0), (0, 5)])
    start = Position(0, 0, 0, at=steps(0, 0))
    assert locate(paths, start, steps(0, 0), MICROSTEPPING) == start


def test_without_at_the_first_point_on_the_walk_counts():
    paths = paths_of([(0, 5), (0, 0), (0, 5)])
    found = locate(paths, Position(0, 0, 0), steps(0, 0), MICROSTEPPING)
    assert found > Position(0, 0, 0)


def test_a_carriage_on_the_travel_to_the_path_travels_on():
    paths = paths_of([(10, 10), (20, 10)])
    start = Position(0, 0, 0, at=steps(0, 0))
    assert locate(paths, start, steps(5, 5), MICROSTEPPING) == start


def test_a_carriage_inside_a_stroke_goes_on_from_there():
    paths = paths_of([(10, 10), (20, 10)])
    start = Position(0, 0, 0, at=steps(0, 0))
    found = locate(paths, start, steps(15, 10), MICROSTEPPING)
    assert found.path == 0 and found.inside == steps(15, 10)


def test_at_survives_the_store():
    position = Position(1, 2, 3, parked=True, inside=(4, 5), at=(6, 7))
    again = Position.from_dict(position.to_dict())
    assert (again, again.parked, again.inside, again.at) == (position, True, (4, 5), (6, 7))


class EverySegment(Trail):
    """The Trail with its bounding boxes ignored: every segment measured."""

    def _near(self, count, p0, p1):
        return self._segments[:max(count, 0)].tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-40, 40), st.integers(-40, 40)), min_size=2,
                max_size=120))
def test_the_trail_says_save_exactly_when_a_segment_is_near(points):
    """The bounding boxes only skip work: the decisions are those of measuring all."""
    trail, everything = Trail(), EverySegment()
    for start, end in zip(points, points[1:]):
        expected = everything.needs_save_before(start, end)
        assert trail.needs_save_before(start, end) == expected
        for each in (trail, everything):
            if expected:
                each.saved_at(each.sent)
            each.add(start, end)
