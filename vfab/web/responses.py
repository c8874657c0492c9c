"""JSON responses and the error shape every HTTP endpoint shares.

Errors are `{"error": {"code": ..., "message": ...}}` so that scripts can act
on `code` and people can read `message`.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource


def json_body(request: IRequest, status: int, payload: Any) -> bytes:
    """Set the status and JSON headers and return the encoded body."""
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def error_body(request: IRequest, status: int, code: str, message: str) -> bytes:
    """An error response in the contract's shape."""
    return json_body(request, status, {"error": {"code": code, "message": message}})


def write_json(request: IRequest, status: int, payload: Any) -> None:
    """Finish a NOT_DONE_YET request with a JSON body."""
    request.write(json_body(request, status, payload))
    request.finish()


def write_error(request: IRequest, status: int, code: str, message: str) -> None:
    """Finish a NOT_DONE_YET request with an error."""
    request.write(error_body(request, status, code, message))
    request.finish()


def write_empty(request: IRequest, status: int) -> None:
    """Finish a NOT_DONE_YET request without a body (204)."""
    request.setResponseCode(status)
    request.finish()


def method_not_allowed(request: IRequest, allowed: list[bytes]) -> bytes:
    """405 naming the methods the path does allow."""
    request.setHeader(b"Allow", b", ".join(allowed))
    names = ", ".join(m.decode("ascii") for m in allowed)
    method = request.method.decode("ascii", "replace")
    return error_body(request, 405, "method_not_allowed",
                      f"{method} is not allowed here; use {names}")


def not_found(request: IRequest) -> bytes:
    """404 for a path nothing serves."""
    path = request.path.decode("utf-8", "replace")
    return error_body(request, 404, "not_found", f"nothing at {path}")


class ErrorResource(Resource):
    """A leaf that answers every method with one JSON error."""

    isLeaf = True

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[bytes, bytes] | None = None):
        super().__init__()
        self._status, self._code, self._message = status, code, message
        self._headers = headers or {}

    def render(self, request: IRequest) -> bytes:
        for name, value in self._headers.items():
            request.setHeader(name, value)
        return error_body(request, self._status, self._code, self._message)


class NotFound(Resource):
    """A leaf that answers 404 in JSON, naming the path."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        return not_found(request)
