"""A job's motion plan on disk: planned once, in a child, read a window at a time.

A drawing of a million segments is a few million EBB moves. Held as Python
objects they take gigabytes; here they are rows of numbers (MOVE_DTYPE, 73
bytes each) in a file the daemon reads a window of rows at a time with
`os.pread`, so its memory does not grow with the drawing (a whole-file mmap
would: the pages it touches count in its RSS).

Layout (little-endian):

    0   magic b"VFABPLAN", u32 format version, u32 0, u64 header offset, u64 header size
    32  the moves: MOVE_DTYPE rows in plot order, per path its pen-up travel
        then its pen-down moves
    ..  the paths: PATH_DTYPE rows, offsets into the moves and each path's figures
    ..  the header: JSON with the settings fingerprint, the figures (estimated
        seconds, counts, pen-down length, bounds) and the layers (name, first
        path, path count)

The header comes last so that the moves can be written as they are planned;
the writer fills in its offset before the file is renamed into place, so a
file under its final name is always whole. A reader refuses a file of
another format version (PlanFormatError): the job is planned again.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence, overload

import attr
import numpy as np

from vfab.config import DeviceConfig

from .plan import MOVE_DTYPE, Move, PathPlan, PenMove, moves_from_rows

MAGIC = b"VFABPLAN"
#: Bumped whenever the layout or the meaning of a column changes.
FORMAT_VERSION = 1
_PRELUDE = struct.Struct("<8sIIQQ")
MOVES_OFFSET = 32

#: One path: where its moves are, and what the runner needs without reading them.
PATH_DTYPE = np.dtype([
    ("travel_start", "<i8"), ("travel_count", "<i8"), ("draw_start", "<i8"),
    ("draw_count", "<i8"), ("start_mm", "<f8", (2,)), ("end_mm", "<f8", (2,)),
    ("length_mm", "<f8"), ("travel_s", "<f8"), ("draw_s", "<f8"), ("draw_mm", "<f8"),
    ("draw_mm_before", "<f8"), ("layer", "<i4"), ("index", "<i4")])

#: The settings that change a plan (speeds, accelerations, pen heights and
#: timings, curve tolerance, ordering, the park position that changes the time).
PLAN_SETTINGS = (
    "model", "pen_pos_up", "pen_pos_down", "pen_rate_raise", "pen_rate_lower",
    "pen_delay_up", "pen_delay_down", "speed_pen_down", "speed_pen_up", "accel_pen_down",
    "accel_pen_up", "cornering", "microstepping", "tolerance", "optimize",
    "merge_tolerance", "pen_change_position")

#: Rows read at once: a window of moves is made into Moves on the reactor, in
#: about a millisecond.
WINDOW_ROWS = 1024
_TICKS_PER_S = 25_000
#: Paths whose rows are put in file order and written at once.
WRITE_PATHS = 8192


class PlanFormatError(ValueError):
    """The file is not a plan this vfab can read (another version, or damaged)."""


def fingerprint(settings: DeviceConfig, *, use_lm: bool) -> str:
    """A hash of what the plan depends on: a plan with another fingerprint is stale."""
    values = {name: getattr(settings, name) for name in PLAN_SETTINGS}
    values["use_lm"] = use_lm
    values["format"] = FORMAT_VERSION
    text = json.dumps(values, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class PlanWriter:
    """Writes a plan file layer by layer, then renames it into place at `finish`.

    The rows go to a temporary file beside the final name; `finish` writes the
    index and header, fsyncs and renames, so the final name holds a whole plan
    or nothing. On any error, `abort` (or leaving the `with` block) removes
    what was written.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._partial = self.path.with_name(
            f".{self.path.name}.{secrets.token_hex(4)}.partial")
        fd = os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._out = os.fdopen(fd, "wb")
        self._out.write(b"\0" * MOVES_OFFSET)
        self._rows = 0
        self._paths: list[np.ndarray] = []
        self._layers: list[dict[str, Any]] = []
        self._draw_mm = 0.0
        self._low = np.full(2, np.inf)
        self._high = np.full(2, -np.inf)

    def __enter__(self) -> "PlanWriter":
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is not None:
            self.abort()

    def add_layer(self, name: str, rows: Any) -> None:
        """One layer's plan (planner.DrawingRows): its rows in plot order, and its paths."""
        draw, travel = rows.draw, rows.travel
        count = len(rows.length_mm)
        first_path = sum(len(paths) for paths in self._paths)
        travel_count = np.diff(rows.travel_bounds)
        draw_count = np.diff(rows.draw_bounds)
        # Per path its travel then its strokes: where each begins in the file.
        sizes = travel_count + draw_count
        path_start = self._rows + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) \
            if count else np.zeros(0, dtype=np.int64)
        # Written WRITE_PATHS paths at a time: a copy of the whole layer's rows in
        # file order would be the biggest array of the submission.
        for low in range(0, count, WRITE_PATHS):
            high = min(low + WRITE_PATHS, count)
            travel_from, travel_to = rows.travel_bounds[low], rows.travel_bounds[high]
            draw_from, draw_to = rows.draw_bounds[low], rows.draw_bounds[high]
            some_travel, some_draw = travel[travel_from:travel_to], draw[draw_from:draw_to]
            out = np.empty(len(some_travel) + len(some_draw), dtype=MOVE_DTYPE)
            base = path_start[low]
            travel_path = some_travel["path"].astype(np.int64)
            draw_path = some_draw["path"].astype(np.int64)
            out[path_start[travel_path] - base + np.arange(travel_from, travel_to)
                - rows.travel_bounds[travel_path]] = some_travel
            out[path_start[draw_path] - base + travel_count[draw_path]
                + np.arange(draw_from, draw_to) - rows.draw_bounds[draw_path]] = some_draw
            out["path"] += first_path
            out.tofile(self._out)
            del out

        index = np.zeros(count, dtype=PATH_DTYPE)
        index["travel_start"], index["travel_count"] = path_start, travel_count
        index["draw_start"], index["draw_count"] = path_start + travel_count, draw_count
        index["start_mm"], index["end_mm"] = rows.start_mm, rows.end_mm
        index["length_mm"] = rows.length_mm
        index["travel_s"] = _per_path(travel["ticks"], rows.travel_bounds) / _TICKS_PER_S
        index["draw_s"] = _per_path(draw["ticks"], rows.draw_bounds) / _TICKS_PER_S
        draw_mm = _per_path(draw["distance"], rows.draw_bounds)
        index["draw_mm"] = draw_mm
        index["draw_mm_before"] = self._draw_mm + np.concatenate([[0.0], np.cumsum(draw_mm)[:-1]]) \
            if count else 0.0
        index["layer"], index["index"] = len(self._layers), np.arange(count)
        self._paths.append(index)
        self._draw_mm += float(draw_mm.sum())
        for points in (draw["end_mm"], rows.start_mm):
            if len(points):
                self._low = np.minimum(self._low, points.min(axis=0))
                self._high = np.maximum(self._high, points.max(axis=0))
        self._layers.append({"name": name, "first_path": first_path, "paths": count,
                             "home_s": rows.home_s})
        self._rows += int(sizes.sum())

    def finish(self, *, fingerprint: str, figures: dict[str, Any],
               pen: tuple[PenMove, PenMove]) -> None:
        """Write the index and header, fsync, rename into place."""
        paths = np.concatenate(self._paths) if self._paths else np.zeros(0, dtype=PATH_DTYPE)
        paths_offset = MOVES_OFFSET + self._rows * MOVE_DTYPE.itemsize
        paths.tofile(self._out)
        bounds = None if not np.all(np.isfinite(self._low)) else \
            [*self._low.tolist(), *self._high.tolist()]
        header = json.dumps({
            "fingerprint": fingerprint, "moves": self._rows, "paths_offset": paths_offset,
            "path_count": len(paths), "layers": self._layers, "draw_mm": self._draw_mm,
            "bounds_mm": bounds, "pen_up": [pen[0].command, pen[0].duration_s],
            "pen_down": [pen[1].command, pen[1].duration_s], "figures": figures,
        }).encode()
        header_offset = paths_offset + paths.nbytes
        self._out.write(header)
        self._out.flush()
        os.pwrite(self._out.fileno(), _PRELUDE.pack(MAGIC, FORMAT_VERSION, 0, header_offset,
                                                    len(header)), 0)
        os.fsync(self._out.fileno())
        self._out.close()
        os.replace(self._partial, self.path)
        _sync_directory(self.path.parent)

    def abort(self) -> None:
        """Remove what was written."""
        if not self._out.closed:
            try:
                self._out.close()
            except OSError:  # a full disk refuses the last buffered bytes too
                pass
        self._partial.unlink(missing_ok=True)


