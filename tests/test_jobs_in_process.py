"""The jobs layer in one process: queue, scheduler, runner and store on a Clock with
the emulated board (see plotting_site). Each test is an interleaving that once went
wrong, or that a person at the plotter can cause."""

from __future__ import annotations

import attr
import numpy as np
import pytest
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent

from plotting_site import SETTINGS, Site
from test_every_stroke_once import BOARDS, finish, resume_to_the_end
from test_runner import TWO_LAYERS, assert_same_drawing, drawn_length
from vfab.jobs import states
from vfab.jobs.errors import InvalidJobInput, InvalidTransition
from vfab.performance import PerformanceLog

#: A page frame through the home corner, with a circle and a square (issue 11).
PAGE_FRAME = b"""<svg xmlns="http://www.w3.org/2000/svg" width="200mm" height="200mm"
 viewBox="0 0 200 200">
  <circle cx="8" cy="8" r="3" fill="none" stroke="black"/>
  <polyline points="100,0 0,0 0,100" fill="none" stroke="black"/>
  <rect x="40" y="40" width="20" height="20" fill="none" stroke="black"/>
</svg>"""
PAGE_FRAME_MM = 2 * np.pi * 3 + 200 + 80


def plot(site: Site, svg: bytes) -> str:
    job_id = site.submit(svg)
    site.wait_for(lambda: site.state(job_id) in states.FINISHED, limit=3600, step=1.0)
    return job_id


def test_a_page_frame_through_home_is_drawn_whole(tmp_path):
    site = Site(tmp_path)
    job_id = plot(site, PAGE_FRAME)
    assert site.state(job_id) == states.COMPLETED
    assert drawn_length(site.strokes) == pytest.approx(PAGE_FRAME_MM, rel=0.01)


def test_a_second_job_after_a_page_frame_is_drawn_whole_too(tmp_path):
    """The motors stay on between jobs: a fresh job must not trust old counters."""
    site = Site(tmp_path)
    plot(site, PAGE_FRAME)
    first = drawn_length(site.strokes)
    plot(site, PAGE_FRAME)
    assert drawn_length(site.strokes) == pytest.approx(2 * first, rel=0.002)


def test_a_request_the_state_forbids_is_refused_at_once(tmp_path):
    site = Site(tmp_path)
    job_id = site.submit(PAGE_FRAME)
    site.wait_for(lambda: site.state(job_id) == states.PLOTTING)
    refused = site.life.queue.resume(job_id)
    failures = []
    refused.addErrback(failures.append)
    assert failures and failures[0].check(InvalidTransition)  # no time passed


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_a_pause_during_the_travel_to_the_pen_change_is_honoured(tmp_path, delay):
    site = Site(tmp_path, attr.evolve(SETTINGS, pen_change_position=(280.0, 200.0)))
    job_id = site.submit(TWO_LAYERS)
    runner = None

    def parking() -> bool:
        nonlocal runner
        runner = site.life.queue.scheduler.runner
        return runner is not None and runner.state.name == "PARKING"

    site.wait_for(parking, step=0.005)
    site.advance(delay)
    assert runner.state.name == "PARKING"
    started = site.clock.seconds()
    site.settle(site.life.queue.pause(job_id), limit=30)
    assert site.state(job_id) == states.PAUSED
    assert site.clock.seconds() - started <= 5.0  # the rest of the travel at most
    site.settle(site.life.queue.resume(job_id), limit=5)
    assert site.state(job_id) == states.AWAITING_PEN  # the pen is asked for, not skipped
    site.settle(site.life.queue.resume(job_id), limit=5)
    site.wait_for(lambda: site.state(job_id) == states.COMPLETED, limit=600)
    assert drawn_length(site.strokes) == pytest.approx(160.0, rel=0.002)


def test_a_pause_in_a_long_stroke_takes_effect_within_a_second(tmp_path):
    long_line = (b'<svg xmlns="http://www.w3.org/2000/svg" width="200mm" height="200mm" '
                 b'viewBox="0 0 200 200"><line x1="10" y1="10" x2="190" y2="190" '
                 b'stroke="black"/></svg>')
    site = Site(tmp_path)
    job_id = site.submit(long_line)
    site.wait_for(lambda: site.board.pen_up is False, step=0.01)
    site.advance(1.0)
    started = site.clock.seconds()
    site.settle(site.life.queue.pause(job_id), limit=30)
    assert site.clock.seconds() - started <= 1.0
    assert site.life.device.status()["status"] == "paused"
    site.settle(site.life.queue.resume(job_id), limit=5)
    assert site.life.device.status()["status"] == "plotting"
    site.wait_for(lambda: site.state(job_id) == states.COMPLETED)
    assert drawn_length(site.strokes) == pytest.approx(180 * 2 ** 0.5, rel=0.002)


