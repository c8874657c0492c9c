"""1. Planning: SVG to the full EBB command stream, beside vpype reading the same file.

Why: a job is usable only once planned; planning must cost about what merely
reading the file costs (target: within 2x of vpype's read_svg). Each size runs
in a fresh subprocess, so ru_maxrss is that run's peak memory alone.

    python benchmarks/bench_planning.py [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

TARGET_RATIO = 2.0
SIZES = (10_000, 100_000, 1_000_000)


def command_stream(prepared, settings) -> int:
    """Every EBB command of the plot in order, formatted; returns how many."""
    from vfab.motion import plan_travel

    plan = prepared.plan
    count = 0
    for layer in plan.layers:
        for path in layer.paths:
            for move in (*path.travel, plan.pen_down, *path.draw, plan.pen_up):
                count += len(move.command) > 0
    last = plan.layers[-1].paths[-1].end_mm
    return count + len(plan_travel(last, (0.0, 0.0), settings))


def child(kind: str, svg_file: str) -> None:
    """Run one measurement in this (fresh) process and print it as JSON."""
    data = Path(svg_file).read_bytes()
    if kind == "vpype":
        import vpype
        started = time.perf_counter()
        vpype.read_svg(io.StringIO(data.decode()), quantization=0.05 * common.PX_PER_MM,
                       crop=False)
        commands = 0
    else:
        from vfab.config import DeviceConfig
        from vfab.jobs.prepare import prepare
        settings = DeviceConfig()
        started = time.perf_counter()
        prepared = prepare(data, settings)
        commands = command_stream(prepared, settings)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "commands": commands}))


def measure(kind: str, svg_file: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", kind, str(svg_file)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{kind} failed on {svg_file.name}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SVG"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(*options.child)
        return True
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as directory:
        for segments in (int(size) for size in options.sizes.split(",")):
            svg_file = Path(directory) / f"walks-{segments}.svg"
            svg_file.write_bytes(common.svg_of(common.random_walks(segments)))
            baseline = measure("vpype", svg_file)
            vfab = measure("vfab", svg_file)
            ratio = vfab["seconds"] / baseline["seconds"]
            ratios.append(ratio)
            rows.append([f"{segments:,}", f"{svg_file.stat().st_size / 1e6:.1f}",
                         baseline["seconds"], vfab["seconds"], f"{ratio:.2f}x",
                         f"{segments / vfab['seconds']:,.0f}", vfab["commands"],
                         f"{baseline['peak_mb']:.0f}", f"{vfab['peak_mb']:.0f}"])
    print("Planning: random-walk polylines (10 segments a path), SVG -> every EBB command")
    print(common.table(["segments", "MB", "vpype read s", "vfab plan s", "ratio",
                        "vfab seg/s", "commands", "vpype peak MB", "vfab peak MB"], rows))
    met = all(ratio <= TARGET_RATIO for ratio in ratios)
    print(common.verdict("1 planning within 2x of vpype read", met,
                         "worst " + f"{max(ratios):.2f}x"))
    return met


if __name__ == "__main__":
    main()
