"""A plotter that loses power mid-plot forgets the moves it had taken and where its
carriage is; its operator pushes the carriage home, as the daemon asks. The resume
must not skip a stroke: it goes on from before the moves the board may not have
executed, so that at most those are drawn twice (issue 12 item 2, issue 11)."""

from __future__ import annotations

import numpy as np
import pytest
from twisted.internet.task import deferLater

from plotting_site import Site
from test_every_stroke_once import BOARDS, finish
from test_jobs_in_process import PAGE_FRAME
from test_runner import distance_to_strokes, drawn_length
from vfab.jobs import states
from vfab.jobs.position import Position

#: One long zigzag of 2 mm strokes: a deep FIFO holds many of them at once.
ZIGZAG = ("<svg xmlns='http://www.w3.org/2000/svg' width='100mm' height='100mm' "
          "viewBox='0 0 100 100'><polyline fill='none' stroke='black' points='"
          + " ".join(f"{10 + 2 * i},{10 + 2 * (i % 2)}" for i in range(40))
          + "'/></svg>").encode()
STROKE_MM = np.hypot(2.0, 2.0)
ZIGZAG_MM = 39 * STROKE_MM
DEEP_BOARDS = ["2.8.1", "3.0.3", "3.0.3 left by other software"]


def stored(site: Site, job_id: str) -> Position | None:
    return Position.from_dict(site.settle(site.life.store.get(job_id)).position)


def saved_with_moves_in_flight(site: Site, job_id: str) -> None:
    """Until a progress save of a plot under way (not the first, before the pen went
    down) while the board holds moves it has not executed yet."""
    saves = []

    def just_saved() -> bool:
        position = stored(site, job_id)
        if position is None or position.parked or position in saves:
            return False
        saves.append(position)
        return len(saves) > 1 and site.board.queued_seconds() > 0

    site.wait_for(just_saved, limit=60.0, step=0.01)


def assert_nothing_skipped(strokes: list[np.ndarray], reference: list[np.ndarray],
                           again_mm: float) -> None:
    """Every point of the drawing is on the paper, nothing off it, and no more than
    `again_mm` drawn twice."""
    assert distance_to_strokes(np.vstack(reference), strokes).max() < 0.05
    assert distance_to_strokes(np.vstack(strokes), reference).max() < 0.05
    assert drawn_length(reference) * 0.998 <= drawn_length(strokes) \
        <= drawn_length(reference) * 1.002 + again_mm


def lose_again(site: Site, then: str) -> None:
    """A second loss before the resume: a kill -9, a graceful restart or a pulled cable."""
    if then == "kill":
        site.kill()
        site.start()
    elif then == "restart":
        site.stop()
        site.start()
    else:
        site.pull_cable()
    site.advance(2.0)


def reference_of(tmp_path, board: dict, svg: bytes = ZIGZAG) -> list[np.ndarray]:
    site = Site(tmp_path / "reference", **board)
    finish(site, site.submit(svg))
    strokes = site.strokes
    site.stop()
    return strokes


@pytest.mark.parametrize("board", DEEP_BOARDS)
def test_a_power_cut_just_after_a_save_skips_no_stroke(tmp_path, board):
    reference = reference_of(tmp_path, BOARDS[board])
    site = Site(tmp_path / "cut", **BOARDS[board])
    job_id = site.submit(ZIGZAG)
    saved_with_moves_in_flight(site, job_id)
    site.power_cut()
    site.wait_for(lambda: site.state(job_id) == states.INTERRUPTED, limit=30.0)
    site.advance(2.0)  # the board is back, without its counters
    assert not site.life.device.position_kept
    assert finish(site, job_id) == states.COMPLETED
    strokes = site.strokes
    site.stop()
    # At most the moves the board may have held: its FIFO and the one running.
    fifo = 32 if BOARDS[board]["firmware"].startswith("3.") else 1  # vfab sets 32 on 3.x
    assert_nothing_skipped(strokes, reference, again_mm=(fifo + 2) * STROKE_MM)


@pytest.mark.parametrize("board", DEEP_BOARDS)
def test_a_blackout_of_daemon_and_plotter_skips_no_stroke(tmp_path, board):
    """The daemon dies with the plotter (a site's power): the store's last save is
    all there is, and the board had taken moves beyond it."""
    reference = reference_of(tmp_path, BOARDS[board])
    site = Site(tmp_path / "blackout", **BOARDS[board])
    job_id = site.submit(ZIGZAG)
    saved_with_moves_in_flight(site, job_id)
    site.kill()
    site.power_cut()
    site.start()
    site.advance(2.0)
    assert finish(site, job_id) == states.COMPLETED
    strokes = site.strokes
    site.stop()
    assert_nothing_skipped(strokes, reference, again_mm=ZIGZAG_MM)


