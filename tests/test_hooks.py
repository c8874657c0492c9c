"""Hooks: which events fire, commands killed at their timeout, webhooks retried with
backoff (all on a fake clock), and both kinds on the real daemon with the virtual plotter."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.daemon_process import DaemonProcess
from vfab.config import HookAction, config_from_dict
from vfab.events import EventBus
from vfab.hooks import WEBHOOK_ATTEMPTS, HookService, hook_event

SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="40mm" height="40mm" '
       b'viewBox="0 0 40 40"><path d="M5 5 L35 5 L35 35" stroke="black" fill="none"/></svg>')


def change(from_state: str | None, to_state: str, **job: Any) -> dict[str, Any]:
    return {"type": "job_state_change", "job_id": "j1", "from_state": from_state,
            "to_state": to_state, "reason": "test",
            "job": {"id": "j1", "name": "poster", "state": to_state, **job}}


# -- which events fire -----------------------------------------------------------

@pytest.mark.parametrize("from_state, to_state, event", [
    (None, "queued", "job_queued"),
    ("interrupted", "queued", None),
    ("queued", "plotting", "job_started"),
    ("interrupted", "plotting", "job_started"),
    ("paused", "plotting", None),
    ("awaiting_pen", "plotting", None),
    ("plotting", "completed", "job_completed"),
    ("plotting", "failed", "job_failed"),
    ("queued", "cancelled", "job_cancelled"),
    ("plotting", "paused", "job_paused"),
    ("plotting", "awaiting_pen", "awaiting_pen"),
    ("plotting", "interrupted", None),
])
def test_job_events(from_state, to_state, event):
    assert hook_event("jobs", change(from_state, to_state), None) == event


@pytest.mark.parametrize("was, now, event", [
    (None, "idle", "device_connected"),
    ("connecting", "idle", "device_connected"),
    ("idle", "plotting", None),
    ("plotting", "disconnected", "device_lost"),
    ("idle", "error", "device_lost"),
    ("connecting", "disconnected", None),
    ("disconnected", "connecting", None),
])
def test_device_events(was, now, event):
    assert hook_event("device", {"type": "device_status", "status": now}, was) == event


def test_other_messages_fire_nothing():
    assert hook_event("jobs", {"type": "job_progress", "job_id": "j1"}, None) is None
    assert hook_event("system", {"type": "system_alert"}, None) is None


# -- commands on a fake reactor --------------------------------------------------

class FakeProcess:
    def __init__(self, protocol: Any):
        self.protocol = protocol
        self.signals: list[str] = []
        self.closed = False

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)

    def loseConnection(self) -> None:
        self.closed = True


class ProcessReactor(MemoryReactorClock):
    """A memory reactor that records spawned processes instead of running them."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[list[str], dict[str, str], FakeProcess]] = []

    def spawnProcess(self, protocol, executable, args, env=None, **kwargs):
        assert executable == args[0]
        process = FakeProcess(protocol)
        protocol.makeConnection(process)
        self.spawned.append((list(args), dict(env or {}), process))
        return process


def test_each_plotter_connects_and_is_lost_on_its_own():
    clock, bus = ProcessReactor(), EventBus()
    hooks = config_from_dict({"hooks": {event: [{"command": ["/bin/true"]}] for event in
                                        ("device_connected", "device_lost")}}).hooks
    HookService(hooks, bus, clock).startService()
    for plotter, status in [("left", "idle"), ("right", "idle"), ("left", "plotting"),
                            ("right", "disconnected"), ("left", "idle")]:
        bus.publish("device", {"type": "device_status", "status": status, "plotter": plotter})
    fired = [env["VFAB_EVENT"] for _, env, _ in clock.spawned]
    assert fired == ["device_connected", "device_connected", "device_lost"]


def messages(events: list[dict]) -> str:
    return "\n".join(formatEvent(event) for event in events)


def test_a_command_gets_the_job_in_its_environment_and_its_output_is_logged():
    clock, bus = ProcessReactor(), EventBus()
    hooks = config_from_dict({"hooks": {"job_completed": [
        {"command": ["/usr/local/bin/notify", "--done"]}]}}).hooks
    service = HookService(hooks, bus, clock)
    service.startService()
    bus.publish("jobs", change("plotting", "completed"))
    bus.publish("jobs", change("queued", "plotting"))  # no job_started hook configured
    [(argv, env, process)] = clock.spawned
    assert argv == ["/usr/local/bin/notify", "--done"]
    assert {k: v for k, v in env.items() if k.startswith("VFAB_")} == {
        "VFAB_EVENT": "job_completed", "VFAB_JOB_ID": "j1", "VFAB_JOB_NAME": "poster",
        "VFAB_STATE": "completed"}
    assert not set(env) - {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME",
                           "VFAB_EVENT", "VFAB_JOB_ID", "VFAB_JOB_NAME", "VFAB_STATE"}
    with capturedLogs() as events:
        process.protocol.outReceived(b"sent the notification\n")
        process.protocol.processEnded(Failure(ProcessDone(0)))
    assert "done: sent the notification" in messages(events)
    assert clock.getDelayedCalls() == []  # the timeout was cancelled
    assert service.stopService().called


