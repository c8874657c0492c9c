"""The audit log: security events, one JSON object a line, for the operator to review.

With `logging.audit: true` the events go to workspace/logs/audit.log (0600,
rotated like the main log); with `logging.security_events: true` the same
events are also written to the main log as warnings. A record holds the
time, the event, the client's address and a detail mapping; it never holds
an API key, and callers must not put one in `detail`.

Events: auth_failed, rate_limited, auth_timeout, origin_refused,
connection_limit, slow_client_dropped, unresponsive_client_dropped,
exposed_without_auth, config_readable, privileges_dropped, daemon_started,
daemon_stopped, records_lost (events a full disk lost).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.python.logfile import LogFile

from vfab.config import LoggingConfig
from vfab.jobs.files import NO_SPACE
from vfab.logs import WholeLinesLogFile

_log = Logger()

AUDIT_FILE = "audit.log"
#: Longest text kept from a client-supplied value (an Origin, a path), so
#: that a hostile client cannot make records arbitrarily large.
MAX_VALUE_LENGTH = 200


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_VALUE_LENGTH:
        return value[:MAX_VALUE_LENGTH] + "…"
    return value


def utc_now(moment: float) -> str:
    """ISO 8601 UTC with milliseconds and a Z, as the rest of vfab writes times."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment))
    return f"{seconds}.{int((moment % 1) * 1000):03d}Z"


class AuditLog:
    """Where the daemon reports security events; a no-op when both switches are off."""

    def __init__(self, file: LogFile | None = None, *, to_main_log: bool = False,
                 clock: Any = None):
        self._file = file
        self._to_main_log = to_main_log
        self._lost = 0
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self._file is not None or self._to_main_log

    def record(self, event: str, client: str | None = None, **detail: Any) -> None:
        """Write one security event; `client` is the peer's address, if there is one."""
        if not self.enabled:
            return
        moment = self._clock.seconds() if self._clock is not None else time.time()
        detail = {name: _bounded(value) for name, value in detail.items()}
        if self._file is not None:
            line = json.dumps({"timestamp": utc_now(moment), "event": event,
                               "client": client, "detail": detail},
                              separators=(",", ":"), default=str, ensure_ascii=True)
            self._write(line + "\n", moment)
        if self._to_main_log:
            _log.warn("security event {event} from {client}: {detail}",
                      event=event, client=client or "-",
                      detail=json.dumps(detail, default=str, ensure_ascii=True))

    def _write(self, line: str, moment: float) -> None:
        """A full disk loses the records while it lasts, never the request that
        made one; the next record that fits says how many were lost."""
        if self._lost:
            line = json.dumps({"timestamp": utc_now(moment), "event": "records_lost",
                               "client": None, "detail": {"count": self._lost,
                                                          "reason": "the disk was full"}},
                              separators=(",", ":")) + "\n" + line
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as error:
            if error.errno not in NO_SPACE:
                raise
            if not self._lost:
                _log.error("audit log: the disk is full; security events are lost until "
                           "there is room")
            self._lost += 1
            return
        self._lost = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def open_audit_log(config: LoggingConfig, logs_dir: Path,
                   owner: tuple[int, int] | None = None, clock: Any = None) -> AuditLog:
    """The audit log the configuration asks for, its file created 0600 (owned by
    `owner`, the user the daemon will drop to, so it can go on writing)."""
    if not config.audit:
        return AuditLog(to_main_log=config.security_events, clock=clock)
    logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = logs_dir / AUDIT_FILE
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
    if owner is not None and os.geteuid() == 0:
        os.chown(logs_dir, *owner)
        os.chown(path, *owner)
    file = WholeLinesLogFile(AUDIT_FILE, str(logs_dir), rotateLength=config.max_size,
                             maxRotatedFiles=config.backup_count or None, defaultMode=0o600)
    return AuditLog(file, to_main_log=config.security_events, clock=clock)
