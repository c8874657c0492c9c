"""Fakes of JobControl and DeviceStatus for testing the web face without a queue or plotter."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from vfab.geometry.errors import OutOfTravel, SVGError
from vfab.jobs.errors import InvalidJobInput, JobNotFound, NoPlotterCanTake, NotAccepting
from vfab.jobs.states import (
    AWAITING_PEN,
    CANCELLED,
    FINISHED,
    INTERRUPTED,
    PAUSED,
    PLOTTING,
    QUEUED,
    InvalidTransition,
    check_transition,
)


class FakeJobs:
    """Keeps jobs in memory and answers as the queue would.

    An SVG without `<svg` is an SVGError; one holding `out-of-travel` is
    OutOfTravel. With `hold` set, every call returns a Deferred that waits in
    `held` until the test fires it.
    """

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.submitted: list[dict[str, Any]] = []
        self.accepting = True
        self.hold = False
        self.held: list[tuple[Deferred[Any], Any]] = []
        self._ids = itertools.count(1)
        #: Where `receive` writes uploads; `submit` removes them, so a test can
        #: tell that nothing was left behind.
        self.uploads = Path(tempfile.mkdtemp(prefix="vfab-fake-uploads-"))

    def add(self, name: str = "job", state: str = QUEUED, priority: int = 0) -> dict[str, Any]:
        number = next(self._ids)
        job = {
            "id": f"job-{number}", "name": name, "state": state, "priority": priority,
            "created_at": f"2026-01-01T00:00:{number:02d}.000Z", "started_at": None,
            "finished_at": None, "layers": 1, "paths": 2, "pen_down_mm": 10.0,
            "pen_up_mm": 5.0, "estimated_seconds": 12.5, "progress": 0.0, "error": None,
        }
        self.jobs[job["id"]] = job
        return job

    def _answer(self, result: Any = None, error: Exception | None = None) -> Deferred[Any]:
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append((d, error if error is not None else result))
            return d
        return fail(error) if error is not None else succeed(result)

    def release(self) -> None:
        """Fire every held call."""
        held, self.held = self.held, []
        for d, outcome in held:
            if isinstance(outcome, Exception):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def receive(self, fill: Any) -> Deferred[tuple[Path, Any]]:
        """As the queue, but at once and in a temporary folder of the fake's own."""
        fd, name = tempfile.mkstemp(dir=self.uploads, prefix=".upload-")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                result = fill(out)
        except Exception as error:  # whatever fill raised is the caller's answer
            path.unlink()
            return fail(error)
        return succeed((path, result))

    def submit(self, name: str, svg: bytes | Path, priority: int = 0, preset: str | None = None,
               plotter: str | None = None, tags: tuple[str, ...] = ()) -> Deferred[dict[str, Any]]:
        if isinstance(svg, Path):
            svg, _ = svg.read_bytes(), svg.unlink()
        farm = {"plotter": plotter, "tags": tags} if plotter or tags else {}
        self.submitted.append({"name": name, "svg": svg, "priority": priority, "preset": preset,
                               **farm})
        if not self.accepting:
            return self._answer(error=NotAccepting())
        if b"<svg" not in svg:
            return self._answer(error=SVGError("not an SVG document: no <svg> element"))
        if b"out-of-travel" in svg:
            return self._answer(error=OutOfTravel("the drawing reaches x=500 mm; "
                                                  "the V3/A3 travels 430 mm"))
        if plotter == "nowhere":
            return self._answer(error=NoPlotterCanTake("no plotter is named 'nowhere'"))
        if preset == "nonesuch":
            return self._answer(error=InvalidJobInput("preset: no preset named 'nonesuch'"))
        return self._answer(dict(self.add(name, priority=priority)))

    def _job(self, job_id: str) -> dict[str, Any]:
        if job_id not in self.jobs:
            raise JobNotFound(job_id)
        return self.jobs[job_id]

    def get(self, job_id: str) -> Deferred[dict[str, Any]]:
        try:
            return self._answer(dict(self._job(job_id)))
        except JobNotFound as error:
            return self._answer(error=error)

    def list(self, state: str | None = None,
             limit: int | None = None) -> Deferred[list[dict[str, Any]]]:
        jobs = [dict(j) for j in reversed(self.jobs.values()) if state in (None, j["state"])]
        return self._answer(jobs[:limit] if limit is not None else jobs)

    def _move(self, job_id: str, to_state: str,
              allowed_from: tuple[str, ...] | None = None) -> Deferred[dict[str, Any]]:
        try:
            job = self._job(job_id)
            if allowed_from is not None and job["state"] not in allowed_from:
                raise InvalidTransition(job_id, job["state"], to_state)
            check_transition(job_id, job["state"], to_state)
        except (JobNotFound, InvalidTransition) as error:
            return self._answer(error=error)
        job["state"] = to_state
        return self._answer(dict(job))

    def pause(self, job_id: str) -> Deferred[dict[str, Any]]:
        return self._move(job_id, PAUSED)

    def resume(self, job_id: str) -> Deferred[dict[str, Any]]:
        return self._move(job_id, PLOTTING, allowed_from=(PAUSED, AWAITING_PEN, INTERRUPTED))

    def cancel(self, job_id: str) -> Deferred[dict[str, Any]]:
        return self._move(job_id, CANCELLED)

    def delete(self, job_id: str) -> Deferred[None]:
        try:
            job = self._job(job_id)
            if job["state"] not in FINISHED:
                raise InvalidTransition(job_id, job["state"], "deleted")
        except (JobNotFound, InvalidTransition) as error:
            return self._answer(error=error)
        del self.jobs[job_id]
        return self._answer(None)

    def preview(self, job_id: str) -> Deferred[dict[str, Any]]:
        try:
            self._job(job_id)
        except JobNotFound as error:
            return self._answer(error=error)
        return self._answer({"layers": [{"name": "1", "paths": [[[0, 0], [10, 10]]]}],
                             "width_mm": 100.0, "height_mm": 50.0})

    def queue_length(self) -> int:
        return sum(1 for j in self.jobs.values() if j["state"] == QUEUED)

    def active_jobs(self) -> int:
        return sum(1 for j in self.jobs.values() if j["state"] in (PLOTTING, PAUSED, AWAITING_PEN))