def test_a_command_is_killed_at_its_timeout_without_holding_anything_up():
    clock, bus = ProcessReactor(), EventBus()
    service = HookService({"job_started": (HookAction(command=("slow",), timeout=5),)},
                          bus, clock)
    service.startService()
    bus.publish("jobs", change("queued", "plotting"))  # returns at once
    [(_, _, process)] = clock.spawned
    clock.advance(4.9)
    assert process.signals == []
    with capturedLogs() as events:
        clock.advance(0.1)
        assert process.signals == ["KILL"] and process.closed
        process.protocol.processEnded(Failure(ProcessTerminated(signal=9)))
    assert "killed after its 5 s timeout" in messages(events)


def test_a_failing_command_is_logged():
    clock, bus = ProcessReactor(), EventBus()
    service = HookService({"job_failed": (HookAction(command=("false",)),)}, bus, clock)
    service.startService()
    bus.publish("jobs", change("plotting", "failed"))
    [(_, _, process)] = clock.spawned
    with capturedLogs() as events:
        process.protocol.processEnded(Failure(ProcessTerminated(exitCode=3)))
    assert "for job_failed failed" in messages(events)
    assert [e for e in events if e["log_level"].name == "warn"]


def test_stopping_waits_a_little_then_kills_running_commands():
    clock, bus = ProcessReactor(), EventBus()
    service = HookService({"job_completed": (HookAction(command=("slow",), timeout=600),)},
                          bus, clock, stop_grace=5)
    service.startService()
    bus.publish("jobs", change("plotting", "completed"))
    [(_, _, process)] = clock.spawned
    stopped = service.stopService()
    bus.publish("jobs", change("plotting", "completed"))  # after stop: nothing runs
    assert len(clock.spawned) == 1 and not stopped.called
    clock.advance(5)
    assert process.signals == ["KILL"]
    assert stopped.called


# -- webhooks with a fake agent ----------------------------------------------------

