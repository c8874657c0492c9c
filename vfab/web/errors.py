"""How the queue's and the drawing's errors read to HTTP and WebSocket clients."""

from __future__ import annotations

from typing import NamedTuple

from twisted.python.failure import Failure

from vfab.geometry.errors import OutOfTravel, SVGError
from vfab.jobs.errors import (DatabaseDamaged, DiskFull, InvalidJobInput, InvalidTransition,
                              DatabaseUnavailable, JobNotFound, NoPlotterCanTake, NotAccepting)


class ClientError(NamedTuple):
    status: int
    code: str
    message: str


_KNOWN: tuple[tuple[type[Exception], int, str], ...] = (
    (SVGError, 400, "invalid_svg"),
    (OutOfTravel, 422, "out_of_travel"),
    (NoPlotterCanTake, 422, "no_plotter"),
    (InvalidJobInput, 400, "invalid_input"),
    (NotAccepting, 503, "not_accepting"),
    (JobNotFound, 404, "not_found"),
    (InvalidTransition, 409, "invalid_state"),
    (DiskFull, 507, "insufficient_storage"),
    (DatabaseDamaged, 503, "database_damaged"),
    (DatabaseUnavailable, 503, "database_unavailable"),
)


def client_error(failure: Failure) -> ClientError | None:
    """The status, code and message for an error the client caused, else None."""
    for kind, status, code in _KNOWN:
        if failure.check(kind):
            return ClientError(status, code, str(failure.value))
    return None
