"""Several plotters on one daemon, in one process on a Clock (see plotting_site):
each plotter has its own board, device service, scheduler and runner, and the
store hands each free one the next job it can take."""

from __future__ import annotations

import attr
import pytest
from twisted.internet.defer import Deferred

from plotting_site import SETTINGS, Site
from test_runner import drawn_length
from vfab.jobs import states
from vfab.geometry import OutOfTravel
from vfab.jobs.errors import NoPlotterCanTake

FARM = [("left", ("a3", "fine")), ("right", ("a4",)), ("spare", ())]


def square(size: float) -> bytes:
    """A square of `size` mm: its length tells which jobs a board drew."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="100mm" height="100mm" '
            f'viewBox="0 0 100 100"><rect x="10" y="10" width="{size}" height="{size}" '
            f'fill="none" stroke="black"/></svg>').encode()


def finished(site: Site, ids: list[str]) -> bool:
    return all(site.state(job_id) in states.FINISHED for job_id in ids)


def taken_by(site: Site, job_id: str) -> str | None:
    return site.settle(site.life.store.get(job_id)).taken_by


def starts(site: Site, job_id: str) -> int:
    history = site.settle(site.life.store.history(job_id))
    return sum(1 for change in history if change["to_state"] == states.PLOTTING)


def test_every_job_is_plotted_once_on_a_plotter_that_can_take_it(tmp_path):
    site = Site(tmp_path, plotters=FARM)
    asks = [{}, {"plotter": "right"}, {"tags": ("a3",)}, {"tags": ("a3", "fine")}, {},
            {"plotter": "spare"}, {"tags": ("a4",)}, {}, {"plotter": "left", "tags": ("fine",)}]
    sizes = {}
    for number, ask in enumerate(asks):
        size = 10 + 3 * number
        sizes[site.submit(square(size), name=f"job {number}", **ask)] = size
    ids = list(sizes)
    site.wait_for(lambda: finished(site, ids), limit=3600, step=1.0)
    tags = dict(FARM)
    drawn = {name: 0.0 for name, _ in FARM}
    for job_id, ask in zip(ids, asks):
        job = site.job(job_id)
        assert job["state"] == states.COMPLETED
        plotter = taken_by(site, job_id)
        assert job["plotter"] == ask.get("plotter", plotter)
        assert ask.get("plotter", plotter) == plotter
        assert set(ask.get("tags", ())) <= set(tags[plotter])
        assert job["host"] == site.life.device.host
        assert starts(site, job_id) == 1
        drawn[plotter] += 4 * sizes[job_id]
    for name, board in site.boards.items():
        assert drawn_length(site.strokes_of(board)) == pytest.approx(drawn[name], rel=0.01)
    assert all(drawn.values())  # every plotter had work


def test_free_plotters_plot_at_the_same_time(tmp_path):
    site = Site(tmp_path, plotters=FARM)
    ids = [site.submit(square(60)) for _ in range(3)]
    site.wait_for(lambda: all(site.state(job_id) == states.PLOTTING for job_id in ids))
    assert sorted(taken_by(site, job_id) for job_id in ids) == ["left", "right", "spare"]
    statuses = {status["plotter"]: status for status in site.life.queue.plotters()}
    assert {statuses[name]["current_job_id"] for name in statuses} == set(ids)
    assert all(status["status"] == "plotting" for status in statuses.values())
    assert statuses["left"]["tags"] == ["a3", "fine"] and statuses["spare"]["tags"] == []


def test_a_free_plotter_takes_the_highest_priority_it_can_then_the_oldest(tmp_path):
    site = Site(tmp_path, plotters=[("left", ("a3",)), ("right", ())])
    busy = [site.submit(square(70), plotter="left"), site.submit(square(70), plotter="right")]
    site.wait_for(lambda: all(site.state(job_id) == states.PLOTTING for job_id in busy))
    old = site.submit(square(20), name="old")
    a3_only = site.submit(square(20), name="a3 only", tags=("a3",), priority=9)
    urgent = site.submit(square(20), name="urgent", priority=5)
    # right finishes first when left is held up: it cannot take the a3 job.
    site.settle(site.life.queue.pause(busy[0]))
    site.wait_for(lambda: site.state(busy[1]) == states.COMPLETED, limit=3600)
    site.wait_for(lambda: site.state(urgent) == states.PLOTTING)
    assert taken_by(site, urgent) == "right"
    assert site.state(a3_only) == states.QUEUED and site.state(old) == states.QUEUED
    site.settle(site.life.queue.resume(busy[0]))
    site.wait_for(lambda: site.state(busy[0]) == states.COMPLETED, limit=3600)
    site.wait_for(lambda: site.state(a3_only) == states.PLOTTING)
    assert taken_by(site, a3_only) == "left"
    site.wait_for(lambda: finished(site, [old, a3_only, urgent]), limit=3600)


def test_a_job_no_plotter_can_take_is_refused(tmp_path):
    site = Site(tmp_path, plotters=FARM)
    for ask, words in [({"plotter": "middle"}, "no plotter is named 'middle'"),
                       ({"tags": ("a2",)}, "no plotter has every tag of a2"),
                       ({"tags": ("a3", "a4")}, "no plotter has every tag of a3, a4"),
                       ({"plotter": "right", "tags": ("a3",)},
                        "plotter 'right' does not have every tag of a3")]:
        with pytest.raises(NoPlotterCanTake, match=words):
            site.submit(square(10), **ask)
    assert site.settle(site.life.queue.list()) == []


def test_an_interrupted_job_stays_with_its_plotter(tmp_path):
    site = Site(tmp_path, plotters=[("left", ()), ("right", ())])
    first = site.submit(square(80), name="first", plotter="left")
    site.wait_for(lambda: site.state(first) == states.PLOTTING)
    site.advance(2.0)
    site.boards["left"].power_cut()
    site.wait_for(lambda: site.state(first) == states.INTERRUPTED)
    # The sheet on the left holds it: left takes nothing else; right goes on.
    others = [site.submit(square(15), name=f"other {n}") for n in range(3)]
    site.wait_for(lambda: finished(site, others), limit=3600)
    assert {taken_by(site, job_id) for job_id in others} == {"right"}
    assert site.state(first) == states.INTERRUPTED and taken_by(site, first) == "left"
    site.settle(site.life.queue.resume(first))
    site.wait_for(lambda: site.state(first) == states.COMPLETED, limit=3600)
    assert taken_by(site, first) == "left" and starts(site, first) == 2


def test_an_interrupted_job_stays_with_its_plotter_across_a_restart(tmp_path):
    site = Site(tmp_path, plotters=[("left", ()), ("right", ())])
    job_id = site.submit(square(80), plotter=None)
    site.wait_for(lambda: site.state(job_id) == states.PLOTTING)
    holder = taken_by(site, job_id)
    site.advance(2.0)
    site.kill()
    site.start()
    assert site.state(job_id) == states.INTERRUPTED
    site.settle(site.life.queue.resume(job_id))
    site.wait_for(lambda: site.state(job_id) == states.COMPLETED, limit=3600)
    assert taken_by(site, job_id) == holder
    board = site.boards[holder]
    assert drawn_length(site.strokes_of(board)) == pytest.approx(320, rel=0.01)


def test_a_claim_given_up_before_the_start_goes_back_to_the_others(tmp_path):
    """A plotter that goes away while its job is planned lets the others take it."""
    site = Site(tmp_path, plotters=[("left", ()), ("right", ())])
    left = site.life.queue.schedulers["left"]
    planned: list[Deferred] = []
    real = left._prepare

    def slow_prepare(job, plotter):
        waiting = Deferred()
        planned.append(waiting)
        return waiting.addCallback(lambda _: real(job, plotter))

    left._prepare = slow_prepare
    busy = site.submit(square(70), plotter="right")
    site.wait_for(lambda: site.state(busy) == states.PLOTTING)
    job_id = site.submit(square(20))
    site.wait_for(lambda: planned)
    assert taken_by(site, job_id) == "left"
    connected = site.life.devices["left"].plotter
    site.boards["left"].drop()  # the cable: the plotter is gone while it plans
    # The loss, not a moment without a plotter: the handshake is so short now
    # (the motors stay off) that the reconnection can fall within one step.
    site.wait_for(lambda: site.life.devices["left"].plotter is not connected)
    left._prepare = real
    planned[0].callback(None)
    site.wait_for(lambda: site.state(job_id) == states.COMPLETED, limit=3600)
    assert starts(site, job_id) == 1


def test_a_device_config_alone_is_one_plotter_named_after_the_host(tmp_path):
    site = Site(tmp_path)
    job_id = site.submit(square(20))
    site.wait_for(lambda: site.state(job_id) == states.COMPLETED, limit=3600)
    (status,) = site.life.queue.plotters()
    assert site.job(job_id)["plotter"] == status["plotter"] == site.life.device.plotter_name
    assert site.job(job_id)["host"] == status["host"]


def test_a_drawing_must_fit_every_plotter_that_may_take_it(tmp_path):
    site = Site(tmp_path, plotters=[("big", ("a3",)), ("small", ())])
    small = attr.evolve(SETTINGS, model="V3/B6")  # 190 x 140 mm
    site.life.devices["small"].config = small
    wide = ('<svg xmlns="http://www.w3.org/2000/svg" width="250mm" height="100mm" '
            'viewBox="0 0 250 100"><path d="M 10 10 L 240 10" fill="none" '
            'stroke="black"/></svg>').encode()
    with pytest.raises(OutOfTravel):
        site.submit(wide)
    with pytest.raises(OutOfTravel):
        site.submit(wide, plotter="small")
    job_id = site.submit(wide, tags=("a3",))
    site.wait_for(lambda: site.state(job_id) == states.COMPLETED, limit=3600)
    assert taken_by(site, job_id) == "big"
