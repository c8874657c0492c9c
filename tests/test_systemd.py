"""systemd: the shipped units verify, readiness reaches $NOTIFY_SOCKET, and the daemon
serves on a socket passed the way systemd passes it (LISTEN_FDS, fd 3)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess
from vfab.systemd import activation_endpoint, notify, socket_family

ETC = Path(__file__).parent.parent / "etc"
VFAB = Path(sys.executable).parent / "vfab"


# -- notify ----------------------------------------------------------------------

def datagram_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    return sock


def test_notify_sends_a_datagram(tmp_path):
    with datagram_socket(str(tmp_path / "notify")) as sock:
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert sock.recv(100) == b"READY=1"


def test_notify_reaches_an_abstract_socket():
    name = f"vfab-test-{os.getpid()}"
    with datagram_socket("\0" + name) as sock:
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"STOPPING=1"


def test_without_notify_socket_nothing_is_sent():
    assert notify("READY=1", {}) is False


def test_no_passed_socket_means_no_activation_endpoint():
    from twisted.internet import reactor
    assert activation_endpoint(reactor) is None


def test_socket_family_leaves_the_socket_open():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert socket_family(sock.fileno()) == socket.AF_INET
        sock.bind(("127.0.0.1", 0))  # still ours and usable


def test_the_daemon_tells_systemd_ready_and_stopping(tmp_path, monkeypatch):
    address = str(tmp_path / "notify")
    with datagram_socket(address) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        daemon = DaemonProcess(tmp_path)
        try:
            daemon.start()
            assert sock.recv(100) == b"READY=1"
            # Ready only once it serves.
            status, health = daemon.request("GET", "/health")
            assert status == 200
        finally:
            code = daemon.stop()
        assert sock.recv(100) == b"STOPPING=1"
    assert code == 0


# -- socket activation ------------------------------------------------------------

#: Execs argv[2:] with the socket fd argv[1] as fd 3 and systemd's variables, keeping its pid.
EXEC_ACTIVATED = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="http")
os.execv(sys.argv[2], sys.argv[2:])
"""


class ActivatedDaemon(DaemonProcess):
    """The daemon started as systemd starts vfab-socket.service: the listening socket
    as fd 3, LISTEN_PID its own pid, LISTEN_FDS=1 and LISTEN_FDNAMES set."""

    def __init__(self, tmp_path: Path, listening: socket.socket):
        super().__init__(tmp_path)
        self._fd = listening.fileno()
        self.argv = [sys.executable, "-c", EXEC_ACTIVATED, str(self._fd), *self.argv]

    def start(self) -> "ActivatedDaemon":
        # As DaemonProcess.start, but handing the socket down.
        self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        pass_fds=(self._fd,))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(60) or self.port is None:
            self.kill()
            raise AssertionError(f"the daemon did not become ready:\n{self.log}")
        return self


def test_the_daemon_serves_on_the_socket_systemd_passes(tmp_path):
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    port = listening.getsockname()[1]
    daemon = ActivatedDaemon(tmp_path, listening)
    try:
        daemon.start()
        listening.close()  # the daemon's copy is the only one now
        assert daemon.port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
        assert "socket activation: serving on the socket systemd passed (fd 3)" in daemon.log
    finally:
        listening.close()
        code = daemon.stop()
    assert code == 0


def test_a_passed_unix_socket_is_refused_with_the_reason(tmp_path):
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(tmp_path / "http.sock"))
    listening.listen(1)
    daemon = ActivatedDaemon(tmp_path, listening)
    try:
        daemon.process = subprocess.Popen(daemon.argv, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True,
                                          pass_fds=(listening.fileno(),))
        out, err = daemon.process.communicate(timeout=60)
    finally:
        listening.close()
        daemon.kill()
    assert daemon.process.returncode == 1
    assert "socket activation: systemd passed a socket of family AF_UNIX" in out + err


# -- the unit files ----------------------------------------------------------------

def test_the_unit_files_pass_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    names = ["vfab.service", "vfab-socket.service", "vfab.socket"]
    for name in names:
        text = (ETC / "systemd" / name).read_text()
        # verify checks that ExecStart= exists: point it at this installation's vfab.
        (tmp_path / name).write_text(text.replace("/usr/local/bin/vfab", str(VFAB)))
    result = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in names)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # verify only warns about unknown keys and bad values: any mention of ours is a failure.
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if any(name in line for name in names)]
    assert problems == []


def test_the_units_are_hardened_and_notify():
    for name in ("vfab.service", "vfab-socket.service"):
        lines = set((ETC / "systemd" / name).read_text().splitlines())
        for setting in ("Type=notify", "User=vfab", "SupplementaryGroups=dialout",
                        "Restart=always", "NoNewPrivileges=yes", "ProtectSystem=strict",
                        "ReadWritePaths=/var/lib/vfab", "PrivateTmp=yes"):
            assert setting in lines, f"{name} lacks {setting}"
    assert "Service=vfab-socket.service" in (ETC / "systemd" / "vfab.socket").read_text()


def test_the_openrc_script_is_valid_shell():
    result = subprocess.run(["sh", "-n", str(ETC / "openrc" / "vfab")], capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 0, result.stderr
