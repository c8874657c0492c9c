"""A host's link to the other hosts of a farm, through the PostgreSQL queue they share.

- Every job state change, job progress and plotter status of this host is sent
  with `NOTIFY` (channel `vfab`); what the others send arrives through `LISTEN`
  on a connection of its own, in a thread, and is published on this host's bus
  for its WebSocket clients, and wakes its schedulers (a job may be free now).
- Every `farm.heartbeat_interval` the host writes that it is alive, with its
  plotters, and reads the others': a host silent for `farm.host_timeout` has
  its plotting jobs marked interrupted (they stay with their plotter, whose
  sheet holds half the drawing, and are resumed there once the host is back).
  The same tick wakes the schedulers, in case a notification was missed while
  the database was away.

A database that goes away costs nothing but the time it is away: the listener
connects again, a heartbeat that fails is tried at the next tick. The
notifications of that time are lost, the store is not: once the listener is
back, the host reads every job again and tells its WebSocket clients of each
state that changed meanwhile (a `job_state_change` with RESYNC_REASON), then
wakes its schedulers.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from vfab.events import EventBus
from vfab.jobs.farm import FarmPlotter
from vfab.jobs.errors import DatabaseUnavailable
from vfab.store.engines import CONNECT_TIMEOUT, ServerPool

_log = Logger()

CHANNEL = "vfab"
#: PostgreSQL refuses a notification payload of 8000 bytes or more.
MAX_PAYLOAD = 7900
#: Seconds the listener waits for a notification before it looks whether to stop.
LISTEN_POLL = 0.5
#: Seconds between attempts to connect the listener again.
RECONNECT_SECONDS = 1.0
#: The reason of a state change learnt by reading the jobs again after a loss.
RESYNC_REASON = "changed while this host could not hear the farm (read again on reconnecting)"
#: What this host tells the others: (channel, message type).
RELAYED = frozenset({("jobs", "job_state_change"), ("jobs", "job_progress"),
                     ("device", "device_status"), ("system", "system_alert")})


class Listener:
    """LISTEN on a connection of its own, in a thread; each payload is handed to
    `received` and each (re)connection or loss to `connected(up, why)`, on the
    reactor's thread."""

    def __init__(self, url: str, reactor: Any, received: Callable[[str], None],
                 connected: Callable[[bool, str], None]):
        self._url = url
        self._reactor = reactor
        self._received = received
        self._connected = connected
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="vfab-farm-listener",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop: it does within LISTEN_POLL seconds."""
        self._stopping.set()

    def _loop(self) -> None:
        import psycopg

        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True,
                                     connect_timeout=CONNECT_TIMEOUT) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._reactor.callFromThread(self._connected, True, "")
                    while not self._stopping.is_set():
                        for note in connection.notifies(timeout=LISTEN_POLL):
                            self._reactor.callFromThread(self._received, note.payload)
            except psycopg.Error as error:
                why = (str(error).strip().splitlines() or [type(error).__name__])[0]
                self._reactor.callFromThread(self._connected, False, why)
                self._stopping.wait(RECONNECT_SECONDS)


class FarmLink(Service):
    """Relays this host's events to the farm and the farm's to this host; keeps the
    hosts' heartbeats."""

    name = "farm"

    def __init__(self, *, url: str, host: str, store: Any, queue: Any, bus: EventBus,
                 reactor: Any, heartbeat_interval: float, host_timeout: float):
        self.host = host
        self._url = url
        self._store = store
        self._queue = queue
        self._bus = bus
        self._reactor = reactor
        self._interval = heartbeat_interval
        self._timeout = host_timeout
        #: One connection, so that this host's notifications leave in their order.
        self._sender: ServerPool | None = None
        self._listener: Listener | None = None
        self._beat: LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._untrack: Callable[[], None] | None = None
        self._listening = False
        #: Each job's state as this host last told its clients (job id -> state),
        #: complete once the jobs were first read (`_read_once`).
        self._states: dict[str, str] = {}
        self._read_once = False
        #: A reading again that failed: the next heartbeat that gets through does it.
        self._resync_due = False
        self._said_unavailable = False
        #: The other hosts' plotters: name -> {"host", "tags", "model", "status"}.
        self.remote: dict[str, dict[str, Any]] = {}
        queue.remote_plotters = self.remote_plotters
        queue.remote_statuses = self.remote_statuses

    # -- lifecycle ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._sender = ServerPool(
            "psycopg", self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
            cp_min=1, cp_max=1, cp_reconnect=True, cp_noisy=False, cp_reactor=self._reactor)
        self._unsubscribe = self._bus.subscribe(self._relay)
        self._untrack = self._bus.subscribe(self._track, remote=True)
        self._listener = Listener(self._url, self._reactor, self._received, self._connected)
        self._listener.start()
        self._beat = LoopingCall(self.beat)
        self._beat.clock = self._reactor
        self._beat.start(self._interval, now=True).addErrback(
            lambda failure: _log.failure("the farm heartbeat stopped", failure))
        _log.info("farm: host {host} on the shared queue (heartbeat every {interval:g} s, "
                  "a host silent {timeout:g} s counts as gone)", host=self.host,
                  interval=self._interval, timeout=self._timeout)

    def stopService(self) -> None:
        super().stopService()
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._untrack is not None:
            self._untrack()
        if self._listener is not None:
            self._listener.stop()
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    # -- this host's events, to the others --------------------------------------

    def _relay(self, channel: str, message: dict[str, Any]) -> None:
        if (channel, message.get("type")) not in RELAYED or self._sender is None:
            return
        payload = json.dumps({"host": self.host, "channel": channel, "message": message},
                             separators=(",", ":"), default=str)
        if len(payload.encode()) > MAX_PAYLOAD:
            _log.debug("farm: a {type} too large to notify ({size} bytes) is not relayed",
                       type=message.get("type"), size=len(payload))
            return
        sending = self._sender.runOperation("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
        sending.addErrback(self._not_sent)

    def _not_sent(self, failure: Any) -> None:
        # The database is away: the listener and the heartbeat say so once.
        _log.debug("farm: a notification was not sent: {why}", why=failure.getErrorMessage())

    # -- the others' events, to this host ---------------------------------------

    def _received(self, payload: str) -> None:
        try:
            note = json.loads(payload)
            host, channel, message = note["host"], note["channel"], note["message"]
        except (ValueError, KeyError, TypeError):
            _log.warn("farm: a notification that is not vfab's: {payload:.80}",
                      payload=payload)
            return
        if host == self.host or not self.running:
            return
        if channel == "device" and message.get("plotter"):
            known = self.remote.setdefault(message["plotter"], {"host": host})
            known.update(host=host, tags=message.get("tags", []), status=message)
        self._bus.publish(channel, message, remote=True)
        if message.get("type") == "job_state_change":
            self._queue.recorder.refresh()
            self._queue.wake_all()

    def _track(self, channel: str, message: dict[str, Any]) -> None:
        if message.get("type") == "job_state_change":
            self._states[message["job_id"]] = message["to_state"]

    def _connected(self, up: bool, why: str) -> None:
        if up and not self._listening:
            self._listening = True
            _log.info("farm: listening to the other hosts")
            # What was said while we could not hear it: read the queue again.
            self.resync().addCallback(lambda _: self._queue.wake_all())
        elif not up and self._listening:
            self._listening = False
            _log.warn("farm: lost the database connection that hears the other hosts "
                      "({why}); connecting again", why=why)

    @inlineCallbacks
    def resync(self) -> Deferred[None]:
        """Read every job and announce, as another host's change, each state this
        host's clients have not been told (the first time: only remember them).
        A change heard while reading is newer than what was read: it stands.
        Never fails: if the database is still away, the next heartbeat that gets
        through reads again."""
        told = dict(self._states)
        self._resync_due = False
        try:
            jobs = yield self._store.list()
        except DatabaseUnavailable as error:
            self._resync_due = True
            _log.warn("farm: could not read the jobs again: {error}", error=error)
            return
        except Exception:  # the store's other failures: logged, read at the next heartbeat
            self._resync_due = True
            _log.failure("farm: could not read the jobs again")
            return
        self._queue.recorder.refresh()
        changed = 0
        for job in reversed(jobs):  # oldest first, as they were submitted
            before = told.get(job.id)
            if not self._read_once:
                self._states.setdefault(job.id, job.state)
                continue
            if job.state == before or self._states.get(job.id) != before:
                continue
            changed += 1
            self._states[job.id] = job.state
            self._bus.publish("jobs", {
                "type": "job_state_change", "job_id": job.id, "from_state": before,
                "to_state": job.state, "reason": RESYNC_REASON, "job": job.to_dict()},
                remote=True)
        first, self._read_once = not self._read_once, True
        _log.info("farm: read the {count} jobs{again}; {changed} changed unheard",
                  count=len(jobs), again="" if first else " again", changed=changed)

    # -- heartbeats --------------------------------------------------------------

    @inlineCallbacks
    def beat(self) -> Deferred[None]:
        """Say this host is alive, learn the others' plotters, settle the silent
        ones' jobs and wake the schedulers; never fails."""
        try:
            yield self._store.heartbeat(self.host, self._queue.plotter_records())
            hosts = yield self._store.hosts()
            for other in hosts:
                if other["name"] == self.host:
                    continue
                gone = other["silent"] >= self._timeout
                self._learn(other, gone)
                if gone:
                    yield self._settle_gone(other["name"], other["silent"])
            if self._said_unavailable:
                self._said_unavailable = False
                _log.info("farm: the database is back")
            if self._resync_due:
                yield self.resync()
        except DatabaseUnavailable as error:
            if not self._said_unavailable:
                self._said_unavailable = True
                _log.warn("farm: {error}; trying again every {interval:g} s", error=error,
                          interval=self._interval)
        except Exception:  # the store's other failures: logged, tried at the next tick
            _log.failure("farm: the heartbeat failed")
        self._queue.wake_all()

    def _learn(self, other: dict[str, Any], gone: bool) -> None:
        for plotter in other["plotters"]:
            status = dict(plotter.get("status") or {})
            if gone:
                status.update(status="disconnected", current_job_id=None)
            known = self.remote.get(plotter["name"])
            if known is not None and not gone and known.get("host") == other["name"] \
                    and known.get("status"):
                status = known["status"]  # a notification is newer than the last beat
            self.remote[plotter["name"]] = {"host": other["name"], "tags": plotter["tags"],
                                            "model": plotter.get("model"), "status": status}

    @inlineCallbacks
    def _settle_gone(self, host: str, silent: float) -> Deferred[None]:
        reason = (f"host {host} went silent (no heartbeat for {silent:.0f} s); resume "
                  f"continues from the saved progress on the same plotter once it is back")
        changed = yield self._store.interrupt_host(host, self._timeout, reason)
        for before, after in changed:
            _log.warn("job {job_id} was plotting on host {host}, silent for {silent:.0f} s: "
                      "it is now interrupted", job_id=after.id, host=host, silent=silent)
            self._queue.recorder.announce(after, before.state, reason)
            self._queue.recorder.alert_interrupted(after.id, reason)

    # -- what the queue asks ------------------------------------------------------

    def remote_plotters(self) -> list[tuple[FarmPlotter, str | None]]:
        """The other hosts' plotters, with their model (None if not known)."""
        return [(FarmPlotter(name=name, host=info["host"], tags=tuple(info.get("tags", ()))),
                 info.get("model")) for name, info in sorted(self.remote.items())]

    def remote_statuses(self) -> list[dict[str, Any]]:
        """The other hosts' plotters' `device_status`, as last heard."""
        return [info["status"] for _, info in sorted(self.remote.items())
                if info.get("status")]
