"""Where the daemon's log goes: stdout (for journald) and a size-rotated file.

Lines use the configured `logging.format`, written with Python logging's
%-style fields (asctime, name, levelname, message, process, levelno), so the
log reads like the reference's and the greps in its troubleshooting guide
(`ERROR`, `websocket`, `performance`) find what they look for.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, formatEvent)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

from vfab.config import ConfigError, LoggingConfig

_LEVEL = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
_LEVEL_NAME = {LogLevel.debug: "DEBUG", LogLevel.info: "INFO", LogLevel.warn: "WARNING",
               LogLevel.error: "ERROR", LogLevel.critical: "CRITICAL"}
_LEVEL_NUMBER = {LogLevel.debug: 10, LogLevel.info: 20, LogLevel.warn: 30,
                 LogLevel.error: 40, LogLevel.critical: 50}


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    moment = event.get("log_time", time.time())
    level = event.get("log_level", LogLevel.info)
    message = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        message = f"{message}\n{failure.getTraceback()}".rstrip()
    return {
        "asctime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))
        + f",{int((moment % 1) * 1000):03d}",
        "created": moment,
        "name": event.get("log_namespace", "vfab"),
        "levelname": _LEVEL_NAME.get(level, "INFO"),
        "levelno": _LEVEL_NUMBER.get(level, 20),
        "message": message,
        "process": os.getpid(),
    }


def check_format(format: str) -> None:
    """Refuse a `logging.format` that cannot format a line, at start-up rather than mid-run."""
    sample = _fields({"log_format": "check", "log_level": LogLevel.info})
    try:
        format % sample
    except (KeyError, ValueError, TypeError) as error:
        raise ConfigError([f"logging.format: cannot format a line with {format!r}: "
                           f"{error!r} (fields: {', '.join(sorted(sample))})"]) from None


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one formatted line (plus a traceback, if any)."""

    def __init__(self, stream: IO[str] | LogFile, format: str):
        self._stream = stream
        self._format = format

    def __call__(self, event: dict[str, Any]) -> None:
        self._stream.write(self._format % _fields(event) + "\n")
        self._stream.flush()


def open_log_file(path: Path, config: LoggingConfig, owner: tuple[int, int] | None = None
                  ) -> LogFile:
    """A log file rotated at `max_size`, keeping `backup_count` old files.

    `owner` is the (uid, gid) the daemon will run as once it drops root, so
    that it can still write and rotate its own log.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    if owner is not None and os.geteuid() == 0:
        os.chown(path.parent, *owner)
        os.chown(path, *owner)
    return LogFile(path.name, str(path.parent), rotateLength=config.max_size,
                   maxRotatedFiles=config.backup_count or None, defaultMode=0o600)


def make_observer(config: LoggingConfig, log_file: LogFile | None,
                  stdout: IO[str] | None = None) -> ILogObserver:
    """The daemon's log observer: level filter, then stdout and the file."""
    targets = [LineObserver(stdout or sys.stdout, config.format)]
    if log_file is not None:
        targets.append(LineObserver(log_file, config.format))

    @implementer(ILogObserver)
    def fan_out(event: dict[str, Any]) -> None:
        for target in targets:
            target(event)

    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVEL[config.level])
    return FilteringLogObserver(fan_out, [predicate])


def reopen_on_sigusr1(log_file: LogFile, reactor: Any) -> None:
    """Let logrotate's `postrotate` send SIGUSR1 to make the daemon reopen its file."""
    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(log_file.reopen)

    signal.signal(signal.SIGUSR1, handler)
