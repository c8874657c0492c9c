"""The job runner on the emulated board, on a Clock: whole plots, pauses, cancels,
stops and pen changes, checked against the strokes the board drew."""

from __future__ import annotations

import math

import attr
import numpy as np
import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from vfab.config import DeviceConfig
from vfab.jobs import states
from vfab.jobs.prepare import prepare
from vfab.jobs.runner import Position, PlotRunner
from vfab.plotter.ebb import EBBProtocol
from vfab.plotter.plotter import Plotter
from vfab.simulator import EBBEmulator, LoopbackPort

SETTINGS = DeviceConfig(type="simulator", model="V3/A4")

# A square, a circle and a long zigzag: corners, curves and many moves.
ONE_LAYER = b"""<svg xmlns="http://www.w3.org/2000/svg" width="200mm" height="150mm"
 viewBox="0 0 200 150">
  <rect x="10" y="10" width="40" height="40" fill="none" stroke="black"/>
  <circle cx="100" cy="50" r="25" fill="none" stroke="black"/>
  <polyline points="10,100 30,120 50,100 70,120 90,100 110,120 130,100" fill="none"
   stroke="black"/>
</svg>"""

TWO_LAYERS = b"""<svg xmlns="http://www.w3.org/2000/svg"
 xmlns:inkscape="http://www.inkscape.org/namespaces/inkscape"
 width="200mm" height="150mm" viewBox="0 0 200 150">
  <g inkscape:groupmode="layer" inkscape:label="black"><line x1="10" y1="10" x2="90" y2="10"
   stroke="black"/></g>
  <g inkscape:groupmode="layer" inkscape:label="red"><line x1="10" y1="30" x2="90" y2="30"
   stroke="red"/></g>
</svg>"""


class FakeDevice:
    """What the runner tells the device service: status only."""

    def __init__(self) -> None:
        self.positions: list[tuple[float, float, bool]] = []

    def update_position(self, x_mm: float, y_mm: float, pen_down: bool) -> None:
        self.positions.append((x_mm, y_mm, pen_down))


class Bench:
    """An emulated board on a Clock, a connected Plotter, and a runner factory."""

    def __init__(self, firmware: str = "2.8.1", settings: DeviceConfig = SETTINGS):
        self.clock = Clock()
        self.settings = settings
        self.board = EBBEmulator(self.clock, firmware_version=firmware)
        self.protocol = EBBProtocol(self.clock, timeout=30.0)
        self.port = LoopbackPort(self.protocol, self.board, self.clock)
        self.settle(self.protocol.version())
        self.settle(self.protocol.enable_motors(16))
        self.plotter = Plotter(self.protocol, settings)
        self.messages: list[dict] = []
        self.transitions: list[tuple[str, str, dict]] = []
        self.saved: list[tuple[float, dict]] = []
        self.device = FakeDevice()

    def settle(self, deferred, limit: float = 3600.0):
        """Advance the clock until `deferred` fires; return its result."""
        results: list = []
        deferred.addBoth(results.append)
        elapsed = 0.0
        while not results and elapsed < limit:
            self.clock.advance(0.005)
            elapsed += 0.005
        assert results, "the Deferred never fired"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def run_for(self, seconds: float) -> None:
        """Let time pass in small steps, as it does for the board."""
        for _ in range(int(round(seconds / 0.005))):
            self.clock.advance(0.005)

    def runner(self, svg: bytes, start: Position | None = None,
               position_kept: bool = False) -> PlotRunner:
        use_lm = self.plotter.supports_lm
        prepared = prepare(svg, self.settings, use_lm=use_lm)
        self.prepared = prepared

        def transition(to_state, reason, **fields):
            self.transitions.append((to_state, reason, fields))
            return succeed(None)

        def save(progress, position, plotting_seconds):
            self.saved.append((progress, position))
            return succeed(None)

        return PlotRunner(job_id="job", plan=prepared.plan, plotter=self.plotter,
                          device=self.device, settings=self.settings, clock=self.clock,
                          publish=self.messages.append, transition=transition,
                          save_progress=save, start=start, position_kept=position_kept,
                          use_lm=use_lm,
                          layer_settings=prepared.layer_settings)

    @property
    def strokes(self) -> list[np.ndarray]:
        return [np.asarray(stroke) for stroke in self.board.recording.strokes
                if len(stroke) > 1]


