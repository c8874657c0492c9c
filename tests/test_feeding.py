"""How the plotter is fed: a deep FIFO (3.x) holds about `motion_queue` seconds of
motion, never runs dry with the pen down, and never holds so much that a pause
waits long; a one-deep FIFO (2.x) is streamed as the board takes it. In-process,
on a Clock, the emulator behind a 2 ms round trip."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from vfab.config import DeviceConfig
from vfab.plotter.ebb import EBBProtocol
from vfab.plotter.plotter import Plotter
from vfab.simulator import EBBEmulator, LoopbackPort

SETTINGS = DeviceConfig(type="axidraw", port="/dev/vfab-test", model="V3/A4")
ROUND_TRIP = 0.002


def connect(firmware: str, speed: float = 1.0, start: float = 0.0, **board):
    clock = Clock()
    clock.advance(start)
    emulator = EBBEmulator(clock, firmware_version=firmware, speed=speed, **board)
    protocol = EBBProtocol(clock, timeout=30.0)
    LoopbackPort(protocol, emulator, clock, delay=ROUND_TRIP / 2)
    ready = protocol.version().addCallback(lambda _: protocol.take_over())
    run(clock, ready)
    return clock, emulator, Plotter(protocol, SETTINGS)


def run(clock: Clock, deferred: defer.Deferred, limit: float = 600.0):
    """Advance the clock call by call until `deferred` fires (within `limit` s); its result."""
    results: list = []
    deferred.addBoth(results.append)
    deadline = clock.seconds() + limit
    while not results and clock.calls and clock.seconds() < deadline:
        clock.advance(max(0.0, clock.calls[0].getTime() - clock.seconds()))
    assert results, "never fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


#: A pen-down scribble: short moves (5 ms) with long ones (200 ms) among them.
MOVES = [("SM,5,8,8", 0.005)] * 60 + [("SM,200,160,-160", 0.2)] * 3 + [("SM,5,-8,8", 0.005)] * 60


@defer.inlineCallbacks
def stream(plotter: Plotter, emulator: EBBEmulator, queued: list[float]):
    yield plotter.send_move("SP,0", 0.0)
    for command, seconds in MOVES * 3:
        yield plotter.send_move(command, seconds)
        queued.append(emulator.queued_seconds())
    yield plotter.send_move("SP,1", 0.0)
    yield plotter.wait_idle()


@pytest.mark.parametrize("board", [
    {}, {"future_syntax": True, "fifo_depth": 32},
    {"start": 1e9},  # float seconds this far from zero round waits away: no endless hold
], ids=["3.0.3", "3.0.3 left in future syntax, FIFO 32", "a clock far from zero"])
def test_a_deep_fifo_holds_about_motion_queue_seconds_and_never_runs_dry(board):
    clock, emulator, plotter = connect("3.0.3", **board)
    assert plotter.unconfirmed_moves == 33
    queued: list[float] = []
    started = clock.seconds()
    run(clock, stream(plotter, emulator, queued))
    planned = sum(seconds for _, seconds in MOVES * 3)
    assert emulator.recording.starvations == []
    assert clock.seconds() - started == pytest.approx(planned, rel=0.01, abs=0.05)
    # Never more than motion_queue, or a third of it and one long move.
    assert max(queued) <= max(SETTINGS.motion_queue, SETTINGS.motion_queue / 3 + 0.2) + 1e-6
    assert sorted(queued)[len(queued) // 2] >= SETTINGS.motion_queue / 3, \
        "the FIFO is kept full, not fed move by move"


def test_a_board_faster_than_planned_is_fed_at_its_own_pace():
    """An emulator run ten times faster (as test rigs do) must not be slowed to the plan."""
    clock, emulator, plotter = connect("3.0.3", speed=10.0)
    started = clock.seconds()
    run(clock, stream(plotter, emulator, []))
    planned = sum(seconds for _, seconds in MOVES * 3)
    assert clock.seconds() - started < planned / 3


def test_a_one_deep_fifo_is_streamed_as_the_board_takes_it():
    clock, emulator, plotter = connect("2.8.1")
    assert plotter.unconfirmed_moves == 2
    queued: list[float] = []
    run(clock, stream(plotter, emulator, queued))
    assert emulator.recording.starvations == []
    assert max(queued) <= 0.4 + 1e-6  # the one running and the one waiting
