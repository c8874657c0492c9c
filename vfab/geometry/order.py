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


#: Entries whose neighbours are looked up ahead, all at once, need at most this
#: many (a closed path of many vertices is looked up when it is left).
_AHEAD_K = 64


class _EntryIndex:
    """Nearest entry of an unused path; the tree is rebuilt once most of its entries are used.

    Entries are points where a path may start: both ends of an open path,
    every vertex of a closed one. `vertex` is where the path is entered.

    The pen leaves a path at one of its own entries (an open path's other end,
    a closed path's entry), so the query made after taking a path is known
    before the walk begins: it is made for every entry at once, in one call
    into the tree, when the tree is built (the same query, with the same k,
    so the same answer), and the walk only looks its answer up.
    """

    def __init__(self, paths: tuple[np.ndarray, ...]):
        sizes = np.fromiter(map(len, paths), dtype=np.int64, count=len(paths))
        joined = np.concatenate(paths)
        offsets = np.cumsum(sizes) - sizes
        closed = (sizes > 3) & np.all(joined[offsets] == joined[offsets + sizes - 1], axis=1)
        self.closed = closed.tolist()
        # Open paths: entries at the first and last point. Closed: every vertex but the repeat.
        counts = self.counts = np.where(closed, sizes - 1, 2)
        self.owner = np.repeat(np.arange(len(paths)), counts)
        first = np.cumsum(counts) - counts
        rank = np.arange(len(self.owner)) - np.repeat(first, counts)
        self.vertex = np.where(closed[self.owner], rank, rank * (sizes[self.owner] - 1))
        self.points = joined[offsets[self.owner] + self.vertex]
        entries = np.arange(len(self.owner))
        # Where the pen stands once the path is drawn from this entry: the same
        # entry of a closed path, the other end of an open one.
        self.exit = np.where(closed[self.owner], entries,
                             np.where(self.vertex == 0, entries + 1, entries - 1))
        self.unused = np.ones(len(paths), dtype=bool)
        # Python lists of the same, for the per-path loop (numpy is slow on scalars).
        self.unused_list = [True] * len(paths)
        self.owner_list = self.owner.tolist()
        self.vertex_list = self.vertex.tolist()
        self.counts_list = counts.tolist()
        self.exit_list = self.exit.tolist()
        self.last_count = 0
        #: The entry the pen stands on (None before the first path).
        self.standing: int | None = None
        self._build(entries)

    def _build(self, ids: np.ndarray) -> None:
        self.ids = ids
        self.ids_list = ids.tolist()
        self.live = len(ids)
        self.tree = cKDTree(self.points[ids])
        self._look_ahead(ids)

    def _look_ahead(self, ids: np.ndarray) -> None:
        """The query take_nearest makes after a path left at each of `ids`, made now
        for all of them, grouped by its k: entry e's answer is row
        `_ahead_row[e]` of group `_ahead_group[e]` (-1: none made)."""
        self._ahead: list[tuple[np.ndarray, np.ndarray]] = []
        self._ahead_group = np.full(len(self.owner), -1, dtype=np.int64)
        self._ahead_row = np.zeros(len(self.owner), dtype=np.int64)
        k = np.minimum(4 + self.counts[self.owner[ids]], len(ids))
        for value in np.unique(k[k <= _AHEAD_K]).tolist():
            chosen = ids[k == value]
            distances, found = self.tree.query(self.points[chosen], k=value)
            if value == 1:
                distances, found = distances[:, None], found[:, None]
            self._ahead_group[chosen] = len(self._ahead)
            self._ahead_row[chosen] = np.arange(len(chosen))
            self._ahead.append((distances, found))

    def take_nearest(self, position: np.ndarray) -> tuple[int, int, float]:
        """(path index, vertex to enter at, distance) of the unused entry nearest
        `position`, which is where the last path taken ends (or, for the first,
        anywhere)."""
        # The pen stands on the path just taken: look past its entries at once.
        k = 4 + self.last_count
        group = -1 if self.standing is None else int(self._ahead_group[self.standing])
        while True:
            k = min(k, len(self.ids))
            if group >= 0:
                row = int(self._ahead_row[self.standing])
                distances = self._ahead[group][0][row].tolist()
                found = self._ahead[group][1][row].tolist()
                group = -1
            else:
                distances, found = self.tree.query(position, k=k)
                if k == 1:
                    distances, found = [distances], [found]
                else:
                    distances, found = distances.tolist(), found.tolist()
            owners = self.owner_list
            unused = self.unused_list
            for distance, index in zip(distances, found):
                entry = self.ids_list[index]
                if unused[owners[entry]]:
                    break
            else:
                k *= 4
                continue
            distance = float(distance)
            break
        path = self.owner_list[entry]
        self.unused[path] = False
        self.unused_list[path] = False
        self.last_count = self.counts_list[path]
        self.standing = self.exit_list[entry]
        self.live -= self.last_count
        if self.live and 4 * self.live < len(self.ids):
            self._build(self.ids[self.unused[self.owner[self.ids]]])
        return path, self.vertex_list[entry], distance


def _entered_at(path: np.ndarray, vertex: int, closed: bool | None = None) -> np.ndarray:
    """`path` drawn from its `vertex`: reversed for an open path's last point, rotated if closed."""
    if vertex == 0:
        return path
    if closed is None:
        closed = bool(np.all(path[0] == path[-1])) and len(path) > 3
    if closed:
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
        path = _entered_at(paths[number], vertex, index.closed[number])
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
