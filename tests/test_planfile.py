"""The plan file: what is written is what the planner planned, move for move."""

from __future__ import annotations

import errno
import os
import struct

import attr
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vfab.config import DeviceConfig
from vfab.geometry import Drawing, Layer
from vfab.motion import pen_moves, plan_drawing
from vfab.motion.planfile import (FORMAT_VERSION, FilePlan, PlanFile, PlanFormatError,
                                  PlanWriter, fingerprint)
from vfab.motion.planner import plan_drawing_rows

CONFIG = DeviceConfig()

#: Coordinates on a micrometre grid, as a drawing's are after reading (the planner
#: itself is not made for subnormal numbers).
coordinate = st.integers(0, 200_000).map(lambda micrometres: micrometres / 1000.0)
point = st.tuples(coordinate, coordinate)
path = st.lists(point, min_size=1, max_size=8).map(lambda points: np.array(points))
layer = st.lists(path, min_size=0, max_size=6)


def write(target, layers, use_lm=True, config=CONFIG):
    with PlanWriter(target) as writer:
        for number, paths in enumerate(layers):
            writer.add_layer(f"layer {number}", plan_drawing_rows(paths, config, use_lm=use_lm))
        writer.finish(fingerprint=fingerprint(config, use_lm=use_lm),
                      figures={"plan_seconds": 1.0}, pen=pen_moves(config))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(layer, min_size=1, max_size=3), use_lm=st.booleans())
def test_a_plan_read_back_from_its_file_has_the_same_moves(tmp_path, layers, use_lm):
    target = tmp_path / "job.plan"
    write(target, layers, use_lm)
    plan = FilePlan(target)
    try:
        assert len(plan.layers) == len(layers)
        total = 0.0
        for number, paths in enumerate(layers):
            memory = plan_drawing(Drawing(layers=(Layer(f"layer {number}", paths),),
                                          width_mm=300, height_mm=300), CONFIG,
                                  use_lm=use_lm).layers[0]
            read = plan.layers[number]
            assert read.name == memory.name and len(read.paths) == len(memory.paths)
            for expected, got in zip(memory.paths, read.paths):
                assert tuple(got.draw) == expected.draw
                assert tuple(got.travel) == expected.travel
                assert [got.draw[i] for i in range(len(got.draw))] == list(expected.draw)
                assert (got.start_mm, got.end_mm, got.index) == \
                    (expected.start_mm, expected.end_mm, expected.index)
                assert got.travel_s == pytest.approx(expected.travel_s)
                assert got.length_mm == pytest.approx(expected.length_mm)
                total += sum(move.distance_mm for move in expected.draw)
        assert plan.draw_mm() == pytest.approx(total)
        assert plan.path_count == sum(len(paths) for paths in layers)
    finally:
        plan.close()


def test_drawn_before_counts_the_moves_and_paths_before_a_position(tmp_path):
    rng = np.random.default_rng(1)
    paths = [np.cumsum(rng.uniform(0, 3, (40, 2)), axis=0) + 10 for _ in range(5)]
    target = tmp_path / "job.plan"
    write(target, [paths[:3], paths[3:]])
    memory_layers = [plan_drawing(Drawing(layers=(Layer("x", part),), width_mm=300,
                                          height_mm=300), CONFIG).layers[0]
                     for part in (paths[:3], paths[3:])]
    with_file = FilePlan(target)
    try:
        for position in [(0, 0, 0), (0, 1, 7), (0, 3, 0), (1, 0, 3), (1, 2, 0), (2, 0, 0)]:
            layer, number, move = position
            done = sum(m.distance_mm for li, plan in enumerate(memory_layers)
                       for pi, p in enumerate(plan.paths)
                       for mi, m in enumerate(p.draw) if (li, pi, mi) < position)
            paths_done = sum(1 for li, plan in enumerate(memory_layers)
                             for pi in range(len(plan.paths)) if (li, pi) < (layer, number))
            got = with_file.drawn_before(*position)
            assert got[0] == pytest.approx(done) and got[1] == paths_done
    finally:
        with_file.close()


def test_the_header_keeps_the_figures_and_bounds(tmp_path):
    target = tmp_path / "job.plan"
    write(target, [[np.array([[10.0, 20.0], [110.0, 70.0]])]])
    with PlanFile(target) as plan:
        assert plan.fingerprint == fingerprint(CONFIG, use_lm=True)
        assert plan.figures == {"plan_seconds": 1.0}
        low_x, low_y, high_x, high_y = plan.header["bounds_mm"]
        assert (low_x, low_y, high_x, high_y) == pytest.approx((10, 20, 110, 70))
        rows = np.concatenate(list(plan.iter_rows(window=3)))
        assert len(rows) == plan.moves_count
        assert rows["end_mm"][-1].tolist() == [110.0, 70.0]


