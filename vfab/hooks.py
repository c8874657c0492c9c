"""Hooks: commands and webhooks run when jobs and the device change state.

A hook runs beside the plot, never in its way: commands are spawned with
`reactor.spawnProcess` (an argv list, no shell) and killed at their timeout;
webhooks are JSON POSTs retried with doubling delays. Their failures are
logged and otherwise ignored, and nothing the queue does waits for them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from twisted.application.service import Service
from twisted.internet.defer import (CancelledError, Deferred, DeferredList, TimeoutError,
                                    inlineCallbacks, succeed)
from twisted.internet.error import ConnectError, DNSLookupError, ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (Agent, HTTPConnectionPool, PartialDownloadError,
                                ResponseFailed, ResponseNeverReceived, _HTTP11ClientFactory,
                                readBody)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from vfab.config import HookAction
from vfab.web.timestamps import utc_timestamp

_log = Logger()

#: job_state_change target states and the hook event each one fires.
_JOB_EVENTS = {
    "queued": "job_queued",
    "completed": "job_completed",
    "failed": "job_failed",
    "cancelled": "job_cancelled",
    "paused": "job_paused",
    "awaiting_pen": "awaiting_pen",
}
#: Device states in which the plotter answers.
_CONNECTED = frozenset({"idle", "plotting", "paused"})
#: Environment variables a hook command inherits from the daemon; nothing
#: else (no API key, no systemd sockets) leaks into it.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME")
WEBHOOK_ATTEMPTS = 3
WEBHOOK_FIRST_DELAY = 1.0
#: At shutdown, hooks still running get this long before they are killed or abandoned.
STOP_GRACE = 5.0
_OUTPUT_LIMIT = 4096
#: The errors of one webhook attempt that are worth retrying.
_RETRYABLE = (ConnectError, DNSLookupError, TimeoutError, ResponseFailed, ResponseNeverReceived,
              PartialDownloadError)


def hook_event(channel: str, message: Mapping[str, Any],
               device_was: str | None) -> str | None:
    """The hook event a bus message fires, if any.

    `job_started` is a job beginning to plot (from the queue, or again after an
    interruption), not a resume after a pause; `job_queued` is a new job.
    `device_connected`/`device_lost` are edges between answering and not.
    """
    kind = message.get("type")
    if channel == "jobs" and kind == "job_state_change":
        to_state, from_state = message.get("to_state"), message.get("from_state")
        if to_state == "plotting":
            return "job_started" if from_state in ("queued", "interrupted") else None
        if to_state == "queued" and from_state is not None:
            return None
        return _JOB_EVENTS.get(to_state)
    if channel == "device" and kind == "device_status":
        status = message.get("status")
        if status in _CONNECTED and device_was not in _CONNECTED:
            return "device_connected"
        if status in ("disconnected", "error") and device_was in _CONNECTED:
            return "device_lost"
    return None


def hook_environment(event: str, message: Mapping[str, Any]) -> dict[str, str]:
    """The VFAB_* variables a hook command sees."""
    job = message.get("job") or {}
    return {
        "VFAB_EVENT": event,
        "VFAB_JOB_ID": str(message.get("job_id") or ""),
        "VFAB_JOB_NAME": str(job.get("name") or ""),
        "VFAB_STATE": str(message.get("to_state") or message.get("status") or ""),
    }


class _HookProcess(ProcessProtocol):
    """Collects a hook command's output (its last few KB) and reports how it ended."""

    def __init__(self) -> None:
        self.output = b""
        self.killed_because: str | None = None
        #: Why it ended (ProcessDone or ProcessTerminated), once it has.
        self.reason: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-_OUTPUT_LIMIT:]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        # Kept aside: a Failure handed to callback() would make `ended` an errback.
        self.reason = reason
        self.ended.callback(None)

    def kill(self, because: str) -> None:
        """SIGKILL the command, and stop reading its pipes so that a grandchild
        still holding them cannot keep the hook "running"."""
        if self.ended.called:
            return
        self.killed_because = because
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        self.transport.loseConnection()


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class _QuietPool(HTTPConnectionPool):
    """A connection pool whose factories do not log "Starting factory" at every POST
    (Twisted offers no public switch for it; treq quiets it the same way)."""

    _factory = _QuietFactory


