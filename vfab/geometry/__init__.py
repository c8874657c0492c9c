"""Geometry: SVG documents read into layers of polylines in millimetres."""

from .drawing import Drawing, Layer
from .errors import OutOfTravel, SVGError
from .order import optimize, order_paths
from .stats import DrawingStats, drawing_stats, preview
from .svg import SVGLimits, load_svg
from .travel import check_travel

__all__ = [
    "Drawing",
    "DrawingStats",
    "Layer",
    "OutOfTravel",
    "SVGError",
    "SVGLimits",
    "check_travel",
    "drawing_stats",
    "load_svg",
    "optimize",
    "order_paths",
    "preview",
]
