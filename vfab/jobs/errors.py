"""Errors of job control that the HTTP API, the WebSocket and the CLI report."""

from vfab.jobs.states import InvalidTransition

__all__ = ["InvalidTransition", "JobNotFound", "NotAccepting", "InvalidJobInput", "DiskFull",
           "DatabaseDamaged", "DatabaseUnavailable", "NoPlotterCanTake"]


class JobNotFound(KeyError):
    """No job has this id (HTTP 404)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(job_id)

    def __str__(self) -> str:
        return f"no job with id {self.job_id!r}"


class NotAccepting(RuntimeError):
    """The daemon is shutting down and takes no new jobs (HTTP 503)."""

    def __str__(self) -> str:
        return "the daemon is shutting down and accepts no new jobs"


class InvalidJobInput(ValueError):
    """A job field (name, priority, preset) is not acceptable (HTTP 400)."""


class NoPlotterCanTake(ValueError):
    """No plotter of the farm has the name or every tag a job asks for (HTTP 422)."""


class DiskFull(OSError):
    """The workspace's disk cannot hold what a job needs (HTTP 507); nothing was left
    behind. `then` says what the person should do next."""

    def __init__(self, what: str, then: str = "free some space and try again"):
        self.what = what
        self.then = then
        super().__init__(what)

    def __str__(self) -> str:
        return f"the disk is full: could not write {self.what}; {self.then}"


class DatabaseDamaged(RuntimeError):
    """The job database was found damaged while the daemon runs (HTTP 503): nothing
    is read or written until a person restores it; the message says how.

    The store logs it once; whoever meets it later need not log it again."""


class DatabaseUnavailable(RuntimeError):
    """The farm's database server cannot be reached (HTTP 503): it restarts, or the
    network is down. The store tries once more on a new connection; the queue
    tries again every few seconds."""
