"""3. Path order: pen-up travel after vfab's ordering, beside vpype's linesort.

Why: on drawings of many short strokes the pen spends more time travelling
with the pen up than drawing; ordering is the cheapest plot time there is.
Pen-up travel is measured the same way for every order: from home through
every path in order and back home (vfab.geometry.drawing_stats), with the
number of pen lifts (paths after merging).

Target: vfab no worse than the best vpype pipeline on every drawing, and at
least 10% less on one.

    python benchmarks/bench_order.py
"""

from __future__ import annotations

import time

import numpy as np
import vpype
import vpype_cli

import common

MERGE_TOLERANCE_MM = 0.05


def drawing_of(paths):
    from vfab.geometry import Drawing, Layer
    return Drawing(layers=(Layer(name="1", paths=paths),), width_mm=common.PAGE_MM[0],
                   height_mm=common.PAGE_MM[1])


def vpype_order(paths, pipeline: str) -> list[np.ndarray]:
    document = vpype.Document()
    document.add(vpype.LineCollection([path[:, 0] + 1j * path[:, 1] for path in paths]), 1)
    document = vpype_cli.execute(pipeline, document)
    return [np.column_stack([line.real, line.imag]) for line in document.layers[1]]


def vfab_order(paths) -> list[np.ndarray]:
    from vfab.geometry import optimize
    return list(optimize(drawing_of(paths), MERGE_TOLERANCE_MM).layers[0].paths)


def measure(paths, order) -> tuple[float, int, float]:
    """(pen-up mm, pen lifts, seconds) of one ordering."""
    from vfab.geometry import drawing_stats
    started = time.perf_counter()
    ordered = order(paths)
    seconds = time.perf_counter() - started
    stats = drawing_stats(drawing_of(ordered))
    return stats.pen_up_mm, stats.paths, seconds


def main() -> bool:
    drawings = {"hatching": common.hatching(), "random lines": common.random_lines(),
                "small circles": common.small_circles()}
    orders = {
        "file order": lambda paths: paths,
        "vpype linesort": lambda paths: vpype_order(paths, "linesort"),
        "vpype linemerge+linesort": lambda paths: vpype_order(
            paths, f"linemerge -t {MERGE_TOLERANCE_MM}mm linesort"),
        "vfab optimize": vfab_order,
    }
    rows, worst, best = [], 0.0, float("inf")
    for drawing, paths in drawings.items():
        results = {name: measure(paths, order) for name, order in orders.items()}
        vpype_best = min(results[name][0] for name in orders if name.startswith("vpype"))
        ratio = results["vfab optimize"][0] / vpype_best
        worst, best = max(worst, ratio), min(best, ratio)
        for name, (pen_up, lifts, seconds) in results.items():
            rows.append([drawing, name, pen_up, lifts, 1000 * seconds,
                         f"{pen_up / vpype_best:.3f}"])
    print("Path order: pen-up travel (home -> paths -> home), ratio to the best vpype order")
    print(common.table(["drawing", "order", "pen-up mm", "pen lifts", "ms", "vs best vpype"],
                       rows))
    met = worst <= 1.0 and best <= 0.9
    print(common.verdict("3 order no worse than vpype on all, 10% less on one", met,
                         f"vfab / best vpype: worst {worst:.3f}, best {best:.3f}"))
    return met


if __name__ == "__main__":
    main()
