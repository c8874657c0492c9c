"""Every stroke exactly once: random drawings against random schedules of pause,
resume, pen changes, lost cables, power cuts (the plotter's, or the whole site's
with the daemon), graceful restarts and kill -9, on both firmware
generations (and a 3.x board left in another program's state), all in-process
on the emulated board, a real SQLite store and the daemon's own queue, scheduler
and runner. The strokes on the paper, all daemon lives together, must be the
uninterrupted plot's (within 0.05 mm both ways, length within 0.2 %); after a
power cut nothing is skipped and no more is drawn twice than the board held.

`make test` runs a few hundred examples; VFAB_PROPERTY_EXAMPLES=5000 runs more
(see README, "Testing").
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.logger import globalLogPublisher

from plotting_site import Site
from test_runner import assert_same_drawing, distance_to_strokes, drawn_length
from vfab.jobs import states
from vfab.jobs.errors import InvalidTransition

EXAMPLES = int(os.environ.get("VFAB_PROPERTY_EXAMPLES", "300"))

# Points on a coarse grid that includes the home corner, so that paths meet,
# revisit their own vertices and pass through home.
coordinate = st.integers(0, 8).map(lambda i: i * 5.0)
point = st.tuples(coordinate, coordinate)


@st.composite
def polylines(draw) -> list[list[tuple[float, float]]]:
    paths = []
    for _ in range(draw(st.integers(1, 4))):
        points = draw(st.lists(point, min_size=2, max_size=7)
                      .filter(lambda points: len(set(points)) > 1))
        if draw(st.booleans()):
            points = points + points[::-1][1:]  # backtrack over itself
        if draw(st.booleans()):
            points.insert(draw(st.integers(0, len(points) - 1)),
                          points[0])  # a repeated vertex (maybe a zero-length segment)
        paths.append(points)
    if draw(st.booleans()):
        paths.append(list(paths[0]))  # a duplicate path
    return paths


def svg_of(layers: list[list[list[tuple[float, float]]]]) -> bytes:
    groups = []
    for index, paths in enumerate(layers):
        lines = "".join(
            f'<polyline fill="none" stroke="black" points="'
            f'{" ".join(f"{x},{y}" for x, y in path)}"/>' for path in paths)
        groups.append(f'<g inkscape:groupmode="layer" inkscape:label="{index + 1} pen">'
                      f'{lines}</g>')
    return ('<svg xmlns="http://www.w3.org/2000/svg" '
            'xmlns:inkscape="http://www.inkscape.org/namespaces/inkscape" '
            'width="100mm" height="100mm" viewBox="0 0 100 100">'
            + "".join(groups) + "</svg>").encode()


drawings = st.lists(polylines(), min_size=1, max_size=2).map(svg_of)

ACTIONS = ("pause", "resume", "button", "pull_cable", "restart", "kill", "cancel",
           "power_cut", "blackout")
schedules = st.lists(st.tuples(st.floats(0.0, 2.0),
                               st.sampled_from(ACTIONS)), max_size=8)


#: Both firmware generations (and 2.6.5: SM moves, no QE, no LM), and a 3.x board
#: another program left in future syntax mode with a 32-deep FIFO and no OK replies.
BOARDS = {
    "2.6.5": {"firmware": "2.6.5"},
    "2.8.1": {"firmware": "2.8.1"},
    "3.0.3": {"firmware": "3.0.3"},
    "3.0.3 left by other software": {"firmware": "3.0.3", "future_syntax": True,
                                     "fifo_depth": 32, "ok_replies": False},
}


def plot_alone(tmp_path, svg: bytes, board: dict) -> list[np.ndarray]:
    site = Site(tmp_path / "reference", **board)
    job_id = site.submit(svg)
    finish(site, job_id)
    strokes = site.strokes
    site.stop()
    return strokes


def finish(site: Site, job_id: str) -> str:
    """Play the person at the plotter until the job ends: resume whatever waits."""
    for _ in range(200):
        state = site.state(job_id)
        if state in (states.COMPLETED, states.CANCELLED):
            return state
        assert state != states.FAILED, site.job(job_id)
        if state in (states.PAUSED, states.AWAITING_PEN, states.INTERRUPTED):
            site.settle(site.life.queue.resume(job_id))
        site.advance(1.0)
    raise AssertionError(f"job {job_id} did not complete: {site.job(job_id)}")


def resume_to_the_end(site: Site, job_id: str) -> list[dict]:
    """Resume the job and play it until it completes; the log events said meanwhile."""
    lines: list[dict] = []
    globalLogPublisher.addObserver(lines.append)
    try:
        site.settle(site.life.queue.resume(job_id))
        assert finish(site, job_id) == states.COMPLETED
    finally:
        globalLogPublisher.removeObserver(lines.append)
    return lines


def apply(site: Site, job_id: str, action: str) -> None:
    queue = site.life.queue
    if action == "pause":
        try:
            pausing = queue.pause(job_id)
        except InvalidTransition:
            return
        started = site.clock.seconds()
        try:
            site.settle(pausing, limit=30.0)
        except InvalidTransition:
            return  # refused at once: the state does not allow it
        job = site.job(job_id)
        if job["state"] == states.PAUSED:
            assert site.clock.seconds() - started <= 1.0, "the pause took too long"
    elif action == "resume":
        try:
            site.settle(queue.resume(job_id), limit=30.0)
        except InvalidTransition:
            pass
    elif action == "cancel":
        try:
            site.settle(queue.cancel(job_id), limit=30.0)
        except InvalidTransition:
            pass
    elif action == "button":
        site.board.press_button()
    elif action == "pull_cable":
        site.pull_cable()
    elif action == "restart":
        site.stop()
        site.start()
    elif action == "kill":
        site.kill()
        site.start()
    elif action == "power_cut":
        site.power_cut()
    elif action == "blackout":  # the site's power: daemon and plotter at once
        site.kill()
        site.power_cut()
        site.start()


# Hundreds of whole plots: minutes, not the suite's per-test two, on a loaded machine.
@pytest.mark.timeout(max(600, EXAMPLES))
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(svg=drawings, schedule=schedules, board=st.sampled_from(sorted(BOARDS)))
def test_every_stroke_is_drawn_exactly_once(tmp_path_factory, svg, schedule, board):
    tmp_path = tmp_path_factory.mktemp("site")
    reference = plot_alone(tmp_path, svg, BOARDS[board])
    site = Site(tmp_path / "interrupted", **BOARDS[board])
    job_id = site.submit(svg)
    for delay, action in schedule:
        site.advance(delay)
        apply(site, job_id, action)
    ended = finish(site, job_id)
    strokes = site.strokes
    # Each example's daemon ends here: hundreds of them left running would hold
    # memory and be finalised, coroutines and all, by the garbage collector.
    site.stop()
    actions = [action for _, action in schedule]
    if "power_cut" in actions or "blackout" in actions:
        assert_power_losses_skip_nothing(strokes, reference, ended, actions, BOARDS[board])
        return
    if ended == states.CANCELLED:
        # What reached the paper is part of the drawing, none of it twice.
        if strokes:
            assert distance_to_strokes(np.vstack(strokes), reference).max() < 0.05
        assert drawn_length(strokes) <= drawn_length(reference) * 1.002
        return
    assert_same_drawing(strokes, reference)


def assert_power_losses_skip_nothing(strokes: list[np.ndarray], reference: list[np.ndarray],
                                     ended: str, actions: list[str], board: dict) -> None:
    """A plotter that lost power forgot the moves it had taken: the resume draws them
    again rather than skip one. So: nothing off the drawing, nothing skipped (unless
    cancelled), and no more drawn twice than the board can have held at each cut (the
    FIFO and the running move; all since the last save when the daemon died too)."""
    if strokes:
        assert distance_to_strokes(np.vstack(strokes), reference).max() < 0.05
    if ended != states.CANCELLED:
        assert distance_to_strokes(np.vstack(reference), strokes).max() < 0.05
    longest_move = 2 * max(float(np.max(np.linalg.norm(np.diff(s, axis=0), axis=1)))
                           for s in reference)
    # vfab sets every 3.x board's FIFO to its deepest (32), whatever it was left at.
    fifo = 32 if board["firmware"].startswith("3.") else 1
    in_flight = (fifo + 2) * longest_move
    again = (actions.count("power_cut") * in_flight
             + actions.count("blackout") * drawn_length(reference))
    assert drawn_length(strokes) <= drawn_length(reference) * 1.002 + again
