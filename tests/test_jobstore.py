"""The job store on a real SQLite file and on a real PostgreSQL database (each
test that takes `location` or `store` runs on both): migrations, transitions,
history, restart, claims."""

import sqlite3
import threading

import attr
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from vfab.jobs import states
from vfab.jobs.errors import JobNotFound
from vfab.jobs.farm import FarmPlotter
from vfab.jobs.job import Job
from vfab.store.jobstore import DatabaseError, JobStore, NotClaimed
from vfab.store.migrations import MIGRATIONS, SCHEMA_VERSION, SchemaTooNew, migrate


def make_job(job_id, *, priority=0, created="2026-11-26T03:00:00.000Z", state=states.QUEUED):
    return Job(id=job_id, name=f"job {job_id}", state=state, priority=priority,
               created_at=created, svg_file=f"{job_id}.svg", layers=1, paths=3,
               pen_down_mm=10.0, pen_up_mm=5.0, estimated_seconds=12.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """Where a store keeps its jobs: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "vfab.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(location):
    store = JobStore(location, reactor=reactor)
    store.open()
    yield store
    store.close()


def test_open_creates_a_private_migrated_file(tmp_path):
    store = JobStore(tmp_path / "sub" / "vfab.db", reactor=reactor)
    store.open()
    store.close()
    path = tmp_path / "sub" / "vfab.db"
    assert path.stat().st_mode & 0o777 == 0o600
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "vfab.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseError, match="vfab.db"):
        JobStore(path, reactor=reactor).open()


def test_a_newer_schema_is_refused(tmp_path):
    connection = sqlite3.connect(tmp_path / "vfab.db")
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match="upgrade vfab"):
        migrate(connection)


@pytest_twisted.inlineCallbacks
def test_jobs_run_by_priority_then_age_and_list_newest_first(store):
    yield store.add(make_job("a", priority=0))
    yield store.add(make_job("b", priority=5))
    yield store.add(make_job("c", priority=5))
    nxt, held_by = yield store.next_to_plot()
    assert nxt.id == "b" and held_by is None
    listed = yield store.list()
    assert [job.id for job in listed] == ["c", "b", "a"]
    limited = yield store.list(limit=1)
    assert [job.id for job in limited] == ["c"]


@pytest_twisted.inlineCallbacks
def test_an_interrupted_job_holds_the_queue(store):
    yield store.add(make_job("a", priority=9))
    yield store.add(make_job("b"))
    yield store.transition("b", "plotting", "started")
    yield store.transition("b", "interrupted", "the daemon stopped")
    nxt, held_by = yield store.next_to_plot()
    assert nxt is None and held_by.id == "b"


@pytest_twisted.inlineCallbacks
def test_transitions_are_checked_and_recorded_with_their_reason(store):
    yield store.add(make_job("a"))
    before, after = yield store.transition("a", states.PLOTTING, "started")
    assert (before.state, after.state) == ("queued", "plotting")
    assert after.started_at is not None and after.finished_at is None
    with pytest.raises(states.InvalidTransition):
        yield store.transition("a", states.QUEUED, "nope")
    _, done = yield store.transition("a", states.COMPLETED, "plot finished", progress=1.0)
    assert done.finished_at is not None and done.progress == 1.0
    history = yield store.history("a")
    assert [(h["from_state"], h["to_state"], h["reason"]) for h in history] == [
        (None, "queued", "submitted"), ("queued", "plotting", "started"),
        ("plotting", "completed", "plot finished")]
    with pytest.raises(JobNotFound):
        yield store.get("missing")


@pytest_twisted.inlineCallbacks
def test_only_finished_jobs_can_be_deleted(store):
    yield store.add(make_job("a"))
    with pytest.raises(states.InvalidTransition):
        yield store.delete("a")
    yield store.transition("a", states.CANCELLED, "by request")
    yield store.delete("a")
    with pytest.raises(JobNotFound):
        yield store.get("a")


@pytest_twisted.inlineCallbacks
def test_a_first_schema_database_keeps_its_jobs_and_learns_their_plotting_time(tmp_path):
    """Migration 2: a job half plotted before the upgrade goes on, its earlier
    plotting time unknown (0), and from then on it is saved with the progress."""
    path = tmp_path / "vfab.db"
    connection = sqlite3.connect(path)
    connection.executescript(f"{MIGRATIONS[0]} PRAGMA user_version = 1;")
    connection.execute("INSERT INTO jobs (id, name, state, created_at, svg_file, progress) "
                       "VALUES ('a', 'old', 'paused', '2026-11-26T03:00:00.000Z', 'a.svg', 0.5)")
    connection.commit()
    connection.close()
    store = JobStore(path, reactor=reactor)
    store.open()
    try:
        job = yield store.get("a")
        assert (job.state, job.progress, job.plotting_seconds) == (states.INTERRUPTED, 0.5, 0.0)
        yield store.save_progress("a", 0.6, None, plotting_seconds=12.5)
        job = yield store.get("a")
        assert job.plotting_seconds == 12.5
        yield store.save_progress("a", 0.7, None)  # kept as it was
        job = yield store.get("a")
        assert (job.progress, job.plotting_seconds) == (0.7, 12.5)
    finally:
        store.close()


@pytest_twisted.inlineCallbacks
def test_progress_is_saved_and_survives_a_restart(location):
    path = location
    store = JobStore(path, reactor=reactor)
    store.open()
    yield store.add(make_job("a"))
    yield store.add(make_job("b"))
    yield store.transition("a", states.PLOTTING, "started")
    yield store.save_progress("a", 0.25, {"layer": 0, "path": 7, "move": 3})
    store.close()

    again = JobStore(path, reactor=reactor)
    again.open()  # as after a crash: "a" was plotting
    try:
        job = yield again.get("a")
        assert job.state == states.INTERRUPTED
        assert job.progress == 0.25
        assert job.position == {"layer": 0, "path": 7, "move": 3}
        assert "daemon stopped" in job.error  # why it holds the queue (issue 15 item 4)
        history = yield again.history("a")
        assert history[-1]["to_state"] == "interrupted"
        other = yield again.get("b")
        assert other.state == states.QUEUED
    finally:
        again.close()


LEFT = FarmPlotter(name="left", host="studio", tags=("a3",))
RIGHT = FarmPlotter(name="right", host="studio", tags=("a4",))


@pytest_twisted.inlineCallbacks
def test_two_plotters_never_claim_the_same_job(store):
    for name in "abcd":
        yield store.add(make_job(name))
    claims = [store.next_to_plot(plotter) for plotter in (LEFT, RIGHT, LEFT, RIGHT)]
    first_left, _ = yield claims[0]
    first_right, _ = yield claims[1]
    again_left, _ = yield claims[2]  # left's claim is still queued: it is offered again
    again_right, _ = yield claims[3]
    assert (first_left.id, first_right.id) == ("a", "b")
    assert (again_left.id, again_right.id) == ("a", "b")
    stored = yield store.get("a")
    assert (stored.taken_by, stored.host, stored.state) == ("left", "studio", states.QUEUED)
    look, _ = yield store.next_to_plot(FarmPlotter(name="third", host="x"), claim=False)
    assert look.id == "c"
    untouched = yield store.get("c")
    assert untouched.taken_by is None


@pytest_twisted.inlineCallbacks
def test_a_job_goes_only_to_the_plotter_it_names_with_every_tag_it_requires(store):
    yield store.add(attr.evolve(make_job("named", priority=9), plotter="right"))
    yield store.add(attr.evolve(make_job("tagged", priority=5), tags=("a3",)))
    yield store.add(make_job("any"))
    left, _ = yield store.next_to_plot(LEFT)
    right, _ = yield store.next_to_plot(RIGHT)
    assert (left.id, right.id) == ("tagged", "named")
    stored = yield store.get("tagged")
    assert stored.tags == ("a3",) and stored.to_dict()["plotter"] == "left"


@pytest_twisted.inlineCallbacks
def test_an_interrupted_job_holds_only_its_plotter(store):
    yield store.add(make_job("held"))
    yield store.add(make_job("next"))
    yield store.next_to_plot(LEFT)
    yield store.transition("held", states.PLOTTING, "started")
    yield store.transition("held", states.INTERRUPTED, "the device was lost")
    left, held_by = yield store.next_to_plot(LEFT)
    assert left is None and held_by.id == "held"
    right, held_by = yield store.next_to_plot(RIGHT)
    assert right.id == "next" and held_by is None
    yield store.transition("held", states.QUEUED, "resume requested")
    yield store.release("held")  # begun on the left: it stays there
    stored = yield store.get("held")
    assert stored.taken_by == "left"


@pytest_twisted.inlineCallbacks
def test_a_claim_not_begun_is_released_and_orphans_are_adopted(store):
    yield store.add(make_job("claimed"))
    yield store.add(make_job("begun"))
    yield store.next_to_plot(LEFT)
    yield store.release("claimed")
    stored = yield store.get("claimed")
    assert stored.taken_by is None
    yield store.next_to_plot(LEFT)  # claims "claimed" again
    yield store.transition("claimed", states.PLOTTING, "started")
    yield store.transition("claimed", states.INTERRUPTED, "the daemon stopped")
    # The left plotter leaves the configuration: its begun job goes to the first.
    changed = yield store.adopt([RIGHT])
    assert changed == 1
    stored = yield store.get("claimed")
    assert stored.taken_by == "right"


@pytest_twisted.inlineCallbacks
def test_a_schema_1_database_is_migrated_with_its_jobs(tmp_path):
    path = tmp_path / "vfab.db"
    connection = sqlite3.connect(path)
    connection.executescript(f"BEGIN; {MIGRATIONS[0]} PRAGMA user_version = 1; COMMIT;")
    connection.execute("INSERT INTO jobs (id, name, state, created_at, svg_file) VALUES "
                       "('old', 'old job', 'interrupted', '2026-11-26T03:00:00.000Z', 'old.svg')")
    connection.commit()
    connection.close()
    store = JobStore(path, reactor=reactor)
    store.open()
    try:
        job = yield store.get("old")
    finally:
        store.close()
    assert (job.plotter, job.tags, job.taken_by, job.host) == (None, (), None, None)


@pytest_twisted.inlineCallbacks
def test_a_plot_starts_only_on_the_plotter_that_claimed_the_job(store):
    yield store.add(make_job("a"))
    yield store.next_to_plot(LEFT)
    with pytest.raises(NotClaimed, match="claimed by left, not by right"):
        yield store.transition("a", states.PLOTTING, "started", claimed_by="right")
    _, started = yield store.transition("a", states.PLOTTING, "started", claimed_by="left")
    assert started.state == states.PLOTTING


@pytest_twisted.inlineCallbacks
def test_a_drawing_kept_in_the_database_goes_with_its_job(store):
    yield store.add(make_job("a"), drawing=b"<svg/>")
    assert (yield store.drawing("a")) == b"<svg/>"
    yield store.transition("a", states.CANCELLED, "by request")
    yield store.delete("a")
    with pytest.raises(JobNotFound):
        yield store.drawing("a")
    assert store.keeps_drawings == (store.engine == "postgresql")


def test_a_newer_postgresql_schema_is_refused(postgres_url):
    import psycopg

    JobStore(postgres_url, reactor=reactor).open()
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT version FROM vfab_schema").fetchone() == (
            SCHEMA_VERSION,)
        connection.execute("UPDATE vfab_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(DatabaseError, match="upgrade vfab"):
        JobStore(postgres_url, reactor=reactor).open()


def test_an_unreachable_server_is_a_one_line_reason(postgres_server):
    url = postgres_server.url("missing_database")
    with pytest.raises(DatabaseError, match=r"^database postgresql://vfab@127\.0\.0\.1:\d+/"
                                            r"missing_database: .*missing_database"):
        JobStore(url, reactor=reactor).open()


@pytest_twisted.inlineCallbacks
def test_on_a_farm_a_host_that_starts_settles_only_its_own_jobs(postgres_url):
    first = JobStore(postgres_url, reactor=reactor, host="studio")
    first.open()
    try:
        for name in ("mine", "theirs"):
            yield first.add(make_job(name))
        yield first.next_to_plot(LEFT)
        yield first.next_to_plot(FarmPlotter(name="far", host="elsewhere"))
        yield first.transition("mine", states.PLOTTING, "started", claimed_by="left")
        yield first.transition("theirs", states.PLOTTING, "started", claimed_by="far")
    finally:
        first.close()
    again = JobStore(postgres_url, reactor=reactor, host="studio")
    again.open()
    try:
        assert (yield again.adopt([RIGHT])) == 1  # left is gone from studio: right has it
        mine, theirs = (yield again.get("mine")), (yield again.get("theirs"))
    finally:
        again.close()
    assert (mine.state, mine.taken_by) == (states.INTERRUPTED, "right")
    assert (theirs.state, theirs.taken_by, theirs.host) == (states.PLOTTING, "far", "elsewhere")


CLAIMERS = 16
CLAIMED_JOBS = 300


@pytest_twisted.inlineCallbacks
def test_sixteen_plotters_claiming_at_once_take_every_job_exactly_once(postgres_url):
    """Each plotter claims, starts and ends jobs as fast as it can, on a connection
    of its own. Without the claim's row lock two plotters take one job (both read
    it free); with a lock that waits, a plotter finds "nothing free" while jobs
    wait; SKIP LOCKED gives each its own."""
    store = JobStore(postgres_url, reactor=reactor, pool_size=CLAIMERS)
    store.open()
    try:
        for number in range(CLAIMED_JOBS):
            yield store.add(make_job(f"job{number:03d}", priority=number % 7))
        plotters = [FarmPlotter(name=f"p{number}", host=f"host{number % 4}")
                    for number in range(CLAIMERS)]
        claims: dict[str, list[str]] = {plotter.name: [] for plotter in plotters}

        @pytest_twisted.inlineCallbacks
        def claim_all(plotter):
            while True:
                job, _ = yield store.next_to_plot(plotter)
                if job is None:
                    return
                claims[plotter.name].append(job.id)
                yield store.transition(job.id, states.PLOTTING, "started",
                                       claimed_by=plotter.name)
                yield store.transition(job.id, states.COMPLETED, "plot finished")

        yield gatherResults([claim_all(plotter) for plotter in plotters], consumeErrors=True)
        taken = [job_id for ids in claims.values() for job_id in ids]
        assert len(taken) == len(set(taken)) == CLAIMED_JOBS
        assert sum(1 for ids in claims.values() if ids) > CLAIMERS // 2  # truly at once
        counts = yield store.counts()
        assert counts == {states.COMPLETED: CLAIMED_JOBS}
        history = yield store.history("job000")
        assert [change["to_state"] for change in history] == ["queued", "plotting",
                                                               "completed"]
    finally:
        store.close()


@pytest_twisted.inlineCallbacks
def test_a_postgresql_pool_opens_pool_size_and_max_overflow_connections_at_most(postgres_url):
    """Six queries at once on pool_size 1 + max_overflow 2: three meet on three
    connections (fewer and the meeting never happens), then three more reuse them
    (more connections and six would show)."""
    store = JobStore(postgres_url, reactor=reactor, pool_size=1, max_overflow=2)
    store.open()
    meeting = threading.Barrier(3, timeout=30)

    def meet(cursor):
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
        meeting.wait()
        return backend

    try:
        backends = yield gatherResults([store._run(meet) for _ in range(6)],
                                       consumeErrors=True)
    finally:
        store.close()
    assert len(set(backends)) == 3
