"""The API key check shared by the HTTP API and the WebSocket.

A key can come as `X-API-Key: KEY`, `Authorization: Bearer KEY` or
`?api_key=KEY` (for clients that cannot set headers). Keys are compared in
constant time, and an address that keeps sending wrong keys is made to wait,
so that the key cannot be guessed by brute force.
"""

from __future__ import annotations

import enum
import hmac
import math
from collections import deque
from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from vfab.web.responses import error_body

_log = Logger()

#: How to present the key, for error messages.
HOW_TO_SEND = "send it as 'X-API-Key: KEY', 'Authorization: Bearer KEY' or '?api_key=KEY'"


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    MISSING = "missing"
    WRONG = "wrong"
    BLOCKED = "blocked"


def key_from(header: Callable[[str], str | None], query_key: str | None) -> str | None:
    """The key a client presented, from its headers or the query, or None."""
    key = header("x-api-key")
    if key:
        return key.strip()
    authorization = header("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_key or None


def request_key(request: IRequest) -> str | None:
    """The key presented with a twisted.web request."""
    def header(name: str) -> str | None:
        value = request.getHeader(name.encode("ascii"))
        return value.decode("utf-8", "replace") if value is not None else None

    query = (request.args or {}).get(b"api_key")
    query_key = query[0].decode("utf-8", "replace") if query else None
    return key_from(header, query_key)


def client_address(request: IRequest) -> str:
    """The peer's address, the unit the failure limit counts by."""
    address = request.getClientAddress()
    return getattr(address, "host", None) or str(address)


class APIKeyCheck:
    """Decides whether a presented key is good, limiting failed attempts per address."""

    #: Addresses tracked before stale entries are swept, to bound memory.
    _SWEEP_AT = 4096

    def __init__(self, api_key: str | None, required: bool, clock: IReactorTime, *,
                 max_failures: int = 10, window: float = 60.0):
        if required and not api_key:
            raise ValueError("an API key is required when authentication is on")
        self.required = required
        self._key = (api_key or "").encode("utf-8")
        self._clock = clock
        self._max_failures = max_failures
        self._window = window
        self._failures: dict[str, deque[float]] = {}

    def verify(self, key: str | None, client: str) -> Verdict:
        """Check `key` from `client`; a wrong key counts towards the limit."""
        if not self.required:
            return Verdict.ALLOWED
        if self._blocked(client):
            return Verdict.BLOCKED
        if key is None:
            return Verdict.MISSING
        if hmac.compare_digest(key.encode("utf-8"), self._key):
            return Verdict.ALLOWED
        self._record_failure(client)
        _log.warn("wrong API key from {client}", client=client)
        return Verdict.WRONG

    def verify_request(self, request: IRequest) -> Verdict:
        return self.verify(request_key(request), client_address(request))

    def retry_after(self, client: str) -> int:
        """Seconds until `client` may try again."""
        failures = self._failures.get(client)
        if not failures:
            return 0
        return max(1, math.ceil(failures[0] + self._window - self._clock.seconds()))

    def refusal(self, request: IRequest, verdict: Verdict) -> bytes:
        """The 401 or 429 response for a refused request."""
        if verdict is Verdict.BLOCKED:
            wait = self.retry_after(client_address(request))
            request.setHeader(b"Retry-After", b"%d" % wait)
            return error_body(request, 429, "too_many_attempts",
                              f"too many wrong API keys from this address; retry in {wait} s")
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="vfab"')
        if verdict is Verdict.MISSING:
            message = f"an API key is required: {HOW_TO_SEND}"
        else:
            message = "the API key is wrong"
        return error_body(request, 401, "unauthorized", message)

    def _recent(self, client: str) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        horizon = self._clock.seconds() - self._window
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        return failures

    def _blocked(self, client: str) -> bool:
        failures = self._recent(client)
        return failures is not None and len(failures) >= self._max_failures

    def _record_failure(self, client: str) -> None:
        if len(self._failures) >= self._SWEEP_AT:
            for address in list(self._failures):
                self._recent(address)
        self._failures.setdefault(client, deque()).append(self._clock.seconds())
