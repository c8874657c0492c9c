"""The drawing vfab plots: named layers of polylines in millimetres.

Coordinates are millimetres from the top-left corner of the page, which is the
plotter's home corner: x to the right, y down, as in the SVG.
"""

from __future__ import annotations

import attr
import numpy as np


def _frozen_path(path: np.ndarray) -> np.ndarray:
    """An (N, 2) float64 copy that cannot be changed by accident."""
    array = np.array(path, dtype=np.float64, copy=True).reshape(-1, 2)
    array.flags.writeable = False
    return array


def _frozen_paths(paths) -> tuple[np.ndarray, ...]:
    return tuple(_frozen_path(path) for path in paths)


@attr.s(frozen=True, eq=False, slots=True)
class Layer:
    """One pen: its paths are plotted in order without a pen change."""

    name: str = attr.ib()
    #: Each path an (N, 2) array of x, y in mm with N >= 2.
    paths: tuple[np.ndarray, ...] = attr.ib(converter=_frozen_paths)


@attr.s(frozen=True, eq=False, slots=True)
class Drawing:
    """A whole document: layers in plotting order and the page size in mm."""

    layers: tuple[Layer, ...] = attr.ib(converter=tuple)
    width_mm: float = attr.ib(converter=float)
    height_mm: float = attr.ib(converter=float)

    @property
    def path_count(self) -> int:
        return sum(len(layer.paths) for layer in self.layers)

    @property
    def point_count(self) -> int:
        return sum(len(path) for layer in self.layers for path in layer.paths)

    def bounds(self) -> tuple[float, float, float, float] | None:
        """(min_x, min_y, max_x, max_y) in mm of every drawn point, None if empty."""
        paths = [path for layer in self.layers for path in layer.paths]
        if not paths:
            return None
        # The min and max of all points are those of the paths' mins and maxes.
        points = np.concatenate(paths)
        low = points.min(axis=0)
        high = points.max(axis=0)
        return float(low[0]), float(low[1]), float(high[0]), float(high[1])
