"""5. WebSocket fan-out: 100 dashboards watching a plot, beside a minimal asyncio server.

Why: every dashboard subscribes to everything, and progress must reach all of
them promptly while the same reactor feeds the plotter. The baseline is the
least a server can do: a `websockets` (asyncio) server that broadcasts the
same stream (job_progress and device_status, 10 a second each) and nothing else.

The real daemon runs as a process (tests/daemon_process.py) on the virtual
plotter; 100 clients (the `websockets` library, in this process) subscribe
to `all`; a job is submitted and plotted. Latency is receive time minus the
message's `timestamp` (whole milliseconds, so figures may read up to 1 ms high).

Target: p99 job_progress latency under 50 ms and within 1.5x of the baseline's.

    python benchmarks/bench_websocket.py [--clients 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from websockets.asyncio.client import connect

import common
from tests.daemon_process import DaemonProcess

TARGET_P99_S = 0.050
TARGET_RATIO = 1.5
BASELINE_SECONDS = 10.0
BASELINE = r'''
import asyncio, sys, time
from datetime import datetime, timezone
from websockets.asyncio.server import serve, broadcast

CLIENTS, SECONDS = int(sys.argv[1]), float(sys.argv[2])
subscribed = set()
ready = asyncio.Event()

def stamp():
    now = datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")

async def handler(websocket):
    async for message in websocket:
        await websocket.send('{"type": "subscribed", "channels": ["system", "jobs", "device"]}')
        subscribed.add(websocket)
        if len(subscribed) >= CLIENTS:
            ready.set()

async def main():
    async with serve(handler, "127.0.0.1", 0) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await ready.wait()
        started = time.monotonic()
        while time.monotonic() - started < SECONDS:
            broadcast(subscribed, '{"type": "job_progress", "job_id": "b", "progress": 0.5, '
                      '"timestamp": "%s"}' % stamp())
            broadcast(subscribed, '{"type": "device_status", "status": "plotting", '
                      '"timestamp": "%s"}' % stamp())
            await asyncio.sleep(0.1)
        broadcast(subscribed, '{"type": "job_state_change", "to_state": "completed", '
                  '"timestamp": "%s"}' % stamp())
        await asyncio.sleep(1.0)

asyncio.run(main())
'''


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


async def watch(url: str, latencies: list[float], counts: list[int], subscribed) -> None:
    """One dashboard: subscribe to everything, read until the job completes."""
    async with connect(url, max_size=None, open_timeout=60) as websocket:
        await websocket.send(json.dumps({"type": "SUBSCRIBE", "channels": ["all"]}))
        subscribed.release()
        async for raw in websocket:
            received = time.time()
            message = json.loads(raw)
            counts.append(received)
            if message["type"] == "job_progress":
                latencies.append(received - _seconds(message["timestamp"]))
            elif message["type"] == "job_state_change" and message.get("to_state") in (
                    "completed", "failed", "cancelled"):
                return


async def fan_out(url: str, clients: int, start_job) -> dict:
    latencies: list[float] = []
    counts: list[float] = []
    subscribed = asyncio.Semaphore(0)
    watchers = [asyncio.create_task(watch(url, latencies, counts, subscribed))
                for _ in range(clients)]
    for _ in range(clients):
        await subscribed.acquire()
    await asyncio.sleep(0.5)  # let the snapshots go by
    started = time.time()
    if start_job is not None:
        await asyncio.get_running_loop().run_in_executor(None, start_job)
    await asyncio.wait_for(asyncio.gather(*watchers), timeout=300)
    window = [t for t in counts if t >= started]
    seconds = max(window) - started
    return {"p50": common.percentile(latencies, 50), "p99": common.percentile(latencies, 99),
            "max": max(latencies), "progress": len(latencies),
            "rate": len(window) / seconds}


def run_vfab(clients: int) -> dict:
    svg = common.svg_of([common.scribble(2500)])
    with tempfile.TemporaryDirectory() as directory:
        daemon = DaemonProcess(Path(directory), {
            "device": {"type": "simulator", "simulator_speed": 2.0},
            "websocket": {"max_connections": clients + 10}})
        daemon.start()
        try:
            daemon.wait_for_log(r"plotter connected", timeout=30)

            def start_job() -> None:
                request = urllib.request.Request(daemon.url + "/api/jobs?name=bench", data=svg,
                                                 headers={"Content-Type": "image/svg+xml"})
                urllib.request.urlopen(request, timeout=60).read()
            return asyncio.run(fan_out(daemon.ws_url, clients, start_job))
        finally:
            daemon.stop()


def run_baseline(clients: int) -> dict:
    server = subprocess.Popen([sys.executable, "-c", BASELINE, str(clients),
                               str(BASELINE_SECONDS)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        return asyncio.run(fan_out(f"ws://127.0.0.1:{port}/", clients, None))
    finally:
        server.wait(30)


def main() -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    options = parser.parse_args()
    baseline = run_baseline(options.clients)
    vfab = run_vfab(options.clients)
    rows = [[name, 1000 * r["p50"], 1000 * r["p99"], 1000 * r["max"], r["progress"],
             f"{r['rate']:,.0f}"] for name, r in (("websockets (asyncio) baseline", baseline),
                                                   ("vfab daemon", vfab))]
    print(f"WebSocket fan-out: {options.clients} clients subscribed to all, during a plot")
    print(common.table(["server", "p50 ms", "p99 ms", "max ms", "job_progress received",
                        "messages/s"], rows))
    ratio = vfab["p99"] / baseline["p99"]
    met = vfab["p99"] < TARGET_P99_S and ratio <= TARGET_RATIO
    print(common.verdict("5 job_progress p99 under 50 ms and within 1.5x of the baseline", met,
                         f"p99 {1000 * vfab['p99']:.1f} ms, {ratio:.2f}x the baseline"))
    return met


if __name__ == "__main__":
    main()
