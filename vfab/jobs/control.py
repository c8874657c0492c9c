"""What the web face, the WebSocket and the CLI may ask of the job queue.

The queue service implements this; the HTTP API and the WebSocket depend only
on it, so they can be tested against a fake. Jobs travel as JSON-ready dicts
in the contract's shape: id, name, state, priority, created_at, started_at,
finished_at, layers, paths, pen_down_mm, pen_up_mm, estimated_seconds,
progress, error, plotter, host (and tags).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol, TypeVar

from twisted.internet.defer import Deferred

JobDict = dict[str, Any]
T = TypeVar("T")


class JobControl(Protocol):
    def receive(self, fill: Callable[[BinaryIO], T]) -> Deferred[tuple[Path, T]]:
        """A new file for an upload, written by `fill(out)` in a thread; fires with
        the file (for `submit`) and what `fill` returned. Fails with DiskFull (507)."""

    def submit(self, name: str, svg: bytes | Path, priority: int = 0, preset: str | None = None,
               plotter: str | None = None, tags: tuple[str, ...] = ()) -> Deferred[JobDict]:
        """Parse, check and queue a drawing for `plotter` (None: any) with every tag:
        its bytes, or the file `receive` wrote, which becomes the job's (or goes, if
        the job is refused).

        Fails with SVGError (400), OutOfTravel (422), NoPlotterCanTake (422),
        InvalidJobInput (400) or NotAccepting (503).
        """

    def get(self, job_id: str) -> Deferred[JobDict]:
        """The job; fails with JobNotFound (404)."""

    def list(self, state: str | None = None, limit: int | None = None) -> Deferred[list[JobDict]]:
        """Jobs newest first, optionally of one state and at most `limit`."""

    def pause(self, job_id: str) -> Deferred[JobDict]:
        """Fails with JobNotFound (404) or InvalidTransition (409)."""

    def resume(self, job_id: str) -> Deferred[JobDict]:
        """Fails with JobNotFound (404) or InvalidTransition (409)."""

    def cancel(self, job_id: str) -> Deferred[JobDict]:
        """Fails with JobNotFound (404) or InvalidTransition (409)."""

    def delete(self, job_id: str) -> Deferred[None]:
        """Only finished jobs; fails with JobNotFound (404) or InvalidTransition (409)."""

    def preview(self, job_id: str) -> Deferred[dict[str, Any]]:
        """The job's drawing for display: {"layers": [{"name", "paths": [[[x, y], ...]]}],
        "width_mm", "height_mm"}, simplified; fails with JobNotFound."""

    def queue_length(self) -> int:
        """How many jobs wait in `queued`."""

    def active_jobs(self) -> int:
        """How many jobs hold the plotter (plotting, paused, awaiting_pen)."""


class DeviceStatus(Protocol):
    def status(self) -> dict[str, Any]:
        """The `device_status` message (with "type"), as the contract lists its fields."""