class FakeResponse:
    def __init__(self, code: int):
        self.code, self.phrase = code, b"X"
        self.headers, self.length = Headers(), 0

    def deliverBody(self, protocol: Any) -> None:
        protocol.dataReceived(b"")
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Answers each request with the next outcome: an HTTP code, an exception, or None
    (never answers)."""

    def __init__(self, clock: MemoryReactorClock, outcomes: list[Any]):
        self._clock, self._outcomes = clock, list(outcomes)
        self.requests: list[tuple[float, bytes, bytes, dict]] = []

    def request(self, method, uri, headers, body):
        class Consumer:
            data = b""

            def write(self, chunk: bytes) -> None:
                Consumer.data += chunk

        body.startProducing(Consumer())
        self.requests.append((self._clock.seconds(), method, uri,
                              dict(headers.getAllRawHeaders()), json.loads(Consumer.data)))
        outcome = self._outcomes.pop(0)
        if outcome is None:
            return Deferred()
        if isinstance(outcome, Exception):
            return fail(outcome)
        return succeed(FakeResponse(outcome))


def webhook_service(outcomes: list[Any], timeout: float = 10, stop_grace: float = 5):
    clock, bus = MemoryReactorClock(), EventBus()
    agent = FakeAgent(clock, outcomes)
    service = HookService({"job_completed": (HookAction(webhook="http://127.0.0.1:9/h",
                                                        timeout=timeout),)},
                          bus, clock, agent=agent, stop_grace=stop_grace)
    service.startService()
    return clock, bus, agent, service


def test_a_webhook_posts_the_event_as_json():
    clock, bus, agent, service = webhook_service([204])
    bus.publish("jobs", change("plotting", "completed", pen_down_mm=12.5))
    [(when, method, uri, headers, body)] = agent.requests
    assert (method, uri) == (b"POST", b"http://127.0.0.1:9/h")
    assert headers[b"Content-Type"] == [b"application/json"]
    assert headers[b"X-Vfab-Event"] == [b"job_completed"]
    assert body["event"] == "job_completed" and body["job_id"] == "j1"
    assert body["job_name"] == "poster" and body["state"] == "completed"
    assert body["timestamp"].endswith("Z")
    assert body["message"]["job"]["pen_down_mm"] == 12.5
    assert service.stopService().called  # nothing left running


def test_a_webhook_retries_with_doubling_delays():
    clock, bus, agent, service = webhook_service(
        [503, ConnectionRefusedError("nobody home"), 200])
    bus.publish("jobs", change("plotting", "completed"))
    assert len(agent.requests) == 1
    clock.advance(0.99)
    assert len(agent.requests) == 1
    clock.advance(0.01)
    assert len(agent.requests) == 2
    clock.advance(1.99)
    assert len(agent.requests) == 2
    with capturedLogs() as events:
        clock.advance(0.01)
    assert [when for when, *_ in agent.requests] == [0.0, 1.0, 3.0]
    assert "answered 200" in messages(events)
    assert clock.getDelayedCalls() == []


def test_a_webhook_gives_up_after_its_attempts():
    clock, bus, agent, service = webhook_service([500] * WEBHOOK_ATTEMPTS)
    with capturedLogs() as events:
        bus.publish("jobs", change("plotting", "completed"))
        clock.pump([1] * 10)
    assert len(agent.requests) == WEBHOOK_ATTEMPTS
    assert "giving up" in messages(events)
    assert [e for e in events if e["log_level"].name == "error"]


def test_a_webhook_that_never_answers_times_out_and_is_retried():
    clock, bus, agent, service = webhook_service([None, 200], timeout=4)
    bus.publish("jobs", change("plotting", "completed"))
    clock.advance(4)  # the first attempt times out; the retry waits 1 s
    assert len(agent.requests) == 1
    clock.advance(1)
    assert [when for when, *_ in agent.requests] == [0.0, 5.0]


def test_a_client_error_is_not_retried():
    clock, bus, agent, service = webhook_service([404])
    with capturedLogs() as events:
        bus.publish("jobs", change("plotting", "completed"))
        clock.pump([1] * 10)
    assert len(agent.requests) == 1
    assert "answered 404; not retried" in messages(events)


def test_stopping_abandons_webhook_retries_after_the_grace():
    clock, bus, agent, service = webhook_service([503, 503, 503], stop_grace=2)
    bus.publish("jobs", change("plotting", "completed"))
    stopped = service.stopService()
    with capturedLogs() as events:
        clock.advance(1)  # the retry still goes out during the grace ...
        clock.advance(1)  # ... then the wait for the third is abandoned
    assert stopped.called and len(agent.requests) == 2
    assert "abandoned" in messages(events)
    assert clock.getDelayedCalls() == []


# -- on the real daemon ------------------------------------------------------------

#: Writes the hook's VFAB_* environment as JSON to the file named by its argument.
DUMP_ENV = ("import json, os, sys; json.dump({k: v for k, v in os.environ.items() "
            "if k.startswith('VFAB_')}, open(sys.argv[1], 'w')); print('env written')")


class WebhookReceiver(Resource):
    """Answers the first POST 503 (so the daemon must retry), then 200."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[dict[str, Any]] = []
        self.delivered: Deferred[dict[str, Any]] = Deferred()

    def render_POST(self, request: Any) -> bytes:
        assert request.getHeader(b"content-type") == b"application/json"
        body = json.loads(request.content.read())
        self.posts.append(body)
        if len(self.posts) == 1:
            request.setResponseCode(503)
            return b"busy"
        self.delivered.callback(body)
        return b"thanks"


@pytest_twisted.inlineCallbacks
def test_hooks_run_when_a_job_completes_on_the_daemon(tmp_path):
    receiver = WebhookReceiver()
    port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
    env_file = tmp_path / "hook-env.json"
    hooks = {
        "job_started": [{"command": [sys.executable, "-c", "import time; time.sleep(60)"],
                         "timeout": 0.5}],
        "job_completed": [{"command": [sys.executable, "-c", DUMP_ENV, str(env_file)]},
                          {"webhook": f"http://127.0.0.1:{port.getHost().port}/vfab",
                           "timeout": 5}],
    }
    daemon = DaemonProcess(tmp_path, {"device": {"type": "simulator", "simulator_speed": 20},
                                      "hooks": hooks})
    try:
        yield deferToThread(daemon.start)
        status, job = yield deferToThread(daemon.submit, SVG, "hooked")
        assert status == 201
        done = yield deferToThread(daemon.wait_for_job, job["id"], {"completed"}, 60)
        assert done["state"] == "completed"
        delivered = yield receiver.delivered.addTimeout(30, reactor)
        yield deferToThread(daemon.wait_for_log, r"for job_completed done: env written")
        yield deferToThread(daemon.wait_for_log, r"for job_started killed after its 0.5 s")
    finally:
        code = yield deferToThread(daemon.stop)
        yield port.stopListening()
    assert code == 0
    assert json.loads(env_file.read_text()) == {
        "VFAB_EVENT": "job_completed", "VFAB_JOB_ID": job["id"], "VFAB_JOB_NAME": "hooked",
        "VFAB_STATE": "completed"}
    assert len(receiver.posts) == 2  # one 503, one retry
    assert delivered["event"] == "job_completed" and delivered["job_id"] == job["id"]
    assert delivered["message"]["job"]["state"] == "completed"
    assert "webhook" in daemon.log and "attempt 2 in 1 s" in daemon.log
