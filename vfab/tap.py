"""`twistd vfab`: the plugin's options and the service it makes.

Process matters (daemonizing, the PID file, dropping to a user and group)
belong to twistd; these options are vfab's own. `vfab daemon` builds a
twistd command line from the daemon reference's options and runs this.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from vfab.config import (LOG_LEVELS, Config, ConfigError, default_workspace, load_config,
                         database_location, with_overrides, workspace_path)

_log = Logger()


def _port(value: str) -> int:
    problem = f"expected an integer 0-65535 (0 = any free port), got {value!r}"
    try:
        port = int(value)
    except ValueError:
        raise ValueError(problem) from None
    if not 0 <= port <= 65535:
        raise ValueError(problem)
    return port


def _log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.lower()


def _nice(value: str) -> int:
    try:
        nice = int(value)
    except ValueError:
        raise ValueError(f"expected an integer -20..19, got {value!r}") from None
    if not -20 <= nice <= 19:
        raise ValueError(f"expected an integer -20..19, got {value!r}")
    return nice


# Checked in postOptions, not as usage.Options coercers: twistd wraps a
# coercer's message in "Parameter type enforcement failed: ...".
_CHECKS = (("port", _port), ("log-level", _log_level), ("nice", _nice))


class Options(usage.Options):
    """vfab's options; CLI values win over the configuration file."""

    synopsis = "[options]"
    longdesc = ("Runs the vfab plotter job server: an HTTP API and WebSocket, a persistent "
                "job queue and the AxiDraw (EBB) device. See README.rst.")

    optParameters = [
        ["host", "h", None, "Bind address of the HTTP/WebSocket server [default: localhost]."],
        ["port", "p", None, "Its port; 0 = any free port [default: 8766]."],
        ["workspace", "w", None,
         "Jobs, database and logs [default: $XDG_DATA_HOME/vfab/workspace]."],
        ["log-level", "l", None,
         "debug, info, warning, error or critical [default: info]."],
        ["config", "c", None, "Configuration file [default: $XDG_CONFIG_HOME/vfab/config.yaml]."],
        ["nice", None, None, "Process priority (-20..19)."],
    ]

    config: Config
    workspace_dir: Path

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Usage and configuration errors exit 2 with the problem on one line each."""
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            _usage_exit([str(error)])
        except ConfigError as error:
            _usage_exit(error.problems)

    def postOptions(self) -> None:
        for name, check in _CHECKS:
            if self[name] is not None:
                try:
                    self[name] = check(self[name])
                except ValueError as error:
                    raise usage.UsageError(f"--{name}: {error}") from None
        config = load_config(self["config"])
        self.config = with_overrides(config, host=self["host"], port=self["port"],
                                     log_level=self["log-level"])
        # Imported here: the plugin dropin must stay import-cheap (no reactor).
        from vfab.logs import check_format
        check_format(self.config.logging.format)
        # A database this build cannot open is a configuration error (exit 2),
        # found before anything starts.
        database_location(self.config.database.url, Path("workspace"))
        self.workspace_dir = Path(self["workspace"]).expanduser().resolve() \
            if self["workspace"] else default_workspace()

    def twistd_option(self, name: str) -> Any:
        """A twistd option (uid, gid, nodaemon…) when run under twistd, else None."""
        parent = getattr(self, "parent", None)
        return parent.get(name) if parent is not None else None


def _usage_exit(problems: list[str]) -> None:
    for problem in problems:
        sys.stderr.write(f"vfab: {problem}\n")
    raise SystemExit(2)


def _owner(options: Options) -> tuple[int, int] | None:
    """The user and group twistd will switch to, so files made as root are theirs."""
    uid, gid = options.twistd_option("uid"), options.twistd_option("gid")
    if uid is None:
        return None
    if gid is None:
        import pwd
        gid = pwd.getpwuid(uid).pw_gid
    return (uid, gid)


def makeService(options: Options, reactor: Any = None) -> Any:
    """Build the daemon's service tree from parsed options."""
    if reactor is None:
        from twisted.internet import reactor
    from vfab.audit import open_audit_log
    from vfab.logs import make_observer, open_log_file, reopen_on_sigusr1
    from vfab.service import VfabService, make_private_dir

    config, workspace = options.config, options.workspace_dir
    owner = _owner(options)
    sys.excepthook = _startup_errors_in_one_line(sys.excepthook)
    log_file = None
    try:
        if options["nice"]:
            os.nice(options["nice"])
        make_private_dir(workspace, owner)
        if config.logging.file:
            log_file = open_log_file(workspace_path(config.logging.file, workspace),
                                     config.logging, owner)
        audit = open_audit_log(config.logging, workspace / "logs", owner, reactor)
    except OSError as error:
        sys.stderr.write(f"vfab: cannot start: {error}\n")
        raise SystemExit(1) from None
    # Always handled: SIGUSR1's default action would kill the daemon.
    reopen_on_sigusr1(reactor, *([log_file] if log_file is not None else []))
    _log.info("configuration loaded and validated: {source}",
              source=options["config"] or "default location (or built-in defaults)")
    observer = make_observer(config.logging, log_file)
    _warn_if_key_readable(options, audit)
    service = VfabService(config, workspace, reactor, owner=owner, log_observer=observer,
                          handle_signals=True, audit=audit)
    if log_file is not None and observer.file is not None \
            and os.stat(log_file.directory).st_dev == os.stat(workspace).st_dev:
        # The log shares the workspace's disk: while that is full, its room is
        # for progress and state changes (see LineObserver.spare_while).
        disk = service.disk
        observer.file.spare_while(lambda: disk.full is not None)
    return service


def _warn_if_key_readable(options: Options, audit: Any) -> None:
    """A config file holding the API key must be private; say so loudly if it is not.
    (Logged now, the event is kept until twistd starts the log.)"""
    from vfab.config import default_config_path
    path = Path(options["config"]).expanduser() if options["config"] else default_config_path()
    if not options.config.websocket.api_key or not path.exists():
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        _log.critical(
            "SECURITY WARNING: {path} holds websocket.api_key but its mode is {mode} "
            "(readable by group or others): chmod 600 {path}", path=str(path), mode=oct(mode))
        audit.record("config_readable", None, path=str(path), mode=oct(mode))


def _startup_errors_in_one_line(previous: Any) -> Any:
    """twistd lets start-up exceptions end the process with a traceback; the
    operator needs the one-line reason instead."""
    from vfab.service import StartupError

    def hook(kind: type, error: BaseException, traceback: Any) -> None:
        if isinstance(error, StartupError):
            # twistd has pointed sys.stderr at the log by now: write to the real one.
            sys.__stderr__.write(f"vfab: cannot start: {error}\n")
        else:
            previous(kind, error, traceback)

    return hook
