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


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of this test process's own (about a second to start),
    stopped and removed when the session ends."""
    from postgres_server import PostgresServer

    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a new, empty database on the tests' PostgreSQL server."""
    return postgres_server.create_database()
