"""Job states and the transitions between them, as the contract names them."""

from __future__ import annotations

QUEUED = "queued"
PLOTTING = "plotting"
PAUSED = "paused"
AWAITING_PEN = "awaiting_pen"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
INTERRUPTED = "interrupted"

STATES = (QUEUED, PLOTTING, PAUSED, AWAITING_PEN, COMPLETED, FAILED, CANCELLED, INTERRUPTED)
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})
#: States in which a job holds the plotter.
ACTIVE = frozenset({PLOTTING, PAUSED, AWAITING_PEN})

TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({PLOTTING, CANCELLED, FAILED}),
    PLOTTING: frozenset({PAUSED, AWAITING_PEN, COMPLETED, FAILED, CANCELLED, INTERRUPTED}),
    # Paused on the way to a pen change: resume asks for the pen.
    PAUSED: frozenset({PLOTTING, AWAITING_PEN, CANCELLED, FAILED, INTERRUPTED}),
    AWAITING_PEN: frozenset({PLOTTING, CANCELLED, FAILED, INTERRUPTED}),
    INTERRUPTED: frozenset({QUEUED, PLOTTING, CANCELLED, FAILED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    """The job's state does not allow what was asked (HTTP 409)."""

    def __init__(self, job_id: str, from_state: str, to_state: str):
        self.job_id, self.from_state, self.to_state = job_id, from_state, to_state
        super().__init__(f"job {job_id} is {from_state}; it cannot become {to_state}")


def check_transition(job_id: str, from_state: str, to_state: str) -> None:
    if to_state not in TRANSITIONS[from_state]:
        raise InvalidTransition(job_id, from_state, to_state)
