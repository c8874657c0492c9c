"""`vfab check config|database|device`: find problems before the daemon does.

Each check prints what it found and returns 0 when all is well, 1 when it
found a problem (and says which).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from vfab.config import (ConfigError, default_config_path, default_workspace, load_config,
                         sqlite_path)
from vfab.store.migrations import SCHEMA_VERSION, schema_version


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def _problem(line: str) -> int:
    sys.stderr.write(f"problem: {line}\n")
    return 1


def run_check(what: str, *, config_path: str | None, workspace: str | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as error:
        for problem in error.problems:
            _problem(problem)
        return 1
    if what == "config":
        shown = config_path or default_config_path()
        where = shown if Path(shown).exists() else "built-in defaults (no file)"
        _say(f"config OK: {where}")
        if config.websocket.authenticate and config_path is not None:
            mode = Path(config_path).stat().st_mode & 0o077
            if mode:
                return _problem(f"{config_path} holds the API key but others can read it: "
                                f"chmod 600 {config_path}")
        return 0
    space = Path(workspace).expanduser() if workspace else default_workspace()
    if what == "database":
        return _check_database(sqlite_path(config.database.url, space))
    from vfab.plotter.check import check_device
    return check_device(config.device, _say, _problem)


def _check_database(path: Path) -> int:
    if not path.exists():
        return _problem(f"no database at {path} (the daemon creates it when it starts)")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            version = schema_version(connection)
            connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            jobs = connection.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] \
                if version >= 1 else 0
        finally:
            connection.close()
    except sqlite3.Error as error:
        return _problem(f"database {path} cannot be read: {error}")
    if version > SCHEMA_VERSION:
        return _problem(f"database {path} has schema {version}, newer than this vfab "
                        f"({SCHEMA_VERSION}): upgrade vfab")
    if version < SCHEMA_VERSION:
        _say(f"database OK: {path}, schema {version} (the daemon migrates it to "
             f"{SCHEMA_VERSION} when it starts), {jobs} jobs")
        return 0
    _say(f"database OK: {path}, schema {version}, {jobs} jobs")
    return 0
