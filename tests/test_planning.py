"""Drawing work in a child process: results, the drawing's errors, a dying child."""

import os
import re
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from vfab.config import DeviceConfig
from vfab.geometry import OutOfTravel, SVGError
from vfab.jobs.planning import DrawingSummary, PlanningProcess, summarize
from vfab.jobs.prepare import release_freed_memory

SQUARE = (b'<svg xmlns="http://www.w3.org/2000/svg" width="100mm" height="100mm" '
          b'viewBox="0 0 100 100"><rect x="10" y="10" width="50" height="50" fill="none" '
          b'stroke="black"/></svg>')


@pytest_twisted.inlineCallbacks
def test_a_summary_comes_back_from_the_child():
    summary = yield PlanningProcess(reactor).run(summarize, SQUARE, DeviceConfig())
    assert isinstance(summary, DrawingSummary)
    assert (summary.layers, summary.paths) == (1, 1)
    assert summary.pen_down_mm == pytest.approx(200.0, abs=0.01)
    assert summary.estimated_seconds > 4


@pytest_twisted.inlineCallbacks
def test_the_drawings_own_errors_come_back_as_they_are():
    planning = PlanningProcess(reactor)
    with pytest.raises(SVGError):
        yield planning.run(summarize, b"<html>not a drawing</html>", DeviceConfig())
    with pytest.raises(OutOfTravel, match="MiniKit"):
        yield planning.run(summarize, SQUARE.replace(b'x="10"', b'x="150"'),
                           DeviceConfig(model="MiniKit"))


@pytest_twisted.inlineCallbacks
def test_a_child_that_dies_is_a_clear_error_not_a_dead_daemon():
    with pytest.raises(SVGError, match="could not be read"):
        yield PlanningProcess(reactor).run(os._exit, 3)


@pytest_twisted.inlineCallbacks
def test_a_child_killed_because_the_daemon_stops_is_a_shutdown_not_a_bad_drawing():
    import time

    from vfab.jobs.errors import NotAccepting

    planning = PlanningProcess(reactor)
    running = planning.run(time.sleep, 30)
    yield deferLater(reactor, 0.5, lambda: None)  # the child is up
    planning.stop()
    with pytest.raises(NotAccepting):
        yield running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_memory_goes_back_to_the_system():
    """What a big plan freed is returned, not kept by malloc for the daemon's life."""
    def rss_kb() -> int:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    release_freed_memory().join(10)
    before = rss_kb()
    # Blocks from malloc (beyond pymalloc's 512 bytes), freed while a few
    # survivors pin the heap, as a plan's arrays and strings leave it.
    chunks = [bytes(2000) for _ in range(30_000)]
    kept = chunks[::300]
    del chunks
    held = rss_kb()
    trimming = release_freed_memory()
    trimming.join(10)
    assert not trimming.is_alive()
    assert rss_kb() < held - 20_000 and kept
    assert rss_kb() < before + 20_000


def _reaped(pid: int) -> bool:
    """The process is gone, not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest_twisted.inlineCallbacks
def test_a_started_planner_answers_from_a_spare_and_keeps_one_ready():
    """The spare (Python started, vpype imported) takes the request, and one new
    spare replaces it: never more than one idle child, none left after stop."""
    planning = PlanningProcess(reactor)
    planning.start()
    try:
        first = planning.spare
        assert first is not None
        served = yield planning.run(os.getpid)
        assert served == first
        second = planning.spare
        assert second not in (None, first)
        served = yield planning.run(os.getpid)
        assert served == second and planning.spare not in (None, first, second)
        assert len(planning._children) == 1
    finally:
        last = planning.spare
        yield planning.stop()
    assert planning.spare is None and not planning._children
    assert all(_reaped(pid) for pid in (first, second, last))


@pytest_twisted.inlineCallbacks
def test_a_spare_that_dies_idle_is_replaced_only_after_the_next_request():
    """A child that cannot start is not restarted in a loop; the next request
    starts one of its own and works."""
    planning = PlanningProcess(reactor)
    planning.start()
    try:
        spare = planning.spare
        gone = planning._children[planning._spare.transport].exited()
        os.kill(spare, 9)
        yield gone
        assert planning.spare is None and _reaped(spare)
        summary = yield planning.run(summarize, SQUARE, DeviceConfig())
        assert summary.paths == 1
        assert planning.spare is not None
    finally:
        yield planning.stop()


class _NoSpawning:
    """A reactor whose user may not run this Python (dropped to `nobody`)."""

    def spawnProcess(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", sys.executable)


def test_a_spare_this_user_cannot_start_is_a_warning_not_a_failed_start():
    """After dropping root the interpreter may be out of reach: the daemon must
    still start, and say why planning will not work."""
    from twisted.logger import globalLogPublisher

    said: list[dict] = []
    globalLogPublisher.addObserver(said.append)
    try:
        planning = PlanningProcess(_NoSpawning())
        planning.start()
    finally:
        globalLogPublisher.removeObserver(said.append)
    assert planning.spare is None and not planning._children
    assert any("cannot start a planning child" in event.get("log_format", "")
               for event in said)


@pytest_twisted.inlineCallbacks
def test_a_planner_never_started_keeps_no_spare():
    """Tests and tools that only `run` leave no idle child behind."""
    planning = PlanningProcess(reactor)
    served = yield planning.run(os.getpid)
    assert served != os.getpid() and planning.spare is None and not planning._children
