"""The job database schema as ordered migrations, applied at start.

One list for both engines: written in SQLite's words, which PostgreSQL takes
once vfab.store.engines.for_postgresql has renamed three types. SQLite's
`PRAGMA user_version` (PostgreSQL: the table `vfab_schema`) holds how many
have been applied; a migration is never edited once released, only followed
by a new one.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: tuple[str, ...] = (
    # 1: jobs and the history of their states.
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        preset TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        layers INTEGER NOT NULL DEFAULT 0,
        paths INTEGER NOT NULL DEFAULT 0,
        pen_down_mm REAL NOT NULL DEFAULT 0,
        pen_up_mm REAL NOT NULL DEFAULT 0,
        estimated_seconds REAL,
        progress REAL NOT NULL DEFAULT 0,
        error TEXT,
        svg_file TEXT NOT NULL,
        position TEXT
    );
    CREATE INDEX jobs_state ON jobs (state);
    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        at TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        reason TEXT
    );
    CREATE INDEX job_events_job ON job_events (job_id);
    """,
    # 2: several plotters. `plotter` is the one a job asks for, `tags` (a JSON
    # list) what it requires; `taken_by` and `host` say which plotter took it.
    """
    ALTER TABLE jobs ADD COLUMN plotter TEXT;
    ALTER TABLE jobs ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN taken_by TEXT;
    ALTER TABLE jobs ADD COLUMN host TEXT;
    """,
    # 3: the time a job has spent plotting, over all its runs (pauses and pen
    # changes not counted), so that a restart does not forget the runs before.
    """
    ALTER TABLE jobs ADD COLUMN plotting_seconds REAL NOT NULL DEFAULT 0;
    """,
    # 4: the job's motion plan, planned once at submission and kept as a file
    # beside its drawing (vfab.motion.planfile), and the fingerprint of the
    # settings it was planned with. NULL: planned when the job starts.
    """
    ALTER TABLE jobs ADD COLUMN plan_file TEXT;
    ALTER TABLE jobs ADD COLUMN plan_fingerprint TEXT;
    """,
    # 5: a farm (PostgreSQL). The drawings travel with the queue, so that any
    # host plots a job another received; each host says it is alive (`seen_at`,
    # seconds since the epoch) and which plotters it has (a JSON list).
    # SQLite keeps drawings as files and has one host: it leaves both empty.
    """
    CREATE TABLE drawings (
        job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        svg BLOB NOT NULL
    );
    CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        seen_at REAL NOT NULL,
        plotters TEXT NOT NULL DEFAULT '[]'
    );
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    """The database was written by a newer vfab; refuse rather than damage it."""


def schema_version(connection: sqlite3.Connection) -> int:
    return connection.execute("PRAGMA user_version").fetchone()[0]


def migrate(connection: sqlite3.Connection) -> tuple[int, int]:
    """Apply the missing migrations; returns (version before, version after)."""
    before = schema_version(connection)
    if before > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database has schema version {before} but this vfab knows only "
            f"{SCHEMA_VERSION}: upgrade vfab or use another database")
    for number in range(before, SCHEMA_VERSION):
        # executescript commits first; each migration is its own transaction.
        connection.executescript(
            f"BEGIN; {MIGRATIONS[number]} PRAGMA user_version = {number + 1}; COMMIT;")
    return before, SCHEMA_VERSION


def integrity_problem(connection: sqlite3.Connection) -> str | None:
    """The first problem `PRAGMA quick_check` finds, on one line; None for a sound file.

    SQLite heads its report with "*** in database main ***" and a newline, which
    would split the one-line reason a failed start or `vfab check` gives.
    """
    rows = [row[0] for row in connection.execute("PRAGMA quick_check").fetchall()]
    if rows == ["ok"]:
        return None
    return " ".join(rows[0].replace("*** in database main ***", "").split())
