"""A real PostgreSQL server of the tests' own: initdb and pg_ctl in a temporary
folder, listening on 127.0.0.1 at a free port (and a socket in that folder).

PostgreSQL refuses to run as root, so under root it runs as `nobody` (through
`setpriv`), the folder given to that user. One server per test process
(pytest-xdist worker); each test that needs one takes a database of its own.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

USER = "vfab"
#: Seconds pg_ctl waits for the server to start or stop.
PG_CTL_TIMEOUT = 60


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's versioned folder."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(os.path.realpath(found)).parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                     key=lambda path: int(Path(path).parent.parent.name), reverse=True)
    return Path(folders[0]).parent if folders else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder; `url(database)` for clients."""

    def __init__(self) -> None:
        binaries = postgres_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL is not installed (make system-packages installs it)")
        self._bin = binaries
        self.folder = Path(tempfile.mkdtemp(prefix="vfab-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
            self._prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

    def _run(self, program: str, *args: str) -> None:
        command = [*self._prefix, str(self._bin / program), *args]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.folder,
                                env={**os.environ, "LC_ALL": "C"}, timeout=PG_CTL_TIMEOUT + 30)
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed ({result.returncode}): "
                               f"{result.stdout}{result.stderr}")

    def start(self) -> "PostgresServer":
        """Create the cluster (first time) and start the server."""
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8",
                      "--no-sync", "--no-instructions")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                   f"-c unix_socket_directories={self.folder} -c fsync=off "
                   f"-c max_connections=200 -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"),
                  "-o", options, "-w", "-t", str(PG_CTL_TIMEOUT), "start")
        return self

    def stop(self) -> None:
        """Stop the server (fast: clients are disconnected), keeping the cluster."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w",
                  "-t", str(PG_CTL_TIMEOUT), "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop the server if it runs and delete its folder."""
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
