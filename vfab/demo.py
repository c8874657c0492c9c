"""`make run`: the daemon on the virtual plotter, plotting the bundled sample.

Starts `vfab daemon` as a child process, waits until it answers, submits the
sample and then stays with the daemon until Ctrl-C (which stops it cleanly).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import resources

from vfab.cli.client import ClientError, DaemonClient
from vfab.config import load_config

READY_TIMEOUT_SECONDS = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    config = load_config(args.config)
    url = f"http://{config.websocket.host}:{config.websocket.port}"
    daemon = subprocess.Popen([sys.executable, "-m", "vfab", "daemon", "--config", args.config,
                               "--workspace", args.workspace])
    try:
        if not _wait_ready(url, daemon):
            return daemon.wait() or 1
        sample = resources.files("vfab.samples").joinpath("sample.svg").read_bytes()
        job = DaemonClient(url).request("POST", "/api/jobs", body=sample,
                                        content_type="image/svg+xml", query={"name": "sample"})
        sys.stderr.write(
            f"\nvfab demo: queued the sample as job {job['id']} "
            f"(about {job['estimated_seconds'] / config.device.simulator_speed:.0f} s on "
            f"the virtual plotter, {job['estimated_seconds']:.0f} s on an AxiDraw).\n"
            f"  dashboard:  {url}/\n  progress:   .venv/bin/vfab watch {job['id']}\n"
            f"  the plot:   {args.workspace}/simulator/ (SVG and PNG of what was drawn)\n"
            f"  Ctrl-C stops the daemon.\n\n")
        return daemon.wait()
    except ClientError as error:
        sys.stderr.write(f"vfab demo: {error}\n")
        return 1
    except KeyboardInterrupt:
        daemon.send_signal(signal.SIGTERM)
        return daemon.wait()


def _wait_ready(url: str, daemon: subprocess.Popen) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    sys.stderr.write(f"vfab demo: the daemon did not answer at {url} within "
                     f"{READY_TIMEOUT_SECONDS:.0f} s\n")
    return False


if __name__ == "__main__":
    raise SystemExit(main())
