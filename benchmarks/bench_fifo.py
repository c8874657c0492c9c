"""9. A deep FIFO (EBB 3.x) against a busy host.

Why: with one move in flight, a 2 ms round trip and a few milliseconds of host
hiccup empty the FIFO, and the pen stops on the paper (a blot). On 3.x vfab
keeps about `motion_queue` seconds of motion queued instead.

The virtual plotter (exact firmware timing, real time) behind a LoopbackPort
with a 2 ms round trip; the drawing is one long scribble of short segments
(median move 6 ms). While PlotRunner plots it, the reactor is blocked for
30 ms every 500 ms (a host stall: a garbage collection, a slow disk, another
process). Firmware 3.0.3 (deep FIFO) and 2.8.1 (one deep) side by side.

Targets (3.0.3): no starvation with the pen down, plot time within 1% of the
board's own motion time (the plan, plus the pen lifts and the way home, as the
emulator ran them: what is over is time the host kept the board waiting). 2.8.1 is reported beside it: it cannot meet them, which is the point.

    python benchmarks/bench_fifo.py [--segments 2500] [--stall-ms 30] [--every-ms 500]
"""

from __future__ import annotations

import argparse
import time

from twisted.internet import defer, task

import common
from bench_feeding import ROUND_TRIP_S, TARGET_OVERRUN, vfab_plot
from virtual import connect


def stall(seconds: float) -> None:
    """Block the reactor, as a busy host does."""
    time.sleep(seconds)


@defer.inlineCallbacks
def measure(reactor, firmware: str, plan, settings, options):
    plotter, emulator = yield connect(reactor, settings, round_trip=ROUND_TRIP_S,
                                      firmware=firmware)
    depth = plotter.protocol.fifo_depth
    stalls = task.LoopingCall(stall, options.stall_ms / 1000.0)
    stalls.clock = reactor
    stalls.start(options.every_ms / 1000.0, now=False)
    started = reactor.seconds()
    yield vfab_plot(reactor, plotter, plan, settings)
    seconds = reactor.seconds() - started
    stalls.stop()
    yield plotter.protocol.disable_motors()
    yield plotter.protocol.release()
    starved = emulator.recording.starvations
    # The board's own motion time: the plan, the pen lifts and the way home.
    motion = emulator.recording.motion_seconds
    return {"firmware": firmware, "depth": depth, "planned": plan.estimated_seconds,
            "motion": motion, "seconds": seconds, "overrun": seconds / motion - 1.0,
            "starvations": len(starved),
            "starved_s": sum(record["gap_seconds"] for record in starved)}


@defer.inlineCallbacks
def run(reactor, options):
    from vfab.config import DeviceConfig
    from vfab.jobs.prepare import prepare

    settings = DeviceConfig()
    plan = prepare(common.svg_of([common.scribble(options.segments)]), settings).plan
    results = []
    for firmware in ("3.0.3", "2.8.1"):
        results.append((yield measure(reactor, firmware, plan, settings, options)))
    print(f"Deep FIFO: one {options.segments:,}-segment scribble, "
          f"{1000 * ROUND_TRIP_S:g} ms round trip, a {options.stall_ms:g} ms host stall "
          f"every {options.every_ms:g} ms, motion_queue {settings.motion_queue:g} s")
    print(common.table(
        ["firmware", "FIFO depth", "planned s", "board motion s", "plot s",
         "vs motion", "starvations", "starved s"],
        [[r["firmware"], r["depth"], r["planned"], r["motion"], r["seconds"],
          f"{100 * r['overrun']:+.2f}%", r["starvations"], r["starved_s"]]
         for r in results]))
    deep = results[0]
    met = deep["overrun"] <= TARGET_OVERRUN and deep["starvations"] == 0
    print(common.verdict("9 deep FIFO (3.0.3) under host stalls", met,
                         f"{100 * deep['overrun']:+.2f}% vs the board's motion time, "
                         f"{deep['starvations']} starvations with the pen down "
                         f"(2.8.1 beside it: {results[1]['starvations']})"))
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=2500)
    parser.add_argument("--stall-ms", type=float, default=30.0)
    parser.add_argument("--every-ms", type=float, default=500.0)
    options = parser.parse_args()
    task.react(lambda reactor: run(reactor, options).addCallback(lambda _: None))


if __name__ == "__main__":
    main()
