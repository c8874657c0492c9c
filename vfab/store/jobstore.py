"""The persistent job store, through `twisted.enterprise.adbapi`: a SQLite file
(one host, the default) or a PostgreSQL database (a farm of hosts on one queue).

SQLite: one connection (SQLite allows one writer; several connections only
trade speed for "database is locked"), WAL journal, foreign keys on.
PostgreSQL: `pool_size` connections, `max_overflow` more when all are busy; a
claim takes its row with `FOR UPDATE SKIP LOCKED`, so hosts claiming at once never take one job twice
nor wait for each other, and a state change locks the row it changes. What
differs between the two is in vfab.store.engines. Every state change is
written with its history row in one transaction, so what the store says after
a crash is what happened.
"""

from __future__ import annotations

import functools
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
from vfab.jobs.errors import DatabaseDamaged, DatabaseUnavailable, DiskFull, JobNotFound
from vfab.store.engines import PostgresEngine, SQLiteEngine, is_postgresql, shown_url
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


class NotClaimed(InvalidTransition):
    """A job starts only on the plotter that claimed it (HTTP 409 if ever asked)."""

    def __init__(self, job_id: str, from_state: str, plotter: str, taken_by: str | None):
        super().__init__(job_id, from_state, PLOTTING)
        self.args = (f"job {job_id} is claimed by {taken_by or 'no plotter'}, "
                     f"not by {plotter}: it does not start there",)

    def __str__(self) -> str:
        return self.args[0]


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


def _fetch(cursor: Any, job_id: str, lock: str = "") -> Job:
    """The job; `lock` (the engine's `lock`) keeps others from changing it until
    the transaction ends."""
    cursor.execute(f"{_SELECT} WHERE id = ?{lock}", (job_id,))
    row = cursor.fetchone()
    if row is None:
        raise JobNotFound(job_id)
    return _job(row)


