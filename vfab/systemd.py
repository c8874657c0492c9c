"""What systemd offers a service: readiness notification and socket activation.

Readiness is a plain datagram to $NOTIFY_SOCKET, so no library is needed.
Socket activation goes through Twisted's own `systemd:` endpoint, which reads
$LISTEN_PID, $LISTEN_FDS and $LISTEN_FDNAMES when `twisted.internet.endpoints`
is first imported (and then removes the first two from the environment), so
this module asks that endpoint rather than the environment.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

_log = Logger()

_DOMAINS = {socket.AF_INET: "INET", socket.AF_INET6: "INET6"}


class ActivationError(ValueError):
    """systemd passed a socket vfab cannot serve HTTP on; the message says which."""


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


def tell_systemd(state: str) -> None:
    """notify(), with a failure logged rather than raised: readiness is a courtesy."""
    try:
        if notify(state):
            _log.debug("told systemd {state}", state=state)
    except OSError as error:
        _log.warn("could not tell systemd {state}: {error}", state=state, error=error)


def socket_family(fileno: int) -> int:
    """The address family of an open socket, without taking ownership of it."""
    probe = socket.socket(fileno=fileno)
    try:
        return probe.family
    finally:
        probe.detach()


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return str(family)


def activation_endpoint(reactor: Any) -> str | None:
    """The `systemd:` endpoint string of the socket systemd passed, or None if none was.

    Raises ActivationError for a socket that is not TCP over IPv4 or IPv6.
    """
    try:
        endpoint = serverFromString(reactor, "systemd:domain=INET:index=0")
    except IndexError:
        return None  # no descriptors (or LISTEN_FDNAMES missing: see deployment.rst)
    try:
        family = socket_family(endpoint.fileno)
    except OSError as error:
        raise ActivationError(f"systemd passed file descriptor {endpoint.fileno}, which is "
                              f"not a socket: {error}") from None
    domain = _DOMAINS.get(family)
    if domain is None:
        raise ActivationError(f"systemd passed a socket of family {_family_name(family)}; "
                              "vfab needs a TCP one (ListenStream=ADDRESS:PORT)")
    _log.info("socket activation: serving on the socket systemd passed (fd {fileno})",
              fileno=endpoint.fileno)
    return f"systemd:domain={domain}:index=0"
