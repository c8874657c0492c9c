"""The API key check shared by the HTTP API and the WebSocket.

A key can come as `X-API-Key: KEY`, `Authorization: Bearer KEY` or
`?api_key=KEY` (for clients that cannot set headers), and in no other way:
not in a form body, not in a `;`-separated query (see vfab.web.query). A
WebSocket upgrade may also carry it as a subprotocol token (vfab.web.ws). Keys are compared in
constant time, and an address that keeps sending wrong keys is made to wait,
so that the key cannot be guessed by brute force.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import math
from collections import deque
from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from vfab.audit import AuditLog
from vfab.web.query import KEY_PARAMETER, query_value, scrubbed_uri
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


def request_key(request: IRequest, uri: bytes | None = None) -> str | None:
    """The key presented with a twisted.web request; `uri` is its target while
    twisted.web has yet to set `request.uri` (the headers are in, the body not)."""
    def header(name: str) -> str | None:
        value = request.getHeader(name.encode("ascii"))
        return value.decode("utf-8", "replace") if value is not None else None

    return key_from(header, query_value(request.uri if uri is None else uri, KEY_PARAMETER))


def strip_credentials(request: IRequest) -> None:
    """Remove the key from a checked request, so nothing downstream can log it.

    Used on the WebSocket upgrade, whose request autobahn re-reads (and, at
    its debug level, logs) in full.
    """
    request.requestHeaders.removeHeader(b"x-api-key")
    request.requestHeaders.removeHeader(b"authorization")
    request.uri = scrubbed_uri(request.uri).encode("utf-8")
    if request.args is not None:
        request.args = {name: values for name, values in request.args.items()
                        if KEY_PARAMETER.encode("ascii") not in name.lower()}


def client_address(request: IRequest) -> str:
    """The peer's address, the unit the failure limit counts by."""
    address = request.getClientAddress()
    return getattr(address, "host", None) or str(address)


def exposure_warning(bound_host: str, authenticate: bool) -> str | None:
    """The loud warning for a server that anyone on the network may use, or None.

    `bound_host` is the address actually bound; anything but a loopback
    address (including 0.0.0.0 and ::) reaches beyond this machine.
    """
    if authenticate:
        return None
    try:
        if ipaddress.ip_address(bound_host.split("%")[0]).is_loopback:
            return None
    except ValueError:
        if bound_host == "localhost":
            return None
    return (f"SECURITY WARNING: listening on {bound_host}, which other machines can reach, "
            "with websocket.authenticate off: anyone who can reach this port can submit, "
            "cancel and delete jobs and move the plotter. Set websocket.authenticate: true "
            "and websocket.api_key, or bind --host 127.0.0.1")


def limit_unit(client: str) -> str:
    """What the failure limit counts by: the address, or its /64 for IPv6, since
    one IPv6 client commonly holds a whole /64 and could otherwise rotate
    through it to escape the limit."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv4Address):
        return client
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


class APIKeyCheck:
    """Decides whether a presented key is good, limiting failed attempts per address."""

    #: Addresses tracked before stale entries are swept, to bound memory.
    _SWEEP_AT = 4096

    def __init__(self, api_key: str | None, required: bool, clock: IReactorTime, *,
                 max_failures: int = 10, window: float = 60.0,
                 audit: AuditLog | None = None):
        if required and not api_key:
            raise ValueError("an API key is required when authentication is on")
        self.required = required
        self._key = (api_key or "").encode("utf-8")
        self._clock = clock
        self._max_failures = max_failures
        self._window = window
        self._failures: dict[str, deque[float]] = {}
        #: When each blocked address was last written to the audit log, so that
        #: an attacker who keeps trying fills no disk: one record a window.
        self._block_reported: dict[str, float] = {}
        self.audit = audit or AuditLog()

    def verify(self, key: str | None, client: str, via: str = "http") -> Verdict:
        """Check `key` from `client`; a wrong key counts towards the limit.

        `via` (http, websocket, websocket AUTH) goes into the audit record.
        """
        if not self.required:
            return Verdict.ALLOWED
        if self._blocked(client):
            self._report_block(client, via)
            return Verdict.BLOCKED
        if key is None:
            return Verdict.MISSING
        if hmac.compare_digest(key.encode("utf-8"), self._key):
            return Verdict.ALLOWED
        self._record_failure(client)
        _log.warn("wrong API key from {client}", client=client)
        self.audit.record("auth_failed", client, via=via, reason="wrong API key",
                          failures=len(self._failures.get(limit_unit(client), ())))
        return Verdict.WRONG

    def verify_request(self, request: IRequest, via: str = "http") -> Verdict:
        return self.verify(request_key(request), client_address(request), via)

    def _report_block(self, client: str, via: str) -> None:
        now = self._clock.seconds()
        unit = limit_unit(client)
        if now - self._block_reported.get(unit, -math.inf) < self._window:
            return
        if len(self._block_reported) >= self._SWEEP_AT:
            self._block_reported = {address: at for address, at in self._block_reported.items()
                                    if now - at < self._window}
        self._block_reported[unit] = now
        _log.warn("too many wrong API keys from {client}: refusing it for {wait} s",
                  client=client, wait=self.retry_after(client))
        self.audit.record("rate_limited", client, via=via, retry_after=self.retry_after(client))

    def retry_after(self, client: str) -> int:
        """Seconds until `client` may try again."""
        failures = self._failures.get(limit_unit(client))
        if not failures:
            return 0
        return max(1, math.ceil(failures[0] + self._window - self._clock.seconds()))

    def refusal(self, request: IRequest, verdict: Verdict) -> bytes:
        """The 401 or 429 response for a refused request."""
        status, code, message, headers = self.refusal_parts(client_address(request), verdict)
        for name, value in headers:
            request.setHeader(name, value)
        return error_body(request, status, code, message)

    def refusal_parts(self, client: str, verdict: Verdict
                      ) -> tuple[int, str, str, tuple[tuple[bytes, bytes], ...]]:
        """(status, code, message, headers) of the refusal of `client`'s request."""
        if verdict is Verdict.BLOCKED:
            wait = self.retry_after(client)
            return (429, "too_many_attempts",
                    f"too many wrong API keys from this address; retry in {wait} s",
                    ((b"Retry-After", b"%d" % wait),))
        if verdict is Verdict.MISSING:
            message = f"an API key is required: {HOW_TO_SEND}"
        else:
            message = "the API key is wrong"
        return 401, "unauthorized", message, ((b"WWW-Authenticate", b'Bearer realm="vfab"'),)

    def _recent(self, client: str) -> deque[float] | None:
        client = limit_unit(client)
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
        self._failures.setdefault(limit_unit(client), deque()).append(self._clock.seconds())
