"""12. Big drawings on small computers (issue 13): planned once at submission, the
plan streamed from its file while the daemon's memory stays flat.

Why: a Raspberry Pi beside the plotter has 1-4 GB, and generative drawings of a
million segments are ordinary. The daemon must not hold a drawing or its plan;
the child that reads the submission plans it once and writes the plan file.

For random-walk polylines (10 segments a path) of 10k, 100k and 1M segments:
- vpype.read_multilayer_svg of the same file in a fresh process (time,
  ru_maxrss), in the same run: the baseline;
- the real daemon (tests/daemon_process.py) on the virtual plotter, which runs
  as a process of its own on a pty (`python -m vfab.simulator`, so that its
  record of every stroke is not counted as the daemon's): the time from POST
  /api/jobs (raw body) to its 201; the peak (VmHWM) of the child that read and
  planned it; the daemon's RSS sampled every 50 ms from the submission to the
  end of the plot; and the time from the job's `plotting` state change to its
  first job_progress above 0 (the first stroke drawn), both as a WebSocket
  client receives them (job_progress comes at most 10 a second, so this is
  up to 0.1 s late).

Targets: daemon RSS under 150 MB at 1M segments; plotting to the first stroke
under 1 s at every size; 201 within 1.5x of vpype's read; the child's peak
within 1.5x of vpype's peak.

    python benchmarks/bench_big_drawing.py [--sizes 10000,100000,1000000] [--speed 10000]

Run it with PYTHONPATH set to the tree under test (the daemon is a child process).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from websockets.sync.client import connect

import common
from bench_submit import ChildPeak, environment, walks_beside_vpype
from tests.daemon_process import DaemonProcess

TARGET_RSS_MB = 150.0
TARGET_FIRST_STROKE_S = 1.0
TARGET_TIME_RATIO = 1.5
TARGET_PEAK_RATIO = 1.5
SIZES = (10_000, 100_000, 1_000_000)
SAMPLE_S = 0.050
PLOT_TIMEOUT_S = 3600.0


class RssSampler(common.ProcessSampler):
    """The daemon's own RSS (not its children's), every 50 ms, in a thread."""

    interval = SAMPLE_S

    def __init__(self, pid: int):
        super().__init__(pid)
        self.samples: list[float] = []

    def sample(self, process: psutil.Process) -> None:
        self.samples.append(process.memory_info().rss / 1e6)


class JobWatch:
    """When a WebSocket client hears the job start plotting, draw its first stroke
    (job_progress above 0) and end."""

    def __init__(self, url: str):
        self._socket = connect(url, open_timeout=10, close_timeout=5, max_size=None).__enter__()
        self._socket.send(json.dumps({"type": "SUBSCRIBE", "channels": ["jobs"]}))
        self.plotting: dict[str, float] = {}
        self.first_stroke: dict[str, float] = {}
        self.ended: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = json.loads(self._socket.recv(timeout=0.5))
            except TimeoutError:
                continue
            now = time.perf_counter()
            job = message.get("job_id")
            if message.get("type") == "job_state_change":
                if message.get("to_state") == "plotting":
                    self.plotting.setdefault(job, now)
                elif message.get("to_state") in ("completed", "failed", "cancelled"):
                    self.ended[job] = message["to_state"]
            elif message.get("type") == "job_progress" and message.get("progress", 0) > 0:
                self.first_stroke.setdefault(job, now)

    def wait_end(self, job: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while job not in self.ended:
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job} did not end within {timeout:.0f} s")
            time.sleep(0.05)
        return self.ended[job]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


def simulator(directory: Path, speed: float) -> tuple[subprocess.Popen, Path]:
    link = directory / "ebb-tty"
    process = subprocess.Popen([sys.executable, "-m", "vfab.simulator", "--link", str(link),
                                "--speed", str(speed)], env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not link.is_symlink():
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise SystemExit("the virtual plotter did not start")
        time.sleep(0.02)
    return process, link


def measure(directory: Path, sizes: list[int], speed: float) -> list[dict]:
    plotter, link = simulator(directory, speed)
    daemon = DaemonProcess(directory / "daemon", {"device": {
        "type": "axidraw", "port": str(link), "model": "V3/A3", "timeout": 30}},
        env=environment()).start()
    results = []
    try:
        watch = JobWatch(daemon.ws_url)
        try:
            for segments in sizes:
                body, baseline = walks_beside_vpype(directory, segments)
                megabytes = len(body) / 1e6
                with RssSampler(daemon.process.pid) as rss:
                    with ChildPeak(daemon.process.pid) as peak:
                        started = time.perf_counter()
                        status, job = daemon.request("POST", "/api/jobs?name=big", body,
                                                     {"Content-Type": "image/svg+xml"},
                                                     timeout=PLOT_TIMEOUT_S)
                        submitted = time.perf_counter() - started
                    del body
                    if status != 201:
                        raise SystemExit(f"submission of {segments:,} segments: {status} {job}")
                    plot_started = time.perf_counter()
                    outcome = watch.wait_end(job["id"], PLOT_TIMEOUT_S)
                    plot_seconds = time.perf_counter() - plot_started
                first = watch.first_stroke.get(job["id"], float("nan")) \
                    - watch.plotting.get(job["id"], float("nan"))
                results.append({
                    "segments": segments, "mb": megabytes,
                    "vpype_s": baseline["seconds"], "vpype_mb": baseline["peak_mb"],
                    "submit_s": submitted, "child_mb": peak.peak_mb,
                    "rss_start_mb": rss.samples[0], "rss_peak_mb": max(rss.samples),
                    "samples": len(rss.samples), "first_stroke_s": first,
                    "plot_s": plot_seconds, "outcome": outcome,
                    "plan_mb": (daemon.workspace / "jobs" / f"{job['id']}.plan").stat().st_size
                    / 1e6})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        finally:
            watch.close()
    finally:
        daemon.stop()
        plotter.terminate()
        plotter.wait(30)
    return results


def main() -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--speed", type=float, default=10000.0,
                        help="the virtual plotter's time factor (default 10000)")
    options = parser.parse_args()
    sizes = [int(size) for size in options.sizes.split(",")]
    with tempfile.TemporaryDirectory() as name:
        results = measure(Path(name), sizes, options.speed)
    print("Big drawings: random-walk polylines (10 segments a path), raw body, plotted on "
          f"the virtual plotter (its own process, speed {options.speed:g})")
    print(common.table(
        ["segments", "SVG MB", "plan MB", "vpype read s", "vfab 201 s", "ratio",
         "vpype peak MB", "child peak MB", "ratio", "daemon RSS MB (start/peak)",
         "to 1st stroke s", "plot s"],
        [[f"{r['segments']:,}", f"{r['mb']:.1f}", f"{r['plan_mb']:.1f}", r["vpype_s"],
          r["submit_s"], f"{r['submit_s'] / r['vpype_s']:.2f}x", f"{r['vpype_mb']:.0f}",
          f"{r['child_mb']:.0f}", f"{r['child_mb'] / r['vpype_mb']:.2f}x",
          f"{r['rss_start_mb']:.0f} / {r['rss_peak_mb']:.0f}", r["first_stroke_s"],
          f"{r['plot_s']:.0f} ({r['outcome']})"] for r in results]))
    biggest = max(results, key=lambda r: r["segments"])
    checks = [
        common.verdict(f"daemon RSS < {TARGET_RSS_MB:.0f} MB at {biggest['segments']:,} segments",
                       biggest["rss_peak_mb"] < TARGET_RSS_MB,
                       f"peak {biggest['rss_peak_mb']:.0f} MB over {biggest['samples']} samples"),
        common.verdict(f"plotting to first stroke < {TARGET_FIRST_STROKE_S:.0f} s",
                       all(r["first_stroke_s"] < TARGET_FIRST_STROKE_S for r in results),
                       ", ".join(f"{r['first_stroke_s']:.2f} s" for r in results)),
        common.verdict(f"201 within {TARGET_TIME_RATIO}x of vpype's read",
                       all(r["submit_s"] / r["vpype_s"] <= TARGET_TIME_RATIO for r in results),
                       ", ".join(f"{r['submit_s'] / r['vpype_s']:.2f}x" for r in results)),
        common.verdict(f"child peak within {TARGET_PEAK_RATIO}x of vpype's peak",
                       all(r["child_mb"] / r["vpype_mb"] <= TARGET_PEAK_RATIO for r in results),
                       ", ".join(f"{r['child_mb'] / r['vpype_mb']:.2f}x" for r in results)),
    ]
    print("\n".join(checks))
    return all(r["outcome"] == "completed" for r in results)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
