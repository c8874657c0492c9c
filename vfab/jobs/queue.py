"""The queue service: accepts jobs, keeps them in the store, plots them in order.

Jobs run one at a time in the contract's order (higher priority first, then
oldest). Every state change is written to the store with its reason and then
announced on the event bus as `job_state_change`.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from vfab.config import DeviceConfig
from vfab.events import EventBus
from vfab.jobs import states
from vfab.jobs.errors import InvalidJobInput, JobNotFound, NotAccepting
from vfab.jobs.job import Job, iso8601
from vfab.jobs.planning import DrawingSummary, PlanningProcess, summarize
from vfab.jobs.planning import preview as read_preview
from vfab.jobs.prepare import device_settings, prepare
from vfab.jobs.runner import PlotRunner, Position
from vfab.plotter.errors import DeviceLost, DeviceTimeout, EBBError
from vfab.store.jobstore import JobStore

_log = Logger()

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME_LENGTH = 200
PREVIEW_POINTS = 20000
_PREVIEW_CACHE = 8


def check_name(name: str) -> str:
    """A job name as people type it: one line, not empty, not absurdly long."""
    name = name.strip()
    if not name:
        raise InvalidJobInput("the job needs a name")
    if _CONTROL.search(name):
        raise InvalidJobInput("the job name must not contain control characters")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidJobInput(f"the job name is longer than {MAX_NAME_LENGTH} characters")
    return name


class QueueService(Service):
    """Implements JobControl (vfab.jobs.control) and drives the plotter."""

    name = "queue"

    def __init__(self, *, store: JobStore, device: Any, bus: EventBus, settings: DeviceConfig,
                 jobs_dir: Path, reactor: Any):
        self._store = store
        self._device = device
        self._bus = bus
        self._settings = settings
        self._jobs_dir = jobs_dir
        self._reactor = reactor
        self._accepting = True
        self._counts: dict[str, int] = {}
        self._runner: PlotRunner | None = None
        self._running: Deferred | None = None
        self._kicking = False
        self._previews: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # Submissions and previews are read in a child process (they may come
        # while another job plots); a job about to start is planned in a thread
        # of its own, when no plot is running to be held up.
        self._planning = PlanningProcess(reactor)
        self._threads = ThreadPool(minthreads=0, maxthreads=1, name="vfab-planning")
        self._unsubscribe = None

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._jobs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._threads.start()
        self._unsubscribe = self._bus.subscribe(self._on_event)
        self._refresh_counts().addCallback(lambda _: self._kick())
        _log.info("queue service started")

    def stop_accepting(self) -> None:
        """Shutdown's first step: no new jobs from now on."""
        if self._accepting:
            self._accepting = False
            _log.info("shutdown: no longer accepting jobs")

    @inlineCallbacks
    def stopService(self) -> Deferred[None]:
        self.stop_accepting()
        yield super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
        runner, running = self._runner, self._running
        if runner is not None and running is not None:
            grace = self._settings.shutdown_grace
            _log.info("shutdown: letting job {job_id} plot on for up to {grace} s",
                      job_id=runner.job_id, grace=grace)
            timer = self._reactor.callLater(grace, runner.stop)
            yield running  # the job's end is recorded by then (see _job_ended)
            if timer.active():
                timer.cancel()
            else:
                _log.info("shutdown: job {job_id} paused at a safe point, progress saved",
                          job_id=runner.job_id)
        self._threads.stop()
        self._planning.stop()
        _log.info("queue service stopped")

    # -- JobControl -------------------------------------------------------------

    @inlineCallbacks
    def submit(self, name: str, svg: bytes, priority: int = 0,
               preset: str | None = None) -> Deferred[dict[str, Any]]:
        if not self._accepting:
            raise NotAccepting()
        name = check_name(name)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidJobInput("priority must be an integer")
        settings = device_settings(self._settings, preset)
        summary: DrawingSummary = yield self._planning.run(summarize, svg, settings)
        job_id = uuid.uuid4().hex[:12]
        svg_file = f"{job_id}.svg"
        path = self._jobs_dir / svg_file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(svg)
        job = Job(id=job_id, name=name, state=states.QUEUED, priority=priority, preset=preset,
                  created_at=iso8601(self._reactor.seconds()), layers=summary.layers,
                  paths=summary.paths, pen_down_mm=summary.pen_down_mm,
                  pen_up_mm=summary.pen_up_mm, estimated_seconds=summary.estimated_seconds,
                  svg_file=svg_file)
        try:
            yield self._store.add(job)
        except Exception:
            path.unlink(missing_ok=True)
            raise
        _log.info("job {job_id} '{name}' queued: {paths} paths, {layers} layers, "
                  "about {seconds:.0f} s", job_id=job_id, name=name, paths=job.paths,
                  layers=job.layers, seconds=job.estimated_seconds)
        self._announce(job, None, "submitted")
        self._kick()
        return job.to_dict()

    @inlineCallbacks
    def get(self, job_id: str) -> Deferred[dict[str, Any]]:
        job = yield self._store.get(job_id)
        return self._live(job).to_dict()

    @inlineCallbacks
    def list(self, state: str | None = None, limit: int | None = None) -> Deferred[list]:
        jobs = yield self._store.list(state=state, limit=limit)
        return [self._live(job).to_dict() for job in jobs]

    def _live(self, job: Job) -> Job:
        """The stored job with the running plot's progress, which is saved only now and then."""
        if self._runner is not None and self._runner.job_id == job.id \
                and job.state == states.PLOTTING:
            return attr.evolve(job, progress=self._runner.progress)
        return job

    @inlineCallbacks
    def pause(self, job_id: str) -> Deferred[dict[str, Any]]:
        job = yield self._store.get(job_id)
        states.check_transition(job_id, job.state, states.PAUSED)
        runner = self._runner_for(job_id)
        if runner is None:
            raise states.InvalidTransition(job_id, job.state, states.PAUSED)
        yield runner.pause()
        result = yield self.get(job_id)
        return result

    @inlineCallbacks
    def resume(self, job_id: str) -> Deferred[dict[str, Any]]:
        job = yield self._store.get(job_id)
        runner = self._runner_for(job_id)
        if job.state in (states.PAUSED, states.AWAITING_PEN) and runner is not None:
            runner.resume()
        elif job.state == states.INTERRUPTED:
            # Back in the queue with its saved progress, which puts it first.
            yield self._change(job_id, states.QUEUED,
                               "resume requested; continues from the saved progress")
            self._kick()
        else:
            raise states.InvalidTransition(job_id, job.state, states.PLOTTING)
        result = yield self.get(job_id)
        return result

    @inlineCallbacks
    def cancel(self, job_id: str) -> Deferred[dict[str, Any]]:
        job = yield self._store.get(job_id)
        states.check_transition(job_id, job.state, states.CANCELLED)
        runner = self._runner_for(job_id)
        if runner is not None:
            running = self._running
            runner.cancel()
            yield running
        else:
            yield self._change(job_id, states.CANCELLED, "cancelled by request")
        result = yield self.get(job_id)
        return result

    @inlineCallbacks
    def delete(self, job_id: str) -> Deferred[None]:
        job = yield self._store.delete(job_id)
        (self._jobs_dir / job.svg_file).unlink(missing_ok=True)
        self._previews.pop(job_id, None)
        _log.info("job {job_id} deleted", job_id=job_id)
        yield self._refresh_counts()

    @inlineCallbacks
    def preview(self, job_id: str) -> Deferred[dict[str, Any]]:
        if job_id in self._previews:
            self._previews.move_to_end(job_id)
            return self._previews[job_id]
        job = yield self._store.get(job_id)
        svg = (self._jobs_dir / job.svg_file).read_bytes()
        settings = device_settings(self._settings, job.preset)
        result = yield self._planning.run(read_preview, svg, settings, PREVIEW_POINTS)
        self._previews[job_id] = result
        while len(self._previews) > _PREVIEW_CACHE:
            self._previews.popitem(last=False)
        return result

    def queue_length(self) -> int:
        return self._counts.get(states.QUEUED, 0)

    def active_jobs(self) -> int:
        return sum(self._counts.get(state, 0) for state in states.ACTIVE)

    def state_counts(self) -> dict[str, int]:
        return {state: self._counts.get(state, 0) for state in states.STATES}

    # -- plotting ----------------------------------------------------------------

    def _runner_for(self, job_id: str) -> PlotRunner | None:
        if self._runner is not None and self._runner.job_id == job_id:
            return self._runner
        return None

    def _on_event(self, channel: str, message: dict[str, Any]) -> None:
        if channel == "device" and message.get("type") == "device_status" \
                and message.get("status") == "idle":
            self._kick()

    def _kick(self) -> None:
        """Start the next job if the plotter is free and connected.

        While a job is interrupted nothing new starts: its drawing is half on
        the paper, and a person decides to resume or cancel it first.
        """
        if self._kicking or self._runner is not None or not self._accepting or not self.running:
            return
        if self._counts.get(states.INTERRUPTED, 0):
            return
        plotter = self._device.plotter
        if plotter is None:
            return
        self._kicking = True
        d = self._store.next_queued()
        d.addCallback(self._start_job, plotter)
        d.addErrback(lambda failure: _log.failure("could not start the next job", failure))

        def done(result: Any) -> Any:
            self._kicking = False
            return result

        d.addBoth(done)

    @inlineCallbacks
    def _start_job(self, job: Job | None, plotter: Any) -> Deferred[None]:
        if job is None:
            return
        settings = device_settings(self._settings, job.preset)
        svg = (self._jobs_dir / job.svg_file).read_bytes()
        use_lm = plotter.supports_lm
        try:
            prepared = yield self._in_thread(prepare, svg, settings, use_lm=use_lm)
        except Exception as error:  # whatever stops planning fails this job, not the queue
            yield self._change(job.id, states.FAILED, f"could not plan the job: {error}",
                               error=str(error))
            self._reactor.callLater(0, self._kick)
            return
        start = Position.from_dict(job.position)
        try:
            yield self._change(job.id, states.PLOTTING, "started" if job.position is None
                               else "continued from the saved progress")
        except states.InvalidTransition:
            # Cancelled while it was being planned: on to the next one.
            self._reactor.callLater(0, self._kick)
            return
        self._device.set_job(job.id, "plotting")
        runner = PlotRunner(
            job_id=job.id, plan=prepared.plan, plotter=plotter, device=self._device,
            settings=settings, clock=self._reactor,
            publish=lambda message: self._bus.publish(
                "system" if message["type"] == "system_alert" else "jobs", message),
            transition=lambda to_state, reason, **fields: self._change(
                job.id, to_state, reason, **fields),
            save_progress=lambda progress, position: self._store.save_progress(
                job.id, progress, position),
            start=start, use_lm=use_lm, layer_settings=prepared.layer_settings)
        self._runner = runner
        _log.info("job {job_id} plotting on the device", job_id=job.id)
        self._running = runner.run()
        self._running.addBoth(self._job_ended, runner)

    @inlineCallbacks
    def _job_ended(self, outcome: str | Failure, runner: PlotRunner) -> Deferred[None]:
        job_id = runner.job_id
        fields = {"progress": runner.progress, "position": runner.position.to_dict()}
        try:
            if isinstance(outcome, Failure):
                if outcome.check(DeviceLost, DeviceTimeout):
                    reason = (f"the device was lost: {outcome.getErrorMessage()}; resume "
                              f"continues from the saved progress")
                    yield self._change(job_id, states.INTERRUPTED, reason,
                                       progress=runner.progress,
                                       position=runner.resume_position.to_dict())
                    self._alert_interrupted(job_id, reason)
                elif outcome.check(EBBError):
                    reason = f"the plotter reported an error: {outcome.getErrorMessage()}"
                    yield self._change(job_id, states.FAILED, reason,
                                       error=outcome.getErrorMessage(), **fields)
                    yield self._device.park()
                else:
                    _log.failure("job {job_id} failed", outcome, job_id=job_id)
                    yield self._change(job_id, states.FAILED, outcome.getErrorMessage(),
                                       error=outcome.getErrorMessage(), **fields)
                    yield self._device.park()
            elif outcome == states.COMPLETED:
                yield self._change(job_id, states.COMPLETED, "plot finished",
                                   progress=1.0, position=None)
            elif outcome == states.CANCELLED:
                yield self._change(job_id, states.CANCELLED, "cancelled by request", **fields)
            # INTERRUPTED by a stop: the runner already recorded it.
        except Exception:
            _log.failure("could not record the end of job {job_id}", job_id=job_id)
        finally:
            self._runner = None
            self._running = None
            self._device.set_job(None)
        if self.running and self._accepting:
            next_job = yield self._store.next_queued()
            if next_job is None and self._device.plotter is not None:
                yield self._device.plotter.motors_off()
            self._kick()

    # -- state changes ---------------------------------------------------------

    @inlineCallbacks
    def _change(self, job_id: str, to_state: str, reason: str, **fields: Any) -> Deferred[Job]:
        before, after = yield self._store.transition(job_id, to_state, reason, **fields)
        if self._runner is not None and self._runner.job_id == job_id:
            if to_state == states.PLOTTING:
                self._device.set_job(job_id, "plotting")
            elif to_state in (states.PAUSED, states.AWAITING_PEN):
                self._device.set_job(job_id, "paused")
        _log.info("job {job_id}: {from_state} -> {to_state} ({reason})", job_id=job_id,
                  from_state=before.state, to_state=to_state, reason=reason)
        self._announce(after, before.state, reason)
        return after

    def _alert_interrupted(self, job_id: str, reason: str) -> None:
        self._bus.publish("system", {
            "type": "system_alert", "severity": "error", "title": "Plot interrupted",
            "message": f"Job {job_id} was interrupted ({reason}). The queue waits: resume "
                       f"the job to finish the drawing, or cancel it."})

    def _announce(self, job: Job, from_state: str | None, reason: str) -> None:
        self._counts[job.state] = self._counts.get(job.state, 0) + 1
        if from_state is not None:
            self._counts[from_state] = max(0, self._counts.get(from_state, 0) - 1)
        self._bus.publish("jobs", {
            "type": "job_state_change",
            "job_id": job.id,
            "from_state": from_state,
            "to_state": job.state,
            "reason": reason,
            "job": job.to_dict(),
        })

    @inlineCallbacks
    def _refresh_counts(self) -> Deferred[None]:
        self._counts = yield self._store.counts()

    def _in_thread(self, function: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._threads, function, *args, **kwargs)
