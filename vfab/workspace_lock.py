"""One daemon per workspace: an exclusive lock held for the daemon's life.

Two daemons on one workspace would share the database, the drawings and the
virtual plotter's files, and each would plot the other's jobs. The lock is
an flock on `vfab.lock` in the workspace, so that it goes with the process
(kill -9 included) and nothing stale is ever left to clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "vfab.lock"


class WorkspaceInUse(RuntimeError):
    """Another process holds the workspace."""


class WorkspaceLock:
    def __init__(self, workspace: Path):
        self.path = workspace / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our PID in it; raises WorkspaceInUse naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise WorkspaceInUse(
                f"the workspace {self.path.parent} is in use by another vfab daemon "
                f"(PID {holder}); stop it, or give this one its own --workspace") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
