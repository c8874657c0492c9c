"""The two databases the job store runs on, and all that differs between them.

SQLite (one file, one host, the default) and PostgreSQL (a farm: several
hosts on one queue). The store writes its SQL once, with `?` placeholders and
portable types; an engine adapts the placeholders, adds the row locks a server
database needs when several hosts claim jobs at once, opens the connection
pool and applies the one migration list (vfab.store.migrations).
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.enterprise import adbapi

from vfab.store import migrations

POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
#: Seconds a connection attempt to PostgreSQL may take before it counts as failed.
CONNECT_TIMEOUT = 5


def is_postgresql(location: Any) -> bool:
    return isinstance(location, str) and location.startswith(POSTGRESQL_SCHEMES)


def shown_url(url: str) -> str:
    """A database URL as logs and messages show it: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class _Cursor:
    """A DB-API cursor that takes the store's `?` placeholders (PostgreSQL: `%s`)."""

    def __init__(self, cursor: Any):
        self._cursor = cursor

    def execute(self, query: str, args: Any = ()) -> Any:
        return self._cursor.execute(query.replace("?", "%s"), args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _ServerConnection(adbapi.Connection):
    """adbapi's pooled connection, quiet about a connection the server dropped.

    adbapi tries a rollback and a `select 1` on it, logs both failures as
    CRITICAL tracebacks and then drops it; a dropped connection is ordinary on
    a farm (the server restarted), and the failed query says so already."""

    def rollback(self) -> None:
        if self._connection.closed or getattr(self._connection, "broken", False):
            self._pool.disconnect(self._connection)
            return
        super().rollback()


class ServerPool(adbapi.ConnectionPool):
    """A pool of PostgreSQL connections, each opened again once the server drops it."""

    connectionFactory = _ServerConnection


class SQLiteEngine:
    """One file; one connection (SQLite allows one writer), WAL journal."""

    name = "sqlite"
    #: SQLite has no row locks: its one writer serialises every claim.
    lock = ""
    claim_lock = ""

    def __init__(self, path: Any):
        self.path = path

    @staticmethod
    def configure(connection: sqlite3.Connection) -> None:
        """Run on every new connection the pool opens."""
        from vfab.store.jobstore import WAL_CHECKPOINT_PAGES, WAL_SIZE_LIMIT

        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA busy_timeout = 5000")

    def pool(self, reactor: Any, pool_size: int, max_overflow: int) -> adbapi.ConnectionPool:
        return adbapi.ConnectionPool(
            "sqlite3", str(self.path), cp_min=1, cp_max=1, check_same_thread=False,
            cp_openfun=self.configure, cp_reactor=reactor)

    @staticmethod
    def cursor(cursor: Any) -> Any:
        return cursor

    @staticmethod
    def tags_match(plotter_tags: tuple[str, ...]) -> tuple[str, tuple[Any, ...]]:
        """SQLite checks tags in Python, after the query (see the store)."""
        return "", ()

    @staticmethod
    def unavailable(error: BaseException) -> bool:
        return False


class PostgresEngine:
    """A PostgreSQL server shared by the hosts of a farm, through psycopg 3."""

    name = "postgresql"
    #: A row read to be changed is locked until the transaction ends.
    lock = " FOR UPDATE"
    #: A claim skips the rows another host is claiming at this moment.
    claim_lock = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str):
        self.url = url

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT)

    def pool(self, reactor: Any, pool_size: int, max_overflow: int) -> adbapi.ConnectionPool:
        # One connection per pool thread, opened on its first query: `pool_size`
        # threads wait for work, `max_overflow` more start when all are busy, so
        # a host holds at most pool_size + max_overflow connections. A dead one
        # (the server restarted) is dropped on the failed rollback and opened
        # again for the next query.
        return ServerPool(
            "psycopg", self.url, connect_timeout=CONNECT_TIMEOUT, cp_min=pool_size,
            cp_max=pool_size + max_overflow,
            cp_reconnect=True, cp_noisy=False, cp_reactor=reactor)

    @staticmethod
    def cursor(cursor: Any) -> Any:
        return _Cursor(cursor)

    @staticmethod
    def tags_match(plotter_tags: tuple[str, ...]) -> tuple[str, tuple[Any, ...]]:
        """Every tag of the job is one of the plotter's, checked in the claim's
        query itself: a claim locks only the one row it returns."""
        import json

        return " AND tags::jsonb <@ ?::jsonb", (json.dumps(list(plotter_tags)),)

    @staticmethod
    def unavailable(error: BaseException) -> bool:
        """The server went away or cannot be reached (not a wrong query)."""
        import psycopg

        return isinstance(error, (psycopg.OperationalError, adbapi.ConnectionLost)) \
            and not isinstance(error, psycopg.errors.QueryCanceled)

    def migrate(self, connection: Any) -> tuple[int, int]:
        """Apply the missing migrations in one transaction, under a lock that
        makes the other hosts starting now wait for it."""
        cursor = connection.cursor()
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        cursor.execute("CREATE TABLE IF NOT EXISTS vfab_schema (version INTEGER NOT NULL)")
        cursor.execute("SELECT version FROM vfab_schema")
        row = cursor.fetchone()
        before = 0 if row is None else row[0]
        if before > migrations.SCHEMA_VERSION:
            connection.rollback()
            raise migrations.SchemaTooNew(
                f"the database has schema version {before} but this vfab knows only "
                f"{migrations.SCHEMA_VERSION}: upgrade vfab or use another database")
        for number in range(before, migrations.SCHEMA_VERSION):
            cursor.execute(for_postgresql(migrations.MIGRATIONS[number]))
        if row is None:
            cursor.execute("INSERT INTO vfab_schema (version) VALUES (%s)",
                           (migrations.SCHEMA_VERSION,))
        else:
            cursor.execute("UPDATE vfab_schema SET version = %s", (migrations.SCHEMA_VERSION,))
        connection.commit()
        return before, migrations.SCHEMA_VERSION


#: The advisory lock key under which one host at a time migrates the schema.
MIGRATION_LOCK = 0x76666162  # "vfab"

_TYPES: tuple[tuple[str, str], ...] = (
    (r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", "BIGSERIAL PRIMARY KEY"),
    (r"\bREAL\b", "DOUBLE PRECISION"),  # SQLite's REAL is 8 bytes; PostgreSQL's, 4
    (r"\bBLOB\b", "BYTEA"),
)


def for_postgresql(script: str) -> str:
    """A migration as PostgreSQL writes its types (the list is written for SQLite,
    whose files are released with it)."""
    for pattern, replacement in _TYPES:
        script = re.sub(pattern, replacement, script)
    return script


Engine = SQLiteEngine | PostgresEngine
