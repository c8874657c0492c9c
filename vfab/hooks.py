"""Hooks: commands and webhooks run when jobs and the device change state.

A hook runs beside the plot, never in its way: commands are spawned with
`reactor.spawnProcess` (an argv list, no shell) and killed at their timeout;
webhooks are JSON POSTs retried with backoff. Their failures are logged and
otherwise ignored.
"""

from __future__ import annotations

import json
import os
from io import BytesIO
from typing import Any, Mapping

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, inlineCallbacks
from twisted.internet.error import ConnectError, ProcessDone, ProcessExitedAlready, TimeoutError
from twisted.internet.task import deferLater
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (Agent, FileBodyProducer, ResponseFailed,
                                ResponseNeverReceived, readBody)
from twisted.web.http_headers import Headers

from vfab.config import HookAction

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
_CONNECTED = frozenset({"idle", "plotting", "paused"})
WEBHOOK_ATTEMPTS = 3
WEBHOOK_FIRST_DELAY = 1.0
_OUTPUT_LIMIT = 4096


def hook_event(channel: str, message: Mapping[str, Any],
               device_was: str | None) -> str | None:
    """The hook event a bus message fires, if any."""
    kind = message.get("type")
    if channel == "jobs" and kind == "job_state_change":
        to_state = message.get("to_state")
        if to_state == "plotting":
            return "job_started" if message.get("from_state") in ("queued", "interrupted") \
                else None
        if to_state == "queued" and message.get("from_state") is not None:
            return None
        return _JOB_EVENTS.get(to_state)
    if channel == "device" and kind == "device_status":
        status = message.get("status")
        if status in _CONNECTED and device_was not in _CONNECTED:
            return "device_connected"
        if status in ("disconnected", "error") and device_was in _CONNECTED:
            return "device_lost"
    return None


class _HookProcess(ProcessProtocol):
    """Collects a hook command's output (bounded) and reports how it ended."""

    def __init__(self, argv: tuple[str, ...]):
        self.argv = argv
        self.output = b""
        self.ended: Deferred[Failure] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-_OUTPUT_LIMIT:]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason)


class HookService(Service):
    """Runs the configured actions of each event."""

    name = "hooks"

    def __init__(self, hooks: Mapping[str, tuple[HookAction, ...]], bus: Any, reactor: Any,
                 *, agent: Any = None):
        self._hooks = hooks
        self._bus = bus
        self._reactor = reactor
        self._agent = agent
        self._unsubscribe = None
        self._device_was: str | None = None
        self._running_hooks: set[Deferred] = set()

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self._bus.subscribe(self._on_message)
        count = sum(len(actions) for actions in self._hooks.values())
        _log.info("hooks ready: {count} action(s) on {events}", count=count,
                  events=", ".join(sorted(self._hooks)) or "no events")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        # Hooks already started may finish (each is bounded by its timeout).
        return DeferredList(list(self._running_hooks)).addCallback(lambda _: None)

    def _on_message(self, channel: str, message: dict[str, Any]) -> None:
        event = hook_event(channel, message, self._device_was)
        if channel == "device" and message.get("type") == "device_status":
            self._device_was = message.get("status")
        if event is None or event not in self._hooks:
            return
        job = message.get("job") or {}
        environment = {
            "VFAB_EVENT": event,
            "VFAB_JOB_ID": message.get("job_id") or "",
            "VFAB_JOB_NAME": job.get("name") or "",
            "VFAB_STATE": message.get("to_state") or message.get("status") or "",
        }
        payload = {"event": event, "message": message}
        for action in self._hooks[event]:
            if action.command is not None:
                running = self.run_command(action, environment)
            else:
                running = self.post_webhook(action, payload)
            self._running_hooks.add(running)
            running.addBoth(lambda _, d=running: self._running_hooks.discard(d))

    @inlineCallbacks
    def run_command(self, action: HookAction, environment: dict[str, str]) -> Deferred[None]:
        """Spawn the hook's argv with the VFAB_* variables; kill it at its timeout."""
        argv = action.command
        process = _HookProcess(argv)
        env = {key: value for key, value in os.environ.items()
               if key in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER")}
        env.update(environment)
        try:
            transport = self._reactor.spawnProcess(process, argv[0], list(argv), env=env)
        except OSError as error:
            _log.error("hook {argv} for {event} could not start: {error}",
                       argv=list(argv), event=environment["VFAB_EVENT"], error=error)
            return
        timer = self._reactor.callLater(action.timeout, _kill, transport)
        reason = yield process.ended
        if timer.active():
            timer.cancel()
        output = process.output.decode("utf-8", "replace").strip()
        if reason.check(ProcessDone):
            _log.info("hook {argv} for {event} done{output}", argv=list(argv),
                      event=environment["VFAB_EVENT"], output=f": {output}" if output else "")
        else:
            timed_out = not timer.active() and not timer.cancelled
            _log.warn("hook {argv} for {event} {how}{output}", argv=list(argv),
                      event=environment["VFAB_EVENT"],
                      how=(f"killed after its {action.timeout:g} s timeout" if timed_out
                           else f"failed: {reason.getErrorMessage()}"),
                      output=f": {output}" if output else "")

    @inlineCallbacks
    def post_webhook(self, action: HookAction, payload: dict[str, Any]) -> Deferred[None]:
        """POST the event as JSON; retry with doubling delays on errors and 5xx answers."""
        agent = self._agent or Agent(self._reactor, connectTimeout=action.timeout)
        body = json.dumps(payload).encode("utf-8")
        delay = WEBHOOK_FIRST_DELAY
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                request = agent.request(
                    b"POST", action.webhook.encode("ascii"),
                    Headers({b"Content-Type": [b"application/json"],
                             b"User-Agent": [b"vfab-hooks"]}),
                    FileBodyProducer(BytesIO(body)))
                response = yield request.addTimeout(action.timeout, self._reactor)
                yield readBody(response)
                if response.code < 500:
                    if response.code >= 400:
                        _log.warn("webhook {url} answered {code}", url=action.webhook,
                                  code=response.code)
                    return
                problem = f"HTTP {response.code}"
            except (ConnectError, TimeoutError, CancelledError, ResponseFailed,
                    ResponseNeverReceived) as error:
                problem = str(error) or error.__class__.__name__
            if attempt < WEBHOOK_ATTEMPTS:
                _log.warn("webhook {url} failed ({problem}); retry {attempt} in {delay:g} s",
                          url=action.webhook, problem=problem, attempt=attempt, delay=delay)
                yield deferLater(self._reactor, delay, lambda: None)
                delay *= 2
        _log.error("webhook {url} failed {attempts} times; giving up", url=action.webhook,
                   attempts=WEBHOOK_ATTEMPTS)


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except ProcessExitedAlready:
        pass

