"""The persistent job store: SQLite through `twisted.enterprise.adbapi`.

One connection (SQLite allows one writer; several connections only trade
speed for "database is locked"), WAL journal, foreign keys on. Every state
change is written with its history row in one transaction, so what the store
says after a crash is what happened.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from vfab.jobs.farm import FarmPlotter
from vfab.jobs.job import Job, iso8601
from vfab.jobs.states import (ACTIVE, FINISHED, INTERRUPTED, PLOTTING, QUEUED,
                              InvalidTransition, check_transition)
from vfab.jobs.errors import DatabaseDamaged, DiskFull, JobNotFound
from vfab.store.migrations import SchemaTooNew, integrity_problem, migrate

_log = Logger()

_COLUMNS = ("id", "name", "state", "priority", "preset", "created_at", "started_at",
            "finished_at", "layers", "paths", "pen_down_mm", "pen_up_mm",
            "estimated_seconds", "progress", "error", "svg_file", "position",
            "plotter", "tags", "taken_by", "host", "plotting_seconds", "plan_file",
            "plan_fingerprint")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"


class DatabaseError(RuntimeError):
    """The database cannot be opened or used; the message says which file and why."""


#: SQLite's primary result codes for a file that is damaged or not a database.
_DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def _primary_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _check_integrity(connection: sqlite3.Connection, path: Path) -> None:
    """Refuse a damaged file now, rather than fail every request later."""
    problem = integrity_problem(connection)
    if problem is not None:
        raise DatabaseError(f"database {path} is damaged ({problem}): restore it from "
                            f"a backup, or move it away to start with an empty queue")


#: Pages the write-ahead log takes before it is checkpointed into the file and
#: written over from its start. SQLite's 1000 (4 MB) let every progress save
#: take a new page of disk until then: on a full disk the room kept for the
#: daemon's own writes went in 64 saves (2 minutes). 32 pages: about 130 KiB,
#: taken once, then written over; a checkpoint every minute or so of saves.
WAL_CHECKPOINT_PAGES = 32
#: The write-ahead log is cut back to this after a checkpoint (a large
#: transaction grows it; left alone it would keep that size until the file is closed).
WAL_SIZE_LIMIT = 1 << 20


def _configure(connection: sqlite3.Connection) -> None:
    """Run on every new connection the pool opens."""
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
    connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA busy_timeout = 5000")


def _job(row: tuple[Any, ...]) -> Job:
    fields = dict(zip(_COLUMNS, row))
    fields["position"] = json.loads(fields["position"]) if fields["position"] else None
    fields["tags"] = tuple(json.loads(fields["tags"] or "[]"))
    return Job(**fields)


def _stored(job: Job, name: str) -> Any:
    """A job field as its column holds it (JSON for the position and the tags)."""
    if name == "position":
        return json.dumps(job.position) if job.position else None
    if name == "tags":
        return json.dumps(list(job.tags))
    return getattr(job, name)


def _fetch(cursor: Any, job_id: str) -> Job:
    cursor.execute(f"{_SELECT} WHERE id = ?", (job_id,))
    row = cursor.fetchone()
    if row is None:
        raise JobNotFound(job_id)
    return _job(row)


class JobStore:
    """Jobs and their history, kept in one SQLite file."""

    def __init__(self, path: Path, *, reactor: Any, pool_size: int = 1,
                 now: Callable[[], float] | None = None, drawings: Path | None = None,
                 on_disk_full: Callable[[str], None] | None = None):
        """`drawings` is the folder of the jobs' drawings: a new database beside
        drawings has lost the jobs they belong to. `on_disk_full(what)` is told
        when a write fails for want of space."""
        self.path = path
        self._drawings = drawings
        self._on_disk_full = on_disk_full
        #: Why the file is unusable, once a request found it damaged (until restart:
        #: damage does not mend itself).
        self.damage: str | None = None
        self._reactor = reactor
        self._now = now or reactor.seconds
        if pool_size != 1:
            _log.debug("SQLite allows one writer: using one connection (pool_size {size} "
                       "applies to server databases)", size=pool_size)
        self._pool: adbapi.ConnectionPool | None = None

    def open(self) -> None:
        """Open the file, apply migrations and mark interrupted every job that held
        the plotter when the daemon last stopped.

        Done synchronously at start-up, before the daemon listens, so that a
        database it cannot use stops the start with a one-line reason.
        """
        try:
            self._refuse_lost_jobs()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                # Create the file ourselves so that it is private from the first byte.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            connection = sqlite3.connect(str(self.path))
            try:
                _check_integrity(connection, self.path)
                _configure(connection)
                before, after = migrate(connection)
                with connection:
                    interrupted = self._interrupt_active(connection.cursor())
            finally:
                connection.close()
        except sqlite3.Error as error:
            if _primary_code(error) in _DAMAGED:
                raise DatabaseError(f"database {self.path} is damaged ({error}): restore it "
                                    f"from a backup, or move it away to start with an empty "
                                    f"queue") from None
            raise DatabaseError(f"database {self.path}: {error}") from None
        except (OSError, SchemaTooNew) as error:
            raise DatabaseError(f"database {self.path}: {error}") from None
        if before != after:
            _log.info("database {path} migrated from schema {before} to {after}",
                      path=str(self.path), before=before, after=after)
        for job_id in interrupted:
            _log.warn("job {job_id} held the plotter when the daemon stopped; "
                      "it is now interrupted", job_id=job_id)
        self._pool = adbapi.ConnectionPool(
            "sqlite3", str(self.path), cp_min=1, cp_max=1, check_same_thread=False,
            cp_openfun=_configure, cp_reactor=self._reactor)

    def _refuse_lost_jobs(self) -> None:
        """A missing or zero-length database beside drawings in `jobs/` means the
        queue was lost (a restore gone wrong, a damaged disk): starting empty would
        orphan those drawings without a word."""
        if self._drawings is None or (self.path.exists() and self.path.stat().st_size > 0):
            return
        drawings = sorted(self._drawings.glob("*.svg")) if self._drawings.is_dir() else []
        if drawings:
            what = "is empty (0 bytes)" if self.path.exists() else "is missing"
            raise DatabaseError(
                f"database {self.path} {what} but {self._drawings} holds {len(drawings)} "
                f"job drawing(s): restore the database from a backup, or move "
                f"{self._drawings} away to start with an empty queue")

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
            _log.info("database {path} closed", path=str(self.path))

    def _interrupt_active(self, cursor: Any) -> list[str]:
        marks = ", ".join("?" * len(ACTIVE))
        cursor.execute(f"SELECT id FROM jobs WHERE state IN ({marks})", tuple(ACTIVE))
        ids = [row[0] for row in cursor.fetchall()]
        reason = ("the daemon stopped while the job held the plotter; resume continues "
                  "from the saved progress")
        for job_id in ids:
            # The reason is the job's `error` too, as for every other interruption,
            # so that status, watch and the dashboard can say why the queue waits.
            self._write_transition(cursor, _fetch(cursor, job_id), INTERRUPTED, reason,
                                   {"error": reason})
        return ids

    def _run(self, interaction: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._pool is None:
            return fail(DatabaseError("the database is closed"))
        if self.damage is not None:
            # Writing over a damaged b-tree spreads the damage; reads of what is
            # left would show a queue that is not the real one.
            return fail(DatabaseDamaged(self.damage))
        return self._pool.runInteraction(interaction, *args).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        """Name the two failures a person must act on: a full disk (DiskFull, 507)
        and a damaged file (remembered in `damage`, which /health reports)."""
        error = failure.value
        if not isinstance(error, sqlite3.Error):
            return failure
        code = _primary_code(error)
        if code == sqlite3.SQLITE_FULL:
            if self._on_disk_full is not None:
                self._on_disk_full("the job database")
            raise DiskFull("the job database")
        if code in _DAMAGED:
            if self.damage is None:
                self.damage = (f"database {self.path} is damaged ({error}): stop the "
                               f"daemon, run `vfab check database`, and restore the file "
                               f"from a backup")
                # Once: every request from now on is refused with this same reason.
                _log.critical("{damage}", damage=self.damage)
            raise DatabaseDamaged(self.damage)
        return failure

    def add(self, job: Job) -> Deferred[Job]:
        """Insert a new job with its first history row."""
        def insert(cursor: Any) -> Job:
            cursor.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES "
                f"({', '.join('?' * len(_COLUMNS))})",
                tuple(_stored(job, name) for name in _COLUMNS))
            cursor.execute(
                "INSERT INTO job_events (job_id, at, from_state, to_state, reason) "
                "VALUES (?, ?, NULL, ?, ?)", (job.id, job.created_at, job.state, "submitted"))
            return job
        return self._run(insert)

    def get(self, job_id: str) -> Deferred[Job]:
        return self._run(_fetch, job_id)

    def list(self, state: str | None = None, limit: int | None = None) -> Deferred[list[Job]]:
        """Jobs newest first."""
        def select(cursor: Any) -> list[Job]:
            query, args = _SELECT, []
            if state is not None:
                query += " WHERE state = ?"
                args.append(state)
            query += " ORDER BY seq DESC"
            if limit is not None:
                query += " LIMIT ?"
                args.append(limit)
            cursor.execute(query, args)
            return [_job(row) for row in cursor.fetchall()]
        return self._run(select)

    def next_to_plot(self, plotter: FarmPlotter | None = None, *,
                     claim: bool = True) -> Deferred[tuple[Job | None, Job | None]]:
        """(the job `plotter` plots next, None), or (None, the interrupted job that
        holds it): while a job is interrupted its drawing is half on that plotter's
        paper, and nothing else starts there until a person resumes or cancels it.

        The job is claimed for `plotter` (`taken_by`, `host`) in the same
        transaction, so that no other plotter takes it; `claim=False` only looks.
        With no `plotter`, any job counts and none is claimed.
        """
        def select(cursor: Any) -> tuple[Job | None, Job | None]:
            mine = "" if plotter is None else " AND taken_by = ?"
            cursor.execute(f"{_SELECT} WHERE state = ?{mine} ORDER BY seq ASC LIMIT 1",
                           (INTERRUPTED,) if plotter is None else (INTERRUPTED, plotter.name))
            row = cursor.fetchone()
            if row:
                return None, _job(row)
            free = "" if plotter is None else (" AND (taken_by IS NULL OR taken_by = ?) "
                                               "AND (plotter IS NULL OR plotter = ?)")
            cursor.execute(f"{_SELECT} WHERE state = ?{free} ORDER BY position IS NULL, "
                           f"priority DESC, seq ASC", (QUEUED,) if plotter is None
                           else (QUEUED, plotter.name, plotter.name))
            for row in cursor.fetchall():
                job = _job(row)
                if plotter is None:
                    return job, None
                if plotter.can_take(job.plotter, job.tags):
                    break
            else:
                return None, None
            if claim and job.taken_by is None:
                self._update(cursor, job.id, {"taken_by": plotter.name, "host": plotter.host})
                job = _fetch(cursor, job.id)
            return job, None
        return self._run(select)

    def release(self, job_id: str) -> Deferred[None]:
        """Give back a claimed job that never started, for any plotter to take."""
        def write(cursor: Any) -> None:
            cursor.execute("UPDATE jobs SET taken_by = NULL, host = NULL WHERE id = ? "
                           "AND state = ? AND started_at IS NULL", (job_id, QUEUED))
        return self._run(write)

    def adopt(self, plotters: list[FarmPlotter]) -> Deferred[int]:
        """At start, with this daemon's plotters: a job taken by a plotter that is no
        longer configured (or by none, before there were several) is given to the
        first plotter if it was begun (its sheet is the likeliest there), and
        freed if it was not. Returns how many jobs changed."""
        def write(cursor: Any) -> int:
            names = [plotter.name for plotter in plotters]
            marks = ", ".join("?" * len(names))
            unfinished = ", ".join("?" * len(FINISHED))
            orphan = (f"state NOT IN ({unfinished}) AND (taken_by IS NULL OR "
                      f"taken_by NOT IN ({marks}))")
            cursor.execute(f"UPDATE jobs SET taken_by = ?, host = ? WHERE {orphan} AND "
                           f"(state != ? OR started_at IS NOT NULL)",
                           (plotters[0].name, plotters[0].host, *FINISHED, *names, QUEUED))
            changed = cursor.rowcount
            # Claimed by the last life as it stopped, before the job began.
            cursor.execute("UPDATE jobs SET taken_by = NULL, host = NULL WHERE state = ? "
                           "AND started_at IS NULL AND taken_by IS NOT NULL", (QUEUED,))
            return changed + cursor.rowcount
        return self._run(write)

    def counts(self) -> Deferred[dict[str, int]]:
        """How many jobs are in each state."""
        def select(cursor: Any) -> dict[str, int]:
            cursor.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            return dict(cursor.fetchall())
        return self._run(select)

    def transition(self, job_id: str, to_state: str, reason: str,
                   **fields: Any) -> Deferred[tuple[Job, Job]]:
        """Move a job to `to_state` with `fields` (progress, position, error…) and a
        history row, in one transaction; returns (before, after).

        Fails with JobNotFound or InvalidTransition.
        """
        def write(cursor: Any) -> tuple[Job, Job]:
            before = _fetch(cursor, job_id)
            check_transition(job_id, before.state, to_state)
            self._write_transition(cursor, before, to_state, reason, fields)
            return before, _fetch(cursor, job_id)
        return self._run(write)

    def _write_transition(self, cursor: Any, job: Job, to_state: str, reason: str,
                          fields: dict[str, Any]) -> None:
        stamp = iso8601(self._now())
        values = dict(fields, state=to_state)
        if to_state == PLOTTING and job.started_at is None:
            values["started_at"] = stamp
        if to_state in FINISHED:
            values["finished_at"] = stamp
        self._update(cursor, job.id, values)
        cursor.execute(
            "INSERT INTO job_events (job_id, at, from_state, to_state, reason) "
            "VALUES (?, ?, ?, ?, ?)", (job.id, stamp, job.state, to_state, reason))

    @staticmethod
    def _update(cursor: Any, job_id: str, values: dict[str, Any]) -> None:
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"not job columns: {sorted(unknown)}")
        if "position" in values and values["position"] is not None:
            values["position"] = json.dumps(values["position"])
        assignments = ", ".join(f"{name} = ?" for name in values)
        cursor.execute(f"UPDATE jobs SET {assignments} WHERE id = ?",
                       (*values.values(), job_id))

    def set_plan(self, job_id: str, plan_file: str, fingerprint: str) -> Deferred[None]:
        """Record the job's plan file and the fingerprint of its settings (planned again)."""
        def write(cursor: Any) -> None:
            self._update(cursor, job_id, {"plan_file": plan_file,
                                          "plan_fingerprint": fingerprint})
        return self._run(write)

    def save_progress(self, job_id: str, progress: float, position: dict[str, int] | None,
                      plotting_seconds: float | None = None) -> Deferred[None]:
        """Record how far an active job has come, without a state change (and how
        long it has plotted, unless None: kept as it is)."""
        def write(cursor: Any) -> None:
            values: dict[str, Any] = {"progress": progress, "position": position}
            if plotting_seconds is not None:
                values["plotting_seconds"] = plotting_seconds
            self._update(cursor, job_id, values)
        return self._run(write)

    def delete(self, job_id: str) -> Deferred[Job]:
        """Remove a finished job and its history; returns what was removed."""
        def remove(cursor: Any) -> Job:
            job = _fetch(cursor, job_id)
            if job.state not in FINISHED:
                raise InvalidTransition(job_id, job.state, "deleted")
            cursor.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            return job
        return self._run(remove)

    def history(self, job_id: str) -> Deferred[list[dict[str, Any]]]:
        """Every state change of a job, oldest first."""
        def select(cursor: Any) -> list[dict[str, Any]]:
            _fetch(cursor, job_id)
            cursor.execute("SELECT at, from_state, to_state, reason FROM job_events "
                           "WHERE job_id = ? ORDER BY seq", (job_id,))
            return [dict(zip(("at", "from_state", "to_state", "reason"), row))
                    for row in cursor.fetchall()]
        return self._run(select)



