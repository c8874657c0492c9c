"""Suite-wide checks: no Deferred error may go unhandled, in any test."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from twisted.logger import globalLogPublisher


def _unhandled(event: dict[str, Any]) -> bool:
    return "Unhandled error in Deferred" in str(event.get("log_format", ""))


@pytest.fixture(autouse=True)
def no_unhandled_deferred_errors():
    """Fail the test if a Deferred it left behind was garbage with an error in it
    (Twisted logs that as "Unhandled error in Deferred" and nobody ever sees it)."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if _unhandled(event):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield
        gc.collect()  # Deferreds report an unhandled error when they are collected
    finally:
        globalLogPublisher.removeObserver(observe)
    if seen:
        failures = [event.get("log_failure") for event in seen]
        details = "\n".join(failure.getTraceback() if failure is not None else repr(event)
                            for failure, event in zip(failures, seen))
        pytest.fail(f"{len(seen)} unhandled error(s) in Deferreds:\n{details}")
