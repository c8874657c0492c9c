"""A host's farm link on a real PostgreSQL: what the other hosts said while the
database was away is not lost to this host's WebSocket clients."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from vfab.events import EventBus
from vfab.farmlink import RESYNC_REASON, FarmLink
from vfab.jobs import states
from vfab.jobs.farm import FarmPlotter
from vfab.store.jobstore import JobStore
from test_jobstore import make_job

#: Seconds the test waits for the link to hear or read again (it takes about one).
WAIT = 30


class Recorder:
    def refresh(self) -> None:
        return None


class Queue:
    """What the link asks of this host's queue: a host without plotters."""

    recorder = Recorder()

    def wake_all(self) -> None:
        return None

    def plotter_records(self) -> list[dict[str, Any]]:
        return []


def first(bus: EventBus, wanted: Any) -> Deferred[dict[str, Any]]:
    """The first message on `bus` (this host's or the farm's) that `wanted` accepts."""
    seen: Deferred[dict[str, Any]] = Deferred()

    def look(channel: str, message: dict[str, Any]) -> None:
        if not seen.called and wanted(message):
            seen.callback(message)
    unsubscribe = bus.subscribe(look, remote=True)
    seen.addBoth(lambda result: (unsubscribe(), result)[1])
    return seen.addTimeout(WAIT, reactor)


def read_jobs() -> Deferred[dict[str, Any]]:
    """The link's next log line that says it read the jobs (again)."""
    seen: Deferred[dict[str, Any]] = Deferred()

    def look(event: dict[str, Any]) -> None:
        if not seen.called and event.get("log_format", "").startswith("farm: read the"):
            seen.callback(event)
    globalLogPublisher.addObserver(look)
    seen.addBoth(lambda result: (globalLogPublisher.removeObserver(look), result)[1])
    return seen.addTimeout(WAIT, reactor)


@pytest_twisted.inlineCallbacks
def test_a_change_made_while_the_database_was_away_reaches_the_clients_on_reconnecting(
        postgres_server, postgres_url):
    """Host "studio" listens; another host's change sends no notification that
    studio hears (here: none at all, as when it is sent while studio's listener
    is down); PostgreSQL restarts; studio reads the jobs again and tells its
    clients, once, that the job is plotting now."""
    other = JobStore(postgres_url, reactor=reactor, host="attic")
    other.open()
    store = JobStore(postgres_url, reactor=reactor, host="studio")
    store.open()
    bus = EventBus()
    link = FarmLink(url=postgres_url, host="studio", store=store, queue=Queue(), bus=bus,
                    reactor=reactor, heartbeat_interval=0.2, host_timeout=30)
    told: list[dict[str, Any]] = []
    bus.subscribe(lambda channel, message: told.append(message), remote=True)
    try:
        yield other.add(make_job("job1"))
        yield other.add(make_job("job2"))
        first_read = read_jobs()
        link.startService()
        event = yield first_read
        assert (event["count"], event["again"], event["changed"]) == (2, "", 0)
        yield other.next_to_plot(FarmPlotter(name="left", host="attic"))
        yield other.transition("job1", states.PLOTTING, "started", claimed_by="left")
        read_again = read_jobs()
        told_of_it = first(bus, lambda message: message.get("type") == "job_state_change")
        postgres_server.restart()
        message = yield told_of_it
        event = yield read_again
    finally:
        link.stopService()
        store.close()
        other.close()
    assert (message["job_id"], message["from_state"], message["to_state"]) == (
        "job1", states.QUEUED, states.PLOTTING)
    assert message["reason"] == RESYNC_REASON and message["job"]["state"] == states.PLOTTING
    assert (event["count"], event["again"], event["changed"]) == (2, " again", 1)
    assert [m["job_id"] for m in told if m.get("type") == "job_state_change"] == ["job1"]
