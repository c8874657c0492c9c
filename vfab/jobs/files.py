"""The submitted drawings: one file per job in the workspace's `jobs/` folder.

A drawing is written to a temporary file beside its final name and renamed
into place once complete, so a crash or a full disk never leaves half a
drawing under a job's name.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

from vfab.jobs.errors import DiskFull

#: The errors that mean "no space": a full disk or a full quota.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class DrawingFiles:
    """Reads, writes and removes the drawings of jobs."""

    def __init__(self, directory: Path, on_disk_full: Callable[[str], None] | None = None):
        """`on_disk_full(what)` is told when a drawing does not fit on the disk."""
        self.directory = directory
        self._on_disk_full = on_disk_full

    def create_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def write(self, job_id: str, data: bytes) -> str:
        """Store `data` as the drawing of `job_id`; returns the file's name.

        Raises DiskFull when the disk cannot hold it, with nothing left behind.
        """
        name = f"{job_id}.svg"
        partial = self.directory / f".{name}.partial"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, self.directory / name)
        except OSError as error:
            partial.unlink(missing_ok=True)
            if error.errno in NO_SPACE:
                if self._on_disk_full is not None:
                    self._on_disk_full(f"the drawing of job {job_id}")
                raise DiskFull(f"the drawing of job {job_id}") from error
            raise
        return name

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def remove(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)
