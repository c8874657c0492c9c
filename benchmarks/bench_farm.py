"""A farm on one PostgreSQL (a server of its own, as the tests start it):

1. claim latency: ten claim loops (ten plotters, each on a connection of its
   own) take 1000 jobs at once (claim, start, end); the p99 of one claim.
2. cross-host fan-out: one host plots, another relays; for each `job_progress`
   both hosts' WebSocket clients receive, how much later the other host's
   arrived (p99).
"""

from __future__ import annotations

import sys
import time

import common  # noqa: F401  (puts the project on sys.path)

sys.path.insert(0, str(common.ROOT / "tests"))

from postgres_server import PostgresServer  # noqa: E402

CLAIMERS = 10
JOBS = 1000
#: Targets: a claim's p99 under ten claimers; a progress message on the other host.
CLAIM_P99_MS = 50.0
FANOUT_P99_MS = 250.0


def claims(url: str) -> list[float]:
    from twisted.internet import defer, reactor

    from vfab.jobs import states
    from vfab.jobs.farm import FarmPlotter
    from vfab.jobs.job import Job
    from vfab.store.jobstore import JobStore

    store = JobStore(url, reactor=reactor, pool_size=CLAIMERS)
    store.open()
    latencies: list[float] = []

    @defer.inlineCallbacks
    def loop(plotter: FarmPlotter):
        while True:
            began = time.perf_counter()
            job, _ = yield store.next_to_plot(plotter)
            latencies.append(time.perf_counter() - began)
            if job is None:
                return
            yield store.transition(job.id, states.PLOTTING, "started", claimed_by=plotter.name)
            yield store.transition(job.id, states.COMPLETED, "plot finished")

    @defer.inlineCallbacks
    def run():
        for number in range(JOBS):
            yield store.add(Job(id=f"j{number:04d}", name="bench", state=states.QUEUED,
                                created_at="2026-12-07T00:00:00.000Z", svg_file="x.svg"))
        yield defer.gatherResults([loop(FarmPlotter(name=f"p{n}", host=f"h{n}"))
                                   for n in range(CLAIMERS)])
        counts = yield store.counts()
        assert counts == {states.COMPLETED: JOBS}, counts
        store.close()
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    return latencies


def fanout(server: PostgresServer) -> list[float]:
    import tempfile
    from pathlib import Path

    from test_farm_hosts import Events, host, long_drawing
    from tests.daemon_process import wait_until

    url = server.create_database()
    folder = Path(tempfile.mkdtemp(prefix="vfab-bench-farm-"))
    plotting = host(folder, "plotting", url, [{"name": "p1", "tags": []}]).start()
    other = host(folder, "other", url).start()
    try:
        here, there = Events(plotting), Events(other)
        code, job = other.submit(long_drawing(), name="bench")
        assert code == 201, job
        plotting.wait_for_job(job["id"], {"completed"}, timeout=300)
        for events in (here, there):  # the end has reached both hosts' clients
            wait_until(lambda: "completed" in events.arrivals("job_state_change", job["id"]),
                       "the job's end on both hosts", timeout=30)
        here.close()
        there.close()

        def progress(events: Events) -> dict[float, float]:
            seen: dict[float, float] = {}
            for moment, message in events.messages:
                if message.get("type") == "job_progress" and message["job_id"] == job["id"]:
                    seen.setdefault(message["progress"], moment)
            return seen
        a, b = progress(here), progress(there)
        return [b[key] - a[key] for key in a if key in b]
    finally:
        other.stop()
        plotting.stop()


def main() -> int:
    server = PostgresServer().start()
    try:
        latencies = claims(server.create_database())
        delays = fanout(server)
    finally:
        server.remove()
    claim_p50, claim_p99 = (common.percentile(latencies, q) * 1000 for q in (50, 99))
    fan_p50, fan_p99 = (common.percentile(delays, q) * 1000 for q in (50, 99))
    print(common.table(["measure", "samples", "p50 ms", "p99 ms"], [
        [f"claim, {CLAIMERS} claimers at once", len(latencies), f"{claim_p50:.1f}",
         f"{claim_p99:.1f}"],
        ["job_progress on the other host, later by", len(delays), f"{fan_p50:.1f}",
         f"{fan_p99:.1f}"]]))
    print(common.verdict("farm claim p99", claim_p99 <= CLAIM_P99_MS,
                         f"{claim_p99:.1f} ms <= {CLAIM_P99_MS:g} ms"))
    print(common.verdict("farm job_progress fan-out p99", fan_p99 <= FANOUT_P99_MS,
                         f"{fan_p99:.1f} ms <= {FANOUT_P99_MS:g} ms over {len(delays)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
