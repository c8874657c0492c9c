"""One `performance:` log line per finished plot: how long it took against the estimate.

The reference's troubleshooting guide greps the log for `performance`; this
listens to the event bus, so the job runner does not have to know about it.
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


def performance_line(job: dict[str, Any], plotting_seconds: float | None = None,
                     time_factor: float = 1.0) -> tuple[str, dict[str, Any]] | None:
    """The log format and fields for an ended job, or None when it never plotted.

    `plotting_seconds` is the time the plotter spent moving for the job (pauses
    and waits for a pen not counted); without it, the wall time is all there is.
    `time_factor` is how much faster than real the plotter runs (the virtual
    plotter's speed), so that its plots compare with the estimate too.
    """
    seconds = plotting_seconds if plotting_seconds is not None else plot_seconds(job)
    if seconds is None:
        return None
    seconds *= time_factor
    estimate = job.get("estimated_seconds")
    if estimate:
        versus = f"estimate {estimate:.1f} s, {(seconds - estimate) / estimate * 100.0:+.0f}%"
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

    The time compared with the estimate is plotting time, as each run's
    `job_progress` counts it (`elapsed_seconds`), summed over the job's runs in
    this daemon: a plot paused overnight did not take a night.
    """

    def __init__(self, bus: EventBus, time_factor: float = 1.0):
        self._time_factor = time_factor
        #: Plotting seconds of each job's ended runs, and of the run under way.
        self._earlier_runs: dict[str, float] = {}
        self._this_run: dict[str, float] = {}
        self._unsubscribe: Callable[[], None] | None = bus.subscribe(self._on_message)

    def _on_message(self, channel: str, message: dict[str, Any]) -> None:
        if channel != "jobs":
            return
        job_id = message.get("job_id")
        if message.get("type") == "job_progress":
            self._this_run[job_id] = float(message.get("elapsed_seconds") or 0.0)
            return
        if message.get("type") != "job_state_change":
            return
        if message.get("to_state") == "interrupted":
            # The run ended; a resume starts a new one, counting from zero.
            self._earlier_runs[job_id] = (self._earlier_runs.get(job_id, 0.0)
                                          + self._this_run.pop(job_id, 0.0))
            return
        if message.get("to_state") not in _ENDED:
            return
        plotting = None
        if job_id in self._this_run or job_id in self._earlier_runs:
            plotting = self._earlier_runs.pop(job_id, 0.0) + self._this_run.pop(job_id, 0.0)
        line = performance_line(message.get("job") or {}, plotting, self._time_factor)
        if line is not None:
            _log.info(line[0], **line[1])

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
