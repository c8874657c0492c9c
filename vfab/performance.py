"""One `performance:` log line per finished plot: how long it took against the estimate.

The reference's troubleshooting guide greps the log for `performance`; this
listens to the event bus, so the job runner does not have to know about it.
`plot_seconds` (wall time, pauses included) is what the metrics' histogram counts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

from twisted.logger import Logger

from vfab.events import EventBus

_log = Logger()

#: Job states after which a plot's figures are final.
_ENDED = ("completed", "failed", "cancelled")


def plot_seconds(job: dict[str, Any]) -> float | None:
    """Wall time from the job's first pen movement to its end (pauses included), or None."""
    started, finished = job.get("started_at"), job.get("finished_at")
    if not started or not finished:
        return None
    try:
        begin = datetime.fromisoformat(started.replace("Z", "+00:00"))
        end = datetime.fromisoformat(finished.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return None
    return max(0.0, (end - begin).total_seconds())


def performance_line(job: dict[str, Any], time_factor: float = 1.0
                     ) -> tuple[str, dict[str, Any]] | None:
    """The log format and fields for an ended job, or None when it never plotted.

    The time is the job's `plotting_seconds`: the plotter's time over all its
    runs, restarts included, pauses and waits for a pen not. The estimate is
    an AxiDraw's; `time_factor` is how much faster the plotter runs (the
    virtual plotter's speed), so the estimate here is the AxiDraw's divided by
    it, and the line names both where they differ.
    """
    if not job.get("started_at"):
        return None
    seconds = float(job.get("plotting_seconds") or 0.0)
    estimate = job.get("estimated_seconds")
    if estimate:
        here = estimate / time_factor
        versus = (f"estimate {here:.1f} s" if time_factor == 1.0 else
                  f"estimate {here:.1f} s here ({estimate:.1f} s on an AxiDraw)")
        versus += f", {(seconds - here) / here * 100.0:+.0f}%"
    else:
        versus = "no estimate"
    fields = {"job_id": job.get("id"), "name": job.get("name"), "state": job.get("state"),
              "seconds": seconds, "versus": versus,
              "pen_down_m": float(job.get("pen_down_mm") or 0.0) / 1000.0,
              "progress": float(job.get("progress") or 0.0) * 100.0}
    if job.get("state") == "completed":
        return ("performance: job {job_id} ({name}) plotted in {seconds:.1f} s ({versus}), "
                "{pen_down_m:.2f} m pen down", fields)
    return ("performance: job {job_id} ({name}) {state} after {seconds:.1f} s "
            "at {progress:.0f}% ({versus} for the whole plot)", fields)


class PerformanceLog:
    """Logs a `performance:` line when a job that plotted ends.

    The job's stored plotting time is what is compared with the estimate: a
    plot paused overnight did not take a night, and one resumed after a
    restart took its runs before too.
    """

    def __init__(self, bus: EventBus, time_factor: float = 1.0):
        self._time_factor = time_factor
        self._unsubscribe: Callable[[], None] | None = bus.subscribe(self._on_message)

    def _on_message(self, channel: str, message: dict[str, Any]) -> None:
        if channel != "jobs" or message.get("type") != "job_state_change" \
                or message.get("to_state") not in _ENDED:
            return
        line = performance_line(message.get("job") or {}, self._time_factor)
        if line is not None:
            _log.info(line[0], **line[1])

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