class JobStore:
    """Jobs and their history, kept in one SQLite file or a PostgreSQL database."""

    def __init__(self, location: Path | str, *, reactor: Any, pool_size: int = 1,
                 max_overflow: int = 0,
                 now: Callable[[], float] | None = None, drawings: Path | None = None,
                 on_disk_full: Callable[[str], None] | None = None,
                 host: str | None = None):
        """`location`: the SQLite file, or a `postgresql://` URL. `drawings` is the
        folder of the jobs' drawings: a new database beside drawings has lost the
        jobs they belong to. `on_disk_full(what)` is told when a write fails for
        want of space. `host` is this daemon's host on a farm: at start only its
        own jobs are interrupted and handed over (the other hosts plot theirs)."""
        self._engine: SQLiteEngine | PostgresEngine
        if is_postgresql(location):
            self._engine = PostgresEngine(str(location))
            #: The SQLite file (None on PostgreSQL).
            self.path: Path | None = None
            #: The database as messages name it.
            self.where = shown_url(str(location))
        else:
            self._engine = SQLiteEngine(Path(location))
            self.path = Path(location)
            self.where = str(location)
        self._host = host
        self._pool_size = pool_size
        self._max_overflow = max_overflow
        self._drawings = drawings
        self._on_disk_full = on_disk_full
        #: Why the file is unusable, once a request found it damaged (until restart:
        #: damage does not mend itself).
        self.damage: str | None = None
        self._reactor = reactor
        self._now = now or reactor.seconds
        if pool_size != 1 and self.path is not None:
            _log.debug("SQLite allows one writer: using one connection (pool_size {size} "
                       "applies to server databases)", size=pool_size)
        self._pool: adbapi.ConnectionPool | None = None

    @property
    def engine(self) -> str:
        """"sqlite" or "postgresql"."""
        return self._engine.name

    @property
    def keeps_drawings(self) -> bool:
        """Whether the drawings are kept in the database (a farm: any host may plot
        any job) rather than as files in the workspace."""
        return self.path is None

    def open(self) -> None:
        """Open the file, apply migrations and mark interrupted every job that held
        the plotter when the daemon last stopped.

        Done synchronously at start-up, before the daemon listens, so that a
        database it cannot use stops the start with a one-line reason.
        """
        if self.path is None:
            self._open_server()
            return
        try:
            self._refuse_lost_jobs()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                # Create the file ourselves so that it is private from the first byte.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            connection = sqlite3.connect(str(self.path))
            try:
                _check_integrity(connection, self.path)
                SQLiteEngine.configure(connection)
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
        self._opened(interrupted)

    def _open_server(self) -> None:
        """PostgreSQL: migrate (one host at a time) and interrupt this host's jobs."""
        assert isinstance(self._engine, PostgresEngine)
        try:
            connection = self._engine.connect()
            try:
                before, after = self._engine.migrate(connection)
                interrupted = self._interrupt_active(self._engine.cursor(connection.cursor()))
                connection.commit()
            finally:
                connection.close()
        except SchemaTooNew as error:
            raise DatabaseError(f"database {self.where}: {error}") from None
        except Exception as error:  # psycopg's errors: the reason is the first line
            if type(error).__module__.split(".")[0] != "psycopg":
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise DatabaseError(f"database {self.where}: {reason}") from None
        if before != after:
            _log.info("database {where} migrated from schema {before} to {after}",
                      where=self.where, before=before, after=after)
        self._opened(interrupted)

    def _opened(self, interrupted: list[str]) -> None:
        for job_id in interrupted:
            _log.warn("job {job_id} held the plotter when the daemon stopped; "
                      "it is now interrupted", job_id=job_id)
        self._pool = self._engine.pool(self._reactor, self._pool_size, self._max_overflow)

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
            _log.info("database {where} closed", where=self.where)

    def _mine(self) -> tuple[str, tuple[Any, ...]]:
        """The condition that limits a start-up change to this host's jobs: on a farm
        the others' jobs are theirs to settle."""
        if self.path is None and self._host is not None:
            return " AND host = ?", (self._host,)
        return "", ()

    def _interrupt_active(self, cursor: Any) -> list[str]:
        marks = ", ".join("?" * len(ACTIVE))
        mine, args = self._mine()
        cursor.execute(f"SELECT id FROM jobs WHERE state IN ({marks}){mine} ORDER BY seq"
                       f"{self._engine.lock}", (*ACTIVE, *args))
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
        adapt = self._engine.cursor

        @functools.wraps(interaction)
        def adapted(cursor: Any, *args: Any) -> Any:
            return interaction(adapt(cursor), *args)

        running = self._pool.runInteraction(adapted, *args).addErrback(self._failed)
        if isinstance(self._engine, PostgresEngine):
            # A connection the server dropped (it restarted) fails once and is
            # replaced: try once more on a new one before saying "unavailable".
            running.addErrback(self._again, adapted, args)
        return running

    def _again(self, failure: Failure, adapted: Callable[..., Any],
               args: tuple[Any, ...]) -> Deferred[Any] | Failure:
        failure.trap(DatabaseUnavailable)
        if self._pool is None:
            return failure
        return self._pool.runInteraction(adapted, *args).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        """Name the failures a person must act on: a full disk (DiskFull, 507), a
        damaged file (remembered in `damage`, which /health reports) and a
        database server out of reach (DatabaseUnavailable, 503)."""
        error = failure.value
        if self._engine.unavailable(error):
            raise DatabaseUnavailable(f"database {self.where} is unavailable: "
                                      f"{str(error).strip() or type(error).__name__}")
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

    def add(self, job: Job, drawing: bytes | None = None) -> Deferred[Job]:
        """Insert a new job with its first history row (and its drawing, where the
        database keeps them: see `keeps_drawings`)."""
        def insert(cursor: Any) -> Job:
            cursor.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES "
                f"({', '.join('?' * len(_COLUMNS))})",
                tuple(_stored(job, name) for name in _COLUMNS))
            cursor.execute(
                "INSERT INTO job_events (job_id, at, from_state, to_state, reason) "
                "VALUES (?, ?, NULL, ?, ?)", (job.id, job.created_at, job.state, "submitted"))
            if drawing is not None:
                cursor.execute("INSERT INTO drawings (job_id, svg) VALUES (?, ?)",
                               (job.id, drawing))
            return job
        return self._run(insert)

    def drawing(self, job_id: str) -> Deferred[bytes]:
        """The drawing of a job the database keeps (JobNotFound if it has none)."""
        def select(cursor: Any) -> bytes:
            cursor.execute("SELECT svg FROM drawings WHERE job_id = ?", (job_id,))
            row = cursor.fetchone()
            if row is None:
                raise JobNotFound(job_id)
            return bytes(row[0])
        return self._run(select)

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
            free, args = "", [QUEUED]
            if plotter is not None:
                tags, tag_args = self._engine.tags_match(plotter.tags)
                free = (f" AND (taken_by IS NULL OR taken_by = ?) "
                        f"AND (plotter IS NULL OR plotter = ?){tags}")
                args += [plotter.name, plotter.name, *tag_args]
            order = " ORDER BY position IS NULL, priority DESC, seq ASC"
            if plotter is not None and claim and self._engine.claim_lock:
                # One row, locked: the others claiming now skip it for the next.
                order += f" LIMIT 1{self._engine.claim_lock}"
            cursor.execute(f"{_SELECT} WHERE state = ?{free}{order}", args)
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
        freed if it was not. On a farm only this host's jobs are looked at.
        Returns how many jobs changed."""
        def write(cursor: Any) -> int:
            names = [plotter.name for plotter in plotters]
            marks = ", ".join("?" * len(names))
            unfinished = ", ".join("?" * len(FINISHED))
            mine, host = self._mine()
            whose = "" if mine else "taken_by IS NULL OR "
            orphan = (f"state NOT IN ({unfinished}) AND ({whose}"
                      f"taken_by NOT IN ({marks})){mine}")
            cursor.execute(f"UPDATE jobs SET taken_by = ?, host = ? WHERE {orphan} AND "
                           f"(state != ? OR started_at IS NOT NULL)",
                           (plotters[0].name, plotters[0].host, *FINISHED, *names, *host,
                            QUEUED))
            changed = cursor.rowcount
            # Claimed by the last life as it stopped, before the job began.
            cursor.execute(f"UPDATE jobs SET taken_by = NULL, host = NULL WHERE state = ? "
                           f"AND started_at IS NULL AND taken_by IS NOT NULL{mine}",
                           (QUEUED, *host))
            return changed + cursor.rowcount
        return self._run(write)

    def counts(self) -> Deferred[dict[str, int]]:
        """How many jobs are in each state."""
        def select(cursor: Any) -> dict[str, int]:
            cursor.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            return dict(cursor.fetchall())
        return self._run(select)

    def transition(self, job_id: str, to_state: str, reason: str, *,
                   claimed_by: str | None = None, **fields: Any) -> Deferred[tuple[Job, Job]]:
        """Move a job to `to_state` with `fields` (progress, position, error…) and a
        history row, in one transaction; returns (before, after). With
        `claimed_by` (a plotter), the job must be claimed by that plotter: a
        plot starts only where the job was claimed.

        Fails with JobNotFound or InvalidTransition (NotClaimed).
        """
        def write(cursor: Any) -> tuple[Job, Job]:
            before = _fetch(cursor, job_id, self._engine.lock)
            check_transition(job_id, before.state, to_state)
            if claimed_by is not None and before.taken_by != claimed_by:
                raise NotClaimed(job_id, before.state, claimed_by, before.taken_by)
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
            job = _fetch(cursor, job_id, self._engine.lock)
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

    # -- a farm's hosts (PostgreSQL) ----------------------------------------------
    # Their times are the database server's clock, so that hosts whose clocks
    # disagree still agree on which of them has gone silent.

    def heartbeat(self, host: str, plotters: list[dict[str, Any]]) -> Deferred[None]:
        """Say that `host` is alive, with its plotters (name, tags, model, status)."""
        def write(cursor: Any) -> None:
            cursor.execute(
                "INSERT INTO hosts (name, seen_at, plotters) VALUES "
                "(?, extract(epoch FROM clock_timestamp()), ?) ON CONFLICT (name) DO UPDATE "
                "SET seen_at = EXCLUDED.seen_at, plotters = EXCLUDED.plotters",
                (host, json.dumps(plotters)))
        return self._run(write)

    def hosts(self) -> Deferred[list[dict[str, Any]]]:
        """Every host of the farm: `name`, `silent` (seconds since it was last
        heard of) and its `plotters`."""
        def select(cursor: Any) -> list[dict[str, Any]]:
            cursor.execute("SELECT name, extract(epoch FROM clock_timestamp()) - seen_at, "
                           "plotters FROM hosts ORDER BY name")
            return [{"name": name, "silent": float(silent), "plotters": json.loads(plotters)}
                    for name, silent, plotters in cursor.fetchall()]
        return self._run(select)

    def interrupt_host(self, host: str, silent_for: float,
                       reason: str) -> Deferred[list[tuple[Job, Job]]]:
        """Mark interrupted the jobs that `host` holds (plotting, paused, awaiting a pen)
        if it has been silent for `silent_for` seconds or more, checked again under
        a lock so that a host heard from meanwhile keeps its jobs and two hosts
        that noticed at once interrupt them once. Returns (before, after) of each."""
        def write(cursor: Any) -> list[tuple[Job, Job]]:
            cursor.execute("SELECT extract(epoch FROM clock_timestamp()) - seen_at FROM hosts "
                           f"WHERE name = ?{self._engine.lock}", (host,))
            row = cursor.fetchone()
            if row is None or float(row[0]) < silent_for:
                return []
            marks = ", ".join("?" * len(ACTIVE))
            cursor.execute(f"SELECT id FROM jobs WHERE host = ? AND state IN ({marks}) "
                           f"ORDER BY seq{self._engine.lock}", (host, *ACTIVE))
            changed = []
            for (job_id,) in cursor.fetchall():
                before = _fetch(cursor, job_id)
                self._write_transition(cursor, before, INTERRUPTED, reason, {"error": reason})
                changed.append((before, _fetch(cursor, job_id)))
            return changed
        return self._run(write)