class FakeDevice:
    """A device whose status the test sets."""

    def __init__(self, status: str = "idle") -> None:
        self.state: dict[str, Any] = {
            "type": "device_status", "device_id": "fake-ebb", "status": status,
            "port": "/dev/null", "firmware_version": "2.8.1", "current_job_id": None,
            "pen": "up", "position_mm": [0.0, 0.0],
        }

    def status(self) -> dict[str, Any]:
        return dict(self.state)


class ClockedReactor:
    """The real reactor for network I/O, a Clock for time.

    A WebService on it listens on a real port while its heartbeat, auth
    timeouts and rate-limit windows move only when the test advances the clock.
    """

    def __init__(self, clock: Any) -> None:
        from twisted.internet import reactor

        self.clock = clock
        self._reactor = reactor

    def callLater(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, f, *args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def getDelayedCalls(self) -> Any:
        return self.clock.getDelayedCalls()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class WebHarness:
    """A WebService on 127.0.0.1, any free port, over the fakes and a Clock."""

    def __init__(self, device_type: str | None = None, **config: Any) -> None:
        from twisted.internet.task import Clock

        from vfab.config import WebSocketConfig
        from vfab.events import EventBus
        from vfab.web.server import WebService

        self.clock = Clock()
        self.clock.advance(1_790_000_000)  # a plausible wall-clock time
        self.reactor = ClockedReactor(self.clock)
        self.jobs = FakeJobs()
        self.device = FakeDevice()
        self.bus = EventBus()
        self.store_ok = True
        options = {key: config.pop(key) for key in ("max_upload_size", "plotters")
                   if key in config}
        self.config = WebSocketConfig(**{"host": "127.0.0.1", "port": 0, **config})
        self.service = WebService(self.config, self.jobs, self.device, self.bus, self.reactor,
                                  health=lambda: self.store_ok, device_type=device_type,
                                  **options)

    @property
    def port(self) -> int:
        assert self.service.port is not None
        return self.service.port

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.port}{path}".encode("ascii")

    def ws_url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"
