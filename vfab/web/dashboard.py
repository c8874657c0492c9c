"""The dashboard's first paint: index.html with what the API knows rendered in.

app.js is loaded by a dynamic import after the load event and then waits for
the WebSocket, so the bare page said "connecting…" and "Nothing is plotting."
to a screenshot, a slow link or a browser without JavaScript, whatever the
plotter was doing. The page is rendered with the WebSocket's own snapshot
instead, in app.js's own markup (the row of a job is the row app.js builds),
and that snapshot goes in beside it as JSON, so that app.js takes the rows
over by job id: none is built twice or lost when live updates come.

With authentication on the dashboard's files hold no data (contract section
3): the page then says what it waits for rather than claiming an empty queue.
"""

from __future__ import annotations

import html
import json
import math
import re
from datetime import datetime, timezone
from functools import cmp_to_key
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from vfab.jobs.errors import DatabaseDamaged
from vfab.web.responses import method_not_allowed, not_found

_log = Logger()

# As app.js: the states that hold the plotter, the finished ones, how many of
# those the queue shows, and what each state lets the operator do.
ACTIVE = ("plotting", "paused", "awaiting_pen")
FINISHED = ("completed", "failed", "cancelled")
FINISHED_SHOWN = 20
ACTIONS = {
    "queued": ("cancel",),
    "plotting": ("pause", "cancel"),
    "paused": ("resume", "cancel"),
    "awaiting_pen": ("resume", "cancel"),
    "interrupted": ("resume", "cancel"),
}
ACTION_LABELS = {"pause": "Pause", "resume": "Resume", "cancel": "Cancel"}
PEN_REASON = "put in the pen for the next layer, then continue."
#: The element app.js reads the snapshot from.
SNAPSHOT_ID = "first-paint"
#: What the page says where data would be, when it may hold none.
WAITING_FOR_KEY = ("This daemon asks for its API key: the plotter and the queue show "
                   "once the dashboard has connected with it.")
WAITING_FOR_QUEUE = "The queue shows once the dashboard has connected with its API key."

#: A channel's snapshot: a message, or for the device channel one per plotter.
Snapshot = Callable[[str], "Deferred[dict[str, Any] | list[dict[str, Any]]]"]


# -- figures, as format.js writes them -------------------------------------------------

def _round(value: float) -> int:
    return math.floor(value + 0.5)  # Math.round, not banker's rounding


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def duration(seconds: Any) -> str:
    """42 -> "42 s", 200 -> "3 min 20 s", 3900 -> "1 h 05 min"."""
    value = _number(seconds)
    if value is None:
        return "–"
    total = max(0, _round(value))
    hours, minutes, secs = total // 3600, total % 3600 // 60, total % 60
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def percent(fraction: Any) -> str:
    value = _number(fraction)
    return "–" if value is None else f"{_round(value * 100)} %"


def state_label(state: Any) -> str:
    return str(state or "unknown").replace("_", " ")


def millimetres(point: Any) -> str:
    if not isinstance(point, (list, tuple)) or len(point) != 2:
        return "–"
    x, y = (_number(value) for value in point)
    return "–" if x is None or y is None else f"{x:.1f}, {y:.1f} mm"


def _moment(iso: Any) -> datetime | None:
    if not isinstance(iso, str) or not iso:
        return None
    try:
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def clock(iso: Any, now: float) -> str:
    """"14:05 CET" today, "6 Dec 14:05 CET" before, in the daemon's time zone and
    naming it: the page's fallback until app.js writes it in the browser's own
    zone and manner (format.clock)."""
    moment = _moment(iso)
    if moment is None:
        return "–"
    local, today = moment.astimezone(), datetime.fromtimestamp(now).astimezone()
    if local.date() == today.date():
        return local.strftime("%H:%M %Z")
    return f"{local.day} {local.strftime('%b %H:%M %Z')}"


def time_element(iso: Any, now: float) -> str:
    """A moment as <time datetime=ISO>: a machine-readable time the page localises."""
    if _moment(iso) is None:
        return "<time>–</time>"
    return f'<time datetime="{_escape(iso)}">{_escape(clock(iso, now))}</time>'


def seconds_between(start: Any, end: Any) -> float | None:
    first, last = _moment(start), _moment(end)
    return (last - first).total_seconds() if first and last else None


# -- what app.js shows, from the same state -----------------------------------------------

