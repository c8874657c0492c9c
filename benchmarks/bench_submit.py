"""11. Submission: POST /api/jobs to 201 beside vpype reading the same file, and the
reactor of a running plot while a 50 MB upload is read.

Why: a drawing is submitted while another may be plotting. The submission must
cost about what reading the file costs (its child's time and peak memory
against vpype's read of the same file), and the upload must never hold up the
reactor that feeds the pen.

1. Random-walk polylines (10 segments a path) of 10k, 100k and 1M segments.
   vpype.read_multilayer_svg in a fresh process (time, ru_maxrss), as vfab's
   reader calls it. The real daemon (tests/daemon_process.py, no device) takes
   the same file as a raw body: the time to its 201, and the peak RSS (VmHWM)
   of the child that read it, sampled every 10 ms from /proc.
2. The daemon on the virtual plotter plots a long scribble; a WebSocket client
   sends PING every 10 ms and times each pong (the reactor's responsiveness,
   round trip included), first while the plot runs alone, then while curl
   uploads a 50 MB multipart form (the 10k drawing padded with line breaks)
   and the daemon reads it, to its 201. The plotter's FIFO starvations come
   from the virtual plotter's record at the end of the plot.

Targets: 201 within 1.5x of vpype's read; the child's peak within 1.5x of
vpype's peak; worst PING round trip during the upload under 20 ms.

    python benchmarks/bench_submit.py [--sizes 10000,100000,1000000]

Run it with PYTHONPATH set to the tree under test (the daemon is a child process).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from websockets.sync.client import connect

import common
from tests.daemon_process import DaemonProcess

TARGET_TIME_RATIO = 1.5
TARGET_PEAK_RATIO = 1.5
TARGET_STALL_S = 0.020
SIZES = (10_000, 100_000, 1_000_000)
UPLOAD_BYTES = 50 * 1000 * 1000
PING_INTERVAL_S = 0.010
BOUNDARY = "vfab-bench-boundary"


def child(svg_file: str) -> None:
    """vpype's read of the file, in this fresh process; printed as JSON."""
    import vpype

    started = time.perf_counter()
    text = Path(svg_file).read_bytes().decode()
    vpype.read_multilayer_svg(io.StringIO(text), quantization=0.05 * common.PX_PER_MM,
                              crop=False, simplify=True)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def vpype_read(svg_file: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", str(svg_file)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"vpype failed on {svg_file.name}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class ChildPeak(common.ProcessSampler):
    """The highest VmHWM of any child of `pid`, sampled every 10 ms in a thread."""

    interval = 0.01

    def __init__(self, pid: int):
        super().__init__(pid)
        self.peak_mb = 0.0

    def sample(self, process: psutil.Process) -> None:
        for kid in process.children(recursive=True):
            try:
                status = Path(f"/proc/{kid.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024.0)


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(common.ROOT)}


def walks_beside_vpype(directory: Path, segments: int) -> tuple[bytes, dict]:
    """A random-walk drawing of `segments` segments, written to `directory`, and
    vpype's reading of that file: the baseline every submission is set beside."""
    svg_file = directory / f"walks-{segments}.svg"
    svg_file.write_bytes(common.svg_of(common.random_walks(segments)))
    return svg_file.read_bytes(), vpype_read(svg_file)


def submissions(directory: Path, sizes: list[int]) -> tuple[list[list], list[float], list[float]]:
    rows, time_ratios, peak_ratios = [], [], []
    daemon = DaemonProcess(directory / "submit", env=environment()).start()
    try:
        for segments in sizes:
            body, baseline = walks_beside_vpype(directory, segments)
            megabytes = len(body) / 1e6
            with ChildPeak(daemon.process.pid) as peak:
                started = time.perf_counter()
                status, job = daemon.request("POST", "/api/jobs?name=bench", body,
                                             {"Content-Type": "image/svg+xml"})
                seconds = time.perf_counter() - started
            del body
            if status != 201:
                raise SystemExit(f"submission of {segments:,} segments: {status} {job}")
            time_ratio = seconds / baseline["seconds"]
            peak_ratio = peak.peak_mb / baseline["peak_mb"]
            time_ratios.append(time_ratio)
            peak_ratios.append(peak_ratio)
            rows.append([f"{segments:,}", f"{megabytes:.1f}",
                         baseline["seconds"], seconds, f"{time_ratio:.2f}x",
                         f"{baseline['peak_mb']:.0f}", f"{peak.peak_mb:.0f}",
                         f"{peak_ratio:.2f}x"])
    finally:
        daemon.stop()
    return rows, time_ratios, peak_ratios


class Pinger:
    """PING every 10 ms over a WebSocket; the round trip of each pong."""

    def __init__(self, url: str):
        self._socket = connect(url, open_timeout=10, close_timeout=5).__enter__()
        self._stop = threading.Event()
        self.trips: list[tuple[float, float]] = []  # (sent at, round trip s)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.perf_counter()
            self._socket.send('{"type": "PING"}')
            while json.loads(self._socket.recv(timeout=30))["type"] != "pong":
                pass
            self.trips.append((sent, time.perf_counter() - sent))
            self._stop.wait(max(0.0, PING_INTERVAL_S - (time.perf_counter() - sent)))

    def between(self, start: float, end: float) -> list[float]:
        return [trip for sent, trip in self.trips if start <= sent <= end]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._socket.close()


def upload_form(directory: Path) -> Path:
    """The 10k drawing padded with line breaks to UPLOAD_BYTES, as a multipart form.

    Not with a comment: svgelements (in vpype) feeds its XML parser 16 KB at a
    time, and expat rescans an unfinished comment on every feed, so a 48 MB
    comment alone costs two minutes of reading (quadratic)."""
    drawing = common.svg_of(common.random_walks(10_000))
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.svg\"\r\nContent-Type: image/svg+xml\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    padding = UPLOAD_BYTES - len(head) - len(tail) - len(drawing)
    body = drawing.replace(b"</svg>", b"\n" * padding + b"</svg>")
    form = directory / "upload.form"
    form.write_bytes(head + body + tail)
    return form


def stall(directory: Path) -> dict:
    daemon = DaemonProcess(directory / "stall", {
        "device": {"type": "simulator", "simulator_speed": 1}}, env=environment()).start()
    try:
        form = upload_form(directory)
        plot = common.svg_of([common.scribble(100_000)])
        status, job = daemon.submit(plot, "scribble")
        assert status == 201, job
        daemon.wait_for_job(job["id"], {"plotting"}, timeout=120)
        pinger = Pinger(daemon.ws_url)
        try:
            time.sleep(1.0)  # the plot's first moves, the pinger settling
            alone_start = time.perf_counter()
            time.sleep(3.0)
            upload_start = time.perf_counter()
            result = subprocess.run(
                ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "600",
                 "-H", f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
                 "--data-binary", f"@{form}", f"{daemon.url}/api/jobs"],
                capture_output=True, text=True)
            upload_end = time.perf_counter()
        finally:
            pinger.close()
        answer, _, code = result.stdout.strip().rpartition("\n")
        if code == "201":  # not to be plotted: the daemon would plan it when the plot ends
            daemon.request("POST", f"/api/jobs/{json.loads(answer)['id']}/cancel")
        during = pinger.between(upload_start, upload_end)
        alone = pinger.between(alone_start, upload_start)
        still = daemon.request("GET", f"/api/jobs/{job['id']}")[1]["state"]
        daemon.request("POST", f"/api/jobs/{job['id']}/cancel")
        daemon.wait_for_job(job["id"], {"cancelled", "completed"}, timeout=120)
        strokes = daemon.workspace / "simulator" / "strokes.json"
        starved = json.loads(strokes.read_text())["starvations"] if strokes.exists() else None
        worst_at = max(((trip, sent - upload_start) for sent, trip in pinger.trips
                        if upload_start <= sent <= upload_end), default=(0.0, 0.0))[1]
        return {"code": code, "seconds": upload_end - upload_start, "alone": alone,
                "worst_at": worst_at,
                "during": during, "state_after": still, "starvations": starved}
    finally:
        daemon.stop()


