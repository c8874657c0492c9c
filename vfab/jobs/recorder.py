"""Job state changes: written to the store with their reason, then announced.

Every change goes through `change()`, so that the store, the log and the
`job_state_change` messages never disagree. The counts of jobs per state
(for `system_status` and the metrics) are read back from the store after
every change; the store answers in the order it was asked, so the last
answer is always the newest and no count is ever adjusted by hand.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from vfab.events import EventBus
from vfab.jobs import states
from vfab.jobs.errors import DatabaseDamaged, DatabaseUnavailable, DiskFull
from vfab.jobs.job import Job

_log = Logger()


class StateRecorder:
    """Records and announces job state changes; knows how many jobs are in each state."""

    def __init__(self, store: Any, bus: EventBus, *,
                 release_reserve: Callable[[str], bool] | None = None):
        """`release_reserve(purpose)` gives the disk the room set aside for a full disk
        (whether there was any): a job's end is recorded with it (see `change`)."""
        self._store = store
        self._bus = bus
        self._release_reserve = release_reserve
        self._counts: dict[str, int] = {}

    def refresh(self) -> Deferred[None]:
        """Read the counts again; never fails (a failure is logged, the old counts stay)."""
        reading = self._store.counts()
        reading.addCallbacks(self._set_counts, self._counting_failed)
        return reading

    def _set_counts(self, counts: dict[str, int]) -> None:
        self._counts = dict(counts)

    @staticmethod
    def _counting_failed(failure: Failure) -> None:
        # Damage the store has said once; a farm's database away, the queue says.
        if not failure.check(DatabaseDamaged, DatabaseUnavailable):
            _log.failure("could not count the jobs in the database", failure)

    @inlineCallbacks
    def change(self, job_id: str, to_state: str, reason: str, **fields: Any) -> Deferred[Job]:
        """Move a job to `to_state` in the store and announce it; fails as the store does.

        An interrupted job's `error` says why it stopped (it holds the queue, and
        whoever looks needs to know); a job queued or plotting again has none."""
        if to_state == states.INTERRUPTED:
            fields.setdefault("error", reason)
        elif to_state in (states.QUEUED, states.PLOTTING):
            fields.setdefault("error", None)
        try:
            before, after = yield self._store.transition(job_id, to_state, reason, **fields)
        except DiskFull:
            # A job's end is a tiny write that must get through a full disk: only
            # a finished job can be deleted, and deleting is how space is freed
            # through the API (cancel, then DELETE). Use the room set aside, once.
            if to_state not in states.FINISHED or self._release_reserve is None \
                    or not self._release_reserve(f"record job {job_id} as {to_state}"):
                raise
            before, after = yield self._store.transition(job_id, to_state, reason, **fields)
        _log.info("job {job_id}: {from_state} -> {to_state} ({reason})", job_id=job_id,
                  from_state=before.state, to_state=to_state, reason=reason)
        self.announce(after, before.state, reason)
        return after

    def announce(self, job: Job, from_state: str | None, reason: str) -> None:
        """Tell the `jobs` channel (a new job has no `from_state`) and count again."""
        self.refresh()
        self._bus.publish("jobs", {
            "type": "job_state_change",
            "job_id": job.id,
            "from_state": from_state,
            "to_state": job.state,
            "reason": reason,
            "job": job.to_dict(),
        })

    def count(self, state: str) -> int:
        return self._counts.get(state, 0)

    def state_counts(self) -> dict[str, int]:
        return {state: self._counts.get(state, 0) for state in states.STATES}

    def alert_interrupted(self, job_id: str, reason: str) -> None:
        """A `system_alert`: the queue waits for a person to resume or cancel the job."""
        self._bus.publish("system", {
            "type": "system_alert", "severity": "error", "title": "Plot interrupted",
            "message": f"Job {job_id} was interrupted ({reason}). The queue waits: resume "
                       f"the job to finish the drawing (vfab resume {job_id}), or cancel it "
                       f"(vfab cancel {job_id})."})
