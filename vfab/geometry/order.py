"""Path order: fewer pen lifts and shorter pen-up travel, never a moved point.

Per layer, paths are taken greedily: from the current pen position (home for
the first layer, the end of the previous layer after that) the nearest path
end is drawn next, reversed when its far end is the nearer one. A closed path
(its last point is its first) may be entered at any of its vertices: it is
drawn from the nearest one all the way round, which draws the same segments.
When the entry lies within `merge_tolerance` of where the pen is, the path is
appended to the current one so the pen stays down (a gap of up to the
tolerance is bridged by a short stroke). A KD-tree over the entries keeps
this fast for 100k paths.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .drawing import Drawing, Layer

HOME = (0.0, 0.0)


def optimize(drawing: Drawing, merge_tolerance: float) -> Drawing:
    """The drawing with each layer's paths merged and ordered; layer order is kept."""
    if merge_tolerance < 0:
        raise ValueError(f"merge_tolerance must be >= 0 mm, got {merge_tolerance!r}")
    position = np.array(HOME, dtype=np.float64)
    layers = []
    for layer in drawing.layers:
        paths, position = order_paths(layer.paths, position, merge_tolerance)
        layers.append(Layer(name=layer.name, paths=paths))
    return Drawing(layers=tuple(layers), width_mm=drawing.width_mm, height_mm=drawing.height_mm)


class _EntryIndex:
    """Nearest entry of an unused path; the tree is rebuilt once most of its entries are used.

    Entries are points where a path may start: both ends of an open path,
    every vertex of a closed one. `vertex` is where the path is entered.
    """

    def __init__(self, paths: tuple[np.ndarray, ...]):
        sizes = np.array([len(path) for path in paths])
        closed = np.array([len(path) > 3 and bool(np.all(path[0] == path[-1])) for path in paths])
        # Open paths: entries at the first and last point. Closed: every vertex but the repeat.
        counts = self.counts = np.where(closed, sizes - 1, 2)
        self.owner = np.repeat(np.arange(len(paths)), counts)
        first = np.cumsum(counts) - counts
        rank = np.arange(len(self.owner)) - np.repeat(first, counts)
        self.vertex = np.where(closed[self.owner], rank, rank * (sizes[self.owner] - 1))
        self.points = np.concatenate(
            [path[:-1] if shut else path[[0, -1]] for path, shut in zip(paths, closed)])
        self.unused = np.ones(len(paths), dtype=bool)
        self.last_count = 0
        self._build(np.arange(len(self.owner)))

    def _build(self, ids: np.ndarray) -> None:
        self.ids = ids
        self.live = len(ids)
        self.tree = cKDTree(self.points[ids])

    def take_nearest(self, position: np.ndarray) -> tuple[int, int, float]:
        """(path index, vertex to enter at, distance) of the unused entry nearest `position`."""
        # The pen stands on the path just taken: look past its entries at once.
        k = 4 + self.last_count
        while True:
            k = min(k, len(self.ids))
            distances, found = self.tree.query(position, k=k)
            entries = self.ids[np.atleast_1d(found)]
            usable = np.flatnonzero(self.unused[self.owner[entries]])
            if len(usable):
                entry = int(entries[usable[0]])
                distance = float(np.atleast_1d(distances)[usable[0]])
                break
            k *= 4
        path = int(self.owner[entry])
        self.unused[path] = False
        self.last_count = int(self.counts[path])
        self.live -= self.last_count
        if self.live and 4 * self.live < len(self.ids):
            self._build(self.ids[self.unused[self.owner[self.ids]]])
        return path, int(self.vertex[entry]), distance


def _entered_at(path: np.ndarray, vertex: int) -> np.ndarray:
    """`path` drawn from its `vertex`: reversed for an open path's last point, rotated if closed."""
    if vertex == 0:
        return path
    if np.all(path[0] == path[-1]) and len(path) > 3:
        return np.concatenate([path[vertex:], path[1:vertex + 1]])
    return path[::-1]


def order_paths(paths: tuple[np.ndarray, ...], start: np.ndarray,
                merge_tolerance: float) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Merge and order one layer's paths from `start`; return them and where the pen ends."""
    position = np.asarray(start, dtype=np.float64)
    if not paths:
        return (), position
    index = _EntryIndex(paths)
    ordered: list[np.ndarray] = []
    current: list[np.ndarray] = []
    for _ in range(len(paths)):
        number, vertex, distance = index.take_nearest(position)
        path = _entered_at(paths[number], vertex)
        if current and distance <= merge_tolerance:
            if distance == 0.0:
                path = path[1:]
            current.append(path)
        else:
            if current:
                ordered.append(np.concatenate(current))
            current = [path]
        position = current[-1][-1]
    ordered.append(np.concatenate(current))
    return tuple(ordered), np.array(position, dtype=np.float64)
