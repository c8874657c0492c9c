"""Start the real daemon as a process, as an operator would, for integration tests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

READY = re.compile(r"vfab ready: http://([^:/]+):(\d+)/")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


class DaemonProcess:
    """`vfab daemon` (or `twistd -n vfab`) on port 0 with a private workspace."""

    def __init__(self, tmp_path: Path, config: dict[str, Any] | None = None, *,
                 twistd: bool = False, extra: list[str] | None = None,
                 vfab: list[str] | None = None, env: dict[str, str] | None = None):
        """`vfab`: the command to run [default: this Python's `-m vfab`]; `env`: the
        environment [default: this one]."""
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.workspace = tmp_path / "workspace"
        self.config_path = tmp_path / "config.yaml"
        settings = {"device": {"type": "none"}, "logging": {"level": "info"}}
        for section, values in (config or {}).items():
            if isinstance(values, dict):
                settings.setdefault(section, {}).update(values)
            else:  # a list, such as `plotters`
                settings[section] = values
        self.config_path.write_text(yaml.safe_dump(settings))
        options = ["--host", "127.0.0.1", "--port", "0", "--workspace", str(self.workspace),
                   "--config", str(self.config_path), *(extra or [])]
        if twistd:
            twistd = str(Path(sys.executable).parent / "twistd")
            self.argv = [twistd, "--nodaemon", "--pidfile=", "vfab", *options]
        else:
            self.argv = [*(vfab or [sys.executable, "-m", "vfab"]), "daemon", *options]
        self.env = env
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def start(self) -> "DaemonProcess":
        self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=self.env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT):
            self.kill()
            raise AssertionError(f"the daemon did not become ready:\n{self.log}")
        if self.port is None:
            raise AssertionError(f"the daemon exited before it was ready:\n{self.log}")
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = READY.search(line)
            if match and self.port is None:
                self.port = int(match.group(2))
                self._ready.set()
        self._ready.set()

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the daemon and wait for it to exit; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the daemon did not stop:\n{self.log}") from None
        if self._reader is not None:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None,
                timeout: float = 30.0) -> tuple[int, Any]:
        """An HTTP call; returns (status, decoded JSON or None)."""
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, data = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, data = error.code, error.read()
        return status, (json.loads(data) if data else None)

    def submit(self, svg: bytes, name: str = "test", timeout: float = 30.0,
               **query: Any) -> tuple[int, Any]:
        params = urllib.parse.urlencode({"name": name, **query})
        return self.request("POST", f"/api/jobs?{params}", svg,
                            {"Content-Type": "image/svg+xml"}, timeout=timeout)

    def wait_for_job(self, job_id: str, states: set[str], timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        job: dict = {}
        while time.monotonic() < deadline:
            status, job = self.request("GET", f"/api/jobs/{job_id}")
            if status == 200 and job["state"] in states:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never reached {states}: {job}\n{self.log}")


def read_to_the_end(sock: socket.socket, timeout: float | None = None) -> bytes:
    """Everything the server sends until it closes; a reset fails the test.
    `timeout` bounds each read (else the socket's own timeout does)."""
    if timeout is not None:
        sock.settimeout(timeout)
    answer = b""
    while True:
        piece = sock.recv(65536)  # ConnectionResetError: the answer may be lost
        if not piece:
            return answer
        answer += piece


def run_vfab(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0
             ) -> subprocess.CompletedProcess:
    """Run the `vfab` command and capture what it prints."""
    return subprocess.run([sys.executable, "-m", "vfab", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def wait_until(condition: Any, what: str, timeout: float = 60.0,
               interval: float = 0.05) -> Any:
    """Poll what a daemon process shows until `condition()` is true (its value),
    at most `timeout` seconds: the daemon's own clock decides when it changes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