def ordered_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The queue's rows as app.js orders them: what holds the plotter, the queue
    in run order, what was interrupted, then the newest finished jobs."""
    def rank(job: dict[str, Any]) -> int:
        return _RANKS.get(str(job.get("state")), 3)

    def compare(a: dict[str, Any], b: dict[str, Any]) -> int:
        if rank(a) != rank(b):
            return rank(a) - rank(b)
        if rank(a) == 1 and a.get("priority") != b.get("priority"):
            return (b.get("priority") or 0) - (a.get("priority") or 0)
        # The queue oldest first (the order it runs in), everything else newest first.
        first, second = (str(a.get("created_at")), str(b.get("created_at")))
        if rank(a) != 1:
            first, second = second, first
        return (first > second) - (first < second)

    ordered = sorted(jobs, key=cmp_to_key(compare))
    finished = [job for job in ordered if job.get("state") in FINISHED][:FINISHED_SHOWN]
    return [job for job in ordered if job.get("state") not in FINISHED] + finished


_RANKS = {**{state: 0 for state in ACTIVE}, "queued": 1, "interrupted": 2}


def current_job(jobs: list[dict[str, Any]], device: dict[str, Any] | None) -> dict | None:
    """The job the "Now plotting" card shows: the one holding the plotter, else
    one that was interrupted (it holds the queue)."""
    by_id = {job.get("id"): job for job in jobs}
    held = by_id.get((device or {}).get("current_job_id"))
    if held is not None and held.get("state") in ACTIVE:
        return held
    for states in (ACTIVE, ("interrupted",)):
        for job in jobs:
            if job.get("state") in states:
                return job
    return None


class _Markup:
    """Edits the elements of index.html by id; each id must be there exactly once,
    so that a change to the page that this does not follow fails loudly."""

    def __init__(self, template: str):
        self.text = template

    def _tag(self, element_id: str) -> tuple[int, int, str, str]:
        """Where the opening tag of the element is: start, end, name, attributes."""
        marker = f' id="{element_id}"'
        at = self.text.find(marker)
        if at < 0 or self.text.find(marker, at + 1) >= 0:
            raise ValueError(f"index.html must have one element with id {element_id!r}")
        start, end = self.text.rindex("<", 0, at), self.text.index(">", at) + 1
        name, _, attributes = self.text[start + 1:end - 1].partition(" ")
        return start, end, name, " " + attributes

    def set(self, element_id: str, **attributes: str | bool | None) -> None:
        """Set attributes (True: present without a value; None or False: absent);
        `data_for` names `data-for`."""
        start, end, name, inside = self._tag(element_id)
        pairs = re.findall(r'\s([a-z-]+)(?:="([^"]*)")?', inside)
        values: dict[str, str | None] = {key: value or None for key, value in pairs}
        for key, value in attributes.items():
            key = key.replace("_", "-")
            if value is None or value is False:
                values.pop(key, None)
            else:
                values[key] = None if value is True else html.escape(str(value))
        written = "".join(f" {key}" if value is None else f' {key}="{value}"'
                          for key, value in values.items())
        self.text = f"{self.text[:start]}<{name}{written}>{self.text[end:]}"

    def fill(self, element_id: str, text: str) -> None:
        """Replace the content of a leaf element with `text`."""
        self.inner(element_id, html.escape(text))

    def inner(self, element_id: str, markup: str) -> None:
        """Replace the content of a leaf element with `markup` (already escaped)."""
        _, end, name, _ = self._tag(element_id)
        close = self.text.index(f"</{name}>", end)
        self.text = self.text[:end] + markup + self.text[close:]

    def badge(self, element_id: str, state: Any) -> None:
        self.set(element_id, data_state=state or "unknown")
        self.fill(element_id, state_label(state))


def _escape(value: Any) -> str:
    return html.escape(str(value))


def _width(progress: float) -> str:
    return f"width: {_round(progress * 1000) / 10:g}%"


class FirstPaint:
    """index.html with a snapshot of the jobs, the plotter and the daemon rendered in."""

    def __init__(self, template: str, now: float):
        self._page = _Markup(template)
        self._now = now
        self._speed = 1.0

    def waiting_for_key(self) -> str:
        """The page when it may hold no data."""
        page = self._page
        page.fill("current-name", WAITING_FOR_KEY)
        page.set("progress", hidden=True)
        page.set("jobs-table", hidden=True)
        page.fill("jobs-empty", WAITING_FOR_QUEUE)
        return page.text

    def render(self, jobs: list[dict[str, Any]], plotters: list[dict[str, Any]],
               system: dict[str, Any] | None) -> str:
        """`plotters`: one device_status per plotter; the "Plotter" card shows the
        first, the Plotters list (with two or more) every one."""
        shown = ordered_jobs(jobs)
        device = plotters[0] if plotters else None
        self._speed = _number((device or {}).get("simulator_speed")) or 1.0
        if system is not None:
            self._system(system, shown)
        if device is not None:
            self._device(device)
        self._plotters(plotters)
        self._current(current_job(shown, device))
        self._jobs(shown)
        snapshot = json.dumps({"jobs": shown, "device": device, "plotters": plotters,
                               "system": system},
                              separators=(",", ":"), default=str)
        # In a <script> element only "</" could end it early; \u escapes are JSON.
        snapshot = snapshot.replace("<", "\\u003c").replace(">", "\\u003e")
        script = f'<script type="application/json" id="{SNAPSHOT_ID}">{snapshot}</script>\n'
        text = self._page.text
        at = text.rindex("</body>")
        return text[:at] + script + text[at:]

    def _estimate(self, seconds: Any) -> str:
        if self._speed == 1 or _number(seconds) is None:
            return duration(seconds)
        return f"{duration(float(seconds) / self._speed)} here, {duration(seconds)} on an AxiDraw"

    def _system(self, system: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
        page = self._page
        page.badge("system-badge", system.get("status"))
        page.fill("system-status", str(system.get("status")))
        page.fill("system-uptime", duration(system.get("uptime")))
        page.fill("system-memory", percent(system.get("memory_usage")))
        page.fill("system-cpu", percent(system.get("cpu_usage")))
        page.fill("system-connections", str(system.get("connections")))
        active = sum(1 for job in jobs if job.get("state") in ACTIVE)
        queued = sum(1 for job in jobs if job.get("state") == "queued")
        page.fill("system-jobs", f"{active} active, {queued} queued")

    def _device(self, device: dict[str, Any]) -> None:
        page = self._page
        page.badge("device-badge", device.get("status"))
        page.fill("device-port", device.get("port") or "–")
        page.fill("device-firmware", device.get("firmware_version") or "–")
        page.fill("device-pen", device.get("pen") or "–")
        page.fill("device-position", millimetres(device.get("position_mm")))

    def _plotters(self, plotters: list[dict[str, Any]]) -> None:
        """The Plotters list, one row each as plotters.js builds it."""
        page = self._page
        page.set("plotters", hidden=len(plotters) < 2)
        page.inner("plotters-rows", "".join(self._plotter_row(status) for status in plotters))

    @staticmethod
    def _plotter_row(status: dict[str, Any]) -> str:
        state = status.get("status") or "unknown"
        tags = ", ".join(str(tag) for tag in status.get("tags") or []) or "–"
        return (
            f'<tr data-plotter="{_escape(status.get("plotter"))}">'
            f'<td>{_escape(status.get("plotter"))}</td>'
            f'<td><span class="badge" data-state="{_escape(state)}">'
            f"{_escape(state_label(status.get('status')))}</span></td>"
            f"<td>{_escape(tags)}</td>"
            f'<td>{_escape(status.get("current_job_id") or "–")}</td></tr>')

    def _current(self, job: dict[str, Any] | None) -> None:
        page = self._page
        page.set("progress", hidden=job is None)
        if job is None:
            return
        state = job.get("state")
        holding = state == "interrupted"
        page.fill("current-title", "Now plotting" if state in ACTIVE else "Holding the queue")
        page.fill("current-name", str(job.get("name")))
        error = (f"{job.get('error') or 'interrupted'}. The queue waits for this job: "
                 f"resume or cancel it.") if holding else job.get("error")
        page.set("current-error", hidden=not error)
        page.fill("current-error", error or "")
        page.set("current-badge", hidden=False)
        page.badge("current-badge", state)
        awaiting_pen = state == "awaiting_pen"
        page.set("pen-prompt", hidden=not awaiting_pen)
        if awaiting_pen:
            page.fill("pen-reason", PEN_REASON)
            page.set("pen-ready", data_job_id=job.get("id"))
        page.set("current-actions", data_for=f"{job.get('id')}:{state}")
        page.inner("current-actions", self._buttons(job, ("cancel",) if awaiting_pen else None))
        page.set("preview-empty", hidden=True)  # app.js fetches the drawing
        progress = _number(job.get("progress")) or 0.0
        page.set("progress-fill", style=_width(progress))
        page.fill("progress-percent", percent(progress))
        if state == "queued":
            page.fill("progress-eta", f"about {self._estimate(job.get('estimated_seconds'))}")

    def _buttons(self, job: dict[str, Any], only: tuple[str, ...] | None = None) -> str:
        actions = [action for action in ACTIONS.get(str(job.get("state")), ())
                   if only is None or action in only]
        return "".join(
            f'<button type="button" class="button{" quiet" if action == "cancel" else ""}" '
            f'data-action="{action}" data-job-id="{_escape(job.get("id"))}">'
            f"{ACTION_LABELS[action]}</button>" for action in actions)

    def _jobs(self, jobs: list[dict[str, Any]]) -> None:
        page = self._page
        page.set("jobs-empty", hidden=bool(jobs))
        page.set("jobs-table", hidden=not jobs)
        page.inner("jobs", "".join(self._row(job) for job in jobs))

    def _row(self, job: dict[str, Any]) -> str:
        """One row, as app.js's newRow and fillRow make it."""
        job_id, error = str(job.get("id")), job.get("error")
        took = seconds_between(job.get("started_at"), job.get("finished_at"))
        if took is None:
            estimate = self._estimate(job.get("estimated_seconds"))
        else:
            estimate = f"took {duration(took)}"
        progress = _number(job.get("progress")) or 0.0
        state = job.get("state")
        return (
            f'<tr data-job-id="{_escape(job_id)}">'
            f'<td class="col-state"><span class="badge" data-state="{_escape(state or "unknown")}">'
            f"{_escape(state_label(state))}</span></td>"
            f'<td class="col-name" title="{_escape(f"{job_id}: {error}" if error else job_id)}">'
            f'<span class="job-name">{_escape(job.get("name"))}</span> '
            f'<code class="job-id">{_escape(job_id[:8])}</code></td>'
            f'<td class="col-submitted">{time_element(job.get("created_at"), self._now)}</td>'
            f'<td class="col-estimate">{_escape(estimate)}</td>'
            f'<td class="col-progress"><div class="mini-track"><div class="mini-fill" '
            f'style="{_width(progress)}"></div></div>'
            f'<span class="mini-figure">{percent(progress)}</span></td>'
            f'<td class="col-actions"><div class="actions" '
            f'data-for="{_escape(f"{job_id}:{state}")}">{self._buttons(job)}</div></td></tr>')


