"""10. The trail check: reactor time the runner spends before each move.

Why: before every move, on the reactor, the runner asks its Trail whether the
move would pass a point the carriage passed since the last save (then it saves
first, so that a lost board's counters say unambiguously how far it got). A
check that costs a tenth of a millisecond is seconds of reactor time per big
plot, taken from the WebSocket, the HTTP API and the feeding of the board.

The moves are those of real plans (pen-down and travel moves, as the runner
sends them). Beside the Trail, the same decisions made by measuring every
segment of the trail exactly (no bounding boxes): the decisions must agree.
The figure of the implementation before this benchmark existed (every segment
measured with numpy, commit 5771cdb) was 210 us per move on the random walk.

Target: under 25 us per move on every drawing.

    python benchmarks/bench_trail.py
"""

from __future__ import annotations

import time

import common

TARGET_US = 25.0


def moves_of(paths) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(from, to) motor steps of each move of the plan, in the order they are sent."""
    from vfab.geometry import Drawing, Layer
    from vfab.motion.planner import plan_drawing
    from vfab.config import DeviceConfig

    drawing = Drawing(layers=(Layer(name="1", paths=paths),), width_mm=common.PAGE_MM[0],
                      height_mm=common.PAGE_MM[1])
    plan = plan_drawing(drawing, DeviceConfig())
    moves, here = [], (0, 0)
    for path in plan.layers[0].paths:
        for move in (*path.travel, *path.draw):
            end = (int(move.end_steps[0]), int(move.end_steps[1]))
            moves.append((here, end))
            here = end
    return moves


def every_segment():
    """The baseline: vfab's Trail with its boxes ignored, every segment measured."""
    from vfab.jobs.carriage import Trail

    class EverySegment(Trail):
        def _near(self, count, p0, p1):
            return self._segments[:max(count, 0)].tolist()

    return EverySegment()


def run(trail, moves) -> tuple[float, list[int]]:
    """(us per move, indices of the moves that needed a save first), the trail cut
    at each save as the runner cuts it."""
    saves = []
    started = time.perf_counter()
    for index, (start, end) in enumerate(moves):
        if trail.needs_save_before(start, end):
            saves.append(index)
            trail.saved_at(trail.sent)
        trail.add(start, end)
    return 1e6 * (time.perf_counter() - started) / len(moves), saves


def main() -> bool:
    from vfab.jobs.carriage import Trail

    drawings = {"hatching": common.hatching(), "random lines": common.random_lines(),
                "small circles": common.small_circles(),
                "random walk": common.random_walks(20000)}
    rows, worst, agree = [], 0.0, True
    for name, paths in drawings.items():
        moves = moves_of(paths)
        vfab_us, vfab_saves = run(Trail(), moves)
        base_us, base_saves = run(every_segment(), moves)
        agree = agree and vfab_saves == base_saves
        worst = max(worst, vfab_us)
        rows.append([name, len(moves), len(vfab_saves), vfab_us, base_us,
                     "yes" if vfab_saves == base_saves else "NO"])
    print("Trail check before each move: us per move, Trail beside every segment measured")
    print(common.table(["drawing", "moves", "saves", "Trail us", "every segment us",
                        "same saves"], rows))
    met = agree and worst < TARGET_US
    print(common.verdict(f"10 trail check under {TARGET_US:.0f} us per move", met,
                         f"worst {worst:.1f} us; decisions agree: {agree}"))
    return met


if __name__ == "__main__":
    main()
