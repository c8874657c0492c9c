"""A small HTTP client for the daemon's API, for the command line.

Blocking on purpose: each command makes one or two requests and exits. Errors
come back as `ClientError` with a message a person can act on.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

TIMEOUT_SECONDS = 30.0


class ClientError(Exception):
    """The request failed; the message says why in the user's words."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class DaemonClient:
    def __init__(self, url: str, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key

    def request(self, method: str, path: str, *, body: bytes | None = None,
                content_type: str | None = None, query: dict[str, Any] | None = None) -> Any:
        """One API call; returns the decoded JSON answer (None for 204)."""
        url = self.url + path
        if query:
            pairs = {key: value for key, value in query.items() if value is not None}
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        request = urllib.request.Request(url, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if self.api_key:
            request.add_header("X-API-Key", self.api_key)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
                data = response.read()
        except urllib.error.HTTPError as error:
            raise ClientError(_error_message(error), error.code) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise ClientError(f"no daemon at {self.url} — is `vfab daemon` running? "
                              f"({reason})") from None
        return json.loads(data) if data else None


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = error.reason
    if error.code == 401:
        return f"{message} (give the key with --api-key or VFAB_API_KEY)"
    return str(message)
