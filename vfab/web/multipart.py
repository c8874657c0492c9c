"""Reading a POST /api/jobs body into a drawing file, a piece at a time.

The body may be tens of megabytes. It is read in pieces of CHUNK bytes, in a
thread (never on the reactor), and the SVG goes straight to the file: neither
a raw body nor a multipart/form-data one is ever held whole in memory. The
pieces are searched with bytes.find, so the thread holds the interpreter lock
only for moments and the reactor feeding a plot keeps its turn.
"""

from __future__ import annotations

import email.policy
import shutil
from email.message import Message
from email.parser import BytesParser
from typing import BinaryIO

#: Bytes read from the request body at a time.
CHUNK = 256 * 1024
#: The most a form field other than the file may hold (a name, a priority).
MAX_FIELD_SIZE = 64 * 1024
#: The most the headers of one part may take.
MAX_PART_HEADERS = 16 * 1024
#: The field whose content is the SVG.
FILE_FIELD = "file"
_IDENTITY_ENCODINGS = ("", "7bit", "8bit", "binary")


class MultipartError(ValueError):
    """The multipart/form-data body cannot be read; the message says why (400)."""


def is_multipart(content_type: bytes) -> bool:
    return content_type.split(b";")[0].strip().lower() == b"multipart/form-data"


def copy_body(body: BinaryIO, out: BinaryIO) -> tuple[dict[str, str], str | None]:
    """A raw SVG body: copied as it is. No form fields, no file name."""
    shutil.copyfileobj(body, out, CHUNK)
    return {}, None


def copy_form(body: BinaryIO, content_type: bytes,
              out: BinaryIO) -> tuple[dict[str, str], str | None]:
    """A multipart/form-data body: the `file` field's content goes to `out`;
    returns the other fields (the first of each name) and the name the client
    gave the file, if any.

    Raises MultipartError when the body is not a form with a `file` field.
    """
    delimiter = b"--" + _boundary(content_type)
    reader = _Reader(body)
    reader.skip_to(delimiter)
    fields: dict[str, str] = {}
    filename: str | None = None
    seen_file = False
    while True:
        if reader.next_is(b"--"):
            break
        reader.skip_to(b"\r\n")  # the end of the delimiter line (after any padding)
        headers = _part_headers(reader.until(b"\r\n\r\n", MAX_PART_HEADERS))
        name = headers.get_param("name", header="content-disposition")
        encoding = str(headers.get("content-transfer-encoding", "")).strip().lower()
        if encoding not in _IDENTITY_ENCODINGS:
            raise MultipartError(f"the multipart part {name!r} uses Content-Transfer-Encoding "
                                 f"{encoding!r}; send the file as it is (binary)")
        end = b"\r\n" + delimiter
        if name == FILE_FIELD and not seen_file:
            seen_file = True
            reader.copy_until(end, out)
            filename = headers.get_filename()
        elif isinstance(name, str) and name != FILE_FIELD and name not in fields:
            value = reader.until(end, MAX_FIELD_SIZE)
            fields[name] = value.decode("utf-8", "replace").strip()
        else:
            reader.copy_until(end, None)
    if not seen_file:
        raise MultipartError(f"the multipart form has no '{FILE_FIELD}' field with the SVG")
    return fields, filename


def _boundary(content_type: bytes) -> bytes:
    message = Message()
    message["content-type"] = content_type.decode("latin-1")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise MultipartError("the multipart/form-data body has no valid boundary in its "
                             "Content-Type")
    return boundary.encode("latin-1")


def _part_headers(block: bytes) -> Message:
    return BytesParser(policy=email.policy.HTTP).parsebytes(block + b"\r\n\r\n",
                                                            headersonly=True)


class _Reader:
    """The body, read in CHUNK pieces, with a small buffer kept between searches."""

    def __init__(self, body: BinaryIO):
        self._body = body
        self._buffer = b""

    def _more(self) -> bool:
        chunk = self._body.read(CHUNK)
        self._buffer += chunk
        return bool(chunk)

    def next_is(self, marker: bytes) -> bool:
        """Whether `marker` comes next (it is left unread)."""
        while len(self._buffer) < len(marker):
            if not self._more():
                raise MultipartError("the multipart/form-data body ends before its closing "
                                     "boundary")
        return self._buffer.startswith(marker)

    def skip_to(self, marker: bytes) -> None:
        """Discard everything up to and including `marker`."""
        self.copy_until(marker, None)

    def until(self, marker: bytes, limit: int) -> bytes:
        """What comes before `marker` (consumed too), refused beyond `limit` bytes."""
        while True:
            found = self._buffer.find(marker)
            if found >= 0:
                if found > limit:
                    break
                value, self._buffer = self._buffer[:found], self._buffer[found + len(marker):]
                return value
            if len(self._buffer) > limit + len(marker):
                break
            if not self._more():
                raise MultipartError("the multipart/form-data body ends before its closing "
                                     "boundary")
        raise MultipartError(f"a multipart form field or its headers are larger than "
                             f"{limit} bytes")

    def copy_until(self, marker: bytes, out: BinaryIO | None) -> None:
        """Write what comes before `marker` to `out` (or drop it), consuming the marker."""
        keep = len(marker) - 1
        while True:
            found = self._buffer.find(marker)
            if found >= 0:
                if out is not None:
                    out.write(self._buffer[:found])
                self._buffer = self._buffer[found + len(marker):]
                return
            if len(self._buffer) > keep:
                if out is not None:
                    out.write(self._buffer[:-keep] if keep else self._buffer)
                self._buffer = self._buffer[-keep:] if keep else b""
            if not self._more():
                raise MultipartError("the multipart/form-data body ends before its closing "
                                     "boundary")
