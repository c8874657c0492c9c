"""`vfab watch`: live progress bars fed by the daemon's WebSocket."""

from __future__ import annotations

import json
import signal
import urllib.parse
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.task import react

from vfab.cli.client import ClientError, DaemonClient
from vfab.cli.commands import estimate, speed_of, time_left

ENDED = frozenset({"completed", "failed", "cancelled", "interrupted"})
WATCHED = ("plotting", "paused", "awaiting_pen", "queued")
INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


class JobBoard:
    """The progress bars of the watched jobs; knows when all of them have ended."""

    def __init__(self, progress: Progress, console: Console, jobs: list[dict[str, Any]],
                 speed: float = 1.0):
        """`speed`: how much faster than an AxiDraw the plotter runs (virtual: its speed)."""
        self._progress = progress
        self._console = console
        self._speed = speed
        self._tasks: dict[str, TaskID] = {}
        self.outcomes: dict[str, str] = {}
        for job in jobs:
            self._tasks[job["id"]] = progress.add_task(
                job["name"], total=1.0, completed=job["progress"], state=job["state"],
                layer="", eta=estimate(_left(job), speed))

    @property
    def done(self) -> bool:
        return len(self.outcomes) == len(self._tasks)

    def on_message(self, message: dict[str, Any]) -> None:
        if message["type"] == "job_list":
            # The snapshot on subscribe: catches what changed before we subscribed.
            for job in message["jobs"]:
                if job["id"] in self._tasks and job["state"] in ENDED:
                    self.on_message({"type": "job_state_change", "job_id": job["id"],
                                     "to_state": job["state"], "reason": job["error"] or ""})
            return
        job_id = message.get("job_id")
        if job_id not in self._tasks:
            return
        task = self._tasks[job_id]
        if message["type"] == "job_progress":
            self._progress.update(
                task, completed=message["progress"],
                layer=f"layer {message['current_layer']}/{message['total_layers']}",
                eta=time_left(message["eta_seconds"], self._speed))
        elif message["type"] == "job_state_change":
            state = message["to_state"]
            self._progress.update(task, state=state)
            if state == "awaiting_pen":
                self._console.print(f"[bold yellow]Pen change[/] for job {job_id}: "
                                    f"{message['reason']} — put it in, then "
                                    f"`vfab resume {job_id}` or press the plotter's button.")
            if state == "completed":
                self._progress.update(task, completed=1.0, eta="done")
            if state in ENDED and job_id not in self.outcomes:
                self.outcomes[job_id] = state
                if state != "completed":
                    self._console.print(f"job {job_id} {state}: {message['reason']}")


def _left(job: dict[str, Any]) -> float | None:
    """An AxiDraw's time for what is left of `job`, until its first job_progress."""
    if job["estimated_seconds"] is None:
        return None
    return job["estimated_seconds"] * (1.0 - float(job["progress"] or 0.0))


def _websocket_url(http_url: str, api_key: str | None) -> str:
    parts = urllib.parse.urlsplit(http_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    query = urllib.parse.urlencode({"api_key": api_key}) if api_key else ""
    return urllib.parse.urlunsplit((scheme, parts.netloc, "/ws", query, ""))


def watch_jobs(client: DaemonClient, job_id: str | None) -> int:
    """Show progress until the watched jobs end: 0 if all completed, 1 otherwise,
    130 when Ctrl-C ends the watch first."""
    if job_id is not None:
        jobs = [client.request("GET", f"/api/jobs/{urllib.parse.quote(job_id, safe='')}")]
    else:
        jobs = [job for state in WATCHED
                for job in client.request("GET", "/api/jobs", query={"state": state})["jobs"]]
    console = Console(stderr=True)
    pending = [job for job in jobs if job["state"] not in ENDED]
    for job in jobs:
        if job["state"] in ENDED:
            console.print(f"job {job['id']} '{job['name']}' is {job['state']}")
    if not pending:
        if job_id is None:
            console.print("no active or queued jobs to watch")
        return 0 if all(job["state"] == "completed" for job in jobs) else 1
    if any(job["state"] == "queued" for job in pending):
        for held in client.request("GET", "/api/jobs", query={"state": "interrupted"})["jobs"]:
            console.print(f"job {held['id']} '{held['name']}' is interrupted and holds the "
                          f"queue ({held['error'] or 'no reason recorded'}); queued jobs wait "
                          f"until you type: vfab resume {held['id']} (or vfab cancel "
                          f"{held['id']})")
    url = _websocket_url(client.url, client.api_key)
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.percentage:>5.1f}%"),
                        TextColumn("{task.fields[state]}"), TextColumn("{task.fields[layer]}"),
                        TextColumn("ETA {task.fields[eta]}"), console=console)
    speed = speed_of(client.request("GET", "/api/device"))
    board = JobBoard(progress, console, pending, speed)
    problems: list[str] = []
    interrupted: list[bool] = []

    def run(reactor: Any) -> Deferred:
        finished: Deferred = Deferred()

        def stop_watching() -> None:
            interrupted.append(True)
            if not finished.called:
                finished.callback(None)

        # Replaces the reactor's SIGINT handler: Ctrl-C ends the watch, not a
        # connection the reactor then drops with 1006.
        signal.signal(signal.SIGINT,
                      lambda number, frame: reactor.callFromThread(stop_watching))

        class Watcher(WebSocketClientProtocol):
            def onOpen(self) -> None:
                self.sendMessage(json.dumps({"type": "subscribe",
                                             "channels": ["jobs"]}).encode())

            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                board.on_message(json.loads(payload))
                if board.done:
                    self.sendClose(1000)

            def onClose(self, wasClean: bool, code: int, reason: str) -> None:
                if not board.done and not interrupted:
                    problems.append(f"the daemon closed the connection ({code}: {reason})")
                if not finished.called:
                    finished.callback(None)

        def unreachable(failure: Any) -> None:
            problems.append(f"no daemon at {client.url} — is `vfab daemon` running?")
            if not finished.called:
                finished.callback(None)

        factory = WebSocketClientFactory(url, reactor=reactor)
        factory.protocol = Watcher
        parts = urllib.parse.urlsplit(client.url)
        endpoint = clientFromString(
            reactor, f"tcp:host={parts.hostname}:port={parts.port or 80}:timeout=10")
        endpoint.connect(factory).addErrback(unreachable)
        return finished

    progress.start()
    try:
        react(run, [])
    except SystemExit:
        pass  # react always exits; the outcome is in the board.
    finally:
        progress.stop()
    if interrupted:
        return INTERRUPTED
    if problems:
        raise ClientError(problems[0])
    return 0 if all(board.outcomes.get(job["id"]) == "completed" for job in pending) else 1
