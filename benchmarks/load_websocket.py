"""Load test: 100 dashboards on every channel while jobs are submitted and plotted.

Why: the daemon must keep many WebSocket clients served, drop the ones that
stop reading, and not grow in memory while it plots. This runs the real
daemon (tests/daemon_process.py) on the accelerated virtual plotter, holds
`--clients` WebSocket clients subscribed to `all` (the `websockets` package,
asyncio), adds `--slow-clients` that subscribe and never read, keeps the
queue fed with jobs for `--seconds`, and reports:

- messages delivered to the clients, and job_progress latency p50/p99
  (receive time minus the message's `timestamp`, stamped when the daemon sends
  it; whole milliseconds, so figures may read up to 1 ms high);
- WebSocket clients the daemon dropped as too slow (from its log), and how
  many of the reading clients were lost (must be 0);
- the daemon's RSS when the load starts and when it ends.

Bounds (exit 1 if one is broken): RSS growth < --max-growth-mib (20 MiB),
p99 job_progress latency < --max-p99 (0.5 s), no reading client lost, at
least one job completed, /health 200 at the end and a clean exit.

    python benchmarks/load_websocket.py [--seconds 60] [--clients 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemon_process import DaemonProcess  # noqa: E402


def drawing(lines: int = 60) -> bytes:
    """Hatching across 100 mm: a plot of a few seconds on the accelerated simulator."""
    paths = "".join(f'<path d="M10 {10 + i * 1.5} L110 {10 + i * 1.5}"/>' for i in range(lines))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="130mm" height="110mm" '
            f'viewBox="0 0 130 110">{paths}</svg>').encode()


def parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class Tally:
    def __init__(self) -> None:
        self.messages = 0
        self.latencies: list[float] = []
        self.lost_clients = 0
        self.connected = 0


async def dashboard(url: str, tally: Tally, stop: asyncio.Event, ready: asyncio.Event,
                    needed: int) -> None:
    """One reading client: subscribe to all, count everything, time job_progress."""
    try:
        async with connect(url, proxy=None, compression=None, max_size=None,
                           ping_interval=None, open_timeout=30) as client:
            await client.send(json.dumps({"type": "SUBSCRIBE", "channels": ["all"]}))
            tally.connected += 1
            if tally.connected >= needed:
                ready.set()
            while not stop.is_set():
                try:
                    raw = await asyncio.wait_for(client.recv(), timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                received = time.time()
                message = json.loads(raw)
                tally.messages += 1
                if message.get("type") == "job_progress":
                    tally.latencies.append(received - parse_time(message["timestamp"]))
    except (ConnectionClosed, OSError):
        if not stop.is_set():
            tally.lost_clients += 1


def stalled_client(port: int) -> socket.socket:
    """A client that subscribes to everything and then never reads (tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    payload = json.dumps({"type": "SUBSCRIBE", "channels": ["all"]}).encode()
    mask = b"\x01\x02\x03\x04"
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask
                 + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return sock


async def feeder(daemon: DaemonProcess, stop: asyncio.Event, counts: dict[str, int],
                 stalled: list[socket.socket]) -> None:
    """Keep two jobs waiting so the plotter never idles; have the stalled clients ask for
    snapshots (100 a second each) so that they fall behind within the run."""
    svg = drawing()
    while not stop.is_set():
        status, body = await asyncio.to_thread(daemon.request, "GET", "/api/jobs?state=queued")
        if status == 200 and len(body["jobs"]) < 2:
            status, _ = await asyncio.to_thread(daemon.submit, svg, "load")
            counts["submitted"] += status == 201
        payload = json.dumps({"type": "SUBSCRIBE", "channels": ["all"]}).encode()
        frame = bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload
        for sock in stalled:
            try:
                sock.sendall(frame * 20)
            except OSError:
                pass  # already dropped
        await asyncio.sleep(0.2)


async def run_load(daemon: DaemonProcess, args: argparse.Namespace) -> dict[str, Any]:
    tally, stop, ready = Tally(), asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(dashboard(daemon.ws_url, tally, stop, ready, args.clients))
             for _ in range(args.clients)]
    await asyncio.wait_for(ready.wait(), timeout=60)
    stalled = [stalled_client(daemon.port) for _ in range(args.slow_clients)]
    process = psutil.Process(daemon.process.pid)
    rss_start = process.memory_info().rss
    counts = {"submitted": 0}
    feeding = asyncio.create_task(feeder(daemon, stop, counts, stalled))
    await asyncio.sleep(args.seconds)
    rss_end = process.memory_info().rss
    stop.set()
    await asyncio.gather(feeding, *tasks)
    for sock in stalled:
        sock.close()
    status, jobs = daemon.request("GET", "/api/jobs?state=completed&limit=1000")
    return {"tally": tally, "rss_start": rss_start, "rss_end": rss_end,
            "submitted": counts["submitted"],
            "completed": len(jobs["jobs"]) if status == 200 else 0,
            "health": daemon.request("GET", "/health")[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--slow-clients", type=int, default=2)
    parser.add_argument("--speed", type=float, default=20.0, help="simulator time factor")
    parser.add_argument("--max-growth-mib", type=float, default=20.0)
    parser.add_argument("--max-p99", type=float, default=0.5, help="seconds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vfab-load-") as folder:
        daemon = DaemonProcess(Path(folder), {
            "device": {"type": "simulator", "simulator_speed": args.speed},
            "websocket": {"max_connections": args.clients + args.slow_clients + 10},
            "logging": {"level": "info"}})
        daemon.start()
        try:
            result = asyncio.run(run_load(daemon, args))
        finally:
            exit_code = daemon.stop()
        dropped = sum("dropping WebSocket client" in line and "reads too slowly" in line
                      for line in daemon.lines)

    tally = result["tally"]
    latencies = sorted(tally.latencies)

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    p50, p99 = percentile(0.50), percentile(0.99)
    growth = (result["rss_end"] - result["rss_start"]) / 2**20
    checks = [
        ("RSS growth (MiB)", f"{growth:.1f}", f"< {args.max_growth_mib:g}",
         growth < args.max_growth_mib),
        ("job_progress p99 (ms)", f"{p99 * 1000:.1f}", f"< {args.max_p99 * 1000:g}",
         bool(latencies) and p99 < args.max_p99),
        ("reading clients lost", str(tally.lost_clients), "0", tally.lost_clients == 0),
        ("jobs completed", str(result["completed"]), ">= 1", result["completed"] >= 1),
        ("/health at the end", str(result["health"]), "200", result["health"] == 200),
        ("daemon exit code", str(exit_code), "0", exit_code == 0),
    ]
    info = [
        ("duration (s)", f"{args.seconds:g}"),
        ("reading clients", str(args.clients)),
        ("stalled clients / dropped as too slow", f"{args.slow_clients} / {dropped}"),
        ("jobs submitted", str(result["submitted"])),
        ("messages delivered", str(tally.messages)),
        ("messages per second", f"{tally.messages / args.seconds:.0f}"),
        ("job_progress received", str(len(latencies))),
        ("job_progress p50 (ms)", f"{p50 * 1000:.1f}"),
        ("daemon RSS start (MiB)", f"{result['rss_start'] / 2**20:.1f}"),
        ("daemon RSS end (MiB)", f"{result['rss_end'] / 2**20:.1f}"),
    ]
    width = max(len(name) for name, *_ in [*checks, *info]) + 2
    print(f"{'measure':<{width}}{'value':>12}  bound")
    for name, value in info:
        print(f"{name:<{width}}{value:>12}")
    for name, value, bound, ok in checks:
        print(f"{name:<{width}}{value:>12}  {bound:<8} {'ok' if ok else 'BROKEN'}")
    broken = [name for name, _, _, ok in checks if not ok]
    if broken:
        print(f"bounds broken: {', '.join(broken)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