@implementer(IBodyProducer)
class _JSONBody:
    """A request body already in memory (no cooperator, so tests need no reactor)."""

    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body) if body else UNKNOWN_LENGTH

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class HookService(Service):
    """Runs the configured actions of each event, each on its own."""

    name = "hooks"

    def __init__(self, hooks: Mapping[str, tuple[HookAction, ...]], bus: Any, reactor: Any,
                 *, agent: Any = None, stop_grace: float = STOP_GRACE):
        self._hooks = hooks
        self._bus = bus
        self._reactor = reactor
        self._agent = agent
        self._stop_grace = stop_grace
        self._unsubscribe: Any = None
        #: Each plotter's last device status (by name): its edges are its own.
        self._device_was: dict[str | None, str | None] = {}
        self._running: set[Deferred[None]] = set()
        self._processes: set[_HookProcess] = set()

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self._bus.subscribe(self._on_message)
        count = sum(len(actions) for actions in self._hooks.values())
        _log.info("hooks ready: {count} action(s) on {events}", count=count,
                  events=", ".join(sorted(self._hooks)) or "no events")

    def stopService(self) -> Deferred[None]:
        """Let running hooks finish for a few seconds, then kill or abandon them."""
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if not self._running:
            return succeed(None)
        _log.info("waiting up to {grace:g} s for {count} running hook(s)",
                  grace=self._stop_grace, count=len(self._running))
        timer = self._reactor.callLater(self._stop_grace, self._abandon_running)

        def done(_: Any) -> None:
            if timer.active():
                timer.cancel()

        return DeferredList(list(self._running)).addCallback(done)

    def _abandon_running(self) -> None:
        for process in list(self._processes):
            process.kill("the daemon is stopping")
        for running in list(self._running):
            running.cancel()

    def _on_message(self, channel: str, message: dict[str, Any]) -> None:
        plotter = message.get("plotter")
        event = hook_event(channel, message, self._device_was.get(plotter))
        if channel == "device" and message.get("type") == "device_status":
            self._device_was[plotter] = message.get("status")
        if event is None or not self._hooks.get(event):
            return
        environment = hook_environment(event, message)
        payload = {
            "event": event,
            "timestamp": utc_timestamp(self._reactor.seconds()),
            "job_id": environment["VFAB_JOB_ID"] or None,
            "job_name": environment["VFAB_JOB_NAME"] or None,
            "state": environment["VFAB_STATE"] or None,
            "message": message,
        }
        for action in self._hooks[event]:
            if action.command is not None:
                self._track(self.run_command(action, environment), action, event)
            else:
                self._track(self.post_webhook(action, event, payload), action, event)

    def _track(self, running: Deferred[None], action: HookAction, event: str) -> None:
        if running.called:
            running.addErrback(self._unexpected, action, event)
            return
        self._running.add(running)
        running.addErrback(self._unexpected, action, event)
        running.addBoth(lambda _: self._running.discard(running))

    def _unexpected(self, failure: Failure, action: HookAction, event: str) -> None:
        what = action.webhook or list(action.command or ())
        if failure.check(CancelledError):
            _log.warn("hook {what} for {event} abandoned: the daemon is stopping",
                      what=what, event=event)
            return
        _log.failure("hook {what} for {event} failed unexpectedly", failure,
                     what=what, event=event)

    def run_command(self, action: HookAction, environment: dict[str, str]) -> Deferred[None]:
        """Spawn the hook's argv with the VFAB_* variables; kill it at its timeout.

        Fires when the command has ended, never with an error of the command's.
        """
        argv = list(action.command or ())
        event = environment["VFAB_EVENT"]
        env = {key: os.environ[key] for key in _INHERITED if key in os.environ}
        env.update(environment)
        process = _HookProcess()
        try:
            self._reactor.spawnProcess(process, argv[0], argv, env=env)
        except OSError as error:
            _log.error("hook {argv} for {event} could not start: {error}",
                       argv=argv, event=event, error=error)
            return succeed(None)
        self._processes.add(process)
        timer = self._reactor.callLater(action.timeout, process.kill,
                                        f"killed after its {action.timeout:g} s timeout")

        def ended(_: None) -> None:
            self._processes.discard(process)
            reason = process.reason
            if timer.active():
                timer.cancel()
            output = process.output.decode("utf-8", "replace").strip()
            shown = f": {output}" if output else ""
            if process.killed_because is not None:
                _log.warn("hook {argv} for {event} {how}{output}", argv=argv, event=event,
                          how=process.killed_because, output=shown)
            elif reason is not None and reason.check(ProcessDone):
                _log.info("hook {argv} for {event} done{output}", argv=argv, event=event,
                          output=shown)
            else:
                _log.warn("hook {argv} for {event} failed: {why}{output}", argv=argv,
                          event=event, why=reason.getErrorMessage() if reason else "?",
                          output=shown)

        return process.ended.addCallback(ended)

    @inlineCallbacks
    def post_webhook(self, action: HookAction, event: str,
                     payload: dict[str, Any]) -> Deferred[None]:
        """POST the event as JSON; retry with doubling delays on errors and 5xx answers.

        Each attempt (connect, answer and body) is bounded by the action's timeout.
        """
        url = action.webhook or ""
        agent = self._agent or Agent(self._reactor, connectTimeout=action.timeout,
                                     pool=_QuietPool(self._reactor, persistent=False))
        body = json.dumps(payload, default=str).encode("utf-8")
        delay = WEBHOOK_FIRST_DELAY
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                code = yield self._post_once(agent, url, event, body).addTimeout(
                    action.timeout, self._reactor)
            except _RETRYABLE as error:
                problem = str(error) or error.__class__.__name__
            except SchemeNotSupported as error:
                _log.error("webhook {url} for {event} cannot be sent: {error}", url=url,
                           event=event, error=error)
                return
            else:
                if code < 400:
                    _log.info("webhook {url} for {event} answered {code}", url=url,
                              event=event, code=code)
                    return
                if code < 500:
                    _log.warn("webhook {url} for {event} answered {code}; not retried",
                              url=url, event=event, code=code)
                    return
                problem = f"HTTP {code}"
            if attempt < WEBHOOK_ATTEMPTS:
                _log.warn("webhook {url} for {event} failed ({problem}); "
                          "attempt {next} in {delay:g} s", url=url, event=event,
                          problem=problem, next=attempt + 1, delay=delay)
                yield deferLater(self._reactor, delay, lambda: None)
                delay *= 2
            else:
                _log.error("webhook {url} for {event} failed {attempts} times, last with "
                           "{problem}; giving up", url=url, event=event,
                           attempts=WEBHOOK_ATTEMPTS, problem=problem)

    @inlineCallbacks
    def _post_once(self, agent: Any, url: str, event: str, body: bytes) -> Deferred[int]:
        headers = Headers({b"Content-Type": [b"application/json"],
                           b"User-Agent": [b"vfab-hooks"],
                           b"X-Vfab-Event": [event.encode("ascii")]})
        response = yield agent.request(b"POST", url.encode("utf-8"), headers, _JSONBody(body))
        yield readBody(response)
        return response.code
