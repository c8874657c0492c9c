"""The last few previews asked for, so that a dashboard reloading does not re-read drawings."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

#: Previews kept.
CACHE_SIZE = 8


class PreviewCache:
    """A small least-recently-used map from job id to its preview."""

    def __init__(self, size: int = CACHE_SIZE):
        self._size = size
        self._previews: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def get(self, job_id: str) -> dict[str, Any] | None:
        preview = self._previews.get(job_id)
        if preview is not None:
            self._previews.move_to_end(job_id)
        return preview

    def put(self, job_id: str, preview: dict[str, Any]) -> None:
        self._previews[job_id] = preview
        self._previews.move_to_end(job_id)
        while len(self._previews) > self._size:
            self._previews.popitem(last=False)

    def forget(self, job_id: str) -> None:
        self._previews.pop(job_id, None)
