"""A job as the store keeps it and as the contract shows it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import attr

#: The priorities a job may have (inclusive): SQLite stores at most 64 bits,
#: and no queue needs more than a million levels either way.
PRIORITY_RANGE = (-1_000_000, 1_000_000)


def iso8601(seconds: float) -> str:
    """UTC time as the contract writes it: 2026-11-26T03:20:48.123Z."""
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Job:
    id: str
    name: str
    state: str
    priority: int = 0
    preset: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    layers: int = 0
    paths: int = 0
    pen_down_mm: float = 0.0
    pen_up_mm: float = 0.0
    estimated_seconds: float | None = None
    progress: float = 0.0
    error: str | None = None
    #: The SVG file's name inside the workspace's jobs folder.
    svg_file: str = ""
    #: Saved progress in the motion plan: {"layer", "path", "move"}, or None.
    position: dict[str, int] | None = None
    #: The plotter the job asked for, if any, and the tags a plotter must all have.
    plotter: str | None = None
    tags: tuple[str, ...] = ()
    #: The plotter that took the job, and its host; an interrupted job stays with it.
    taken_by: str | None = None
    host: str | None = None
    #: Seconds the plotter has spent on the job over all its runs, pauses and
    #: waits for a pen not counted (on the virtual plotter, at its own speed).
    plotting_seconds: float = 0.0
    #: The motion plan's file inside the jobs folder (None: not planned yet) and
    #: the fingerprint of the settings it was planned with (planfile.fingerprint).
    plan_file: str | None = None
    plan_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The job in the contract's JSON shape."""
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "priority": self.priority,
            "preset": self.preset,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "layers": self.layers,
            "paths": self.paths,
            "pen_down_mm": round(self.pen_down_mm, 3),
            "pen_up_mm": round(self.pen_up_mm, 3),
            "estimated_seconds": (None if self.estimated_seconds is None
                                  else round(self.estimated_seconds, 1)),
            "progress": round(self.progress, 4),
            "error": self.error,
            "plotter": self.plotter or self.taken_by,
            "host": self.host,
            "tags": list(self.tags),
            "plotting_seconds": round(self.plotting_seconds, 1),
        }
