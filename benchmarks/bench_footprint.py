"""7. Footprint: start-up time, idle memory, and listing a queue of 10,000 jobs.

Why: the daemon runs for months on a Raspberry Pi-class host beside the
plotter; it must start fast, sit small, and keep its API quick however long
its history grows. The baseline is a bare Twisted web server (one resource
that reads the same table with sqlite3 and returns it as JSON): what start-up,
memory and a list cost with nothing of vfab in them.

The queue is filled by submitting one job through the API and copying its
row 10,000 times in the database while the daemon is stopped (submitting
10,000 drawings would measure planning, not listing).

    python benchmarks/bench_footprint.py [--jobs 10000]
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common
from tests.daemon_process import DaemonProcess

LIST_REQUESTS = 30
PAGE_REQUESTS = 200
BASELINE = r'''
import json, sqlite3, sys
from twisted.internet import reactor
from twisted.web import resource, server

class Jobs(resource.Resource):
    isLeaf = True
    def render_GET(self, request):
        query = "SELECT * FROM jobs ORDER BY seq DESC"
        if b"limit" in request.args:
            query += " LIMIT %d" % int(request.args[b"limit"][0])
        cursor = sqlite3.connect(sys.argv[1]).execute(query)
        names = [column[0] for column in cursor.description]
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"jobs": [dict(zip(names, row)) for row in cursor]}).encode()

port = reactor.listenTCP(0, server.Site(Jobs()), interface="127.0.0.1")
print("ready: http://127.0.0.1:%d/" % port.getHost().port, flush=True)
reactor.run()
'''


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024.0


def latencies(url: str, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()
        seconds.append(time.perf_counter() - started)
    return seconds


def fill_queue(database: Path, jobs: int) -> None:
    """Copy the one submitted job's row until the queue holds `jobs` jobs."""
    with sqlite3.connect(database) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(jobs)")
                   if row[1] not in ("seq", "id")]
        listed = ", ".join(columns)
        for _ in range(jobs - 1):
            connection.execute(f"INSERT INTO jobs (id, {listed}) SELECT "
                               f"lower(hex(randomblob(6))), {listed} FROM jobs LIMIT 1")


def run_vfab(directory: Path, jobs: int) -> dict:
    daemon = DaemonProcess(directory)
    started = time.perf_counter()
    daemon.start()
    start_s = time.perf_counter() - started
    time.sleep(2.0)
    idle_mb = rss_mb(daemon.process.pid)
    status, _ = daemon.submit(common.svg_of(common.random_lines(50)), name="queued")
    assert status == 201, status
    daemon.stop()
    fill_queue(daemon.workspace / "vfab.db", jobs)
    daemon = DaemonProcess(directory)
    daemon.start()
    try:
        whole = latencies(daemon.url + "/api/jobs", LIST_REQUESTS)
        page = latencies(daemon.url + "/api/jobs?limit=50", PAGE_REQUESTS)
        loaded_mb = rss_mb(daemon.process.pid)
    finally:
        daemon.stop()
    return {"start": start_s, "idle_mb": idle_mb, "loaded_mb": loaded_mb, "whole": whole,
            "page": page, "database": daemon.workspace / "vfab.db"}


def run_baseline(database: Path) -> dict:
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-c", BASELINE, str(database)],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split("ready: ")[1].strip()
        start_s = time.perf_counter() - started
        time.sleep(2.0)
        idle_mb = rss_mb(server.pid)
        whole = latencies(url + "api/jobs", LIST_REQUESTS)
        page = latencies(url + "api/jobs?limit=50", PAGE_REQUESTS)
        loaded_mb = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    return {"start": start_s, "idle_mb": idle_mb, "loaded_mb": loaded_mb, "whole": whole,
            "page": page}


def main() -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        vfab = run_vfab(Path(directory), options.jobs)
        baseline = run_baseline(vfab["database"])
    rows = [[name, r["start"], r["idle_mb"], r["loaded_mb"],
             1000 * common.percentile(r["whole"], 50), 1000 * common.percentile(r["whole"], 99),
             1000 * common.percentile(r["page"], 50), 1000 * common.percentile(r["page"], 99)]
            for name, r in (("bare Twisted + sqlite3", baseline), ("vfab daemon", vfab))]
    print(f"Footprint: start to listening, RSS idle and after listing {options.jobs:,} jobs")
    print(common.table(["server", "start s", "idle RSS MB", "RSS after MB",
                        "all jobs p50 ms", "all jobs p99 ms", "limit=50 p50 ms",
                        "limit=50 p99 ms"], rows))
    return True


if __name__ == "__main__":
    main()
