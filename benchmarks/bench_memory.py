"""8. Memory over a long life: the same big job plotted again and again.

Why: the daemon runs for months; whatever one plot leaves behind piles up.
The daemon plots the same drawing (100,000 paths by default) ten times, one
after another, on the virtual plotter run as its own process (so that its
recording of every stroke is not counted; it writes no record to disk, which
it would rewrite whole after every plot and again at the stop), and the
daemon's RSS is read once each plot has completed. The baseline is the RSS
after the first plot: what a plot of this size needs at all.

    python benchmarks/bench_memory.py [--paths 100000] [--runs 10]

Target: after the last plot, RSS within 10% of the baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
from bench_footprint import rss_mb
from tests.daemon_process import DaemonProcess
from tests.test_durability import SimulatorProcess

#: How much faster than a real AxiDraw the virtual one runs.
SPEED = 2000
GROWTH_LIMIT = 0.10


def plot(daemon: DaemonProcess, svg: bytes, timeout: float) -> float:
    """Submit the drawing, wait until it has completed; seconds it took."""
    started = time.monotonic()
    # A big drawing is read in a child at submission: minutes on a loaded machine.
    status, job = daemon.submit(svg, name="memory", timeout=timeout)
    assert status == 201, job
    done = daemon.wait_for_job(job["id"], {"completed", "failed", "cancelled"},
                               timeout=timeout)
    assert done["state"] == "completed", done
    seconds = time.monotonic() - started
    # The job is recorded completed a little before the scheduler lets go of its
    # plan: read the RSS only once the device no longer names the job.
    deadline = time.monotonic() + 60
    while daemon.request("GET", "/api/device")[1]["current_job_id"] is not None:
        assert time.monotonic() < deadline, "the daemon never let go of the job"
        time.sleep(0.1)
    time.sleep(0.5)  # the freed memory is handed back on the next reactor turn
    return seconds


def main() -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per plot")
    options = parser.parse_args()
    svg = common.svg_of(common.random_walks(options.paths * 2, per_path=2))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        simulator = SimulatorProcess(tmp, "--speed", str(SPEED), record=False)
        daemon = DaemonProcess(tmp / "daemon", {"device": {
            "type": "axidraw", "port": str(simulator.link), "model": "V3/A3",
            "timeout": 10}}).start()
        try:
            idle = rss_mb(daemon.process.pid)
            for run in range(1, options.runs + 1):
                seconds = plot(daemon, svg, options.timeout)
                rows.append([run, seconds, rss_mb(daemon.process.pid)])
                print(f"plot {run}: {seconds:.0f} s, RSS {rows[-1][2]:.0f} MB", flush=True)
        finally:
            daemon.stop()
            simulator.stop()
    baseline = rows[0][2]
    growth = rows[-1][2] / baseline - 1.0
    print(f"\nMemory: {options.paths:,}-path job plotted {options.runs} times in one daemon "
          f"({common.machine()})")
    print(common.table(["plot", "seconds", "RSS MB", "vs first"],
                       [[run, seconds, rss, f"{rss / baseline - 1:+.1%}"]
                        for run, seconds, rss in rows]))
    print(f"idle before the first plot: {idle:.0f} MB; baseline (after the first plot): "
          f"{baseline:.0f} MB")
    met = growth <= GROWTH_LIMIT
    print(common.verdict("memory", met, f"{growth:+.1%} after {options.runs} plots, "
                         f"limit +{GROWTH_LIMIT:.0%}"))
    return met


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
