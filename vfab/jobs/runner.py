"""Walks one job's motion plan on the plotter, as an explicit state machine.

The runner sends one move at a time and the next once the plotter has taken
it, so the carriage is fed without getting far ahead of it. Every pause, pen
change, cancel and stop happens between two moves, at a position (layer,
path, move) that is saved and from which the plot continues without drawing
a stroke twice or skipping one.

The requests from outside (pause, resume, cancel, stop) and the loss of the
device are inputs of one transition table (`_REQUESTS`): each names the
states where it is legal and the state it leads to; anything else is refused
at once with InvalidTransition (HTTP 409). The plot itself is a coroutine
that looks at the state at every safe point, so an interleaving nobody
thought of shows up as a refused request, never as a request that is
swallowed and a caller that waits for ever.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any, Callable

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from vfab.config import DeviceConfig
from vfab.jobs import states
from vfab.jobs.carriage import Trail, locate
from vfab.jobs.errors import DatabaseDamaged, DatabaseUnavailable, DiskFull
from vfab.jobs.position import Position
from vfab.motion import (Move, MotionPlan, PathPlan, PenMove, pen_moves, plan_travel,
                         resume_path)
from vfab.plotter.errors import DeviceLost
from vfab.plotter.kinematics import mm_to_motor_steps, motor_steps_to_mm

_log = Logger()

#: job_progress messages a second, at most, for one job (the contract's bound).
PROGRESS_RATE = 10.0
HOME = (0.0, 0.0)
#: How often the PRG button is polled while a pen change is awaited.
BUTTON_POLL_SECONDS = 0.5


class RunnerState(enum.Enum):
    STARTING = "starting"          # motors, position, pen up
    PLOTTING = "plotting"          # moves are being sent
    PAUSING = "pausing"            # a pause was asked for: stop at the next move boundary
    PAUSED = "paused"              # stopped, pen up, progress saved
    PARKING = "parking"            # to the pen-change position between two layers
    PARKING_TO_PAUSE = "parking to pause"  # a pause was asked for on the way there
    PAUSED_FOR_PEN = "paused for the pen"  # paused there; resume asks for the pen
    AWAITING_PEN = "awaiting the pen"
    CANCELLING = "cancelling"
    STOPPING = "stopping"          # the daemon stops: pause at a safe point and end
    FINISHING = "finishing"        # the last stroke is drawn; going home
    LOST = "lost"                  # the device went away
    DONE = "done"


S = RunnerState

#: request -> {state it is legal in: state it leads to}. Not listed: refused.
_REQUESTS: dict[str, dict[RunnerState, RunnerState]] = {
    "pause": {S.STARTING: S.PAUSING, S.PLOTTING: S.PAUSING, S.PAUSING: S.PAUSING,
              S.PARKING: S.PARKING_TO_PAUSE, S.PARKING_TO_PAUSE: S.PARKING_TO_PAUSE},
    "resume": {S.PAUSED: S.PLOTTING, S.AWAITING_PEN: S.PLOTTING,
               S.PAUSED_FOR_PEN: S.AWAITING_PEN},
    "cancel": {state: S.CANCELLING for state in S
               if state not in (S.FINISHING, S.LOST, S.DONE, S.STOPPING)},
    # The daemon stopping is never refused: finishing runs to its end, an
    # ending run simply ends.
    "stop": {**{state: S.STOPPING for state in S}, S.FINISHING: S.FINISHING,
             S.CANCELLING: S.CANCELLING, S.LOST: S.LOST, S.DONE: S.DONE},
    "lost": {**{state: S.LOST for state in S}, S.DONE: S.DONE},
}

#: The job state a runner state shows as (what a refused request names).
JOB_STATE = {S.STARTING: states.PLOTTING, S.PLOTTING: states.PLOTTING,
             S.PAUSING: states.PLOTTING, S.PAUSED: states.PAUSED, S.PARKING: states.PLOTTING,
             S.PARKING_TO_PAUSE: states.PLOTTING, S.PAUSED_FOR_PEN: states.PAUSED,
             S.AWAITING_PEN: states.AWAITING_PEN, S.CANCELLING: states.PLOTTING,
             S.STOPPING: states.PLOTTING, S.FINISHING: states.PLOTTING,
             S.LOST: states.INTERRUPTED, S.DONE: states.COMPLETED}
#: The job state a request asks for (for the refusal's wording).
_REQUEST_TARGET = {"pause": states.PAUSED, "resume": states.PLOTTING,
                   "cancel": states.CANCELLED}


class Cancelled(Exception):
    """The job was cancelled while plotting."""


class Stopped(Exception):
    """The daemon is stopping: the plot was paused at a safe point and saved."""


# What a runner needs from the queue: state changes and saved progress
# (with the job's plotting time), both written to the store (and announced)
# by the queue.
Transition = Callable[..., Deferred]
SaveProgress = Callable[[float, dict[str, int], float], Deferred]


class PlotRunner:
    """Plots one job; `run()` fires with the final job state or fails with the device's error.

    `start` is the saved position of a job that was begun before, None for a
    fresh one. `position_kept` says that the device's step counters still tell
    where the carriage stopped since that position was saved (the board kept
    power and was not re-enabled): only then, and unless the carriage was
    parked after the save, is the position checked against the counters.
    `plotted_before` is the job's plotting time in its earlier runs: the run
    adds its own, and saves the sum with every save and state change.

    The store always holds a position the plot can go on from without a
    stroke twice: before the pen first goes down in a run, before the
    carriage leaves the drawing (pen change, stop, the way home), and before
    a move that passes near a point passed since the last save (see
    `vfab.jobs.carriage`), the position is saved and the save awaited.
    """

    def __init__(self, *, job_id: str, plan: MotionPlan, plotter: Any, device: Any,
                 settings: DeviceConfig, clock: Any, publish: Callable[[dict], None],
                 transition: Transition, save_progress: SaveProgress,
                 start: Position | None = None, position_kept: bool = False,
                 use_lm: bool = True, layer_settings: tuple[DeviceConfig, ...] | None = None,
                 time_factor: float = 1.0, plotted_before: float = 0.0):
        self.job_id = job_id
        self._plan = plan
        self._plotter = plotter
        self._device = device
        self._settings = settings
        self._clock = clock
        self._publish = publish
        self._transition = transition
        self._save_progress = save_progress
        self._resuming = start is not None
        #: The board lost power since `start` was saved: the moves it had taken
        #: and not executed are drawn again, from where they began.
        self._stepped_back = (start is not None and not position_kept
                              and start.behind is not None)
        if start is not None:
            start = start.after_power_loss() if self._stepped_back \
                else attr.evolve(start, behind=None)
        self._start = start or Position()
        self._position_kept = position_kept
        self._use_lm = use_lm
        self._time_factor = time_factor
        self._layer_settings = layer_settings or (settings,) * len(plan.layers)
        self._pen_up, self._pen_down = pen_moves(settings)
        self._here = HOME
        self._pen_is_down = False
        self._state = S.STARTING
        self._changed: list[Deferred] = []
        self._pause_waiters: list[Deferred] = []
        self._lost_reason: Failure | None = None
        # Progress is the share of the pen-down length drawn, so that a preview
        # inked up to `progress` of its length shows what is on the paper.
        self._total_draw = plan.draw_mm() or 1.0
        self._done_draw = 0.0
        self._paths_done = 0
        self._total_paths = plan.path_count
        self._position = self._start
        self._count_done_before(self._start)
        #: The position saved for sure (None: the store holds none).
        self._durable = start
        self._trail = Trail()
        self._position_sequence = 0  # the trail's length when `_position` was reached
        self._here_steps = (0, 0)
        #: Where the carriage stands inside the start position's next stroke, if it does.
        self._inside = self._start.inside
        self._pen_down_saved = False
        #: The position before each of the last few commands sent.
        self._history: deque[Position] = deque(maxlen=plotter.unconfirmed_moves + 1)
        self._plotting_since: float | None = None
        self._plotting_seconds = plotted_before
        self._last_progress = float("-inf")
        self._last_position_report = float("-inf")
        self._last_save = clock.seconds()
        self._saving: Deferred | None = None
        #: Saves failed in a row (the store is failing).
        self._failed_saves = 0

    # -- requests ------------------------------------------------------------

    @property
    def state(self) -> RunnerState:
        return self._state

    @property
    def job_state(self) -> str:
        """The job's state as the runner sees it (the store follows it)."""
        return JOB_STATE[self._state]

    def _request(self, name: str) -> None:
        target = _REQUESTS[name].get(self._state)
        if target is None:
            raise states.InvalidTransition(self.job_id, self.job_state, _REQUEST_TARGET[name])
        if target is not self._state:
            _log.debug("job {job_id}: runner {before} -> {after} ({request})",
                       job_id=self.job_id, before=self._state.value, after=target.value,
                       request=name)
            self._set_state(target)

    def pause(self) -> Deferred[None]:
        """Pause at the next move; fires once the pen is up and the progress saved
        (or the run ended first). Raises InvalidTransition where a pause cannot be."""
        self._request("pause")
        waiter: Deferred[None] = Deferred()
        self._pause_waiters.append(waiter)
        return waiter

    def resume(self) -> None:
        """Continue after a pause or a pen change."""
        self._request("resume")

    def cancel(self) -> None:
        self._request("cancel")

    def stop(self) -> None:
        """The daemon is stopping: pause at the next safe point and end the run."""
        self._request("stop")

    def device_lost(self, reason: Failure) -> None:
        """The plotter went away: whatever the runner waits for ends with DeviceLost."""
        self._lost_reason = reason
        self._request("lost")

    def _record(self, to_state: str, reason: str, **fields: Any) -> Deferred:
        """A job state change, with the plotting time so far."""
        return self._transition(to_state, reason, plotting_seconds=self.plotting_seconds,
                                **fields)

    def _set_state(self, state: RunnerState) -> None:
        now = self._clock.seconds()
        if self._plotting_since is not None:
            self._plotting_seconds += now - self._plotting_since
            self._plotting_since = None
        if state in (S.PLOTTING, S.PAUSING, S.PARKING, S.PARKING_TO_PAUSE, S.FINISHING,
                     S.CANCELLING, S.STOPPING):
            self._plotting_since = now
        self._state = state
        changed, self._changed = self._changed, []
        for waiter in changed:
            waiter.callback(state)

    def _until_changed(self, state: RunnerState) -> Deferred[RunnerState]:
        """Fires with the new state once the state is no longer `state` (at once if so)."""
        if self._state is not state:
            return succeed(self._state)
        waiter: Deferred[RunnerState] = Deferred()
        self._changed.append(waiter)
        return waiter

    # -- figures ---------------------------------------------------------------

    @property
    def progress(self) -> float:
        return min(1.0, self._done_draw / self._total_draw)

    @property
    def plotter(self) -> Any:
        """The connection this run plots on."""
        return self._plotter

    @property
    def position(self) -> Position:
        return self._position

    @property
    def plotting_seconds(self) -> float:
        """Time spent moving (not paused, not waiting for a pen) in this run and
        the job's runs before it."""
        extra = self._clock.seconds() - self._plotting_since \
            if self._plotting_since is not None else 0.0
        return self._plotting_seconds + extra

    @property
    def resume_position(self) -> Position | None:
        """Where a later run must start after the board was lost (None: afresh).

        The plotter takes moves ahead of executing them, so the last few it
        took may never have been drawn: step back over them, but not behind
        the last durable save (from which the walk of `locate` is certain).
        If the board kept power, the next run finds from its step counters how
        far it really got; if it lost power, the next run goes on from `behind`.
        """
        if self._durable is None and self._position.at is None:
            return None  # a new job, lost before it learnt where the carriage is
        sent = self._history[0] if self._history else self._position
        if self._durable is not None and self._durable >= sent:
            return self._durable.with_behind(sent)
        return sent

    def position_after_loss(self, steps: tuple[int, int]) -> Position | None:
        """Where this run, ended by a lost device, really got to, for a board that
        kept power and whose carriage stands at `steps`; exact, so marked parked."""
        start = self.resume_position
        if start is None:
            return None
        if start.parked or start.layer >= len(self._plan.layers):
            return start.parked_here()
        found = locate(self._plan.layers[start.layer].paths, start, steps,
                       self._settings.microstepping)
        return found.parked_here()

    def _reach(self, position: Position) -> None:
        """The moves sent so far take the carriage to `position`."""
        self._position = attr.evolve(position, at=self._here_steps)
        self._position_sequence = self._trail.sent

    # -- the plot ----------------------------------------------------------

    @inlineCallbacks
    def run(self) -> Deferred[str]:
        """Plot from the start position; fires with COMPLETED, CANCELLED or INTERRUPTED."""
        try:
            outcome = yield self._run()
        finally:
            if self._state is not S.LOST:
                self._set_state(S.DONE)
            # A pause asked for too late to take effect still gets its answer.
            self._resolve_pause()
        return outcome

    @inlineCallbacks
    def _run(self) -> Deferred[str]:
        if self._resuming and not self._position_kept and not self._start.parked:
            # Turning the motors on zeroes the board's counters, so from then on
            # they cannot confirm the saved position: say so in the store first,
            # or a run after a kill -9 would take the carriage at home for one
            # that went on from there.
            if self._stepped_back:
                _log.info("job {job_id}: the plotter lost power; going on from the last "
                          "moves it may not have drawn (a few strokes may be drawn twice)",
                          job_id=self.job_id)
            yield self._save_durably(self._start.parked_here())
        yield self._plotter.ensure_motors_on()
        # After a reconnect the board may still be drawing what it took before:
        # the carriage's place is known once it has stopped.
        yield self._plotter.wait_idle()
        steps = yield self._plotter.query_steps()
        self._here = motor_steps_to_mm(steps[0], steps[1], self._settings.microstepping)
        self._here_steps = (int(steps[0]), int(steps[1]))
        if self._resuming and self._position_kept and not self._start.parked:
            self._confirm_start(self._here_steps)
        self._reach(self._start)
        # The pen may be down: a killed daemon, a lost cable, another program.
        yield self._send(self._pen_up)
        yield self._plotter.wait_idle()
        self._report_progress(force=True)
        try:
            if self._state is S.STARTING:
                self._set_state(S.PLOTTING)
            yield self._plot()
            self._finishing()
            self._reach(self._position.parked_here())
            yield self._save_durably(self._position)
        except Cancelled:
            yield self._go_home()
            return states.CANCELLED
        except Stopped:
            return states.INTERRUPTED
        yield self._go_home()
        self._done_draw = self._total_draw
        self._report_progress(force=True)
        return states.COMPLETED

    def _finishing(self) -> None:
        """The last stroke is sent: a pause or cancel now would stop nothing."""
        self._honour_ending()
        if self._state is S.PAUSING:
            # Asked for too late to take effect: the plot ends instead.
            self._resolve_pause()
        self._set_state(S.FINISHING)

    def _confirm_start(self, steps: tuple[int, int]) -> None:
        """The saved position can be behind what the board drew: the last moves it
        took before a loss, or all it drew since the last save before the daemon
        was killed. The board kept power, so its step counters say where the
        carriage stopped: go on from there."""
        start = self._start
        if start.layer >= len(self._plan.layers):
            return
        paths = self._plan.layers[start.layer].paths
        found = locate(paths, start, steps, self._settings.microstepping)
        if found == start and found.inside == start.inside:
            return
        _log.info("job {job_id}: the plotter had drawn up to {position}, past the saved "
                  "progress; continuing from there", job_id=self.job_id,
                  position=found.to_dict())
        self._start = found
        self._inside = found.inside
        self._done_draw, self._paths_done = 0.0, 0
        self._count_done_before(found)
        if found.inside is not None:
            # The part of the stroke drawn before the carriage stopped is passed.
            path = paths[found.path]
            began = tuple(path.draw[found.move - 1].end_steps) if found.move else \
                mm_to_motor_steps(*path.start_mm, self._settings.microstepping)
            self._trail.add(began, steps)

    def _count_done_before(self, start: Position) -> None:
        """Progress already made by an earlier run of this job (from the plan's
        index: a plan file is not read through for it)."""
        done, paths = self._plan.drawn_before(start.layer, start.path, start.move)
        self._done_draw += done
        self._paths_done += paths

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
                self._reach(Position(li, pi + 1, 0))

    @inlineCallbacks
    def _draw_path(self, li: int, pi: int, mi: int, path: PathPlan,
                   came_from: tuple[float, float]) -> Deferred[None]:
        """Draw `path` from its move `mi`; a pause inside re-plans the rest from rest."""
        if not path.draw:
            # A dot: too small to move the motors, so lower and raise the pen there.
            while True:
                yield self._checkpoint()
                arrived = yield self._travel_to_start(path, came_from)
                if arrived:
                    break
            yield self._set_pen(down=True)
        while mi < len(path.draw):
            inside = self._inside
            self._reach(Position(li, pi, mi, inside=inside))
            yield self._checkpoint()
            if inside is not None:
                arrived = yield self._travel(
                    motor_steps_to_mm(*inside, self._settings.microstepping), drawing=True)
            elif mi == 0:
                arrived = yield self._travel_to_start(path, came_from)
            else:
                arrived = yield self._travel(path.draw[mi - 1].end_mm, drawing=True)
            if not arrived:
                continue  # a request stopped the travel: the checkpoint honours it
            self._inside = None
            yield self._set_pen(down=True)
            # From inside a stroke, the first move ends where a pause can be.
            at_vertex = inside is None
            for move, completes in self._remaining(path, mi, inside is not None):
                if at_vertex and self._state is not S.PLOTTING:
                    break  # the checkpoint at the top of the loop honours it
                yield self._send(move)
                self._done_draw += move.distance_mm
                at_vertex = completes is not None
                if at_vertex:
                    mi = completes
                    self._reach(Position(li, pi, mi))
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

    def _remaining(self, path: PathPlan, mi: int, from_here: bool
                   ) -> list[tuple[Move, int | None]]:
        """The moves that draw `path` from its move `mi` on, starting at rest (from
        the carriage, when it stands inside move `mi`).

        With each move comes how many of the path's planned moves are complete
        once it is done, or None when it ends between two of them: the runner
        pauses only where that count is known, so that the saved position is
        exactly where the carriage stands.
        """
        if from_here:
            return resume_path(path, mi, self._settings, use_lm=self._use_lm,
                               start_mm=self._here)
        if mi == 0:
            return [(move, index + 1) for index, move in enumerate(path.draw)]
        return resume_path(path, mi, self._settings, use_lm=self._use_lm)

    def _travel_to_start(self, path: PathPlan, came_from: tuple[float, float]
                         ) -> Deferred[bool]:
        """To the start of `path`: the planned travel when the carriage is where the
        plan expects it, else a travel planned now. Fires False if a request (pause,
        cancel, stop) stopped it on the way."""
        if _point_key(self._here) == _point_key(came_from):
            return self._send_travel(path.travel, drawing=True)
        return self._travel(path.start_mm, drawing=True)

    def _travel(self, target: tuple[float, float], drawing: bool = False) -> Deferred[bool]:
        """Pen-up moves from where the carriage is to `target`; while `drawing`, a
        request stops them between two moves (fires False)."""
        if _point_key(target) == _point_key(self._here):
            return succeed(True)
        return self._send_travel(
            plan_travel(self._here, target, self._settings, use_lm=self._use_lm), drawing)

    @inlineCallbacks
    def _send_travel(self, moves: Any, drawing: bool) -> Deferred[bool]:
        for move in moves:
            if drawing and self._state is not S.PLOTTING:
                return False
            yield self._send(move)
        return True

    def _honour_ending(self) -> None:
        """Raise what a cancel or a lost device means for the coroutine."""
        if self._state is S.DONE:
            # Only a coroutine of a run that is over gets here (one that the
            # garbage collector closes out of order): it must send nothing.
            raise Stopped()
        if self._state is S.CANCELLING:
            raise Cancelled()
        if self._state is S.LOST:
            raise DeviceLost(self._lost_reason.getErrorMessage() if self._lost_reason
                             else "the plotter was lost")

    @inlineCallbacks
    def _checkpoint(self) -> Deferred[None]:
        """Between two moves: honour a pause, a cancel or a stop."""
        while True:
            self._honour_ending()
            if self._state is S.STOPPING:
                yield self._stop_here("the daemon stopped; resume continues from the "
                                      "saved progress")
            if self._state is not S.PAUSING:
                return
            yield self._safe_stop()
            if self._state is not S.PAUSING:
                continue  # cancelled, stopped or lost while the carriage came to rest
            self._set_state(S.PAUSED)
            yield self._record(states.PAUSED, "paused by request", progress=self.progress,
                                   position=self._position.to_dict())
            self._resolve_pause()
            state = yield self._until_changed(S.PAUSED)
            if state is S.PLOTTING:
                yield self._record(states.PLOTTING, "resumed")

    @inlineCallbacks
    def _stop_here(self, reason: str) -> Deferred[None]:
        """The daemon stops: pen up, park at home, record the job interrupted, end."""
        yield self._safe_stop()
        self._reach(self._position.parked_here())
        yield self._save_durably(self._position)
        # Park at home: the motors go off at shutdown and the board zeroes its
        # counters when they come on again, so home is where to wait.
        yield self._go_home()
        yield self._record(states.INTERRUPTED, reason, progress=self.progress,
                               position=self._position.to_dict())
        raise Stopped()

    def _resolve_pause(self) -> None:
        waiters, self._pause_waiters = self._pause_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    @inlineCallbacks
    def _safe_stop(self) -> Deferred[None]:
        """Let the queued moves finish, then lift the pen: nothing is left half drawn."""
        yield self._plotter.wait_idle()
        if self._pen_is_down:
            yield self._send(self._pen_up)
            self._pen_is_down = False
            yield self._plotter.wait_idle()
        # Every move taken has been executed: the position is exact.
        self._history.clear()
        self._device.update_position(self._here[0], self._here[1], pen_down=False)

    @inlineCallbacks
    def _change_pen(self, index: int, name: str) -> Deferred[None]:
        """Park the carriage, ask for the next pen and wait for resume or the PRG button."""
        yield self._checkpoint()
        # Until the pen is in, a later run starts by asking for it again: the
        # position is the end of the layer before.
        before = self._plan.layers[index - 1]
        self._reach(Position(index - 1, len(before.paths), 0, parked=True))
        yield self._save_durably(self._position)
        self._pen_down_saved = False
        self._set_state(S.PARKING)
        yield self._travel(self._settings.pen_change_position or HOME)
        yield self._safe_stop()
        yield self._plotter.button_pressed()  # forget a press from before the prompt
        while True:
            self._honour_ending()
            if self._state is S.STOPPING:
                yield self._stop_here("the daemon stopped during a pen change")
            if self._state is not S.PARKING_TO_PAUSE:
                break
            self._set_state(S.PAUSED_FOR_PEN)
            yield self._record(states.PAUSED, "paused by request", progress=self.progress,
                                   position=self._position.to_dict())
            self._resolve_pause()
            yield self._until_changed(S.PAUSED_FOR_PEN)
        self._set_state(S.AWAITING_PEN)
        yield self._record(states.AWAITING_PEN, f"next pen: {name}",
                               progress=self.progress, position=self._position.to_dict())
        self._publish({"type": "system_alert", "severity": "info",
                       "title": "Pen change",
                       "message": f"Job {self.job_id}: put in the pen for layer "
                                  f"{index + 1} ({name}), then resume or press the "
                                  f"plotter's button."})
        yield self._wait_for_pen()
        self._honour_ending()
        if self._state is S.STOPPING:
            yield self._stop_here("the daemon stopped during a pen change")
        self._reach(Position(index, 0, 0))
        yield self._record(states.PLOTTING, f"pen for layer {index + 1} ({name}) is in")

    @inlineCallbacks
    def _wait_for_pen(self) -> Deferred[None]:
        """Until resume, the PRG button, or an end (cancel, stop, loss)."""
        while self._state is S.AWAITING_PEN:
            pressed = yield self._plotter.button_pressed()
            if pressed and self._state is S.AWAITING_PEN:
                self._request("resume")
                break
            yield self._sleep(BUTTON_POLL_SECONDS, S.AWAITING_PEN)

    def _sleep(self, seconds: float, state: RunnerState) -> Deferred[RunnerState]:
        """Fires after `seconds`, or as soon as the state is no longer `state`."""
        waiter = self._until_changed(state)
        if waiter.called:
            return waiter
        call = self._clock.callLater(seconds, self._wake, waiter)

        def woken(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return waiter.addBoth(woken)

    def _wake(self, waiter: Deferred) -> None:
        self._changed.remove(waiter)
        waiter.callback(self._state)

    @inlineCallbacks
    def _set_pen(self, *, down: bool) -> Deferred[None]:
        if down == self._pen_is_down:
            return
        if down and not self._pen_down_saved:
            # Where the carriage stands now, so that a kill before the next save
            # goes on from here rather than from an older position.
            yield self._save_durably(self._position)
            self._pen_down_saved = True
        yield self._send(self._pen_down if down else self._pen_up)
        self._pen_is_down = down
        self._device.update_position(self._here[0], self._here[1], pen_down=down)

    @inlineCallbacks
    def _send(self, move: Move | PenMove) -> Deferred[None]:
        if isinstance(move, Move):
            end = tuple(move.end_steps)
            if self._trail.needs_save_before(self._here_steps, end):
                yield self._save_durably(self._position)
            self._trail.add(self._here_steps, end)
            self._here_steps = end
        self._history.append(self._position)
        yield self._plotter.send_move(move.command, move.duration_s)
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
        remaining = (1.0 - progress) * self._plan.estimated_seconds / self._time_factor
        self._publish({
            "type": "job_progress",
            "job_id": self.job_id,
            "progress": round(progress, 4),
            "progress_percentage": round(progress * 100.0, 1),
            "current_layer": min(self._position.layer + 1, len(self._plan.layers)),
            "total_layers": len(self._plan.layers),
            "paths_done": self._paths_done,
            "total_paths": self._total_paths,
            "elapsed_seconds": round(self.plotting_seconds, 1),
            "eta_seconds": round(remaining, 1),
        })

    def _save(self, position: Position) -> Deferred[None]:
        """Save the progress at `position`; never fails (a failure is logged)."""
        sequence = self._position_sequence if position == self._position else self._trail.sent

        def saved(result: Any) -> None:
            self._durable = position
            self._trail.saved_at(sequence)
            if self._failed_saves:
                _log.info("job {job_id}: progress saved again, after {count} failed saves",
                          job_id=self.job_id, count=self._failed_saves)
                self._failed_saves = 0

        def failed(failure: Failure) -> None:
            # The plot goes on: the next move that needs a save tries again. Said
            # once a streak, not once a move, so a broken store cannot flood the log.
            self._failed_saves += 1
            if self._failed_saves > 1:
                return
            if failure.check(DiskFull, DatabaseDamaged, DatabaseUnavailable):  # said in a line
                _log.error("could not save the progress of job {job_id}; plotting on and "
                           "trying again: {why}", job_id=self.job_id,
                           why=failure.getErrorMessage())
            else:
                _log.failure("could not save the progress of job {job_id}; plotting on and "
                             "trying again", failure, job_id=self.job_id)
            self._publish({"type": "system_alert", "severity": "warning",
                           "title": "Progress not saved",
                           "message": f"Job {self.job_id}: the progress could not be saved "
                                      f"({failure.getErrorMessage()}). The plot goes on; if "
                                      f"the daemon stops before a save succeeds, a resume "
                                      f"may draw a few strokes again."})

        stored = position.with_behind(self._history[0]) if self._history else position
        saving = self._save_progress(self.progress, stored.to_dict(), self.plotting_seconds)
        saving.addCallbacks(saved, failed)
        return saving

    @inlineCallbacks
    def _save_durably(self, position: Position) -> Deferred[None]:
        """Save `position` and wait until the store has it (after any save under way)."""
        while self._saving is not None:
            yield when_fired(self._saving)
        self._last_save = self._clock.seconds()
        yield self._save(position)

    def _maybe_save(self) -> None:
        now = self._clock.seconds()
        if self._saving is not None or now - self._last_save < self._settings.progress_save_interval:
            return
        self._last_save = now
        saving = self._save(self._position)
        if not saving.called:
            self._saving = saving

            def saved(result: Any) -> Any:
                self._saving = None
                return result

            saving.addBoth(saved)


def _point_key(point: tuple[float, float]) -> tuple[float, float]:
    """A point rounded to a micrometre, to compare planned positions."""
    return (round(point[0], 3), round(point[1], 3))


def when_fired(deferred: Deferred) -> Deferred[None]:
    """Fires when `deferred` does, leaving its result to its own callbacks."""
    done: Deferred[None] = Deferred()

    def fired(result: Any) -> Any:
        done.callback(None)
        return result

    deferred.addBoth(fired)
    return done
