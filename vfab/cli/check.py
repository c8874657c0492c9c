"""`vfab check config|database|device`: find problems before the daemon does.

Each check prints what it found and returns 0 when all is well, 1 when it
found a problem; every problem is listed (on stderr, one a line) with what to do.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
from pathlib import Path

from vfab.config import (Config, ConfigError, database_location, default_config_path,
                         default_workspace, load_config)
from vfab.store.engines import CONNECT_TIMEOUT, shown_url
from vfab.store.migrations import SCHEMA_VERSION, integrity_problem, schema_version


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def _problem(line: str) -> int:
    sys.stderr.write(f"problem: {line}\n")
    return 1


def run_check(what: str, *, config_path: str | None, workspace: str | None) -> int:
    """Run one check; the exit code: 0 all is well, 1 a problem was found."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        for problem in error.problems:
            _problem(problem)
        return 1
    if what == "config":
        return _check_config(config, config_path)
    space = Path(workspace).expanduser() if workspace else default_workspace()
    if what == "database":
        try:
            location = database_location(config.database.url, space)
        except ConfigError as error:
            return _problem(error.problems[0])
        if isinstance(location, str):
            return _check_server_database(location)
        return _check_database(location, space / "jobs")
    from vfab.plotter.check import check_device
    if not config.plotters:
        return check_device(config.device, _say, _problem)
    # Several plotters: each is checked, and any problem makes the exit 1.
    codes = [check_device(plotter.device, lambda text, name=plotter.name: _say(f"{name}: {text}"),
                          lambda text, name=plotter.name: _problem(f"{name}: {text}"))
             for plotter in config.plotters]
    return max(codes)


def config_problems(config: Config, config_path: str | None) -> list[str]:
    """What the schema cannot see: the log format, the database URL, hook
    commands that cannot run."""
    from vfab.logs import check_format

    problems: list[str] = []
    try:
        check_format(config.logging.format)
    except ConfigError as error:
        problems.extend(error.problems)
    try:
        database_location(config.database.url, Path("workspace"))
    except ConfigError as error:
        problems.extend(error.problems)
    for event, actions in sorted(config.hooks.items()):
        for index, action in enumerate(actions):
            if action.command is None:
                continue
            program = action.command[0]
            if shutil.which(program) is None:
                problems.append(f"hooks.{event}[{index}].command: {program!r} is not an "
                                f"executable file (or not found on PATH)")
    return problems


def config_warnings(config: Config, config_path: str | None) -> list[str]:
    """What the daemon starts with but warns of: an API key others can read."""
    if config.websocket.authenticate and config_path is not None:
        if Path(config_path).stat().st_mode & 0o077:
            return [f"websocket.api_key: {config_path} holds the API key but others "
                    f"can read it: chmod 600 {config_path}"]
    return []


def _check_config(config: Config, config_path: str | None) -> int:
    # The daemon starts with a key file others can read (it logs a warning):
    # said here too, but the configuration is not wrong.
    for warning in config_warnings(config, config_path):
        sys.stderr.write(f"warning: {warning}\n")
    problems = config_problems(config, config_path)
    for problem in problems:
        _problem(problem)
    if problems:
        return 1
    shown = config_path or default_config_path()
    where = shown if Path(shown).exists() else "built-in defaults (no file)"
    hooks = sum(len(actions) for actions in config.hooks.values())
    plotters = (f"{len(config.plotters)} plotters: "
                f"{', '.join(plotter.name for plotter in config.plotters)}"
                if config.plotters else f"device {config.device.type}")
    _say(f"config OK: {where} ({plotters}, "
         f"http://{config.websocket.host}:{config.websocket.port}, {hooks} hook action(s))")
    return 0


def _check_database(path: Path, drawings: Path) -> int:
    found = len(list(drawings.glob("*.svg"))) if drawings.is_dir() else 0
    if found and (not path.exists() or path.stat().st_size == 0):
        what = "is empty (0 bytes)" if path.exists() else "is missing"
        return _problem(f"database {path} {what} but {drawings} holds {found} job "
                        f"drawing(s): restore the database from a backup")
    if not path.exists():
        return _problem(f"no database at {path} (the daemon creates it when it starts; "
                        f"is --workspace right?)")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            damage = integrity_problem(connection)
            if damage is not None:
                return _problem(f"database {path} is damaged ({damage}): restore it "
                                f"from a backup")
            version = schema_version(connection)
            connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            jobs = connection.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] \
                if version >= 1 else 0
        finally:
            connection.close()
    except sqlite3.Error as error:
        if (getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_CORRUPT:
            return _problem(f"database {path} is damaged ({error}): restore it from a backup")
        return _problem(f"database {path} cannot be read: {error}")
    if version > SCHEMA_VERSION:
        return _problem(f"database {path} has schema {version}, newer than this vfab "
                        f"({SCHEMA_VERSION}): upgrade vfab")
    if not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        return _problem(f"database {path} (or its folder) is not writable by this user: "
                        f"run the check as the daemon's user")
    if version < SCHEMA_VERSION:
        _say(f"database OK: {path}, schema {version} (the daemon migrates it to "
             f"{SCHEMA_VERSION} when it starts), {jobs} jobs")
        return 0
    _say(f"database OK: {path}, schema {version} (current), {jobs} jobs")
    return 0


def _check_server_database(url: str) -> int:
    """A farm's PostgreSQL database: reachable, with a schema this vfab knows."""
    import psycopg

    where = shown_url(url)
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT) as connection:
            exists = connection.execute(
                "SELECT to_regclass('vfab_schema') IS NOT NULL").fetchone()[0]
            version = connection.execute("SELECT version FROM vfab_schema").fetchone()[0] \
                if exists else 0
            jobs = connection.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] \
                if version >= 1 else 0
            hosts = connection.execute("SELECT COUNT(*) FROM hosts").fetchone()[0] \
                if version >= SCHEMA_VERSION else 0
    except psycopg.Error as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return _problem(f"database {where} cannot be used: {reason}")
    if version > SCHEMA_VERSION:
        return _problem(f"database {where} has schema {version}, newer than this vfab "
                        f"({SCHEMA_VERSION}): upgrade vfab")
    if version < SCHEMA_VERSION:
        _say(f"database OK: {where}, schema {version} (the daemon migrates it to "
             f"{SCHEMA_VERSION} when it starts), {jobs} jobs")
        return 0
    _say(f"database OK: {where}, schema {version} (current), {jobs} jobs, {hosts} host(s)")
    return 0
