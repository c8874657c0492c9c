"""What the virtual plotter drew: pen-down strokes in mm, motion time and FIFO starvations.

Written out as `strokes.json` (for tests and tools), `drawing.svg` and
`drawing.png` (for people), so a plot on the simulator can be checked by eye
and by program.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw

# Load Pillow's format plugins now: done lazily, the import may come after the
# daemon dropped root and can no longer read Python's own files.
Image.init()
from twisted.logger import Logger

log = Logger()

Point = tuple[float, float]

STROKES_FILE = "strokes.json"
SVG_FILE = "drawing.svg"
PNG_FILE = "drawing.png"
#: PNG resolution.
PIXELS_PER_MM = 4


class Recording:
    """Collects the pen's path as the emulator executes moves."""

    def __init__(self, page_mm: tuple[float, float] | None = None):
        self.page_mm = page_mm
        self.strokes: list[list[Point]] = []
        self.pen_down_mm = 0.0
        self.pen_up_mm = 0.0
        self.motion_seconds = 0.0
        self.starvations: list[dict] = []
        self.warnings: list[str] = []
        self.pen_up = True
        self.position: Point = (0.0, 0.0)
        self._stroke: list[Point] | None = None

    def pen_changed(self, up: bool) -> None:
        """The pen went up or down at the current position."""
        if up == self.pen_up:
            return
        self.pen_up = up
        if up:
            self._stroke = None
        else:
            self._stroke = [self.position]
            self.strokes.append(self._stroke)

    def moved(self, points: list[Point]) -> None:
        """The carriage went through `points` (mm), in order."""
        for point in points:
            length = math.dist(self.position, point)
            if length == 0:
                continue
            if self.pen_up:
                self.pen_up_mm += length
            else:
                self.pen_down_mm += length
                if self._stroke is None:
                    self._stroke = [self.position]
                    self.strokes.append(self._stroke)
                self._stroke.append(point)
            self.position = point

    def jumped(self, point: Point) -> None:
        """The position changed without motion (the step counters were reset)."""
        self.position = point
        if not self.pen_up:
            self._stroke = [point]
            self.strokes.append(self._stroke)

    def starved(self, gap_seconds: float) -> None:
        """The motion FIFO ran empty with the pen down between two pen-down moves."""
        self.starvations.append({
            "at_seconds": round(self.motion_seconds, 6),
            "gap_seconds": round(gap_seconds, 6),
            "position_mm": [round(self.position[0], 4), round(self.position[1], 4)],
        })

    def warn(self, message: str) -> None:
        log.warn("virtual plotter: {message}", message=message)
        self.warnings.append(message)

    def snapshot(self) -> "Recording":
        """A copy to write while this one goes on recording. Finished strokes never
        change, so only the list of them and the stroke under way are copied."""
        copy = Recording(self.page_mm)
        copy.strokes = self.strokes[:]
        if self._stroke is not None and copy.strokes and copy.strokes[-1] is self._stroke:
            copy.strokes[-1] = list(self._stroke)
        copy.pen_down_mm, copy.pen_up_mm = self.pen_down_mm, self.pen_up_mm
        copy.motion_seconds = self.motion_seconds
        copy.starvations, copy.warnings = list(self.starvations), list(self.warnings)
        return copy

    def fingerprint(self) -> tuple:
        """Cheap to take, and different after anything was recorded: a long
        plot's record is not serialised again when nothing changed."""
        last = len(self.strokes[-1]) if self.strokes else 0
        return (len(self.strokes), last, self.pen_down_mm, self.pen_up_mm,
                self.motion_seconds, len(self.starvations), len(self.warnings),
                self.position, self.pen_up)

    def as_dict(self) -> dict:
        return {
            "strokes": [[[round(x, 4), round(y, 4)] for x, y in stroke]
                        for stroke in self.strokes],
            "pen_down_mm": round(self.pen_down_mm, 4),
            "pen_up_mm": round(self.pen_up_mm, 4),
            "motion_seconds": round(self.motion_seconds, 6),
            "starvations": list(self.starvations),
            "warnings": list(self.warnings),
        }

    # -- files --------------------------------------------------------------

    def page(self) -> tuple[float, float]:
        """The page drawn on: the configured one, or what the strokes cover from home."""
        if self.page_mm is not None:
            return self.page_mm
        xs = [x for stroke in self.strokes for x, _ in stroke] or [0.0]
        ys = [y for stroke in self.strokes for _, y in stroke] or [0.0]
        return (max(1.0, max(xs) + 5.0), max(1.0, max(ys) + 5.0))

    def write(self, directory: str | os.PathLike) -> Path:
        """Write strokes.json, drawing.svg and drawing.png into `directory`; returns it."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        _replace(path / STROKES_FILE, json.dumps(self.as_dict(), indent=1).encode("utf-8"))
        _replace(path / SVG_FILE, self.svg().encode("utf-8"))
        png = io.BytesIO()
        self.png().save(png, format="PNG")
        _replace(path / PNG_FILE, png.getvalue())
        log.info("virtual plotter wrote its drawing to {path}", path=str(path))
        return path

    def svg(self) -> str:
        width, height = self.page()
        shapes = []
        for stroke in self.strokes:
            if len(stroke) == 1:
                x, y = stroke[0]
                shapes.append(f'<circle cx="{x:.3f}" cy="{y:.3f}" r="0.2" fill="black"/>')
            else:
                points = " ".join(f"{x:.3f},{y:.3f}" for x, y in stroke)
                shapes.append(f'<polyline points="{points}"/>')
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}mm" height="{height:g}mm" '
            f'viewBox="0 0 {width:g} {height:g}">\n'
            f'<rect width="{width:g}" height="{height:g}" fill="white"/>\n'
            f'<g fill="none" stroke="black" stroke-width="0.3" stroke-linecap="round" '
            f'stroke-linejoin="round">\n' + "\n".join(shapes) + "\n</g>\n</svg>\n")

    def png(self) -> Image.Image:
        width, height = self.page()
        image = Image.new("L", (max(1, math.ceil(width * PIXELS_PER_MM)),
                                max(1, math.ceil(height * PIXELS_PER_MM))), 255)
        draw = ImageDraw.Draw(image)
        for stroke in self.strokes:
            pixels = [(x * PIXELS_PER_MM, y * PIXELS_PER_MM) for x, y in stroke]
            if len(pixels) == 1:
                draw.point(pixels, fill=0)
            else:
                draw.line(pixels, fill=0, width=1)
        return image


class RecordWriter:
    """Writes a recording's files, off the reactor's thread when given a way there.

    A long plot's record takes seconds to serialise and draw; in the daemon's
    own process (device type `simulator`) that must not stall the plot. Writes
    run one at a time, one that was overtaken by a newer one is skipped, and so
    is one of a recording unchanged since the last: a stop after a motors-off
    would otherwise write the same million strokes twice.
    """

    def __init__(self, directory: str | os.PathLike,
                 run_in_thread: Callable[..., Any] | None = None):
        self.directory = directory
        self._run_in_thread = run_in_thread
        self._lock = threading.Lock()
        self._asked = 0
        self._written = 0
        self._asked_fingerprint: tuple | None = None
        self._last_asked: tuple[Recording, int] | None = None

    def write(self, recording: Recording, *, now: bool = False) -> None:
        """Write what `recording` holds; `now` (or no thread): before returning."""
        fingerprint = recording.fingerprint()
        if fingerprint == self._asked_fingerprint and self._last_asked is not None:
            if now:  # the same record, already asked for: see that it is written
                self._write(*self._last_asked)
            return
        self._asked_fingerprint = fingerprint
        self._asked += 1
        self._last_asked = snapshot, number = recording.snapshot(), self._asked
        if now or self._run_in_thread is None:
            self._write(snapshot, number)
        else:
            self._run_in_thread(self._write, snapshot, number)

    def _write(self, snapshot: Recording, number: int) -> None:
        with self._lock:
            if number <= self._written:
                return
            try:
                snapshot.write(self.directory)
            except OSError as error:
                log.error("virtual plotter could not write its drawing: {error}", error=error)
                self._asked_fingerprint = None  # the next write tries again
            self._written = number


def _replace(path: Path, data: bytes) -> None:
    """Write atomically, so a reader never sees half a file; 0600, like the rest
    of the workspace (the drawing is the user's)."""
    partial = path.with_name(path.name + ".part")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)  # a full disk leaves the last whole file, no part
        raise
