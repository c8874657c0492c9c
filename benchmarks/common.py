"""What every benchmark shares: generated drawings, the machine, a table, a verdict.

The drawings are generated here (no files are checked in), always from the
same seed, so every run measures the same input.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import vpype

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PX_PER_MM = 96.0 / 25.4
#: The V3/A3 page, the default model's travel.
PAGE_MM = (430.0, 297.0)
SEED = 20261126


def svg_of(paths: list[np.ndarray], page_mm: tuple[float, float] = PAGE_MM) -> bytes:
    """Polylines (each an (N, 2) array in mm) as an SVG of <polyline> elements in mm.

    Written directly rather than with vpype.write_svg, which takes 15 s for
    a million segments.
    """
    width, height = page_mm
    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}mm" height="{height}mm" '
             f'viewBox="0 0 {width} {height}">']
    for path in paths:
        points = " ".join(f"{x:.3f},{y:.3f}" for x, y in path.tolist())
        lines.append(f'<polyline fill="none" stroke="black" points="{points}"/>')
    lines.append("</svg>")
    return "\n".join(lines).encode()


def random_walks(segments: int, per_path: int = 10, step_mm: float = 1.0) -> list[np.ndarray]:
    """Scribbles: `segments` segments in paths of `per_path`, each a random walk.

    Short segments at changing angles, as in generative art: the planner's
    worst case (many corners, many short moves).
    """
    rng = np.random.default_rng(SEED)
    count = segments // per_path
    starts = rng.uniform((10.0, 10.0), (PAGE_MM[0] - 10, PAGE_MM[1] - 10), size=(count, 1, 2))
    steps = rng.normal(0.0, step_mm, size=(count, per_path, 2))
    walks = np.concatenate([starts, starts + np.cumsum(steps, axis=1)], axis=1)
    walks = np.clip(walks, 1.0, (PAGE_MM[0] - 1, PAGE_MM[1] - 1))
    return list(walks)


def scribble(segments: int, step_mm: float = 0.3, turn: float = 0.25) -> np.ndarray:
    """One long pen-down path of short segments whose heading drifts: mostly short moves
    at full speed, the feeder's hardest case (a new command every few milliseconds)."""
    rng = np.random.default_rng(SEED)
    heading = np.cumsum(rng.normal(0.0, turn, segments))
    steps = step_mm * np.column_stack([np.cos(heading), np.sin(heading)])
    path = np.vstack([[PAGE_MM[0] / 2, PAGE_MM[1] / 2], steps]).cumsum(axis=0)
    # Fold the walk back into the page.
    span = np.array(PAGE_MM) - 20.0
    return 10.0 + np.abs((path - 10.0 + span) % (2 * span) - span)


def hatching(count: int = 400) -> list[np.ndarray]:
    """Horizontal hatch lines over three rectangles, all drawn left to right (as tools emit them)."""
    rng = np.random.default_rng(SEED)
    paths = []
    for _ in range(3):
        x0, y0 = rng.uniform((10, 10), (250, 150))
        width, height = rng.uniform((80, 60), (170, 140))
        for y in np.linspace(y0, y0 + height, count // 3):
            paths.append(np.array([[x0, y], [x0 + width, y]]))
    order = rng.permutation(len(paths))  # the rectangles' lines interleaved, as layers merge
    return [paths[i] for i in order]


def random_lines(count: int = 2000) -> list[np.ndarray]:
    """Straight lines of random length and angle anywhere on the page."""
    rng = np.random.default_rng(SEED)
    starts = rng.uniform((10, 10), (PAGE_MM[0] - 10, PAGE_MM[1] - 10), size=(count, 2))
    angles = rng.uniform(0, 2 * np.pi, count)
    lengths = rng.uniform(1, 20, count)
    ends = starts + lengths[:, None] * np.column_stack([np.cos(angles), np.sin(angles)])
    ends = np.clip(ends, 1.0, (PAGE_MM[0] - 1, PAGE_MM[1] - 1))
    return [np.array([a, b]) for a, b in zip(starts, ends)]


def small_circles(count: int = 2000) -> list[np.ndarray]:
    """Many small closed circles (vpype.circle), in random order."""
    rng = np.random.default_rng(SEED)
    centres = rng.uniform((10, 10), (PAGE_MM[0] - 10, PAGE_MM[1] - 10), size=(count, 2))
    radii = rng.uniform(0.5, 4.0, count)
    paths = []
    for (x, y), r in zip(centres, radii):
        circle = vpype.circle(x, y, r, quantization=0.1)
        paths.append(np.column_stack([circle.real, circle.imag]))
    return paths


def machine() -> str:
    """CPU model, cores and Python version, for the README's table."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, Python {platform.python_version()}"


def table(headers: list[str], rows: list[list]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for number, row in enumerate(cells):
        lines.append("  ".join(value.rjust(width) if number and _numeric(value) else
                               value.ljust(width) for value, width in zip(row, widths)))
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _numeric(value: str) -> bool:
    return value.replace(",", "").replace(".", "").replace("-", "").replace("x", "").isdigit()


def verdict(name: str, met: bool, detail: str) -> str:
    """One line per target, as run_all.py collects them."""
    return f"TARGET {name}: {'MET' if met else 'NOT MET'} ({detail})"


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


class ProcessSampler:
    """Looks at process `pid` every `interval` seconds in a thread, while in a
    `with` block, so that a benchmark sees peaks a single reading would miss."""

    interval = 0.05

    def __init__(self, pid: int):
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcessSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample(self._process)
            self._stop.wait(self.interval)

    def sample(self, process: psutil.Process) -> None:
        raise NotImplementedError
