"""The submitted drawings: one file per job in the workspace's `jobs/` folder.

A drawing is written to a temporary file beside its final name and renamed
into place once complete, so a crash or a full disk never leaves half a
drawing under a job's name.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

from vfab.jobs.errors import DiskFull

#: The errors that mean "no space": a full disk or a full quota.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
#: The names of uploads that are not (yet) a job's drawing.
UPLOAD_PREFIX = ".upload-"

T = TypeVar("T")


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

    def spool(self, fill: Callable[[BinaryIO], T]) -> tuple[Path, T]:
        """A new upload, written by `fill(out)` to a file of its own; returns the
        file and what `fill` returned.

        Blocking (it runs in a thread, off the reactor); the file is complete
        and on disk when this returns, so `adopt` only has to rename it. On any
        failure nothing is left behind; a full disk raises DiskFull, and the
        caller tells `on_disk_full` (from the reactor's thread).
        """
        path = self.directory / f"{UPLOAD_PREFIX}{secrets.token_hex(8)}.partial"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                result = fill(out)
                out.flush()
                os.fsync(out.fileno())
        except OSError as error:
            path.unlink(missing_ok=True)
            if error.errno in NO_SPACE:
                raise DiskFull("the uploaded drawing") from error
            raise
        except BaseException:  # a bad form, a closed body: nothing half-written stays
            path.unlink(missing_ok=True)
            raise
        return path, result

    def disk_full(self, what: str) -> None:
        """Tell `on_disk_full` that `what` did not fit."""
        if self._on_disk_full is not None:
            self._on_disk_full(what)

    def adopt(self, job_id: str, upload: Path) -> str:
        """Make a spooled upload the drawing of `job_id`: a rename, so the drawing is
        there whole or not at all. Returns the file's name."""
        name = f"{job_id}.svg"
        os.replace(upload, self.directory / name)
        return name

    def remove_stale_uploads(self) -> None:
        """Uploads a crash left behind: no job refers to them."""
        for stale in self.directory.glob(f"{UPLOAD_PREFIX}*.partial"):
            stale.unlink(missing_ok=True)
        # Plans a planning child was writing when it was killed (planfile.PlanWriter).
        for stale in self.directory.glob(".*.plan.*.partial"):
            stale.unlink(missing_ok=True)

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def remove(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)
