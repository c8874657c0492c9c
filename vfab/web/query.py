"""The one reading of a request's query string, for the API, the key check and the logs.

twisted.web splits `request.args` on `;` as well as `&` and mixes in form
bodies; the key check and the log scrubber once read the query differently,
so `?x=1;api_key=KEY` was accepted and logged. Everything that reads a query
uses this module instead: pairs are separated by `&` only (as browsers and
Python's urllib do), and only the URL's query counts, never the body.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

#: The query parameter that carries the API key.
KEY_PARAMETER = "api_key"


def query_pairs(uri: bytes) -> list[tuple[str, str]]:
    """The decoded (name, value) pairs of the query of `uri`, in order."""
    _, _, query = uri.partition(b"?")
    return parse_qsl(query.decode("utf-8", "replace"), keep_blank_values=True,
                     separator="&")


def query_value(uri: bytes, name: str) -> str | None:
    """The first value of `name` in the query of `uri`, or None."""
    for key, value in query_pairs(uri):
        if key == name:
            return value
    return None


def _may_hold_key(name: str, value: str) -> bool:
    # A pair that mentions the key parameter anywhere (`x=1;api_key=KEY`,
    # an encoded `%3Bapi_key%3D`) may hold the key, though it is not one.
    return KEY_PARAMETER in name.lower() or KEY_PARAMETER in value.lower()


def scrubbed_uri(uri: bytes) -> str:
    """`uri` without any query pair that holds or may hold the key: what may be logged."""
    text = uri.decode("utf-8", "replace")
    path, _, query = text.partition("?")
    if not query:
        return path
    kept = [(name, value) for name, value in query_pairs(uri)
            if not _may_hold_key(name, value)]
    return f"{path}?{urlencode(kept)}" if kept else path