def test_a_stop_while_the_job_is_planned_leaves_it_queued(tmp_path):
    site = Site(tmp_path)
    planned: list[Deferred] = []
    scheduler = site.life.queue.scheduler

    def slow_prepare(job, plotter):
        waiting = Deferred()
        planned.append(waiting)
        return waiting

    scheduler._prepare = slow_prepare
    job_id = site.submit(PAGE_FRAME)
    site.wait_for(lambda: planned)
    stopping = site.life.queue.stopService()
    planned[0].callback(None)  # the plan arrives as the daemon stops
    site.settle(stopping)
    assert site.state(job_id) == states.QUEUED
    site.settle(site.life.device.stopService())
    site.life.store.close()
    site.life.clock.alive = False
    site.start()
    site.wait_for(lambda: site.state(job_id) == states.COMPLETED, limit=600)
    assert drawn_length(site.strokes) == pytest.approx(PAGE_FRAME_MM, rel=0.01)


def test_a_store_failure_while_choosing_is_retried(tmp_path):
    site = Site(tmp_path)
    store = site.life.store
    real = store.next_to_plot
    calls = []

    def failing(*args, **kwargs):
        calls.append(site.clock.seconds())
        if len(calls) == 1:
            from vfab.store.jobstore import DatabaseError
            from twisted.internet.defer import fail
            return fail(DatabaseError("disk I/O error"))
        return real(*args, **kwargs)

    store.next_to_plot = failing
    job_id = site.submit(PAGE_FRAME)
    site.wait_for(lambda: site.state(job_id) == states.COMPLETED, limit=600)
    assert len(calls) >= 2


def test_counts_follow_every_change(tmp_path):
    site = Site(tmp_path)
    ids = [site.submit(PAGE_FRAME) for _ in range(3)]
    site.advance(0.1)
    counts = site.life.queue.state_counts()
    assert counts[states.PLOTTING] == 1 and counts[states.QUEUED] == 2
    site.settle(site.life.queue.cancel(ids[2]))
    site.wait_for(lambda: site.state(ids[1]) == states.COMPLETED, limit=1200)
    site.advance(1.0)
    counts = site.life.queue.state_counts()
    assert counts[states.COMPLETED] == 2 and counts[states.CANCELLED] == 1
    assert counts[states.QUEUED] == 0 and counts[states.PLOTTING] == 0


def test_same_drawing_after_a_loss_during_a_resumed_stroke(tmp_path):
    """Pause inside a path, resume, pull the cable, stop the daemon, start it again."""
    reference_site = Site(tmp_path / "reference")
    plot(reference_site, PAGE_FRAME)
    site = Site(tmp_path / "site")
    job_id = site.submit(PAGE_FRAME)
    site.advance(3.0)
    site.settle(site.life.queue.pause(job_id), limit=30)
    site.settle(site.life.queue.resume(job_id))
    site.advance(0.4)
    site.pull_cable()
    site.advance(2.0)
    site.stop()
    site.start()
    site.settle(site.life.queue.resume(job_id))
    site.wait_for(lambda: site.state(job_id) == states.COMPLETED, limit=600)
    assert_same_drawing(site.strokes, reference_site.strokes)



@pytest.mark.parametrize("board", sorted(BOARDS))
def test_a_stop_as_the_device_comes_back_keeps_what_the_board_drew(tmp_path, board):
    """The cable is pulled with the stroke's moves taken but not confirmed, and
    the daemon stops just as the board is back (a hypothesis find): its
    counters are read before the stop parks the carriage, so the next start
    draws nothing twice."""
    line = (b'<svg xmlns="http://www.w3.org/2000/svg" width="100mm" height="100mm" '
            b'viewBox="0 0 100 100"><polyline fill="none" stroke="black" '
            b'points="0,0 0,5"/></svg>')
    reference_site = Site(tmp_path / "reference", **BOARDS[board])
    plot(reference_site, line)
    site = Site(tmp_path / "site", **BOARDS[board])
    job_id = site.submit(line)
    site.advance(1.0)
    site.pull_cable()
    site.stop()
    site.start()
    assert finish(site, job_id) == states.COMPLETED
    assert_same_drawing(site.strokes, reference_site.strokes)


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_a_loss_before_the_first_move_of_a_path_back_through_home_skips_nothing(
        tmp_path, board):
    """The carriage stands at home, which the path passes in its middle: found
    there after a loss before anything moved, it has drawn nothing (a hypothesis
    find)."""
    there_and_back = (b'<svg xmlns="http://www.w3.org/2000/svg" width="100mm" '
                      b'height="100mm" viewBox="0 0 100 100"><polyline fill="none" '
                      b'stroke="black" points="0,5 0,0 0,5"/></svg>')
    site = Site(tmp_path, **BOARDS[board])
    job_id = site.submit(there_and_back)
    site.pull_cable()
    assert finish(site, job_id) == states.COMPLETED
    assert drawn_length(site.strokes) == pytest.approx(10.0, rel=0.002)


