"""Dropping root: `vfab daemon --user nobody --group nogroup` on the real daemon.

Runs only as root (as in CI and the development sandbox). The workspace is in
a fresh folder under /tmp that `nobody` may enter, since pytest's own tmp
folders are private to root.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.daemon_process import DaemonProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")

SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="30mm" height="30mm" '
       b'viewBox="0 0 30 30"><path d="M2 2 L20 20 L2 20"/></svg>')


@pytest.fixture
def base() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="vfab-privileges-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def interpreter_runs_as(uid: int, gid: int) -> bool:
    """Whether `uid` can run this Python at all: not when it lives in a private
    folder such as /root/.pyenv, as in the development sandbox."""
    try:
        return subprocess.run([sys.executable, "-c", "pass"], user=uid, group=gid,
                              capture_output=True, timeout=30).returncode == 0
    except PermissionError:
        return False


def ids_of(pid: int) -> dict[str, list[int]]:
    """Real, effective, saved and filesystem uid/gid of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, values = line.partition(":")
        if name in ("Uid", "Gid"):
            fields[name] = [int(value) for value in values.split()]
    return fields


def test_root_drops_to_nobody_after_binding_and_files_are_private(base: Path) -> None:
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    daemon = DaemonProcess(base, {
        "device": {"type": "simulator", "simulator_speed": 50},
        "websocket": {"authenticate": True, "api_key": "priv-test-key"},
        "logging": {"audit": True}}, extra=["--user", "nobody", "--group", "nogroup"])
    key = {"X-API-Key": "priv-test-key"}
    daemon.start()
    try:
        assert ids_of(daemon.process.pid) == {"Uid": [nobody] * 4, "Gid": [nogroup] * 4}
        assert daemon.request("GET", "/health")[0] == 200
        assert daemon.request("GET", "/api/jobs", headers=key)[0] == 200
        if interpreter_runs_as(nobody, nogroup):
            # Planning runs in a child interpreter, which nobody must be able to start.
            status, job = daemon.request("POST", "/api/jobs?name=as-nobody", SVG,
                                         {**key, "Content-Type": "image/svg+xml"})
            assert status == 201, job
            assert daemon.request("GET", f"/api/jobs/{job['id']}", headers=key)[0] == 200
        line = daemon.wait_for_log(r"privileges dropped: running as uid \d+")
        assert str(nobody) in line
        # The config file holds the key and is 0644: a loud warning.
        daemon.wait_for_log(r"SECURITY WARNING: .* holds websocket.api_key")
    finally:
        assert daemon.stop() == 0
    workspace = daemon.workspace

    def owned_private(path: Path, mode: int) -> None:
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (nobody, nogroup), path
        assert stat.S_IMODE(info.st_mode) == mode, f"{path}: {oct(info.st_mode)}"

    owned_private(workspace, 0o700)
    owned_private(workspace / "vfab.db", 0o600)
    owned_private(workspace / "logs", 0o700)
    owned_private(workspace / "logs" / "vfab.log", 0o600)
    owned_private(workspace / "logs" / "audit.log", 0o600)
    owned_private(workspace / "jobs", 0o700)
    for stored in (workspace / "jobs").iterdir():
        owned_private(stored, 0o600)
    # The virtual plotter's record of what it drew (written at stop).
    owned_private(workspace / "simulator", 0o700)
    assert (workspace / "simulator" / "strokes.json").exists()
    for record in (workspace / "simulator").iterdir():
        owned_private(record, 0o600)
    events = [json.loads(line)["event"]
              for line in (workspace / "logs" / "audit.log").read_text().splitlines()]
    assert "privileges_dropped" in events and "config_readable" in events
    assert "priv-test-key" not in daemon.log
