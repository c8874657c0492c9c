"""The queue service: the face of the jobs layer that the HTTP API and WebSocket use.

It checks what clients ask for and wires the pieces that do the work: the
drawing files (DrawingFiles), the record of state changes (StateRecorder),
and one Scheduler per plotter, the one owner of what plots next there, which
runs each job's PlotRunner. Each plotter runs one job at a time, the next it
can take in the contract's order (higher priority first, then oldest); the
store's claim makes sure no two plotters take the same job.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence, TypeVar

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from vfab.config import DeviceConfig
from vfab.events import EventBus
from vfab.geometry import SVGLimits
from vfab.jobs import states
from vfab.disk import DiskSpace
from vfab.jobs.errors import (DatabaseDamaged, DatabaseUnavailable, DiskFull, InvalidJobInput,
                              NotAccepting)
from vfab.jobs.farm import FarmPlotter, check_takers
from vfab.jobs.job import PRIORITY_RANGE, Job, iso8601
from vfab.jobs.layers import layer_settings
from vfab.jobs.planning import (DrawingSummary, PlanningProcess, plan_to_file,
                                preview_from_plan, summarize)
from vfab.jobs.planning import preview as read_preview
from vfab.jobs.prepare import device_settings
from vfab.motion.planfile import FilePlan, PlanFormatError, fingerprint
from vfab.jobs.files import DrawingFiles
from vfab.jobs.previews import PreviewCache
from vfab.jobs.recorder import StateRecorder
from vfab.jobs.position import Position
from vfab.jobs.runner import PlotRunner
from vfab.jobs.scheduler import Scheduler
from vfab.store.jobstore import JobStore

_log = Logger()

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME_LENGTH = 200
PREVIEW_POINTS = 20000
#: Uploads written to disk at once; more wait for a thread.
UPLOAD_THREADS = 2

T = TypeVar("T")


@attr.s(frozen=True, auto_attribs=True)
class PlannedJob:
    """What a job's run needs: its plan, read from its file as the plot goes, and
    the device settings of each layer."""

    plan: FilePlan
    layer_settings: tuple[DeviceConfig, ...]


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
    """Implements JobControl (vfab.jobs.control): checks requests, keeps the drawings,
    and hands the plotting to the Scheduler."""

    name = "queue"

    def __init__(self, *, store: JobStore, devices: Sequence[Any], bus: EventBus,
                 jobs_dir: Path, reactor: Any, planning: Any = None, prepare_job: Any = None,
                 disk: DiskSpace | None = None, limits: SVGLimits = SVGLimits()):
        """`devices`: one DeviceService per plotter, each with its `config` (the
        plot settings), `plotter_name`, `host` and `tags`; the first is the one a
        single-plotter client sees. `planning` reads submissions and previews (a
        PlanningProcess by default); `prepare_job(job, settings, use_lm=)` fires
        with the PlannedJob of a job about to start (its plan file, planned again
        through `planning` when its settings changed). Tests inject them to run
        in-process on a Clock. `disk` is told of a full disk and holds the room a
        delete needs then; `limits` bound the drawings read."""
        if not devices:
            raise ValueError("the queue needs at least one plotter")
        self._limits = limits
        self._disk = disk
        self._store = store
        self.devices = list(devices)
        self.farm = [FarmPlotter(name=device.plotter_name, host=device.host, tags=device.tags)
                     for device in self.devices]
        self._bus = bus
        self._reactor = reactor
        self._accepting = True
        self.files = DrawingFiles(jobs_dir, on_disk_full=disk.noticed_full if disk else None)
        self._previews = PreviewCache()
        self.recorder = StateRecorder(store, bus,
                                      release_reserve=disk.release_reserve if disk else None)
        # Submissions are read and planned in a child process, once: the plan is a
        # file the runner reads as it plots. Previews, and plans made again for
        # changed settings, are made in a child too.
        self._planning = planning if planning is not None else PlanningProcess(reactor)
        self._upload_threads = ThreadPool(minthreads=0, maxthreads=UPLOAD_THREADS,
                                          name="vfab-uploads")
        self._prepare_job = prepare_job if prepare_job is not None else self._open_plan
        #: plotter name -> its scheduler, in the configuration's order.
        self.schedulers = {
            plotter.name: self._scheduler_for(plotter, device)
            for plotter, device in zip(self.farm, self.devices)}
        self._unsubscribe = None
        #: On a farm (set by vfab.farmlink): the other hosts' plotters with their
        #: model, and their statuses.
        self.remote_plotters: Callable[[], list[tuple[FarmPlotter, str | None]]] = list
        self.remote_statuses: Callable[[], list[dict[str, Any]]] = list

    def _scheduler_for(self, plotter: FarmPlotter, device: Any) -> Scheduler:
        return Scheduler(
            store=self._store, recorder=self.recorder, device=device,
            prepare=lambda job, connected: self._plan_for(device, job, connected),
            make_runner=lambda job, prepared, connected: self._runner_for_job(
                device, job, prepared, connected),
            clock=self._reactor, shutdown_grace=device.config.shutdown_grace,
            plotter=plotter, released=self.wake_all)

    @property
    def scheduler(self) -> Scheduler:
        """The first plotter's scheduler (the only one of a single-plotter daemon)."""
        return next(iter(self.schedulers.values()))

    def wake_all(self) -> None:
        """Every plotter looks for a job it can take (one may be free now)."""
        for scheduler in self.schedulers.values():
            scheduler.wake()

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.files.create_directory()
        self.files.remove_stale_uploads()
        self._upload_threads.start()
        self._planning.start()
        self._unsubscribe = self._bus.subscribe(self._on_event, remote=True)
        starting = self.recorder.refresh().addCallback(lambda _: self._store.adopt(self.farm))
        starting.addCallback(self._adopted)
        starting.addErrback(self._settling_failed)
        starting.addCallback(lambda _: self._start_schedulers())
        _log.info("queue service started")

    def _adopted(self, changed: int) -> None:
        if changed:
            _log.info("{count} job(s) handed over: their plotter is no longer configured, "
                      "or they were claimed as the daemon last stopped", count=changed)

    @staticmethod
    def _settling_failed(failure: Failure) -> None:
        if failure.check(DatabaseUnavailable):
            _log.warn("could not settle which plotter holds which job: {error}",
                      error=failure.value)
        elif not failure.check(DatabaseDamaged):  # the store has said that once
            _log.failure("could not settle which plotter holds which job", failure)

    def _start_schedulers(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

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
        yield DeferredList([scheduler.stop() for scheduler in self.schedulers.values()])
        self._upload_threads.stop()
        yield self._planning.stop()
        _log.info("queue service stopped")

    # -- JobControl -------------------------------------------------------------

    def receive(self, fill: Callable[[BinaryIO], T]) -> Deferred[tuple[Path, T]]:
        """Write an upload to a file of its own with `fill(out)`, in a thread: a
        body of tens of megabytes is copied (or a form parsed) off the reactor.
        Fires with the file, to `submit`, and what `fill` returned."""

        def disk_full(failure: Any) -> Any:
            if failure.check(DiskFull):
                self.files.disk_full(failure.value.what)
            return failure

        return deferToThreadPool(self._reactor, self._upload_threads, self.files.spool,
                                 fill).addErrback(disk_full)

    def submit(self, name: str, svg: bytes | Path, priority: int = 0, preset: str | None = None,
               plotter: str | None = None,
               tags: tuple[str, ...] = ()) -> Deferred[dict[str, Any]]:
        """`svg` is the drawing, or the file `receive` wrote it to: that file
        becomes the job's drawing (renamed) or, if the job is refused, goes."""
        submitting = self._submit(name, svg, priority, preset, plotter, tags)
        if isinstance(svg, Path):
            submitting.addErrback(self._discard_upload, svg)
        return submitting

    @staticmethod
    def _discard_upload(failure: Any, upload: Path) -> Any:
        upload.unlink(missing_ok=True)
        return failure

    @inlineCallbacks
    def _submit(self, name: str, svg: bytes | Path, priority: int, preset: str | None,
                plotter: str | None, tags: tuple[str, ...]) -> Deferred[dict[str, Any]]:
        if not self._accepting:
            raise NotAccepting()
        name = check_name(name)
        low, high = PRIORITY_RANGE
        if not isinstance(priority, int) or isinstance(priority, bool) \
                or not low <= priority <= high:
            raise InvalidJobInput(f"priority: expected an integer from {low} to {high}, "
                                  f"got {priority!r:.40}")
        tags = tuple(tags)
        remote = self.remote_plotters()
        takers = check_takers([*self.farm, *(other for other, _ in remote)], plotter, tags)
        configs = [device.config for candidate, device in zip(self.farm, self.devices)
                   if candidate in takers]
        # Another host's plotter: its model's travel, with this host's settings.
        configs += [attr.evolve(self.devices[0].config, model=model)
                    for other, model in remote if other in takers and model is not None]
        configs = configs or [self.devices[0].config]
        summary: DrawingSummary | None = None
        # The drawing must fit every plotter that may take it: it is planned once
        # for each model among them; the first plotter's figures are kept.
        models: dict[str, DeviceConfig] = {}
        for config in configs:
            models.setdefault(config.model, config)
        job_id = uuid.uuid4().hex[:12]
        plan_file = f"{job_id}.plan"
        try:
            planned_with = None
            for config in models.values():
                settings = device_settings(config, preset)
                if planned_with is None:
                    # The first plotter's plan, written by the child: the daemon
                    # keeps only its name and figures.
                    figures = yield self._planning.run(
                        plan_to_file, svg, settings, self._limits,
                        self.files.directory / plan_file)
                    planned_with = fingerprint(settings, use_lm=True)
                else:
                    figures = yield self._planning.run(summarize, svg, settings, self._limits)
                summary = summary or figures
            assert summary is not None
            if not self._accepting:
                raise NotAccepting()
            if isinstance(svg, Path):
                svg_file = self.files.adopt(job_id, svg)
            else:
                svg_file = self.files.write(job_id, svg)
            # A farm: the drawing goes into the database with the job, for
            # whichever host plots it (this host's file and plan are its cache).
            drawing = None if not self._store.keeps_drawings else (yield deferToThreadPool(
                self._reactor, self._upload_threads, self.files.read, svg_file))
        except BaseException as error:
            self.files.remove(plan_file)
            if isinstance(error, DiskFull):
                self.files.disk_full(error.what)
            raise
        job = Job(id=job_id, name=name, state=states.QUEUED, priority=priority, preset=preset,
                  created_at=iso8601(self._reactor.seconds()), layers=summary.layers,
                  paths=summary.paths, pen_down_mm=summary.pen_down_mm,
                  pen_up_mm=summary.pen_up_mm, estimated_seconds=summary.estimated_seconds,
                  svg_file=svg_file, plotter=plotter, tags=tags, plan_file=plan_file,
                  plan_fingerprint=planned_with)
        try:
            yield self._store.add(job, drawing)
        except Exception:
            self.files.remove(svg_file)
            self.files.remove(plan_file)
            raise
        factor = self._time_factor(configs[0])
        here = (f"about {job.estimated_seconds:.0f} s" if factor == 1.0 else
                f"about {job.estimated_seconds / factor:.0f} s here "
                f"({job.estimated_seconds:.0f} s on an AxiDraw)")
        _log.info("job {job_id} '{name}' queued: {paths} paths, {layers} layers, {here}",
                  job_id=job_id, name=name, paths=job.paths, layers=job.layers, here=here)
        self.recorder.announce(job, None, "submitted")
        self.wake_all()
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
        runner = self._runner(job.id)
        if runner is not None and job.state == states.PLOTTING:
            return attr.evolve(job, progress=runner.progress)
        return job

    def _scheduler_of(self, job_id: str) -> Scheduler | None:
        """The scheduler whose plotter runs the job now, if any."""
        for scheduler in self.schedulers.values():
            if scheduler.runner is not None and scheduler.runner.job_id == job_id:
                return scheduler
        return None

    def _runner(self, job_id: str) -> PlotRunner | None:
        scheduler = self._scheduler_of(job_id)
        return None if scheduler is None else scheduler.runner

    @inlineCallbacks
    def pause(self, job_id: str) -> Deferred[dict[str, Any]]:
        job = yield self._store.get(job_id)
        runner = self._runner(job_id)
        if runner is None:
            raise states.InvalidTransition(job_id, job.state, states.PAUSED)
        yield runner.pause()
        result = yield self.get(job_id)
        return result

    @inlineCallbacks
    def resume(self, job_id: str) -> Deferred[dict[str, Any]]:
        job = yield self._store.get(job_id)
        runner = self._runner(job_id)
        if runner is not None:
            runner.resume()
        elif job.state == states.INTERRUPTED:
            # Back in the queue with its saved progress, which puts it first.
            yield self.recorder.change(job_id, states.QUEUED,
                                       "resume requested; continues from the saved progress")
            self.wake_all()
        else:
            raise states.InvalidTransition(job_id, job.state, states.PLOTTING)
        result = yield self.get(job_id)
        return result

    @inlineCallbacks
    def cancel(self, job_id: str) -> Deferred[dict[str, Any]]:
        job = yield self._store.get(job_id)
        scheduler = self._scheduler_of(job_id)
        if scheduler is not None and scheduler.runner is not None:
            ended = scheduler.when_ended()
            scheduler.runner.cancel()
            try:
                yield ended
            except DiskFull:
                raise DiskFull(f"that job {job_id} is cancelled",
                               "its plot has stopped (pen up, carriage home), and the "
                               "cancel is recorded by itself once space is freed") from None
        else:
            states.check_transition(job_id, job.state, states.CANCELLED)
            yield self.recorder.change(job_id, states.CANCELLED, "cancelled by request")
            self.wake_all()
        result = yield self.get(job_id)
        return result

    @inlineCallbacks
    def delete(self, job_id: str) -> Deferred[None]:
        try:
            job = yield self._store.delete(job_id)
        except DiskFull:
            # Deleting is how space is freed through the API: give the database
            # the room set aside for this, once.
            if self._disk is None or not self._disk.release_reserve(f"delete job {job_id}"):
                raise
            job = yield self._store.delete(job_id)
        self.files.remove(job.svg_file)
        if job.plan_file:
            self.files.remove(job.plan_file)
        self._previews.forget(job_id)
        _log.info("job {job_id} deleted", job_id=job_id)
        yield self.recorder.refresh()

    @inlineCallbacks
    def preview(self, job_id: str) -> Deferred[dict[str, Any]]:
        cached = self._previews.get(job_id)
        if cached is not None:
            return cached
        job = yield self._store.get(job_id)
        if job.plan_file and (self.files.directory / job.plan_file).exists():
            result = yield self._planning.run(preview_from_plan,
                                              self.files.directory / job.plan_file,
                                              PREVIEW_POINTS)
        else:
            svg = yield self._drawing(job)
            settings = device_settings(self._device_of(job).config, job.preset)
            result = yield self._planning.run(read_preview, svg, settings, PREVIEW_POINTS,
                                              self._limits)
        self._previews.put(job_id, result)
        return result

    def _device_of(self, job: Job) -> Any:
        """The device of the plotter that took (or was asked for) the job, else the first."""
        name = job.taken_by or job.plotter
        for plotter, device in zip(self.farm, self.devices):
            if plotter.name == name:
                return device
        return self.devices[0]

    def plotters(self) -> list[dict[str, Any]]:
        """Every plotter's `device_status`: this host's in the configuration's order,
        then the farm's other hosts' as last heard."""
        return [device.status() for device in self.devices] + self.remote_statuses()

    def plotter_records(self) -> list[dict[str, Any]]:
        """This host's plotters as its heartbeat tells the farm."""
        return [{"name": plotter.name, "tags": list(plotter.tags), "model": device.config.model,
                 "status": device.status()} for plotter, device in zip(self.farm, self.devices)]

    def queue_length(self) -> int:
        return self.recorder.count(states.QUEUED)

    def active_jobs(self) -> int:
        return sum(self.recorder.count(state) for state in states.ACTIVE)

    def state_counts(self) -> dict[str, int]:
        return self.recorder.state_counts()

    # -- plotting ----------------------------------------------------------------

    def _on_event(self, channel: str, message: dict[str, Any]) -> None:
        if channel == "device" and message.get("type") == "device_status" \
                and message.get("status") == "idle":
            scheduler = self.schedulers.get(message.get("plotter"))
            if scheduler is not None:
                scheduler.wake()
            else:
                self.wake_all()

    def _drawing(self, job: Job) -> Deferred[bytes]:
        """A job's drawing: its file, else (a farm, another host received it) the
        database's copy."""
        if self._store.keeps_drawings and not (self.files.directory / job.svg_file).exists():
            return self._store.drawing(job.id)
        return maybeDeferred(self.files.read, job.svg_file)

    def _plan_for(self, device: Any, job: Job, plotter: Any) -> Deferred[PlannedJob]:
        settings = device_settings(device.config, job.preset)
        if not self._store.keeps_drawings or (self.files.directory / job.svg_file).exists():
            return self._prepare_job(job, settings, use_lm=plotter.supports_lm)
        # A farm: another host received the job; its drawing comes from the
        # database into this host's jobs folder, where its plan is made.
        fetching = self._store.drawing(job.id).addCallback(
            lambda svg: self.files.write(job.id, svg))
        return fetching.addCallback(
            lambda _: self._prepare_job(job, settings, use_lm=plotter.supports_lm))

    @inlineCallbacks
    def _open_plan(self, job: Job, settings: DeviceConfig, *,
                   use_lm: bool) -> Deferred[PlannedJob]:
        """The job's plan file, opened; planned again in a child first when the
        settings that shape the plan (or the firmware's commands) are not those it
        was planned with, or it is missing or of another format."""
        wanted = fingerprint(settings, use_lm=use_lm)
        plan_file = job.plan_file or f"{job.id}.plan"
        plan = self._read_plan(plan_file, wanted)
        if plan is None:
            why = ("it was planned before plans were kept" if job.plan_file is None else
                   "its plan file is missing or unreadable" if job.plan_fingerprint is None
                   or job.plan_fingerprint == wanted else
                   "the settings or the firmware differ from those it was planned for")
            _log.info("job {job_id}: planning again in a child process: {why}",
                      job_id=job.id, why=why)
            yield self._planning.run(plan_to_file, self.files.directory / job.svg_file,
                                     settings, self._limits,
                                     self.files.directory / plan_file, use_lm)
            yield self._store.set_plan(job.id, plan_file, wanted)
            plan = self._read_plan(plan_file, wanted)
            if plan is None:
                raise PlanFormatError(f"the plan of job {job.id} could not be read back")
        return PlannedJob(plan=plan, layer_settings=tuple(
            layer_settings(layer.name, settings) for layer in plan.layers))

    def _read_plan(self, plan_file: str, wanted: str) -> FilePlan | None:
        """The plan in `plan_file` if it was planned with fingerprint `wanted`."""
        try:
            plan = FilePlan(self.files.directory / plan_file)
        except (OSError, PlanFormatError, ValueError, KeyError):
            return None
        if plan.fingerprint != wanted:
            plan.close()
            return None
        return plan

    def _runner_for_job(self, device: Any, job: Job, prepared: PlannedJob,
                        plotter: Any) -> PlotRunner:
        settings = device_settings(device.config, job.preset)
        resuming = job.position is not None
        return PlotRunner(
            job_id=job.id, plan=prepared.plan, plotter=plotter, device=device,
            settings=settings, clock=self._reactor,
            publish=lambda message: self._bus.publish(
                "system" if message["type"] == "system_alert" else "jobs", message),
            transition=lambda to_state, reason, **fields: self._runner_changed(
                device, job.id, to_state, reason, **fields),
            save_progress=lambda progress, position, plotting_seconds: (
                self._store.save_progress(job.id, progress, position,
                                          plotting_seconds=plotting_seconds)),
            start=Position.from_dict(job.position),
            position_kept=resuming and device.position_kept,
            use_lm=plotter.supports_lm, layer_settings=prepared.layer_settings,
            time_factor=self._time_factor(device.config), plotted_before=job.plotting_seconds)

    def _runner_changed(self, device: Any, job_id: str, to_state: str, reason: str,
                        **fields: Any) -> Deferred[Job]:
        """A state change of the running job, which its device's status follows."""
        changing = self.recorder.change(job_id, to_state, reason, **fields)

        def follow(job: Job) -> Job:
            if to_state == states.PLOTTING:
                device.set_job(job_id, "plotting")
            elif to_state in (states.PAUSED, states.AWAITING_PEN):
                device.set_job(job_id, "paused")
            return job

        return changing.addCallback(follow)

    @staticmethod
    def _time_factor(settings: DeviceConfig) -> float:
        """How much faster than the real plotter this one runs (the virtual one may)."""
        return settings.simulator_speed if settings.type == "simulator" else 1.0
