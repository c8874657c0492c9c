"""Numbers about a drawing for the job record, and a light preview for the dashboard."""

from __future__ import annotations

import math

import attr
import numpy as np

from .drawing import Drawing

HOME = np.zeros(2)


@attr.s(frozen=True, slots=True)
class DrawingStats:
    layers: int = attr.ib()
    paths: int = attr.ib()
    #: Length drawn with the pen down.
    pen_down_mm: float = attr.ib()
    #: Straight travel with the pen up: home, through every path in order, home.
    pen_up_mm: float = attr.ib()


def path_length(path: np.ndarray) -> float:
    return float(np.hypot(*np.diff(path, axis=0).T).sum())


def drawing_stats(drawing: Drawing) -> DrawingStats:
    """Counts and distances of the drawing plotted in its current order."""
    paths_list = [path for layer in drawing.layers for path in layer.paths]
    paths = len(paths_list)
    pen_down = 0.0
    pen_up = 0.0
    if paths:
        # The same numbers as path_length and np.hypot path by path, in the same
        # order of addition, computed for all paths at once.
        sizes = np.fromiter(map(len, paths_list), dtype=np.int64, count=paths)
        points = np.concatenate(paths_list)
        step = np.diff(points, axis=0)
        segment = np.hypot(step[:, 0], step[:, 1])
        ends = np.cumsum(sizes)
        starts = ends - sizes
        for first, last in zip(starts.tolist(), ends.tolist()):
            pen_down += float(segment[first:last - 1].sum())
        previous = np.vstack([HOME, points[ends[:-1] - 1]])
        gap = points[starts] - previous
        for length in np.hypot(gap[:, 0], gap[:, 1]).tolist():
            pen_up += length
        position = points[-1]
    else:
        position = HOME
    pen_up += float(np.hypot(*(HOME - position)))
    return DrawingStats(layers=len(drawing.layers), paths=paths,
                        pen_down_mm=pen_down, pen_up_mm=pen_up)


def preview(drawing: Drawing, max_points: int) -> dict:
    """The drawing as plain lists for a dashboard, at most `max_points` points, 0.01 mm.

    Every path keeps its two ends and an even sample of its inner points. When
    even two points per path would exceed the budget, the shortest paths are
    left out (a preview, not the plot).
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points!r}")
    everything = [(index, number, path) for index, layer in enumerate(drawing.layers)
                  for number, path in enumerate(layer.paths)]
    total = sum(len(path) for _, _, path in everything)
    budgets: dict[tuple[int, int], int] = {}
    if total <= max_points:
        budgets = {(index, number): len(path) for index, number, path in everything}
    else:
        share = max_points / total
        # Longest paths first, so that any left out are the least visible.
        by_length = sorted(everything, key=lambda item: -path_length(item[2]))
        used = 0
        for index, number, path in by_length:
            budget = min(len(path), max(2, math.floor(len(path) * share)))
            if used + budget > max_points:
                budget = max_points - used
                if budget < 2:
                    break
            budgets[(index, number)] = budget
            used += budget
    layers = []
    for index, layer in enumerate(drawing.layers):
        paths = []
        for number, path in enumerate(layer.paths):
            budget = budgets.get((index, number))
            if budget is None:
                continue
            if budget < len(path):
                keep = np.unique(np.linspace(0, len(path) - 1, budget).round().astype(int))
                path = path[keep]
            paths.append(np.round(path, 2).tolist())
        layers.append({"name": layer.name, "paths": paths})
    return {"width_mm": round(drawing.width_mm, 2), "height_mm": round(drawing.height_mm, 2),
            "layers": layers}
