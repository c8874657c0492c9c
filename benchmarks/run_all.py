"""Run every benchmark (`make bench`), each in its own process, and sum up the targets.

Why separate processes: each benchmark's memory and threads start clean, and
any one of them can be run alone the same way.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
SCRIPTS = ("bench_planning.py", "bench_feeding.py", "bench_order.py", "bench_plot_time.py",
           "bench_websocket.py", "bench_footprint.py", "bench_fifo.py", "bench_trail.py", "bench_submit.py",
           "bench_big_drawing.py", "bench_farm.py")


def main() -> int:
    print(f"vfab benchmarks on {common.machine()}\n", flush=True)
    started = time.monotonic()
    verdicts, failed = [], []
    for script in SCRIPTS:
        began = time.monotonic()
        result = subprocess.run([sys.executable, str(HERE / script)], cwd=common.ROOT,
                                capture_output=True, text=True)
        print(result.stdout, end="")
        if result.returncode != 0:
            failed.append(script)
            print(result.stderr[-3000:], end="")
        print(f"({script}: {time.monotonic() - began:.0f} s)\n", flush=True)
        verdicts += [line for line in result.stdout.splitlines() if line.startswith("TARGET")]
    print("Summary")
    print("\n".join(verdicts))
    print(f"{len([v for v in verdicts if ': MET' in v])} of {len(verdicts)} targets met; "
          f"all benchmarks took {time.monotonic() - started:.0f} s")
    if failed:
        print(f"benchmarks that crashed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
