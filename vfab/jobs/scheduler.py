"""The one owner of "what plots next": picks a job when the plotter is free and runs it.

Everything that may free the plotter or make a job ready (a submission, a
resume, the device connecting, a plot ending) calls `wake()`; nothing else
starts a job. The scheduler is a small state machine:

    idle -> choosing -> preparing -> running -> ending -> idle (and again)

A `wake()` while it is busy is remembered and acted on when it is idle
again, so no event is lost and no two jobs ever start. A failure to read the
store is retried after a pause rather than stopping the queue.

With several plotters each has a scheduler of its own; choosing claims the
job for this plotter in the store (one transaction), so two never take one
job, and a claim given up before the job began is released for the others.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from vfab.jobs import states
from vfab.jobs.errors import DatabaseDamaged, DatabaseUnavailable, DiskFull
from vfab.jobs.farm import FarmPlotter
from vfab.jobs.job import Job
from vfab.jobs.position import Position
from vfab.jobs.prepare import forget_frozen, release_freed_memory
from vfab.jobs.runner import PlotRunner, when_fired
from vfab.plotter.errors import DeviceLost, DeviceTimeout, EBBError

_log = Logger()

#: Seconds before the scheduler tries again after the store failed it.
RETRY_SECONDS = 5.0


class SchedulerState(enum.Enum):
    IDLE = "idle"
    CHOOSING = "choosing"
    PREPARING = "preparing"
    RUNNING = "running"
    ENDING = "ending"
    STOPPED = "stopped"


#: Builds the runner of a job once its plan is ready: (job, prepared plan, plotter) -> runner.
RunnerFactory = Callable[[Job, Any, Any], PlotRunner]


class Scheduler:
    """Runs the queue's jobs one after another on one plotter."""

    def __init__(self, *, store: Any, recorder: Any, device: Any, prepare: Callable,
                 make_runner: RunnerFactory, clock: Any, shutdown_grace: float,
                 plotter: FarmPlotter | None = None,
                 released: Callable[[], None] = lambda: None):
        """`prepare(job, plotter)` fires with the job's plan (PreparedJob); `plotter`
        is the farm's name for this one (None: take any job); `released()` is told
        when a claimed job was given back, so that other plotters look again."""
        self.plotter = plotter
        self._released = released
        self._store = store
        self._recorder = recorder
        self._device = device
        self._prepare = prepare
        self._make_runner = make_runner
        self._clock = clock
        self._grace = shutdown_grace
        self._state = SchedulerState.STOPPED
        self._again = False
        self._retry = None
        self._step: Deferred | None = None  # the choosing/preparing/ending in progress
        self.runner: PlotRunner | None = None
        self._running: Deferred | None = None
        #: The interrupted job that holds the queue, if any (for the status).
        self.held_by: Job | None = None
        self._unsubscribe_lost: Callable[[], None] | None = None
        #: The runner of a job that ended with the device lost, until the device is back.
        self._lost: PlotRunner | None = None
        #: The connection on which the held job was last checked against the counters.
        self._checked_on: Any = None
        #: Who waits for the running plot's end to be recorded (see when_ended).
        self._end_waiters: list[Deferred[None]] = []

    @property
    def state(self) -> SchedulerState:
        return self._state

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._state = SchedulerState.IDLE
        self._unsubscribe_lost = self._device.on_lost(self._device_lost)
        self.wake()

    @inlineCallbacks
    def stop(self) -> Deferred[None]:
        """Let a running plot go on for the grace time, then pause it at a safe point."""
        state, self._state = self._state, SchedulerState.STOPPED
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._unsubscribe_lost is not None:
            self._unsubscribe_lost()
        if self._step is not None:
            yield when_fired(self._step)
        runner, running = self.runner, self._running
        if runner is not None and running is not None:
            _log.info("shutdown: letting job {job_id} plot on for up to {grace} s",
                      job_id=runner.job_id, grace=self._grace)
            timer = self._clock.callLater(self._grace, runner.stop)
            yield when_fired(running)  # the job's end is recorded by then (see _ended)
            if timer.active():
                timer.cancel()
            else:
                _log.info("shutdown: job {job_id} paused at a safe point, progress saved",
                          job_id=runner.job_id)
        yield self._settle_lost_job()
        _log.debug("scheduler stopped (it was {state})", state=state.value)

    def when_ended(self) -> Deferred[None]:
        """Fires once the running plot's end is recorded (at once when none runs).

        Fails with DiskFull if the disk has no room to record it: the plot has
        stopped, and its end is recorded once there is room, but whoever asked
        (a cancel request) is told now rather than left waiting for space."""
        if self._running is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._end_waiters.append(waiter)
        return waiter

    def _tell_end_waiters(self, result: None | Failure) -> None:
        waiters, self._end_waiters = self._end_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    # -- choosing the next job ---------------------------------------------------

    def wake(self) -> None:
        """Something changed that may let a job start: look, now or once idle."""
        if self._state is SchedulerState.IDLE:
            self._choose()
        elif self._state is not SchedulerState.STOPPED:
            self._again = True

    def _idle(self) -> None:
        if self._state is SchedulerState.STOPPED:
            return
        self._state = SchedulerState.IDLE
        self._step = None
        if self._again:
            self._again = False
            self._choose()

    def _choose(self) -> None:
        plotter = self._device.plotter
        if plotter is None:
            return  # the device's `idle` status wakes us when it connects
        self._state = SchedulerState.CHOOSING
        self._again = False
        step = self._store.next_to_plot(self.plotter)
        step.addCallback(self._chosen, plotter)
        step.addErrback(self._choosing_failed)
        self._step = step

    @inlineCallbacks
    def _settle_held_job(self, held: Job, plotter: Any) -> Deferred[None]:
        """An interrupted job holds the queue and the board kept power: while its
        counters still say how far the board drew, save that (as exact), before
        anything moves the carriage (a stop parks it at home and the counters are
        gone). Once per connection; never fails."""
        if plotter is self._checked_on:
            return
        self._checked_on = plotter
        start = Position.from_dict(held.position)
        if start is None or start.parked or not self._device.position_kept:
            return
        runner, self._lost = self._lost, None
        try:
            if runner is None or runner.job_id != held.id:
                prepared = yield self._prepare(held, plotter)
                runner = self._make_runner(held, prepared, plotter)
            yield plotter.wait_idle()
            steps = yield plotter.query_steps()
            position = runner.position_after_loss((int(steps[0]), int(steps[1])))
            if position is not None:
                yield self._store.save_progress(held.id, runner.progress, position.to_dict())
        except Exception:  # planning, the device or the store: the saved progress stands
            _log.failure("could not check how far job {job_id} got on the plotter",
                         job_id=held.id)

    @inlineCallbacks
    def _settle_lost_job(self) -> Deferred[None]:
        """Stopping after the device came back from a loss, before the queue looked
        at it again: the stop parks the carriage, so read the counters now."""
        plotter = self._device.plotter
        if self._lost is None or plotter is None:
            return
        try:
            held = yield self._store.get(self._lost.job_id)
        except Exception:  # the store: the saved progress stands
            _log.failure("could not read job {job_id}", job_id=self._lost.job_id)
            return
        if held.state == states.INTERRUPTED:
            yield self._settle_held_job(held, plotter)

    def _choosing_failed(self, failure: Failure) -> None:
        if failure.check(DatabaseUnavailable):
            _log.warn("{error}; choosing the next job again in {seconds:.0f} s",
                      error=failure.value, seconds=RETRY_SECONDS)
        elif not failure.check(DatabaseDamaged):  # the store has said that once
            _log.failure("could not choose the next job; trying again in {seconds:.0f} s",
                         failure, seconds=RETRY_SECONDS)
        self._idle()
        if self._state is SchedulerState.STOPPED:
            return
        self._retry = self._clock.callLater(RETRY_SECONDS, self.wake)

    @inlineCallbacks
    def _chosen(self, chosen: tuple[Job | None, Job | None], plotter: Any) -> Deferred[None]:
        job, self.held_by = chosen
        if self.held_by is not None:
            yield self._settle_held_job(self.held_by, plotter)
        if job is None or self._state is SchedulerState.STOPPED:
            if self._state is not SchedulerState.STOPPED:
                self._idle()
            elif job is not None:
                yield self._release(job)
            return
        self._state = SchedulerState.PREPARING
        try:
            prepared = yield self._prepare(job, plotter)
        except DatabaseUnavailable as error:  # its drawing could not be read: not its fault
            if self._state is SchedulerState.STOPPED:
                return
            _log.warn("{error}; job {job_id} is planned again in {seconds:.0f} s", error=error,
                      job_id=job.id, seconds=RETRY_SECONDS)
            self._idle()
            self._retry = self._clock.callLater(RETRY_SECONDS, self.wake)
            return
        except Exception as error:  # whatever stops planning fails this job, not the queue
            if self._state is SchedulerState.STOPPED:
                return
            yield self._record(job.id, states.FAILED, f"could not plan the job: {error}",
                               error=str(error))
            self._idle()
            return
        if self._state is SchedulerState.STOPPED:
            yield self._release(job)  # shutting down: the job stays queued
            return
        if self._device.plotter is not plotter:
            yield self._release(job)
            self._idle()  # the plotter went away meanwhile; its return wakes us
            return
        # Only where it was claimed: on a farm another host may have settled it
        # meanwhile (cancelled it, or marked this host gone).
        claim = {} if self.plotter is None else {"claimed_by": self.plotter.name}
        try:
            yield self._recorder.change(job.id, states.PLOTTING,
                                        "started" if job.position is None
                                        else "continued from the saved progress", **claim)
        except states.InvalidTransition:
            self._idle()  # cancelled while it was being planned: on to the next one
            return
        if self._state is SchedulerState.STOPPED:
            # Stopping while the start was recorded: the next start resumes it.
            yield self._record(job.id, states.INTERRUPTED, "the daemon stopped as the job "
                               "started; resume continues from the saved progress")
            return
        self._run(job, prepared, plotter)

    @inlineCallbacks
    def _release(self, job: Job) -> Deferred[None]:
        """Give back a job claimed but not begun; never fails (the next start frees it)."""
        if self.plotter is None:
            return
        try:
            yield self._store.release(job.id)
        except Exception:  # the store: the claim is freed when the daemon starts again
            _log.failure("could not give job {job_id} back to the queue", job_id=job.id)
            return
        self._released()

    def _run(self, job: Job, prepared: Any, plotter: Any) -> None:
        self._state = SchedulerState.RUNNING
        self._step = None
        runner = self._make_runner(job, prepared, plotter)
        self.runner = runner
        self._device.set_job(job.id, "plotting")
        _log.info("job {job_id} plotting on the device", job_id=job.id)
        self._running = runner.run()
        self._running.addBoth(self._ended, runner)
        # Whatever goes wrong while recording the end is logged here, not left as an
        # "Unhandled error in Deferred" when the Deferred is collected.
        self._running.addErrback(lambda failure: _log.failure(
            "recording the end of job {job_id} failed", failure, job_id=job.id))

    # -- a plot's end ------------------------------------------------------------

    def _device_lost(self, reason: Failure) -> None:
        if self.runner is not None:
            self.runner.device_lost(reason)

    @inlineCallbacks
    def _ended(self, outcome: str | Failure, runner: PlotRunner) -> Deferred[None]:
        """Record how the plot ended; never fails."""
        if self._state is not SchedulerState.STOPPED:
            self._state = SchedulerState.ENDING
        job_id = runner.job_id
        # A cancelled or failed job's carriage is parked: no counter can confirm it.
        fields = {"progress": runner.progress,
                  "position": runner.position.parked_here().to_dict(),
                  "plotting_seconds": runner.plotting_seconds}
        if isinstance(outcome, Failure) and outcome.check(DeviceLost, DeviceTimeout):
            reason = (f"the device was lost: {outcome.getErrorMessage()}; resume "
                      f"continues from the saved progress")
            resume = runner.resume_position
            yield self._record(job_id, states.INTERRUPTED, reason, progress=runner.progress,
                               position=None if resume is None else resume.to_dict(),
                               plotting_seconds=runner.plotting_seconds)
            self._recorder.alert_interrupted(job_id, reason)
            # Checked once the device is back, on its new connection (which may
            # already be up).
            self._lost, self._checked_on = runner, runner.plotter
        elif isinstance(outcome, Failure):
            if not outcome.check(EBBError):
                _log.failure("job {job_id} failed", outcome, job_id=job_id)
            reason = (f"the plotter reported an error: {outcome.getErrorMessage()}"
                      if outcome.check(EBBError) else outcome.getErrorMessage())
            yield self._record(job_id, states.FAILED, reason,
                               error=outcome.getErrorMessage(), **fields)
            try:
                yield self._device.park()
            except Exception:  # the device: its own loss or error status says so
                _log.failure("could not park the plotter after job {job_id} failed",
                             job_id=job_id)
        elif outcome == states.COMPLETED:
            yield self._record(job_id, states.COMPLETED, "plot finished",
                               progress=1.0, position=None,
                               plotting_seconds=runner.plotting_seconds)
        elif outcome == states.CANCELLED:
            yield self._record(job_id, states.CANCELLED, "cancelled by request", **fields)
        # INTERRUPTED by a stop: the runner recorded it.
        self.runner = None
        self._running = None
        self._tell_end_waiters(None)
        forget_frozen()
        self._device.set_job(None)
        if self._state is SchedulerState.STOPPED:
            return None
        yield self._motors_off_if_nothing_waits()
        self._idle()
        self.wake()
        # Once this call has returned and let go of the runner, its plan is freed.
        self._clock.callLater(0, release_freed_memory)
        return None

    @inlineCallbacks
    def _motors_off_if_nothing_waits(self) -> Deferred[None]:
        """Let the motors cool when the queue is empty; never fails."""
        plotter = self._device.plotter
        if plotter is None:
            return
        try:
            job, held_by = yield self._store.next_to_plot(self.plotter, claim=False)
            if job is None and held_by is None:
                yield plotter.motors_off()
        except Exception:  # the device or the store: the next plot switches them on anyway
            _log.failure("could not switch the motors off after a plot")

    @inlineCallbacks
    def _record(self, job_id: str, to_state: str, reason: str, **fields: Any) -> Deferred[None]:
        """A state change that must not stop the queue if the store fails it. On a
        full disk it is tried again every RETRY_SECONDS until space is back (or
        the daemon stops), so that a plot that ended is not left `plotting`."""
        while True:
            try:
                yield self._recorder.change(job_id, to_state, reason, **fields)
                return
            except DiskFull as error:
                self._tell_end_waiters(Failure(error))  # only a plot's end has waiters
                if self._state is SchedulerState.STOPPED:
                    _log.error("disk full: job {job_id} could not be recorded as {state}; "
                               "the next start puts it right", job_id=job_id, state=to_state)
                    return
                _log.warn("disk full: recording job {job_id} as {state} again in "
                          "{seconds:.0f} s", job_id=job_id, state=to_state,
                          seconds=RETRY_SECONDS)
                yield deferLater(self._clock, RETRY_SECONDS, lambda: None)
            except DatabaseUnavailable as error:
                # The farm's database server is away (restarting, the network):
                # the plot's end must not be lost, so it waits for the server.
                if self._state is SchedulerState.STOPPED:
                    _log.error("job {job_id} could not be recorded as {state} ({error}); "
                               "the next start puts it right", job_id=job_id,
                               state=to_state, error=error)
                    return
                _log.warn("{error}: recording job {job_id} as {state} again in "
                          "{seconds:.0f} s", error=error, job_id=job_id, state=to_state,
                          seconds=RETRY_SECONDS)
                yield deferLater(self._clock, RETRY_SECONDS, lambda: None)
            except Exception:  # the store: logged, and the job is put right at the next start
                _log.failure("could not record job {job_id} as {state}", job_id=job_id,
                             state=to_state)
                return