class DashboardPage(Resource):
    """GET / and /index.html: the dashboard with its first paint rendered in.

    `snapshot(channel)` is the WebSocket's snapshot of a channel, so the page
    and a new subscriber see the same; `holds_data` is False when the page may
    hold none (authentication on).
    """

    isLeaf = True

    def __init__(self, template: str, snapshot: Snapshot, clock: Any, holds_data: bool):
        super().__init__()
        self._template = template
        self._snapshot = snapshot
        self._clock = clock
        self._holds_data = holds_data

    def render(self, request: IRequest) -> bytes | int:
        if request.postpath not in ([], [b""]):
            return not_found(request)
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, [b"GET"])
        page = FirstPaint(self._template, self._clock.seconds())
        if not self._holds_data:
            return self._body(request, page.waiting_for_key())
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def write(text: str) -> None:
            if not gone:
                request.write(self._body(request, text))
                request.finish()

        snapshots = [self._snapshot(channel) for channel in ("jobs", "device", "system")]
        rendered = DeferredList(snapshots, consumeErrors=True).addCallback(self._render, page)
        rendered.addErrback(self._unrendered).addCallback(write)
        return NOT_DONE_YET

    def _render(self, results: list[tuple[bool, Any]], page: FirstPaint) -> str:
        failures = [value for ok, value in results if not ok]
        if failures:
            for failure in failures:
                if not failure.check(DatabaseDamaged):  # the store has said that once
                    _log.failure("dashboard: a snapshot for the first paint failed",
                                 failure)
            return self._template  # app.js shows what the WebSocket says
        (_, jobs), (_, plotters), (_, system) = results
        return page.render(jobs["jobs"], plotters, system)

    def _unrendered(self, failure: Failure) -> str:
        _log.failure("dashboard: the first paint failed", failure)
        return self._template

    @staticmethod
    def _body(request: IRequest, text: str) -> bytes:
        body = text.encode("utf-8")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        # The page is a moment's snapshot: never shown again from a cache.
        request.setHeader(b"Cache-Control", b"no-store")
        return body
