"""What systemd offers a service: readiness notification and socket activation.

Both are plain protocols (a datagram to $NOTIFY_SOCKET; file descriptors from
3 on, announced by $LISTEN_PID and $LISTEN_FDS), so no library is needed.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

LISTEN_FDS_START = 3


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd `state` (e.g. "READY=1"); False when not run under Type=notify."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode("utf-8"))
    return True


def activation_endpoint(environ: Mapping[str, str] = os.environ) -> str | None:
    """The Twisted endpoint string of a socket systemd passed us, or None."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    # Ask the passed socket its family without taking ownership of the descriptor.
    probe = socket.socket(fileno=LISTEN_FDS_START)
    try:
        family = probe.family
    finally:
        probe.detach()
    domain = {socket.AF_INET: "INET", socket.AF_INET6: "INET6",
              socket.AF_UNIX: "UNIX"}.get(family)
    return f"systemd:domain={domain}:index=0" if domain else None