def test_an_interrupted_job_says_why_until_it_goes_on(tmp_path):
    """It holds the queue: whoever looks at it must see why it stopped."""
    site = Site(tmp_path)
    job_id = site.submit(PAGE_FRAME)
    site.advance(2.0)
    site.stop()
    site.start()
    interrupted = site.job(job_id)
    assert interrupted["state"] == states.INTERRUPTED
    assert "the daemon stopped" in interrupted["error"]
    site.settle(site.life.queue.resume(job_id))
    assert site.job(job_id)["error"] is None
    assert finish(site, job_id) == states.COMPLETED


def test_a_failing_store_is_said_once_and_the_plot_goes_on(tmp_path):
    """Progress saves fail for a while: one alert, not one a move; the plot ends."""
    from twisted.internet.defer import fail

    site = Site(tmp_path)
    store = site.life.store
    real_save, failures = store.save_progress, []

    def failing_save(*args, **kwargs):
        failures.append(args)
        return fail(OSError("disk I/O error"))

    store.save_progress = failing_save
    job_id = site.submit(PAGE_FRAME)
    site.advance(20.0)
    store.save_progress = real_save
    assert finish(site, job_id) == states.COMPLETED
    alerts = [message for channel, message in site.messages
              if message.get("type") == "system_alert"
              and message.get("title") == "Progress not saved"]
    assert len(failures) > 1 and len(alerts) == 1
    assert "disk I/O error" in alerts[0]["message"]
    assert drawn_length(site.strokes) == pytest.approx(PAGE_FRAME_MM, rel=0.01)


def test_a_board_without_qe_says_it_kept_power_through_its_layer_mark(tmp_path):
    """2.6.5 cannot say whether its motors are on: the layer value vfab sets with
    them (QL, zero at power-up) tells a pulled cable from a power cut or a stop."""
    site = Site(tmp_path, firmware="2.6.5")
    site.advance(1.0)
    assert not site.life.device.position_kept  # nothing has driven it yet
    job_id = site.submit(PAGE_FRAME)
    site.wait_for(lambda: site.state(job_id) == states.PLOTTING)
    site.advance(0.5)
    site.pull_cable()
    site.advance(2.0)
    assert site.life.device.plotter is not None
    assert site.life.device.position_kept  # the cable: power and counters kept
    site.board.power_cut()  # the mark is gone with the counters
    site.advance(2.0)
    assert site.life.device.plotter is not None
    assert not site.life.device.position_kept
    site.stop()  # parks: motors off, the carriage free to be moved by hand
    site.start()
    site.advance(2.0)
    assert site.life.device.plotter is not None
    assert not site.life.device.position_kept


@pytest.mark.parametrize("priority", [10**30, -10**30, 1_000_001, True, "3"])
def test_a_priority_the_store_cannot_hold_is_refused_before_anything_is_kept(tmp_path, priority):
    """The queue is the last check before SQLite, which overflows at 64 bits."""
    site = Site(tmp_path)
    failures = []
    site.life.queue.submit("big", PAGE_FRAME, priority=priority).addErrback(failures.append)
    assert failures and failures[0].check(InvalidJobInput)  # no time passed
    assert "from -1000000 to 1000000" in str(failures[0].value)
    assert not list(site.jobs_dir.glob("*"))


def test_plotting_time_adds_up_over_pauses_restarts_and_a_kill(tmp_path):
    """A paused hour, a stop, a kill -9 and the time spent interrupted do not
    count; every run's plotting does, after a restart too (issue 15, item 7)."""
    reference = Site(tmp_path / "reference")
    alone = reference.job(plot(reference, PAGE_FRAME))["plotting_seconds"]
    site = Site(tmp_path / "site")
    job_id = site.submit(PAGE_FRAME)
    site.advance(3.0)
    site.settle(site.life.queue.pause(job_id), limit=30)
    site.advance(3600.0)
    site.settle(site.life.queue.resume(job_id))
    site.advance(2.0)
    site.stop()
    site.start()
    site.advance(600.0)
    site.settle(site.life.queue.resume(job_id))
    site.advance(2.0)
    site.kill()
    site.start()
    site.advance(600.0)
    PerformanceLog(site.life.bus)
    lines = resume_to_the_end(site, job_id)
    plotted = site.job(job_id)["plotting_seconds"]
    # Each new run lifts the pen and travels back to where it stopped.
    assert alone <= plotted <= alone + 6.0
    performance = [formatEvent(event) for event in lines
                   if "performance:" in event.get("log_format", "")]
    assert len(performance) == 1 and f"plotted in {plotted:.1f} s" in performance[0]