def test_a_file_of_another_format_version_is_refused(tmp_path):
    target = tmp_path / "job.plan"
    write(target, [[np.array([[10.0, 20.0], [110.0, 70.0]])]])
    with open(target, "r+b") as out:
        out.seek(8)
        out.write(struct.pack("<I", FORMAT_VERSION + 1))
    with pytest.raises(PlanFormatError, match="plan format"):
        PlanFile(target)
    (tmp_path / "junk.plan").write_bytes(b"not a plan at all, no: " * 3)
    with pytest.raises(PlanFormatError):
        PlanFile(tmp_path / "junk.plan")


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "job.plan"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write(target, [[np.array([[10.0, 20.0], [110.0, 70.0]])]])
    assert list(tmp_path.iterdir()) == []


def test_the_fingerprint_follows_the_settings_that_change_the_plan():
    base = fingerprint(CONFIG, use_lm=True)
    assert fingerprint(attr.evolve(CONFIG, speed_pen_down=20.0), use_lm=True) != base
    assert fingerprint(attr.evolve(CONFIG, pen_pos_down=10.0), use_lm=True) != base
    assert fingerprint(CONFIG, use_lm=False) != base
    assert fingerprint(attr.evolve(CONFIG, progress_save_interval=9.0), use_lm=True) == base


# -- the daemon: planned once at submission, plotted from the file ------------------------

def _planning_calls(site):
    """The functions the submission's (in-process) planning child is asked to run."""
    calls = []
    planning = site.life.queue._planning
    run = planning.run

    def counted(function, *args):
        calls.append(function.__name__)
        return run(function, *args)

    planning.run = counted
    return calls


def test_a_job_is_planned_once_at_submission_and_plotted_from_its_file(tmp_path):
    from plotting_site import Site
    from test_jobs_in_process import PAGE_FRAME, PAGE_FRAME_MM
    from test_runner import drawn_length
    from vfab.jobs import states

    site = Site(tmp_path)
    calls = _planning_calls(site)
    job_id = site.submit(PAGE_FRAME)
    site.wait_for(lambda: site.life.queue.scheduler.runner is not None, step=0.01)
    assert isinstance(site.life.queue.scheduler.runner._plan, FilePlan)
    site.wait_for(lambda: site.state(job_id) == states.COMPLETED)
    assert calls == ["plan_to_file"]
    assert drawn_length(site.strokes) == pytest.approx(PAGE_FRAME_MM, rel=0.01)
    preview = site.settle(site.life.queue.preview(job_id))
    assert calls == ["plan_to_file", "preview_from_plan"]
    assert preview["width_mm"] == 200 and sum(len(layer["paths"])
                                               for layer in preview["layers"]) == 3
    site.stop()


def test_changed_settings_plan_the_job_again_in_a_child_and_say_so(tmp_path):
    from twisted.logger import formatEvent

    from plotting_site import Site
    from test_every_stroke_once import resume_to_the_end
    from test_jobs_in_process import PAGE_FRAME, PAGE_FRAME_MM
    from test_runner import drawn_length

    site = Site(tmp_path)
    job_id = site.submit(PAGE_FRAME)
    site.wait_for(lambda: site.board.pen_up is False, step=0.01)
    site.advance(1.0)
    site.settle(site.life.queue.pause(job_id), limit=30)
    site.stop()
    site.settings = attr.evolve(site.settings, speed_pen_down=20.0)
    site.start()
    calls = _planning_calls(site)
    lines = resume_to_the_end(site, job_id)
    assert calls == ["plan_to_file"]
    said = [formatEvent(event) for event in lines if "planning again" in
            event.get("log_format", "")]
    assert len(said) == 1 and "settings or the firmware differ" in said[0]
    assert drawn_length(site.strokes) == pytest.approx(PAGE_FRAME_MM, rel=0.01)
    site.stop()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(st.lists(path, min_size=1, max_size=12), min_size=1, max_size=2),
       use_lm=st.booleans())
def test_a_plan_made_and_written_a_few_paths_at_a_time_is_the_same_file(
        tmp_path, monkeypatch, layers, use_lm):
    """Rows are made (planner.ROWS_CHUNK pieces) and written (WRITE_PATHS paths) a
    bit at a time to bound the memory of a million segments: the bytes are those
    made all at once."""
    import vfab.motion.planfile as planfile_module
    import vfab.motion.planner as planner_module

    whole, pieces = tmp_path / "whole.plan", tmp_path / "pieces.plan"
    write(whole, layers, use_lm)
    with monkeypatch.context() as patch:
        patch.setattr(planner_module, "ROWS_CHUNK", 3)
        patch.setattr(planfile_module, "WRITE_PATHS", 2)
        write(pieces, layers, use_lm)
    assert pieces.read_bytes() == whole.read_bytes()
