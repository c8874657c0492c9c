"""Walks one job's motion plan on the plotter.

The runner keeps exactly one command in flight: the board acknowledges a move
when it enters its one-deep motion FIFO, so sending the next move on each
acknowledgement keeps the carriage fed without ever getting far ahead of it.
Every pause, pen change, cancel and stop happens between two moves, at a
position (layer, path, move) that is saved and from which the plot continues
without drawing a stroke twice or skipping one.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import attr
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from vfab.config import DeviceConfig
from vfab.jobs import states
from vfab.motion import (Move, MotionPlan, PathPlan, PenMove, pen_moves, plan_travel,
                         resume_path)
from vfab.plotter.kinematics import mm_to_motor_steps, motor_steps_to_mm

_log = Logger()

#: job_progress messages a second, at most, for one job (the contract's bound).
PROGRESS_RATE = 10.0
HOME = (0.0, 0.0)
#: Commands the board may have acknowledged without executing them: the one
#: running and the one waiting in its one-deep FIFO.
UNCONFIRMED_COMMANDS = 2
#: How many planned points past the saved progress are searched for the
#: carriage's position (more than a progress-save interval's worth of moves).
CONFIRM_SEARCH_MOVES = 20000
#: How often the PRG button is polled while a pen change is awaited.
BUTTON_POLL_SECONDS = 0.5


@attr.s(frozen=True, auto_attribs=True)
class Position:
    """Where a plot stands: the next move to send is `move` of path `path` of `layer`."""

    layer: int = 0
    path: int = 0
    move: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"layer": self.layer, "path": self.path, "move": self.move}

    @classmethod
    def from_dict(cls, data: dict[str, int] | None) -> "Position":
        if not data:
            return cls()
        return cls(int(data["layer"]), int(data["path"]), int(data["move"]))


class Cancelled(Exception):
    """The job was cancelled while plotting."""


class Stopped(Exception):
    """The daemon is stopping: the plot was paused at a safe point and saved."""


# What a runner needs from the queue: state changes and saved progress,
# both written to the store (and announced) by the queue.
Transition = Callable[..., Deferred]
SaveProgress = Callable[[float, dict[str, int]], Deferred]


class PlotRunner:
    """Plots one job; `run()` fires with the final state or fails with the device's error."""

    def __init__(self, *, job_id: str, plan: MotionPlan, plotter: Any, device: Any,
                 settings: DeviceConfig, clock: Any, publish: Callable[[dict], None],
                 transition: Transition, save_progress: SaveProgress,
                 start: Position = Position(), use_lm: bool = True,
                 layer_settings: tuple[DeviceConfig, ...] | None = None):
        self.job_id = job_id
        self._plan = plan
        self._plotter = plotter
        self._device = device
        self._settings = settings
        self._clock = clock
        self._publish = publish
        self._transition = transition
        self._save_progress = save_progress
        self._start = start
        self._use_lm = use_lm
        self._layer_settings = layer_settings or (settings,) * len(plan.layers)
        self._pen_up, self._pen_down = pen_moves(settings)
        self._here = (0.0, 0.0)
        self._pen_is_down = False
        self._requested: str | None = None  # "pause", "cancel" or "stop"
        self._pause_done: Deferred | None = None
        self._wake: Deferred | None = None
        # Progress is the share of the pen-down length drawn, so that a preview
        # inked up to `progress` of its length shows what is on the paper.
        self._total_draw = sum(m.distance_mm for layer in plan.layers
                               for path in layer.paths for m in path.draw) or 1.0
        self._done_draw = 0.0
        self._paths_done = 0
        self._total_paths = sum(len(layer.paths) for layer in plan.layers)
        self._position = start
        #: The position after each of the last few acknowledged commands.
        self._history: deque[Position] = deque(maxlen=UNCONFIRMED_COMMANDS + 1)
        self._started_at = clock.seconds()
        self._last_progress = float("-inf")
        self._last_position_report = float("-inf")
        self._last_save = clock.seconds()
        self._saving: Deferred | None = None

    # -- requests from the queue -------------------------------------------

    def pause(self) -> Deferred:
        """Ask for a pause at the next move; fires once the pen is up and progress saved."""
        if self._pause_done is None:
            self._pause_done = Deferred()
        if self._requested is None:
            self._requested = "pause"
        return self._pause_done

    def resume(self) -> None:
        """Continue after a pause or a pen change."""
        self._requested = None
        self._wakeup("resume")

    def cancel(self) -> None:
        self._requested = "cancel"
        self._wakeup("cancel")

    def stop(self) -> None:
        """The daemon is stopping: pause at the next safe point and end the run."""
        self._requested = "stop"
        self._wakeup("stop")

    def _wakeup(self, why: str) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.callback(why)

    @property
    def progress(self) -> float:
        return min(1.0, self._done_draw / self._total_draw)

    @property
    def position(self) -> Position:
        return self._position

    @property
    def resume_position(self) -> Position:
        """Where a later run must start after the board was lost.

        The board acknowledges a move when it takes it into its FIFO, so the
        last moves acknowledged (one running, one waiting) may never have been
        drawn: step back over them. If the board kept power, the next run
        finds from its step counters how far it really got.
        """
        return self._history[0] if self._history else self._start

    # -- the plot ----------------------------------------------------------

    @inlineCallbacks
    def run(self) -> Deferred[str]:
        """Plot from the start position; fires with COMPLETED, CANCELLED or INTERRUPTED."""
        try:
            outcome = yield self._run()
        finally:
            # A pause asked for too late to take effect still gets its answer.
            self._resolve_pause()
        return outcome

    @inlineCallbacks
    def _run(self) -> Deferred[str]:
        kept = yield self._plotter.ensure_motors_on()
        steps = yield self._plotter.query_steps()
        self._here = motor_steps_to_mm(steps[0], steps[1], self._settings.microstepping)
        if kept:
            self._start = self._confirmed_start(self._start, steps)
        self._position = self._start
        self._count_done_before(self._start)
        self._report_progress(force=True)
        try:
            yield self._plot()
        except Cancelled:
            yield self._go_home()
            return states.CANCELLED
        except Stopped:
            return states.INTERRUPTED
        yield self._go_home()
        self._done_draw = self._total_draw
        self._report_progress(force=True)
        return states.COMPLETED

    def _confirmed_start(self, start: Position, steps: tuple[int, int]) -> Position:
        """The saved position can be behind what the board drew: the last moves it
        acknowledged before a loss, or all it drew since the last save before the
        daemon was killed. The board kept power, so its step counters say where the
        carriage stopped: continue after the first planned point they match."""
        target = (int(steps[0]), int(steps[1]))
        for position, point in self._points_from(start):
            if point == target:
                if position != start:
                    _log.info("job {job_id}: the plotter had drawn up to {position}, past the "
                              "saved progress; continuing from there", job_id=self.job_id,
                              position=position.to_dict())
                return position
        return start

    def _points_from(self, start: Position):
        """(position, motor steps of the carriage there) for the planned points from
        `start` on, in its layer, as far as a daemon could have got unsaved."""
        paths = self._plan.layers[start.layer].paths if start.layer < len(self._plan.layers) \
            else ()
        budget = CONFIRM_SEARCH_MOVES
        microstepping = self._settings.microstepping
        for pi in range(start.path, len(paths)):
            path = paths[pi]
            first = start.move if pi == start.path else 0
            for mi in range(first, len(path.draw) + 1):
                if mi == 0:
                    point = mm_to_motor_steps(*path.start_mm, microstepping)
                else:
                    point = tuple(path.draw[mi - 1].end_steps)
                yield Position(start.layer, pi, mi), point
                budget -= 1
                if budget <= 0:
                    return

    def _count_done_before(self, start: Position) -> None:
        """Progress already made by an earlier run of this job."""
        for li, layer in enumerate(self._plan.layers):
            for pi, path in enumerate(layer.paths):
                if (li, pi) < (start.layer, start.path):
                    self._done_draw += sum(m.distance_mm for m in path.draw)
                    self._paths_done += 1
                elif (li, pi) == (start.layer, start.path):
                    self._done_draw += sum(m.distance_mm for m in path.draw[:start.move])

    @inlineCallbacks
    def _plot(self) -> Deferred[None]:
        start = self._start
        for li in range(start.layer, len(self._plan.layers)):
            layer = self._plan.layers[li]
            if li > start.layer:
                yield self._change_pen(li, layer.name)
            yield self._use_settings(self._layer_settings[li])
            first_path = start.path if li == start.layer else 0
            for pi in range(first_path, len(layer.paths)):
                path = layer.paths[pi]
                mi = start.move if (li, pi) == (start.layer, start.path) else 0
                if mi < len(path.draw) or (mi == 0 and not path.draw):
                    # Each layer is planned from home, each path from the one before.
                    came_from = layer.paths[pi - 1].end_mm if pi else HOME
                    yield self._draw_path(li, pi, mi, path, came_from)
                self._paths_done += 1
                self._position = Position(li, pi + 1, 0)

    @inlineCallbacks
    def _draw_path(self, li: int, pi: int, mi: int, path: PathPlan,
                   came_from: tuple[float, float]) -> Deferred[None]:
        """Draw `path` from its move `mi`; a pause inside re-plans the rest from rest."""
        if not path.draw:
            # A dot: too small to move the motors, so lower and raise the pen there.
            yield self._checkpoint()
            yield self._travel_to_start(path, came_from)
            yield self._set_pen(down=True)
        while mi < len(path.draw):
            self._position = Position(li, pi, mi)
            yield self._checkpoint()
            if mi == 0:
                yield self._travel_to_start(path, came_from)
            else:
                yield self._travel(path.draw[mi - 1].end_mm)
            yield self._set_pen(down=True)
            at_vertex = True
            for move, reached in self._remaining(path, mi):
                if at_vertex:
                    paused = yield self._checkpoint()
                    if paused:
                        break
                yield self._send(move)
                self._done_draw += move.distance_mm
                at_vertex = reached is not None
                if at_vertex:
                    mi = reached
                    self._position = Position(li, pi, mi)
                self._report_progress()
                self._maybe_save()
        yield self._set_pen(down=False)

    @inlineCallbacks
    def _use_settings(self, settings: DeviceConfig) -> Deferred[None]:
        """A layer's own settings (its name may set speed and pen height)."""
        pen_changed = (settings.pen_pos_down, settings.pen_pos_up, settings.pen_rate_lower,
                       settings.pen_rate_raise) != (
            self._settings.pen_pos_down, self._settings.pen_pos_up,
            self._settings.pen_rate_lower, self._settings.pen_rate_raise)
        self._settings = settings
        if pen_changed:
            yield self._plotter.configure_pen(settings)
            self._pen_up, self._pen_down = pen_moves(settings)

    def _remaining(self, path: PathPlan, mi: int) -> list[tuple[Move, int | None]]:
        """The moves that draw `path` from its move `mi` on, starting at rest.

        With each move comes how many of the path's planned moves it completes,
        or None when it ends between two of them: the runner pauses only where
        that count is known, so that the saved position is exactly where the
        carriage stands.
        """
        if mi == 0:
            return [(move, index + 1) for index, move in enumerate(path.draw)]
        ends = {_point_key(move.end_mm): index + 1
                for index, move in enumerate(path.draw) if index >= mi}
        return [(move, ends.get(_point_key(move.end_mm)))
                for move in resume_path(path, mi, self._settings, use_lm=self._use_lm)]

    @inlineCallbacks
    def _travel_to_start(self, path: PathPlan, came_from: tuple[float, float]
                         ) -> Deferred[None]:
        """To the start of `path`: the planned travel when the carriage is where the
        plan expects it, else a travel planned now."""
        if _point_key(self._here) == _point_key(came_from):
            for move in path.travel:
                yield self._send(move)
        else:
            yield self._travel(path.start_mm)

    @inlineCallbacks
    def _travel(self, target: tuple[float, float]) -> Deferred[None]:
        """Pen-up moves from where the carriage is to `target`."""
        if _point_key(target) == _point_key(self._here):
            return
        for move in plan_travel(self._here, target, self._settings, use_lm=self._use_lm):
            yield self._send(move)

    @inlineCallbacks
    def _checkpoint(self) -> Deferred[bool]:
        """Between two moves: honour a pause, a cancel or a stop.

        Fires True when the plot was paused and has been resumed (the pen is
        then up and the rest of the path must be planned again from rest).
        """
        paused = False
        while self._requested is not None:
            request = self._requested
            if request == "cancel":
                raise Cancelled()
            yield self._safe_stop()
            if request == "stop":
                # Park at home: the motors go off at shutdown and the board zeroes
                # its counters when they come on again, so home is where to wait.
                yield self._go_home()
                yield self._transition(states.INTERRUPTED, "the daemon stopped; resume "
                                       "continues from the saved progress",
                                       progress=self.progress,
                                       position=self._position.to_dict())
                self._resolve_pause()
                raise Stopped()
            yield self._transition(states.PAUSED, "paused by request", progress=self.progress,
                                   position=self._position.to_dict())
            self._resolve_pause()
            why = yield self._wait()
            if why == "resume":
                yield self._transition(states.PLOTTING, "resumed")
                paused = True
        return paused

    def _resolve_pause(self) -> None:
        done, self._pause_done = self._pause_done, None
        if done is not None:
            done.callback(None)

    @inlineCallbacks
    def _safe_stop(self) -> Deferred[None]:
        """Let the queued moves finish, then lift the pen: nothing is left half drawn."""
        yield self._plotter.wait_idle()
        if self._pen_is_down:
            yield self._send(self._pen_up)
            self._pen_is_down = False
            yield self._plotter.wait_idle()
        self._device.update_position(self._here[0], self._here[1], pen_down=False)

    def _wait(self) -> Deferred[str]:
        """Fires with "resume", "cancel" or "stop"."""
        self._wake = Deferred()
        if self._requested in ("cancel", "stop"):
            self._wakeup(self._requested)
        return self._wake

    @inlineCallbacks
    def _change_pen(self, index: int, name: str) -> Deferred[None]:
        """Park the carriage, ask for the next pen and wait for resume or the PRG button."""
        yield self._checkpoint()
        yield self._travel(self._settings.pen_change_position or HOME)
        yield self._plotter.wait_idle()
        yield self._plotter.button_pressed()  # forget a press from before the prompt
        self._position = Position(index, 0, 0)
        yield self._transition(states.AWAITING_PEN, f"next pen: {name}",
                               progress=self.progress, position=self._position.to_dict())
        self._publish({"type": "system_alert", "severity": "info",
                       "title": "Pen change",
                       "message": f"Job {self.job_id}: put in the pen for layer "
                                  f"{index + 1} ({name}), then resume or press the "
                                  f"plotter's button."})
        why = yield self._wait_for_pen()
        if why == "cancel":
            raise Cancelled()
        if why == "stop":
            yield self._go_home()
            yield self._transition(states.INTERRUPTED, "the daemon stopped during a pen change",
                                   progress=self.progress, position=self._position.to_dict())
            raise Stopped()
        yield self._transition(states.PLOTTING, f"pen for layer {index + 1} ({name}) is in")

    @inlineCallbacks
    def _wait_for_pen(self) -> Deferred[str]:
        wake = self._wait()
        while not wake.called:
            pressed = yield self._plotter.button_pressed()
            if pressed and not wake.called:
                self._requested = None
                self._wakeup("resume")
                break
            if not wake.called:
                yield _sleep(self._clock, BUTTON_POLL_SECONDS, wake)
        why = yield wake
        return why

    @inlineCallbacks
    def _set_pen(self, *, down: bool) -> Deferred[None]:
        if down == self._pen_is_down:
            return
        yield self._send(self._pen_down if down else self._pen_up)
        self._pen_is_down = down
        self._device.update_position(self._here[0], self._here[1], pen_down=down)

    @inlineCallbacks
    def _send(self, move: Move | PenMove) -> Deferred[None]:
        self._history.append(self._position)
        yield self._plotter.send_move(move.command)
        if isinstance(move, Move):
            self._here = move.end_mm
            now = self._clock.seconds()
            if now - self._last_position_report >= 1.0 / PROGRESS_RATE:
                self._last_position_report = now
                self._device.update_position(self._here[0], self._here[1],
                                             pen_down=self._pen_is_down)

    @inlineCallbacks
    def _go_home(self) -> Deferred[None]:
        """Pen up, then to home, and wait until the carriage is there."""
        yield self._safe_stop()
        yield self._travel(HOME)
        yield self._plotter.wait_idle()
        self._device.update_position(HOME[0], HOME[1], pen_down=False)

    # -- telling the world ---------------------------------------------------

    def _report_progress(self, force: bool = False) -> None:
        now = self._clock.seconds()
        if not force and now - self._last_progress < 1.0 / PROGRESS_RATE:
            return
        self._last_progress = now
        progress = self.progress
        elapsed = now - self._started_at
        remaining = (1.0 - progress) * self._plan.estimated_seconds
        self._publish({
            "type": "job_progress",
            "job_id": self.job_id,
            "progress": round(progress, 4),
            "progress_percentage": round(progress * 100.0, 1),
            "current_layer": min(self._position.layer + 1, len(self._plan.layers)),
            "total_layers": len(self._plan.layers),
            "paths_done": self._paths_done,
            "total_paths": self._total_paths,
            "elapsed_seconds": round(elapsed, 1),
            "eta_seconds": round(remaining, 1),
        })

    def _maybe_save(self) -> None:
        now = self._clock.seconds()
        if self._saving is not None or now - self._last_save < self._settings.progress_save_interval:
            return
        self._last_save = now
        saving = self._save_progress(self.progress, self._position.to_dict())
        saving.addErrback(lambda failure: _log.failure(
            "could not save the progress of job {job_id}", failure, job_id=self.job_id))
        if not saving.called:
            self._saving = saving

            def saved(result: Any) -> Any:
                self._saving = None
                return result

            saving.addBoth(saved)


def _sleep(clock: Any, seconds: float, cut_short: Deferred) -> Deferred[None]:
    """A Deferred that fires after `seconds`, or as soon as `cut_short` fires."""
    slept: Deferred[None] = Deferred()
    call = clock.callLater(seconds, slept.callback, None)

    def early(result: Any) -> Any:
        if call.active():
            call.cancel()
            slept.callback(None)
        return result

    cut_short.addBoth(early)
    return slept


def _point_key(point: tuple[float, float]) -> tuple[float, float]:
    """A point rounded to a micrometre, to compare planned positions."""
    return (round(point[0], 3), round(point[1], 3))
