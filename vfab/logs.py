"""Where the daemon's log goes: stdout (for journald) and a size-rotated file.

Lines use the configured `logging.format`, with Python logging's %-style
fields (asctime, name, levelname, message, process… any LogRecord field), so the
log reads like the reference's and the greps in its troubleshooting guide
(`ERROR`, `websocket`, `performance`) find what they look for.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, Logger, formatEvent)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

from vfab.config import ConfigError, LoggingConfig
from vfab.jobs.files import NO_SPACE

_log = Logger()

_LEVEL = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
#: The levels left out of the file while the disk is full (see spare_while).
_SPARED = frozenset({LogLevel.debug, LogLevel.info})
_PYTHON_LEVEL = {LogLevel.debug: logging.DEBUG, LogLevel.info: logging.INFO,
                 LogLevel.warn: logging.WARNING, LogLevel.error: logging.ERROR,
                 LogLevel.critical: logging.CRITICAL}


def _record(event: dict[str, Any]) -> logging.LogRecord:
    """A twisted.logger event as the Python logging record the format expects."""
    moment = float(event.get("log_time", time.time()))
    message = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        message = f"{message}\n{failure.getTraceback()}".rstrip()
    record = logging.LogRecord(
        name=event.get("log_namespace", "vfab"),
        level=_PYTHON_LEVEL.get(event.get("log_level", LogLevel.info), logging.INFO),
        pathname="", lineno=0, msg=message, args=None, exc_info=None)
    record.created = moment
    record.msecs = int((moment - int(moment)) * 1000)
    return record


def line_formatter(format: str) -> logging.Formatter:
    """The formatter of `logging.format`; ConfigError (naming the key) if it cannot format."""
    try:
        formatter = logging.Formatter(format, validate=True)
        formatter.format(_record({"log_format": "check", "log_level": LogLevel.info}))
    except (KeyError, ValueError, TypeError) as error:
        raise ConfigError([f"logging.format: cannot format a line with {format!r}: "
                           f"{error} (use Python logging %(name)s fields, e.g. "
                           f"%(asctime)s, %(levelname)s, %(name)s, %(message)s)"]) from None
    return formatter


def check_format(format: str) -> None:
    """Refuse a `logging.format` that cannot format a line, at start-up rather than mid-run."""
    line_formatter(format)


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one formatted line (plus a traceback, if any).

    A destination that breaks (stdout piped to `head` that has exited, a
    terminal that went away) is given up alone: an observer that raised would
    be dropped by Twisted's log publisher with every other destination in it,
    and the log file would stop with it. A full disk is not a broken
    destination: the lines are lost while it lasts, and the first line that
    fits again says how many.
    """

    def __init__(self, stream: IO[str] | LogFile, format: str):
        self._stream = stream
        self._formatter = line_formatter(format)
        self.broken = False
        #: Lines not written because the disk was full.
        self.lost = 0
        #: Whether the disk is full (see `spare_while`); never, by default.
        self._sparing: Callable[[], bool] = lambda: False
        #: Lines below warning held back while the disk was full.
        self.spared = 0

    def spare_while(self, disk_full: Callable[[], bool]) -> None:
        """While `disk_full()`, write only warnings and worse: the room a full
        disk has left is for the daemon's progress and state changes, and the
        lines of every request (an access line a scrape) would take it in time."""
        self._sparing = disk_full

    def __call__(self, event: dict[str, Any]) -> None:
        if self.broken:
            return
        if (event.get("log_level") or LogLevel.info) in _SPARED and self._sparing():
            self.spared += 1
            return
        line = self._formatter.format(_record(event)) + "\n"
        if self.spared:
            line = (f"({self.spared} log line(s) below warning were not written while "
                    f"the disk was full)\n{line}")
        if self.lost:
            line = (f"({self.lost} log line(s) were lost while the disk was full)\n"
                    f"{line}")
        try:
            self._stream.write(line)
            self._stream.flush()
        except OSError as error:
            if error.errno in NO_SPACE:
                self.lost += 1
            else:  # EPIPE, EIO
                self.broken = True
            return
        except ValueError:  # a closed stream
            self.broken = True
            return
        self.lost = self.spared = 0


def open_log_file(path: Path, config: LoggingConfig, owner: tuple[int, int] | None = None
                  ) -> LogFile:
    """A log file created 0600, rotated at `max_size` keeping `backup_count` old files
    (vfab.log.1 the newest). `backup_count: 0` means no rotation by vfab, as in
    Python's RotatingFileHandler: logrotate's job then.

    `owner` is the (uid, gid) the daemon will run as once it drops root, so
    that it can still write and rotate its own log.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
    if owner is not None and os.geteuid() == 0:
        os.chown(path.parent, *owner)
        os.chown(path, *owner)
    rotating = config.backup_count > 0
    return LogFile(path.name, str(path.parent),
                   rotateLength=config.max_size if rotating else None,
                   maxRotatedFiles=config.backup_count if rotating else None,
                   defaultMode=0o600)


@implementer(ILogObserver)
class DaemonObserver:
    """The daemon's log observer: level filter, then stdout (journald's input when
    run in the foreground) and the file (`file`, None without one)."""

    def __init__(self, config: LoggingConfig, log_file: LogFile | None,
                 stdout: IO[str] | None = None):
        self._targets = [LineObserver(stdout or sys.stdout, config.format)]
        self.file = LineObserver(log_file, config.format) if log_file is not None else None
        if self.file is not None:
            self._targets.append(self.file)
        predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVEL[config.level])
        self._filtered = FilteringLogObserver(self._fan_out, [predicate])

    def _fan_out(self, event: dict[str, Any]) -> None:
        for target in self._targets:
            target(event)

    def __call__(self, event: dict[str, Any]) -> None:
        self._filtered(event)


def make_observer(config: LoggingConfig, log_file: LogFile | None,
                  stdout: IO[str] | None = None) -> DaemonObserver:
    """The daemon's log observer (see DaemonObserver)."""
    return DaemonObserver(config, log_file, stdout)


def reopen_on_sigusr1(reactor: Any, *log_files: LogFile) -> None:
    """Let logrotate's `postrotate` send SIGUSR1 to make the daemon reopen its files
    (`systemctl reload vfab` does the same)."""
    def reopen() -> None:
        for log_file in log_files:
            log_file.reopen()
            _log.info("log file {path} reopened (SIGUSR1)", path=log_file.path)

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(reopen)

    signal.signal(signal.SIGUSR1, handler)