def drawn_length(strokes: list[np.ndarray]) -> float:
    return sum(float(np.sum(np.linalg.norm(np.diff(s, axis=0), axis=1))) for s in strokes)


def expected_length(bench: Bench) -> float:
    return sum(float(np.sum(np.linalg.norm(np.diff(path, axis=0), axis=1)))
               for layer in bench.prepared.drawing.layers for path in layer.paths)


def distance_to_strokes(points: np.ndarray, strokes: list[np.ndarray]) -> np.ndarray:
    """Each point's distance to the nearest segment of `strokes`."""
    starts = np.vstack([s[:-1] for s in strokes])
    ends = np.vstack([s[1:] for s in strokes])
    along = ends - starts
    length2 = np.maximum(np.sum(along * along, axis=1), 1e-12)
    nearest = []
    for chunk in np.array_split(points, max(1, len(points) // 200)):
        offset = chunk[:, None, :] - starts[None, :, :]
        t = np.clip(np.sum(offset * along[None], axis=2) / length2[None], 0.0, 1.0)
        gap = offset - t[:, :, None] * along[None]
        nearest.append(np.min(np.linalg.norm(gap, axis=2), axis=1))
    return np.concatenate(nearest)


def assert_same_drawing(strokes: list[np.ndarray], reference: list[np.ndarray]) -> None:
    """Every point of one lies on the other (within a step), both ways, and the
    lengths agree: nothing drawn twice, nothing skipped."""
    assert distance_to_strokes(np.vstack(strokes), reference).max() < 0.05
    assert distance_to_strokes(np.vstack(reference), strokes).max() < 0.05
    assert drawn_length(strokes) == pytest.approx(drawn_length(reference), rel=0.002)


@pytest.fixture(scope="module")
def reference() -> list[np.ndarray]:
    bench = Bench()
    outcome = bench.settle(bench.runner(ONE_LAYER).run())
    assert outcome == states.COMPLETED
    return bench.strokes


@pytest.mark.parametrize("firmware", ["2.8.1", "2.6.5"], ids=["LM", "SM"])
def test_a_whole_plot_draws_the_drawing_and_ends_home(firmware):
    bench = Bench(firmware)
    runner = bench.runner(ONE_LAYER)
    assert bench.plotter.supports_lm == (firmware == "2.8.1")
    assert bench.settle(runner.run()) == states.COMPLETED
    assert drawn_length(bench.strokes) == pytest.approx(expected_length(bench), rel=0.002)
    assert bench.board.steps == (0, 0) and bench.board.pen_up
    measured = bench.board.recording.motion_seconds
    assert measured == pytest.approx(bench.prepared.estimated_seconds, rel=0.02)
    progress = [m["progress"] for m in bench.messages if m["type"] == "job_progress"]
    assert progress[0] == 0 and progress[-1] == 1.0 and progress == sorted(progress)


def test_progress_is_reported_at_most_ten_times_a_second():
    bench = Bench()
    bench.settle(bench.runner(ONE_LAYER).run())
    times: list[float] = []
    original = bench.messages
    assert original, "no progress"
    # Re-run, stamping each message with the clock's time as it is published.
    bench = Bench()
    runner = bench.runner(ONE_LAYER)
    runner._publish = lambda message: times.append(bench.clock.seconds())
    bench.settle(runner.run())
    gaps = np.diff(times[1:-1])
    assert len(times) > 10 and gaps.min() >= 0.1 - 1e-9


@pytest.mark.parametrize("pause_after", [0.3, 2.0, 7.7])
def test_pause_and_resume_draw_nothing_twice_and_skip_nothing(reference, pause_after):
    bench = Bench()
    runner = bench.runner(ONE_LAYER)
    running = runner.run()
    bench.run_for(pause_after)
    pen_down_before = bench.board.recording.pen_down_mm
    paused = bench.settle(runner.pause())
    assert paused is None
    state, _, fields = bench.transitions[-1]
    assert state == states.PAUSED and fields["position"] == runner.position.to_dict()
    # The pause took effect at once: only the moves the board had already taken
    # (the one running, the one waiting in its FIFO, the one being handed over)
    # were drawn after the request.
    moves = [move.distance_mm for layer in bench.prepared.plan.layers
             for path in layer.paths for move in path.draw]
    three_moves = max(a + b + c for a, b, c in zip(moves, moves[1:], moves[2:]))
    assert bench.board.recording.pen_down_mm - pen_down_before <= three_moves + 1e-6
    assert bench.board.pen_up
    idle_steps = bench.board.steps
    bench.run_for(60)
    assert bench.board.steps == idle_steps  # stopped while paused
    runner.resume()
    assert bench.settle(running) == states.COMPLETED
    assert bench.transitions[-1][0] == states.PLOTTING  # "resumed" (the queue completes it)
    assert_same_drawing(bench.strokes, reference)


def test_many_pauses_still_draw_the_drawing_once(reference):
    bench = Bench()
    runner = bench.runner(ONE_LAYER)
    running = runner.run()
    for _ in range(8):
        bench.run_for(1.1)
        if running.called:
            break
        bench.settle(runner.pause())
        runner.resume()
    assert bench.settle(running) == states.COMPLETED
    assert_same_drawing(bench.strokes, reference)


def test_cancel_lifts_the_pen_and_returns_home():
    bench = Bench()
    runner = bench.runner(ONE_LAYER)
    running = runner.run()
    bench.run_for(3.0)
    runner.cancel()
    assert bench.settle(running) == states.CANCELLED
    assert bench.board.pen_up and bench.board.steps == (0, 0)
    assert drawn_length(bench.strokes) < expected_length(bench)


def test_cancel_while_paused():
    bench = Bench()
    runner = bench.runner(ONE_LAYER)
    running = runner.run()
    bench.run_for(2.0)
    bench.settle(runner.pause())
    runner.cancel()
    assert bench.settle(running) == states.CANCELLED
    assert bench.board.steps == (0, 0)


def test_a_stop_saves_the_position_and_a_new_run_finishes_the_drawing(reference):
    bench = Bench()
    runner = bench.runner(ONE_LAYER)
    running = runner.run()
    bench.run_for(4.2)
    runner.stop()
    assert bench.settle(running) == states.INTERRUPTED
    state, _, fields = bench.transitions[-1]
    assert state == states.INTERRUPTED
    saved = Position.from_dict(fields["position"])
    assert saved != Position()
    # The board kept power: a new runner continues from the saved position.
    assert bench.settle(bench.runner(ONE_LAYER, start=saved).run()) == states.COMPLETED
    assert_same_drawing(bench.strokes, reference)


def test_a_pen_change_waits_for_resume_or_the_button():
    bench = Bench()
    runner = bench.runner(TWO_LAYERS)
    running = runner.run()
    for _ in range(2000):
        bench.run_for(0.01)
        if bench.transitions and bench.transitions[-1][0] == states.AWAITING_PEN:
            break
    state, reason, _ = bench.transitions[-1]
    assert (state, reason) == (states.AWAITING_PEN, "next pen: red")
    assert bench.board.steps == (0, 0) and bench.board.pen_up  # parked at home
    alerts = [m for m in bench.messages if m["type"] == "system_alert"]
    assert "red" in alerts[-1]["message"]
    bench.run_for(30)
    assert not running.called
    bench.board.press_button()
    assert bench.settle(running) == states.COMPLETED
    assert [t[0] for t in bench.transitions] == [states.AWAITING_PEN, states.PLOTTING]
    assert len(bench.strokes) == 2
    assert drawn_length(bench.strokes) == pytest.approx(160.0, rel=0.002)


def test_progress_is_saved_every_few_seconds():
    bench = Bench(settings=attr.evolve(SETTINGS, progress_save_interval=1.0))
    runner = bench.runner(ONE_LAYER)
    bench.settle(runner.run())
    # Saved while drawing, at least every other second of the plot.
    assert len(bench.saved) >= math.floor(bench.board.recording.motion_seconds / 2.0)
    progress = [p for p, _ in bench.saved]
    assert progress == sorted(progress)


def reconnect(bench: Bench) -> None:
    """The cable is plugged back in: a new connection to the same (powered) board."""
    bench.protocol = EBBProtocol(bench.clock, timeout=30.0)
    LoopbackPort(bench.protocol, bench.board, bench.clock)
    bench.settle(bench.protocol.version())
    bench.plotter = Plotter(bench.protocol, bench.settings)


@pytest.mark.parametrize("lost_after", [1.3, 6.1])
def test_after_a_device_loss_the_plot_continues_exactly(reference, lost_after):
    from vfab.plotter.errors import DeviceLost

    bench = Bench()
    runner = bench.runner(ONE_LAYER)
    running = runner.run()
    bench.run_for(lost_after)
    bench.board.drop()  # the cable is pulled; the board keeps power and drains its FIFO
    with pytest.raises(DeviceLost):
        bench.settle(running)
    saved = runner.resume_position
    bench.run_for(5)
    reconnect(bench)
    assert bench.settle(bench.runner(ONE_LAYER, start=saved, position_kept=True).run()) \
        == states.COMPLETED
    assert_same_drawing(bench.strokes, reference)


def test_after_the_daemon_was_killed_the_board_position_finds_where_it_got(reference):
    bench = Bench(settings=attr.evolve(SETTINGS, progress_save_interval=1.0))
    runner = bench.runner(ONE_LAYER)
    killed = runner.run()
    killed.addErrback(lambda failure: None)  # it dies with the connection
    bench.run_for(5.0)
    last_saved = Position.from_dict(bench.saved[-1][1])
    # kill -9: the daemon is gone without a word; the board finishes what it took.
    bench.protocol.transport.loseConnection()
    bench.run_for(5)
    reconnect(bench)
    assert bench.settle(bench.runner(ONE_LAYER, start=last_saved, position_kept=True).run()) \
        == states.COMPLETED
    assert_same_drawing(bench.strokes, reference)


LAYER_CODES = b"""<svg xmlns="http://www.w3.org/2000/svg"
 xmlns:inkscape="http://www.inkscape.org/namespaces/inkscape"
 width="200mm" height="150mm" viewBox="0 0 200 150">
  <g inkscape:groupmode="layer" inkscape:label="% notes"><line x1="0" y1="0" x2="190" y2="140"
   stroke="black"/></g>
  <g inkscape:groupmode="layer" inkscape:label="1 slow +S10 +H20"><line x1="10" y1="10"
   x2="110" y2="10" stroke="black"/></g>
  <g inkscape:groupmode="layer" inkscape:label="2 fast"><line x1="10" y1="30" x2="110" y2="30"
   stroke="red"/></g>
</svg>"""


def test_layer_names_set_speed_and_pen_height_and_skip_documentation():
    bench = Bench()
    runner = bench.runner(LAYER_CODES)
    assert [layer.name for layer in bench.prepared.plan.layers] == ["1 slow +S10 +H20",
                                                                  "2 fast"]
    slow, fast = bench.prepared.layer_settings
    assert slow.speed_pen_down == pytest.approx(22.09, abs=0.01) and slow.pen_pos_down == 20
    assert fast == SETTINGS
    running = runner.run()
    for _ in range(4000):
        bench.run_for(0.01)
        if bench.transitions and bench.transitions[-1][0] == states.AWAITING_PEN:
            break
    runner.resume()
    assert bench.settle(running) == states.COMPLETED
    assert len(bench.strokes) == 2  # the "%" layer was not plotted
    # The slow layer's 100 mm took about 100 / 22 s; the fast one about 100 / 50 s.
    slow_draw = sum(m.duration_s for m in bench.prepared.plan.layers[0].paths[0].draw)
    fast_draw = sum(m.duration_s for m in bench.prepared.plan.layers[1].paths[0].draw)
    assert slow_draw > 4.4 and fast_draw < 2.5
    # The slow layer's pen height was set on the board, and the default again after it.
    pen_settings = [line for line in b"".join(bench.port.written).decode().split("\r")
                    if line.startswith("SC,4,")]
    assert len(set(pen_settings)) == 2 and pen_settings[-1] == pen_settings[0] or \
        len(pen_settings) >= 2