def _per_path(values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The sum of `values` over each path's rows."""
    totals = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    return totals[bounds[1:]] - totals[bounds[:-1]]


def _sync_directory(directory: Path) -> None:
    """The rename itself survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PlanFile:
    """An open plan file: its header in memory, its rows read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            prelude = os.pread(self._fd, _PRELUDE.size, 0)
            if len(prelude) < _PRELUDE.size:
                raise PlanFormatError(f"{self.path} is not a plan file (too short)")
            magic, version, _, offset, size = _PRELUDE.unpack(prelude)
            if magic != MAGIC:
                raise PlanFormatError(f"{self.path} is not a plan file")
            if version != FORMAT_VERSION:
                raise PlanFormatError(f"{self.path} has plan format {version}; this vfab "
                                      f"reads format {FORMAT_VERSION}")
            self.header: dict[str, Any] = json.loads(os.pread(self._fd, size, offset))
        except BaseException:
            os.close(self._fd)
            raise
        # Closed with the plan (a runner kept for a lost device still reads it).
        self._closer = weakref.finalize(self, os.close, self._fd)
        self.moves_count: int = self.header["moves"]
        self.path_count: int = self.header["path_count"]
        self._paths_offset: int = self.header["paths_offset"]

    @property
    def fingerprint(self) -> str:
        return self.header["fingerprint"]

    @property
    def figures(self) -> dict[str, Any]:
        return self.header["figures"]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Move rows [start, stop), read from the file."""
        start, stop = max(0, start), min(stop, self.moves_count)
        if stop <= start:
            return np.zeros(0, dtype=MOVE_DTYPE)
        size = MOVE_DTYPE.itemsize
        data = os.pread(self._fd, (stop - start) * size, MOVES_OFFSET + start * size)
        return np.frombuffer(data, dtype=MOVE_DTYPE)

    def path_rows(self, start: int, stop: int) -> np.ndarray:
        """Path index rows [start, stop)."""
        start, stop = max(0, start), min(stop, self.path_count)
        if stop <= start:
            return np.zeros(0, dtype=PATH_DTYPE)
        size = PATH_DTYPE.itemsize
        data = os.pread(self._fd, (stop - start) * size, self._paths_offset + start * size)
        return np.frombuffer(data, dtype=PATH_DTYPE)

    def iter_rows(self, start: int = 0, stop: int | None = None,
                  window: int = WINDOW_ROWS * 16) -> Iterator[np.ndarray]:
        """The rows from `start` to `stop`, a window at a time."""
        stop = self.moves_count if stop is None else stop
        for begin in range(start, stop, window):
            yield self.rows(begin, min(begin + window, stop))

    def close(self) -> None:
        self._closer()
        self._fd = -1

    def __enter__(self) -> "PlanFile":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class FileMoves(Sequence[Move]):
    """Moves [start, start + count) of a plan file, as a sequence of Move read a
    window at a time: only the window in use is held as Python objects."""

    def __init__(self, plan: PlanFile, start: int, count: int):
        self._plan = plan
        self._start = start
        self._count = count
        self._window_start = -1
        self._window: list[Move] = []

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> Move: ...

    @overload
    def __getitem__(self, index: slice) -> "FileMoves": ...

    def __getitem__(self, index: int | slice) -> "Move | FileMoves":
        if isinstance(index, slice):
            first, last, step = index.indices(self._count)
            if step != 1:
                raise ValueError("plan moves are sliced with step 1 only")
            return FileMoves(self._plan, self._start + first, max(0, last - first))
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        window = index // WINDOW_ROWS * WINDOW_ROWS
        if window != self._window_start:
            begin = self._start + window
            self._window = moves_from_rows(self._plan.rows(
                begin, begin + min(WINDOW_ROWS, self._count - window)))
            self._window_start = window
        return self._window[index - window]

    def __iter__(self) -> Iterator[Move]:
        for window in range(0, self._count, WINDOW_ROWS):
            begin = self._start + window
            yield from moves_from_rows(self._plan.rows(
                begin, begin + min(WINDOW_ROWS, self._count - window)))

    def distance_mm(self) -> float:
        """The pen-down length of these moves, without making Moves of them."""
        return float(sum(rows["distance"].sum() for rows in
                         self._plan.iter_rows(self._start, self._start + self._count)))


class _FilePaths(Sequence[PathPlan]):
    """A layer's paths, each read from the index when asked for (a few kept)."""

    def __init__(self, plan: PlanFile, first: int, count: int):
        self._plan = plan
        self._first = first
        self._count = count
        self._cache: dict[int, PathPlan] = {}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> PathPlan:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("a plan file's paths are read one at a time")
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        path = self._cache.get(index)
        if path is None:
            path = self._read(index)
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = path
        return path

    def _read(self, index: int) -> PathPlan:
        row = self._plan.path_rows(self._first + index, self._first + index + 1)[0]
        start_x, start_y = row["start_mm"].tolist()
        end_x, end_y = row["end_mm"].tolist()
        return PathPlan(
            index=index, start_mm=(start_x, start_y), end_mm=(end_x, end_y),
            draw=FileMoves(self._plan, int(row["draw_start"]), int(row["draw_count"])),
            length_mm=float(row["length_mm"]), travel_s=float(row["travel_s"]),
            travel=FileMoves(self._plan, int(row["travel_start"]), int(row["travel_count"])))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class FileLayer:
    index: int
    name: str
    paths: _FilePaths


class FilePlan:
    """A plan file as the runner walks a MotionPlan: layers, paths, moves; read
    from the file as they are reached, never whole."""

    def __init__(self, path: Path):
        self.file = PlanFile(path)
        header = self.file.header
        self.layers = tuple(
            FileLayer(index=number, name=layer["name"],
                      paths=_FilePaths(self.file, layer["first_path"], layer["paths"]))
            for number, layer in enumerate(header["layers"]))
        self.estimated_seconds: float = header["figures"]["plan_seconds"]
        self.home_s: float = header["layers"][-1]["home_s"] if header["layers"] else 0.0
        self.pen_up = PenMove(command=header["pen_up"][0], duration_s=header["pen_up"][1])
        self.pen_down = PenMove(command=header["pen_down"][0],
                                duration_s=header["pen_down"][1])
        self._first_paths = [layer["first_path"] for layer in header["layers"]]

    @property
    def fingerprint(self) -> str:
        return self.file.fingerprint

    @property
    def path_count(self) -> int:
        return self.file.path_count

    def draw_mm(self) -> float:
        return float(self.file.header["draw_mm"])

    def drawn_before(self, layer: int, path: int, move: int) -> tuple[float, int]:
        """(pen-down mm, paths) done before move `move` of path `path` of `layer`."""
        if layer >= len(self.layers):
            return self.draw_mm(), self.path_count
        number = self._first_paths[layer] + min(path, len(self.layers[layer].paths))
        if number >= self.path_count:
            return self.draw_mm(), self.path_count
        row = self.file.path_rows(number, number + 1)[0]
        done = float(row["draw_mm_before"])
        if move > 0 and path < len(self.layers[layer].paths):
            start = int(row["draw_start"])
            done += FileMoves(self.file, start, min(move, int(row["draw_count"]))).distance_mm()
        return done, number

    def close(self) -> None:
        self.file.close()