def test_a_pulled_cable_after_a_save_still_draws_each_stroke_once(tmp_path):
    """The board kept power: its counters, not the step back, say where to go on."""
    board = BOARDS["3.0.3 left by other software"]
    reference = reference_of(tmp_path, board)
    site = Site(tmp_path / "cable", **board)
    job_id = site.submit(ZIGZAG)
    saved_with_moves_in_flight(site, job_id)
    site.pull_cable()
    site.wait_for(lambda: site.state(job_id) == states.INTERRUPTED, limit=30.0)
    site.advance(2.0)
    assert site.life.device.position_kept
    assert finish(site, job_id) == states.COMPLETED
    strokes = site.strokes
    site.stop()
    assert_nothing_skipped(strokes, reference, again_mm=0.0)


def test_a_position_keeps_where_a_power_loss_goes_on():
    behind = Position(0, 1, 3, at=(5, 5))
    saved = Position(0, 1, 9).with_behind(behind)
    assert Position.from_dict(saved.to_dict()).after_power_loss() == behind
    assert saved.parked_here().behind is None  # exact: nothing in flight
    assert Position(0, 1, 3).with_behind(behind).behind is None  # nothing between


@pytest.mark.parametrize("board", ["2.6.5", "2.8.1"])
def test_a_daemon_killed_after_a_power_cut_leaves_no_counters_that_look_kept(tmp_path, board):
    """After a cut the board's counters are gone. A daemon that connects and is killed
    before it resumes must not leave the motors on: the next one would read counters
    zeroed at home as the carriage's place and skip to where the plan passes home."""
    reference = reference_of(tmp_path, BOARDS[board], PAGE_FRAME)
    site = Site(tmp_path / "twice", **BOARDS[board])
    job_id = site.submit(PAGE_FRAME)
    site.wait_for(lambda: drawn_length(site.strokes) > 30.0, limit=60.0)
    site.settle(site.life.queue.pause(job_id), limit=30.0)
    site.kill()
    site.power_cut()
    site.start()
    site.advance(2.0)  # connected, the job held as interrupted
    site.kill()
    site.start()
    site.advance(2.0)
    assert not site.life.device.position_kept
    assert finish(site, job_id) == states.COMPLETED
    strokes = site.strokes
    site.stop()
    assert_nothing_skipped(strokes, reference, again_mm=0.0)


@pytest.mark.parametrize("board", ["2.6.5", "3.0.3 left by other software"])
@pytest.mark.parametrize("then", ["kill", "pull_cable", "restart"])
def test_a_power_cut_then_another_loss_before_the_resume_skips_no_stroke(tmp_path, board,
                                                                          then):
    """The counters a later connection finds say nothing of the moves lost in the cut,
    whatever came between: the resume must still go on from where those began."""
    reference = reference_of(tmp_path, BOARDS[board])
    site = Site(tmp_path / "cut", **BOARDS[board])
    job_id = site.submit(ZIGZAG)
    saved_with_moves_in_flight(site, job_id)
    site.power_cut()
    site.wait_for(lambda: site.state(job_id) == states.INTERRUPTED, limit=30.0)
    site.advance(2.0)  # the board is back, without its counters
    lose_again(site, then)
    assert finish(site, job_id) == states.COMPLETED
    strokes = site.strokes
    site.stop()
    fifo = BOARDS[board].get("fifo_depth", 1)
    assert_nothing_skipped(strokes, reference, again_mm=(fifo + 2) * STROKE_MM)


#: The zigzag twice, as two layers: a pen change between them.
TWO_LAYERS = ZIGZAG.replace(
    b"<polyline", b"<g inkscape:groupmode='layer' inkscape:label='1 pen'><polyline", 1
).replace(b"/></svg>", b"/></g><g inkscape:groupmode='layer' inkscape:label='2 pen'>"
          + ZIGZAG[ZIGZAG.index(b"<polyline"):ZIGZAG.index(b"</svg>")] + b"</g></svg>").replace(
    b"<svg ", b"<svg xmlns:inkscape='http://www.inkscape.org/namespaces/inkscape' ", 1)


