"""The HTTP API under /api and /health (contract section 3).

Every answer is JSON; errors use the shared `{"error": {...}}` shape. Job
calls return Deferreds, so requests are answered later (NOT_DONE_YET), and a
client that hangs up meanwhile is simply not answered.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from vfab.config import plotter_name
from vfab.geometry.errors import SVGError
from vfab.jobs.control import DeviceStatus, JobControl
from vfab.jobs.errors import InvalidJobInput
from vfab.jobs.farm import parse_tags
from vfab.jobs.job import PRIORITY_RANGE
from vfab.jobs.states import STATES
from vfab.web.errors import client_error
from vfab.web.multipart import MultipartError, copy_body, copy_form, is_multipart
from vfab.web.query import query_pairs, query_value
from vfab.web.responses import (
    error_body,
    json_body,
    method_not_allowed,
    not_found,
    write_empty,
    write_error,
    write_json,
)
from vfab.web.system import SystemMonitor
from vfab.web.timestamps import utc_timestamp

_log = Logger()

JOB_ACTIONS = ("pause", "resume", "cancel")
#: The most jobs one `GET /api/jobs?limit=` asks for.
MAX_LIST_LIMIT = 1_000_000
_DECIMAL = re.compile(r"[+-]?[0-9]+")
#: More significant digits than any range the API takes: int() never sees more.
_MAX_DIGITS = 20


class BadInput(InvalidJobInput):
    """A request parameter the API itself refuses (400 invalid_input)."""


def render_later(request: IRequest, work: Callable[[], Deferred[Any]],
                 answer: Callable[[IRequest, Any], None]) -> int:
    """Run `work` and answer with `answer(request, result)` once it fires.

    Known errors become their 4xx/5xx response, anything else a logged 500.
    If the client hangs up first, the result is dropped quietly.
    """
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)

    def succeeded(result: Any) -> None:
        if not gone:
            answer(request, result)

    def failed(failure: Failure) -> None:
        if gone:  # e.g. its body closed under the copy: the client is not waiting
            _log.info("{method} {path}: the client hung up before the answer ({error})",
                      method=request.method.decode("ascii", "replace"),
                      path=request.path.decode("utf-8", "replace"),
                      error=failure.getErrorMessage())
            return
        known = client_error(failure)
        if known is None:
            _log.failure("{method} {path} failed", failure,
                         method=request.method.decode("ascii", "replace"),
                         path=request.path.decode("utf-8", "replace"))
            known = (500, "internal_error",
                     "the daemon failed to handle this request; its log has the details")
        write_error(request, *known)

    def unanswerable(failure: Failure) -> None:
        _log.failure("could not answer {path}", failure,
                     path=request.path.decode("utf-8", "replace"))

    maybeDeferred(work).addCallbacks(succeeded, failed).addErrback(unanswerable)
    return NOT_DONE_YET


def _arg(request: IRequest, name: str) -> str | None:
    return query_value(request.uri, name)


def _integer(name: str, text: str | None, low: int, high: int) -> int | None:
    """An integer parameter in `low`..`high`, or None if absent.

    Only plain decimal digits count (int() would also take '1_000' and other
    scripts' digits), and the range is checked here so that no value can
    overflow the database (10**30 was a 500 from SQLite). The value decides,
    not the spelling: leading zeros are dropped before the digits are counted,
    so '0000000000000000000000005' is 5, and a long text costs one linear scan.
    """
    if text is None or text.strip() == "":
        return None
    text = text.strip()
    wanted = f"{name}: expected an integer from {low} to {high}"
    if not _DECIMAL.fullmatch(text):
        raise BadInput(f"{wanted}, got {text!r:.40}")
    digits = text.lstrip("+-").lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS:
        raise BadInput(f"{wanted}, got {text:.40}")
    value = -int(digits) if text.startswith("-") else int(digits)
    if not low <= value <= high:
        raise BadInput(f"{wanted}, got {text:.40}")
    return value


class Upload:
    """What POST /api/jobs asks for: the SVG (in the file it was received into)
    and the job's name, priority and preset, from the form or the query, and the
    plotter it asks for and the tags it requires (`tags=a3,fine` or `tags` given
    more than once)."""

    def __init__(self, request: IRequest, svg: Path, fields: dict[str, str],
                 filename: str | None):
        def field(name: str) -> str | None:
            return fields[name] if name in fields else _arg(request, name)

        self.svg = svg
        self.name: str = field("name") or _stem(filename) or "untitled"
        self.priority: int = _integer("priority", field("priority"), *PRIORITY_RANGE) or 0
        self.preset: str | None = field("preset") or None
        self.plotter: str | None = field("plotter") or None
        if self.plotter is not None:
            try:
                plotter_name(self.plotter)
            except ValueError as error:
                raise BadInput(f"plotter: {error}") from None
        tags = [fields["tags"]] if "tags" in fields else \
            [value for key, value in query_pairs(request.uri) if key == "tags"]
        self.tags: tuple[str, ...] = parse_tags(",".join(tags))


def _stem(filename: str | None) -> str | None:
    if not filename:
        return None
    return PurePosixPath(filename.replace("\\", "/")).stem or None


class HealthResource(Resource):
    """GET /health: never needs the key, so supervisors can probe it."""

    isLeaf = True

    def __init__(self, monitor: SystemMonitor):
        super().__init__()
        self._monitor = monitor

    def render(self, request: IRequest) -> bytes:
        if request.postpath not in ([], [b""]):
            return not_found(request)
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, [b"GET"])
        return json_body(request, 200, self._monitor.health())


class APIResource(Resource):
    """Everything under /api: jobs and the device."""

    isLeaf = True

    def __init__(self, jobs: JobControl, device: DeviceStatus, clock: IReactorTime, *,
                 plotters: Callable[[], list[dict[str, Any]]] | None = None):
        super().__init__()
        self._jobs = jobs
        self._device = device
        self._plotters = plotters or (lambda: [device.status()])
        self._clock = clock

    def render(self, request: IRequest) -> bytes | int:
        segments = [s.decode("utf-8", "replace") for s in request.postpath]
        if segments and segments[-1] == "":
            segments.pop()
        method = b"GET" if request.method == b"HEAD" else request.method
        try:
            return self._route(request, method, segments)
        except BadInput as error:
            return error_body(request, 400, "invalid_input", str(error))

    def _route(self, request: IRequest, method: bytes, segments: list[str]) -> bytes | int:
        match segments:
            case ["jobs"]:
                if method == b"GET":
                    return self._list(request)
                if method == b"POST":
                    return self._submit(request)
                return method_not_allowed(request, [b"GET", b"POST"])
            case ["jobs", job_id]:
                if method == b"GET":
                    return render_later(request, lambda: self._jobs.get(job_id), _job)
                if method == b"DELETE":
                    return render_later(request, lambda: self._jobs.delete(job_id), _deleted)
                return method_not_allowed(request, [b"GET", b"DELETE"])
            case ["jobs", job_id, action] if action in JOB_ACTIONS:
                if method != b"POST":
                    return method_not_allowed(request, [b"POST"])
                act = getattr(self._jobs, action)
                return render_later(request, lambda: act(job_id), _job)
            case ["jobs", job_id, "preview"]:
                if method != b"GET":
                    return method_not_allowed(request, [b"GET"])
                return render_later(request, lambda: self._jobs.preview(job_id), _document)
            case ["device"]:
                if method != b"GET":
                    return method_not_allowed(request, [b"GET"])
                status = {"timestamp": utc_timestamp(self._clock.seconds()),
                          **self._device.status(), "type": "device_status"}
                return json_body(request, 200, status)
            case ["plotters"]:
                if method != b"GET":
                    return method_not_allowed(request, [b"GET"])
                stamp = utc_timestamp(self._clock.seconds())
                return json_body(request, 200, {"plotters": [
                    {"timestamp": stamp, **status, "type": "device_status"}
                    for status in self._plotters()]})
        return not_found(request)

    def _list(self, request: IRequest) -> bytes | int:
        state = _arg(request, "state")
        if state is not None:
            state = state.strip().lower()
            if state not in STATES:
                raise BadInput(f"state: expected one of {', '.join(STATES)}, got {state!r}")
        limit = _integer("limit", _arg(request, "limit"), 1, MAX_LIST_LIMIT)
        return render_later(request, lambda: self._jobs.list(state=state, limit=limit),
                            _job_list)

    def _submit(self, request: IRequest) -> bytes | int:
        return render_later(request, lambda: self._receive_and_submit(request), _created)

    @inlineCallbacks
    def _receive_and_submit(self, request: IRequest) -> Deferred[dict[str, Any]]:
        """Copy the body (or the form's file) to a drawing file in a thread, then
        submit that file: the body is never read whole, nor on the reactor."""
        content_type = request.getHeader(b"content-type") or b""
        body = request.content
        if body is None:
            raise BadInput(_NO_SVG)
        body.seek(0)

        def fill(out: BinaryIO) -> tuple[dict[str, str], str | None]:
            if is_multipart(content_type):
                return copy_form(body, content_type, out)
            return copy_body(body, out)

        try:
            svg, (fields, filename) = yield self._jobs.receive(fill)
        except MultipartError as error:
            raise BadInput(str(error)) from None
        try:
            upload = Upload(request, svg, fields, filename)
        except BadInput:
            svg.unlink(missing_ok=True)
            raise
        if svg.stat().st_size == 0:
            svg.unlink(missing_ok=True)
            raise SVGError(_NO_SVG)
        job = yield self._jobs.submit(upload.name, upload.svg, priority=upload.priority,
                                      preset=upload.preset, plotter=upload.plotter,
                                      tags=upload.tags)
        return job


_NO_SVG = ("the request has no SVG: send it as the body (Content-Type: image/svg+xml) "
           "or as the multipart field 'file'")


def _job(request: IRequest, job: dict[str, Any]) -> None:
    write_json(request, 200, job)


def _document(request: IRequest, document: dict[str, Any]) -> None:
    write_json(request, 200, document)


def _job_list(request: IRequest, jobs: list[dict[str, Any]]) -> None:
    write_json(request, 200, {"jobs": jobs})


def _created(request: IRequest, job: dict[str, Any]) -> None:
    request.setHeader(b"Location", f"/api/jobs/{job.get('id')}".encode("utf-8"))
    write_json(request, 201, job)


def _deleted(request: IRequest, _: None) -> None:
    write_empty(request, 204)