def main() -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--child", metavar="SVG", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child)
        return True
    sizes = [int(size) for size in options.sizes.split(",")]
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        rows, time_ratios, peak_ratios = submissions(directory, sizes)
        reactor = stall(directory)
    print("Submission: random-walk polylines (10 segments a path), raw body to 201")
    print(common.table(["segments", "MB", "vpype read s", "vfab 201 s", "ratio",
                        "vpype peak MB", "child peak MB", "ratio"], rows))
    alone, during = reactor["alone"], reactor["during"]
    print(f"\nReactor of a running plot (WebSocket PING round trip, every 10 ms), while a "
          f"{UPLOAD_BYTES / 1e6:.0f} MB multipart upload (10k segments) is sent and read "
          f"(HTTP {reactor['code']} after {reactor['seconds']:.1f} s)")
    print(common.table(["", "pings", "p50 ms", "p99 ms", "max ms"], [
        ["plot alone (baseline)", len(alone), 1000 * common.percentile(alone, 50),
         1000 * common.percentile(alone, 99), 1000 * max(alone, default=float("nan"))],
        ["plot + upload", len(during), 1000 * common.percentile(during, 50),
         1000 * common.percentile(during, 99), 1000 * max(during, default=float("nan"))]]))
    print(f"the worst round trip began {reactor['worst_at']:.1f} s after the upload began")
    starved = reactor["starvations"]
    print(f"job state after the upload: {reactor['state_after']}; FIFO starvations in the "
          f"plot: {'unknown' if starved is None else len(starved)}")
    time_met = all(ratio <= TARGET_TIME_RATIO for ratio in time_ratios)
    peak_met = all(ratio <= TARGET_PEAK_RATIO for ratio in peak_ratios)
    worst = max(during, default=float("inf"))
    stall_met = worst < TARGET_STALL_S and reactor["code"] == "201"
    print(common.verdict("9 submission 201 within 1.5x of vpype read", time_met,
                         f"worst {max(time_ratios):.2f}x"))
    print(common.verdict("9 submission child peak within 1.5x of vpype peak", peak_met,
                         f"worst {max(peak_ratios):.2f}x"))
    print(common.verdict("9 reactor stall under 20 ms during a 50 MB upload", stall_met,
                         f"worst {1000 * worst:.1f} ms"))
    return time_met and peak_met and stall_met


if __name__ == "__main__":
    main()
