"""Whether the workspace's disk is full, for /health and a `system_alert`.

Writers that meet ENOSPC say so at once (`noticed_full`); the free space is
looked at every CHECK_SECONDS, so the alert also clears by itself once space
is back. A small reserve file is kept so that, on a full disk, cancelling and
then deleting a job (`release_reserve`) can still free space through the API:
SQLite needs a few pages of room even to delete.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from vfab.events import EventBus

_log = Logger()

#: Below this much free space the disk counts as full.
MIN_FREE_BYTES = 1 << 20
#: Room set aside for deleting jobs on a full disk.
RESERVE_BYTES = 256 << 10
RESERVE_FILE = ".space-reserve"
#: Seconds between two looks at the free space.
CHECK_SECONDS = 5.0


class DiskSpace:
    """Knows whether the workspace's disk is full and tells the `system` channel."""

    def __init__(self, directory: Path, bus: EventBus, clock: Any, *,
                 free_bytes: Callable[[], int] | None = None,
                 min_free: int = MIN_FREE_BYTES, reserve: int = RESERVE_BYTES,
                 temp_dir: Path | None = None):
        """`free_bytes()` is how much space is left (the disk's own figure by default);
        `temp_dir` is where twisted.web spools request bodies (tempfile's by default)."""
        self.directory = directory
        self._temp_dir = temp_dir
        self._bus = bus
        self._free_bytes = free_bytes or (lambda: shutil.disk_usage(directory).free)
        self._min_free = min_free
        self._reserve = reserve
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock
        #: Why the disk counts as full, or None when there is room.
        self.full: str | None = None

    @property
    def reserve_path(self) -> Path:
        return self.directory / RESERVE_FILE

    def start(self) -> None:
        self._loop.start(CHECK_SECONDS, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def noticed_full(self, what: str) -> None:
        """A write of `what` failed for want of space."""
        self._set_full(f"the disk of {self.directory} is full: could not write {what}")

    def check(self) -> None:
        """Look at the free space: full below the minimum, else clear (and refill
        the reserve)."""
        try:
            free = self._free_bytes()
        except OSError as error:
            _log.warn("cannot tell the free space of {directory}: {error}",
                      directory=str(self.directory), error=error)
            return
        if free < self._min_free:
            self._set_full(f"the disk of {self.directory} is full: {free // 1024} KiB free")
            return
        self._make_reserve()
        if self.full is not None:
            self.full = None
            _log.info("disk space is back in {directory}", directory=str(self.directory))
            self._bus.publish("system", {
                "type": "system_alert", "severity": "info", "title": "Disk space back",
                "message": f"The disk of {self.directory} has room again; jobs can be "
                           f"submitted and progress is saved."})

    def room_for_upload(self, size: int, others: int = 0) -> tuple[int, str] | None:
        """Whether an upload of `size` bytes fits, with `others` bytes still to come
        for the uploads under way, and MIN_FREE_BYTES kept for the daemon's own
        writes: None, 507 and why (it can never fit), or 503 and why (it fits
        once the others are done).

        While it is read, an upload takes its size twice on the workspace's disk
        when the temporary directory is on it: twisted.web's spool, then the drawing.
        """
        try:
            free = self._free_bytes()
            temp_dir = self._temp_dir or Path(tempfile.gettempdir())
            shared = os.stat(temp_dir).st_dev == os.stat(self.directory).st_dev
            temp_free = free if shared else shutil.disk_usage(temp_dir).free
        except OSError:
            return None  # cannot tell: the writes will (507 if they fail)
        copies = 2 if shared else 1
        room = free - self._min_free
        kept = f"{_mib(self._min_free)} are kept for the daemon's own writes"
        if size * copies > room:
            return 507, (f"an upload of {_mib(size)} needs {_mib(size * copies)} on the disk "
                         f"of {self.directory}, which has {_mib(free)} free, and {kept}")
        if not shared and size > temp_free - self._min_free:
            return 507, (f"an upload of {_mib(size)} does not fit in the temporary directory "
                         f"{temp_dir}: {_mib(temp_free)} free")
        if (size + others) * copies > room:
            return 503, (f"the uploads under way will take the room this one needs on the "
                         f"disk of {self.directory} ({_mib(free)} free, and {kept}); "
                         f"try again once they are done")
        return None

    def release_reserve(self, purpose: str) -> bool:
        """Give the reserve back to the disk so that a write that frees space (a
        delete, a job's end) can go through; whether there was one."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        _log.warn("disk full: released the {size} KiB reserve to {purpose}",
                  size=self._reserve // 1024, purpose=purpose)
        return True

    def _make_reserve(self) -> None:
        if self._reserve <= 0 or self.reserve_path.exists():
            return
        partial = self.reserve_path.with_name(RESERVE_FILE + ".part")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if os.write(fd, bytes(self._reserve)) < self._reserve:
                    raise OSError(errno.ENOSPC, "the reserve was cut short")
            finally:
                os.close(fd)
            os.replace(partial, self.reserve_path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            _log.warn("could not set aside {size} KiB for deleting jobs on a full disk: "
                      "{error}", size=self._reserve // 1024, error=error)

    def _set_full(self, reason: str) -> None:
        if self.full is not None:
            return
        self.full = reason
        _log.error("{reason}: free some space (deleting finished jobs helps)", reason=reason)
        self._bus.publish("system", {
            "type": "system_alert", "severity": "error", "title": "Disk full",
            "message": f"{reason}. New jobs are refused (507) and progress may not be "
                       f"saved until space is freed; deleting finished jobs helps."})


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
