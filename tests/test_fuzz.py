"""Fuzzing the two places untrusted bytes enter: SVG uploads and WebSocket messages.

Bounded: a few hundred examples each with a per-example deadline, so the
whole file runs in seconds. The SVG property: load_svg returns a Drawing or
raises SVGError, never anything else, never hangs. The WebSocket property:
any message gets JSON replies (an `error` for anything malformed) and the
connection stays open.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tests.web_fakes import ClockedReactor, FakeDevice, FakeJobs
from vfab.config import WebSocketConfig
from vfab.geometry import Drawing, SVGError, load_svg
from vfab.web.auth import APIKeyCheck
from vfab.web.system import SystemMonitor
from vfab.web.ws import StreamFactory

FUZZ = settings(max_examples=200, deadline=5000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- SVG -----------------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(-2000, 2000).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["1e308", "-1e400", "NaN", "inf", "-Infinity", ".5", "1.", "-.0e-3",
                     "1e", "--1", "0x10", "1,2", ""]),
)
units = st.sampled_from(["", "", "mm", "cm", "in", "px", "pt", "%", "em", "furlong"])
lengths = st.builds(lambda n, u: n + u, numbers, units)
path_data = st.lists(
    st.builds(lambda c, ns: c + " ".join(ns),
              st.sampled_from(list("MmLlHhVvCcSsQqTtAaZzX")), st.lists(numbers, max_size=7)),
    max_size=12).map(" ".join)
attribute_values = {
    "d": path_data,
    "points": st.lists(numbers, max_size=12).map(" ".join),
    "transform": st.builds(lambda f, ns: f"{f}({','.join(ns)})",
                           st.sampled_from(["matrix", "translate", "scale", "rotate", "skewX",
                                            "nonsense"]), st.lists(numbers, max_size=6)),
    "viewBox": st.lists(numbers, min_size=0, max_size=5).map(" ".join),
    "href": st.sampled_from(["#a", "#b", "#missing", "file:///etc/passwd", "http://x/", ""]),
    "id": st.sampled_from(["a", "b", "c"]),
    "style": st.sampled_from(["display:none", "stroke:red", "fill:url(#a)", "}{", ""]),
}
for name in ("x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "rx", "ry", "width", "height"):
    attribute_values[name] = lengths
attributes = st.dictionaries(st.sampled_from(sorted(attribute_values)), st.just(None),
                             max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: attribute_values[k] for k in keys}))
tags = st.sampled_from(["path", "line", "rect", "circle", "ellipse", "polyline", "polygon",
                        "g", "use", "svg", "defs", "symbol", "text", "image", "clipPath",
                        "unknown", "svg:path"])


def element(tag: str, attrs: dict[str, str], children: list[str]) -> str:
    rendered = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return f"<{tag}{rendered}>{''.join(children)}</{tag}>"


elements = st.recursive(
    st.builds(element, tags, attributes, st.just([])),
    lambda inner: st.builds(element, tags, attributes, st.lists(inner, max_size=4)),
    max_leaves=25)
prologues = st.sampled_from([
    "", '<?xml version="1.0"?>', '<?xml version="1.0" encoding="latin-1"?>',
    '<?xml version="1.0" encoding="bogus"?>', "\ufeff",
    '<!DOCTYPE svg [<!ENTITY a "aaaa">]>', '<!DOCTYPE svg SYSTEM "http://x/y.dtd">'])
documents = st.builds(
    lambda prologue, root_attrs, children: prologue + element(
        "svg", {"xmlns": "http://www.w3.org/2000/svg", **root_attrs}, children),
    prologues, attributes, st.lists(elements, max_size=5))


def encoded(text: str, how: str) -> bytes:
    if how == "utf-16":
        return text.encode("utf-16")
    return text.encode("utf-8", "surrogatepass")


svg_inputs = st.one_of(
    st.builds(encoded, documents, st.sampled_from(["utf-8", "utf-8", "utf-16"])),
    # A valid-looking document cut short, or with bytes flipped.
    st.builds(lambda doc, cut: doc.encode()[:cut], documents, st.integers(0, 400)),
    st.builds(lambda doc, junk, at: doc.encode()[:at] + junk + doc.encode()[at:],
              documents, st.binary(max_size=8), st.integers(0, 200)),
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@FUZZ
@given(svg_inputs)
@example(b'<svg xmlns="http://www.w3.org/2000/svg" style="display:none"></svg>')  # found by it
@example(b'<svg xmlns="http://www.w3.org/2000/svg"><style>svg{display:none}</style></svg>')
@example(b'<svg xmlns="http://www.w3.org/2000/svg"><path d="h C"/></svg>')  # found by it
@example(b'<svg xmlns="http://www.w3.org/2000/svg"><path d="M0 0 C"/><circle r="1"/></svg>')
def test_load_svg_only_ever_raises_svgerror(data: bytes) -> None:
    try:
        drawing = load_svg(data)
    except SVGError as error:
        assert str(error)
        return
    assert isinstance(drawing, Drawing) and drawing.layers


# -- WebSocket messages -----------------------------------------------------------------------

UPGRADE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n\r\n")
REPLY_TYPES = {"error", "pong", "subscribed", "unsubscribed", "command_result",
               "authenticated", "system_status", "job_list", "device_status"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=15)
message_types = st.sampled_from(["SUBSCRIBE", "subscribe", "UnSubscribe", "PING", "COMMAND",
                                 "AUTH", "explode", "", " ping ", "ṗing"]) | st.text(max_size=10)
messages = st.fixed_dictionaries(
    {"type": message_types | json_values},
    optional={"channels": st.lists(st.sampled_from(["all", "jobs", "devices", "system", "x",
                                                    ""]), max_size=4) | json_values,
              "command": st.sampled_from(["pause", "resume", "cancel", "rm"]) | json_values,
              "job_id": st.sampled_from(["job-1", "../vfab.db", ""]) | json_values,
              "api_key": json_values,
              "extra": json_values})
payloads = st.one_of(
    messages.map(lambda m: (json.dumps(m).encode(), False)),
    json_values.map(lambda v: (json.dumps(v).encode(), False)),
    messages.map(lambda m: (json.dumps(m).encode()[:-1], False)),  # truncated
    st.binary(max_size=200).map(lambda b: (b, False)),  # not UTF-8 / not JSON
    st.binary(max_size=200).map(lambda b: (b, True)),  # binary frames
    st.integers(1, 3000).map(lambda depth: (b"[" * depth + b"]" * depth, False)),
)


def text_frames(data: bytes) -> list[dict[str, Any]]:
    """The JSON messages in the server's (unmasked) frames; pings and closes are not expected."""
    messages, at = [], 0
    while at < len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            length, at = struct.unpack(">H", data[at:at + 2])[0], at + 2
        elif length == 127:
            length, at = struct.unpack(">Q", data[at:at + 8])[0], at + 8
        assert opcode == 1, f"unexpected frame opcode {opcode}"
        messages.append(json.loads(data[at:at + length]))
        at += length
    return messages


def open_protocol() -> tuple[Any, StringTransport]:
    clock = Clock()
    jobs, device = FakeJobs(), FakeDevice()
    jobs.add("job one")
    factory = StreamFactory(WebSocketConfig(), jobs, device, SystemMonitor(jobs, device, clock),
                            APIKeyCheck(None, False, clock), ClockedReactor(clock))
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(UPGRADE.encode())
    assert transport.value().startswith(b"HTTP/1.1 101")
    transport.clear()
    return protocol, transport


@FUZZ
@given(st.lists(payloads, min_size=1, max_size=5))
def test_websocket_messages_only_get_json_replies(sequence: list[tuple[bytes, bool]]) -> None:
    protocol, transport = open_protocol()
    for payload, is_binary in sequence:
        protocol.onMessage(payload, is_binary)
        replies = text_frames(transport.value())
        transport.clear()
        assert replies, f"no reply to {payload!r}"
        for reply in replies:
            assert reply["type"] in REPLY_TYPES and reply["timestamp"].endswith("Z")
        try:
            parsed = json.loads(payload) if not is_binary else None
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("type"), str):
            assert [reply["type"] for reply in replies] == ["error"]
        assert not transport.disconnecting
    assert protocol.state == protocol.STATE_OPEN