@pytest.mark.parametrize("leaving", ["PARKING", "FINISHING"])
@pytest.mark.parametrize("then", ["resume", "kill"])
def test_a_power_cut_as_the_carriage_leaves_the_drawing_skips_no_stroke(tmp_path, leaving,
                                                                         then):
    """The parked position is saved before the carriage leaves the drawing for the pen
    change (or home), while the board still draws the last moves it took: after a
    cut those are drawn again, even when a kill -9 comes before the resume."""
    board = BOARDS["3.0.3 left by other software"]
    reference = reference_of(tmp_path, board, TWO_LAYERS)
    site = Site(tmp_path / "cut", **board)
    job_id = site.submit(TWO_LAYERS)

    def leaving_with_moves_taken() -> bool:
        if site.state(job_id) == states.AWAITING_PEN:
            site.life.queue.resume(job_id)
        runner = site.life.queue.scheduler.runner
        return (runner is not None and runner.state.name == leaving
                and site.board.queued_seconds() > 0.1)

    site.wait_for(leaving_with_moves_taken, limit=60.0, step=0.01)
    site.power_cut()
    site.wait_for(lambda: site.state(job_id) == states.INTERRUPTED, limit=30.0)
    site.advance(2.0)
    if then == "kill":
        site.kill()
        site.start()
        site.advance(2.0)
    assert finish(site, job_id) == states.COMPLETED
    strokes = site.strokes
    site.stop()
    assert_nothing_skipped(strokes, reference, again_mm=34 * STROKE_MM)


@pytest.mark.parametrize("then", ["kill", "pull_cable"])
def test_a_job_resumed_before_the_plotter_is_back_keeps_its_step_back(tmp_path, then):
    """Resumed while the plotter is still off, the job is planned once it is back; a
    loss while it is planned (which takes a while for a large drawing) must not let
    the next connection take the counters as kept."""
    board = BOARDS["3.0.3 left by other software"]
    reference = reference_of(tmp_path, board)
    site = Site(tmp_path / "cut", **board)
    job_id = site.submit(ZIGZAG)
    saved_with_moves_in_flight(site, job_id)
    site.power_cut()
    site.board.go_silent()  # still off: it does not answer yet
    site.wait_for(lambda: site.state(job_id) == states.INTERRUPTED, limit=30.0)
    assert site.life.device.plotter is None
    planning = site.life.queue._prepare_job
    clock = site.life.clock

    def slowly(*args, **kwargs):  # a large drawing takes a while to plan
        return deferLater(clock, 5.0, lambda: None).addCallback(
            lambda _: planning(*args, **kwargs))

    site.life.queue._prepare_job = slowly
    site.settle(site.life.queue.resume(job_id))
    site.board.speak()  # back
    site.wait_for(lambda: site.life.device.plotter is not None, limit=90.0)
    site.advance(1.0)  # planning
    lose_again(site, then)
    assert finish(site, job_id) == states.COMPLETED
    strokes = site.strokes
    site.stop()
    assert_nothing_skipped(strokes, reference, again_mm=34 * STROKE_MM)


def test_a_power_cut_on_a_3x_board_redraws_no_more_than_it_held(tmp_path):
    """vfab sets a 3.x board's FIFO 32 deep but feeds it only `motion_queue` seconds
    ahead: a cut while it holds 0.11 s of motion redraws no more than the property
    test's bound for this board."""
    from test_every_stroke_once import apply, assert_power_losses_skip_nothing, svg_of
    layers = [[[(0, 0), (20, 0), (20, 20), (0, 20), (0, 0)], [(10, 10), (30, 10), (10, 10),
                                                              (10, 30)]],
              [[(5, 5), (25, 25)], [(25, 5), (5, 25), (25, 5)]]]
    svg = svg_of(layers)
    reference = reference_of(tmp_path, BOARDS["3.0.3"], svg)
    site = Site(tmp_path / "cut", **BOARDS["3.0.3"])
    job_id = site.submit(svg)
    site.advance(3.85)
    assert site.board.queued_seconds() < 0.2
    apply(site, job_id, "power_cut")
    ended = finish(site, job_id)
    strokes = site.strokes
    site.stop()
    assert_power_losses_skip_nothing(strokes, reference, ended, ["power_cut"],
                                     BOARDS["3.0.3"])


def test_a_pulled_cable_on_the_connection_that_began_without_counters_draws_once(tmp_path):
    """A daemon's first connection finds the board fresh (`position_kept` False), yet
    vfab drives its counters from then on: a job lost on it is not a power loss."""
    from test_every_stroke_once import apply, svg_of
    from test_runner import assert_same_drawing
    svg = svg_of([[[(0.0, 0.0), (0.0, 5.0)], [(0.0, 0.0), (0.0, 10.0)]]])
    reference = reference_of(tmp_path, BOARDS["2.6.5"], svg)
    site = Site(tmp_path / "cable", **BOARDS["2.6.5"])
    job_id = site.submit(svg)
    site.advance(1.0)
    apply(site, job_id, "pull_cable")
    assert finish(site, job_id) == states.COMPLETED
    strokes = site.strokes
    site.stop()
    assert_same_drawing(strokes, reference)
