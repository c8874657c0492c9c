"""4. Plot time: vfab's planned duration beside a planner that stops at every corner,
and beside the physical bound.

Why: plot time is what users wait for. The corner-stopping baseline is how
simple host programs move (every segment from rest to rest, at the same speed
and acceleration limits, through vfab's own exact LM timing); the bound is
what no planner can beat: pen-down length at full pen-down speed, pen-up
length at full pen-up speed, and every pen lift and lowering. The issue sets
no target here: the figures are for comparison.

    python benchmarks/bench_plot_time.py
"""

from __future__ import annotations

import numpy as np

import common


def corner_stopping_seconds(prepared, settings) -> float:
    """The same plot with every segment drawn from rest to rest."""
    from vfab.motion.planner import pen_down_limits, plan_moves

    segments = [np.array([a, b]) for layer in prepared.drawing.layers
                for path in layer.paths for a, b in zip(path[:-1], path[1:])]
    moves, _ = plan_moves(segments, pen_down_limits(settings), use_lm=True, tolerance=0.0)
    draw = sum(move.duration_s for group in moves for move in group)
    plan = prepared.plan
    pen = plan.pen_up.duration_s + plan.pen_down.duration_s
    travel = sum(path.travel_s + pen for layer in plan.layers for path in layer.paths)
    return draw + travel + plan.home_s


def bound_seconds(prepared, settings) -> float:
    plan = prepared.plan
    pen = plan.pen_up.duration_s + plan.pen_down.duration_s
    return (prepared.pen_down_mm / settings.speed_pen_down
            + prepared.pen_up_mm / settings.speed_pen_up + prepared.paths * pen)


def main() -> bool:
    from vfab.config import DeviceConfig
    from vfab.jobs.prepare import prepare

    settings = DeviceConfig()
    drawings = {
        "scribble (1 path, 2,500 segments)": [common.scribble(2500)],
        "random walks (10,000 segments)": common.random_walks(10_000),
        "hatching": common.hatching(),
        "small circles": common.small_circles(),
    }
    rows = []
    for name, paths in drawings.items():
        prepared = prepare(common.svg_of(paths), settings)
        planned = prepared.plan.estimated_seconds
        stopping = corner_stopping_seconds(prepared, settings)
        bound = bound_seconds(prepared, settings)
        rows.append([name, planned, stopping, f"{stopping / planned:.2f}x", bound,
                     f"{planned / bound:.2f}x"])
    print("Plot time (default settings: 50 mm/s down, 150 mm/s up, 1000/2000 mm/s², "
          "cornering 0.05 mm)")
    print(common.table(["drawing", "vfab s", "stop at corners s", "stops / vfab",
                        "physical bound s", "vfab / bound"], rows))
    return True


if __name__ == "__main__":
    main()
