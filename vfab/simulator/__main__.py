"""`python -m vfab.simulator`: run the virtual plotter on a pty until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import signal
import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from vfab.simulator import Faults, start_virtual_plotter


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vfab.simulator",
        description="A virtual AxiDraw (EBB firmware 2.8.1 or 3.0.3) on a pseudo-terminal.")
    parser.add_argument("--firmware", choices=("2.8.1", "3.0.3"), default="2.8.1",
                        help="the firmware to emulate (default 2.8.1)")
    parser.add_argument("--future-syntax", action="store_true",
                        help="3.x: left in future syntax mode by other software (CU,10,1)")
    parser.add_argument("--fifo-depth", type=int, default=1, metavar="N",
                        help="3.x: the motion FIFO depth other software left (CU,4,N)")
    parser.add_argument("--no-ok", action="store_true",
                        help="left with OK replies off by other software (CU,1,0)")
    parser.add_argument("--link", help="keep a symlink at this path pointing to the pty")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="time factor: 10 runs moves ten times faster (default 1)")
    parser.add_argument("--record-dir", help="write strokes.json, drawing.svg and drawing.png "
                        "here on motors-off and at exit")
    parser.add_argument("--drop-after", type=int, metavar="N",
                        help="fault: hang up when command N+1 arrives")
    parser.add_argument("--silent-after", type=int, metavar="N",
                        help="fault: stop answering after N commands")
    parser.add_argument("--error-at", type=int, action="append", default=[], metavar="N",
                        help="fault: answer command N with an error (repeatable)")
    parser.add_argument("--press-button", action="store_true",
                        help="the PRG button was pressed: the first QB answers 1")
    parser.epilog = ("While it runs: SIGUSR1 plugs the cable back in after a drop, SIGUSR2 "
                     "presses the PRG button, SIGHUP resets the board's step counters.")
    args = parser.parse_args(argv)
    if args.speed <= 0:
        parser.error("--speed: expected a positive number")
    if (args.future_syntax or args.fifo_depth != 1) and args.firmware < "3":
        parser.error("--future-syntax and --fifo-depth need --firmware 3.0.3")
    return args


def _control_by_signals(plotter) -> None:
    """Faults a test or a person can cause while it runs: SIGUSR1 plugs the cable
    back in (a new pty at the same link), SIGUSR2 presses the PRG button, SIGHUP
    resets the board (it forgets its step counters)."""
    actions = {signal.SIGUSR1: plotter.replug, signal.SIGUSR2: plotter.emulator.press_button,
               signal.SIGHUP: plotter.emulator.reset_counters}
    for signum, action in actions.items():
        signal.signal(signum, lambda number, frame, action=action:
                      reactor.callFromThread(action))


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)
    faults = Faults(drop_after=args.drop_after, silent_after=args.silent_after,
                    error_at=frozenset(args.error_at), button_pressed=args.press_button)
    plotter = start_virtual_plotter(reactor, speed=args.speed, record_dir=args.record_dir,
                                    link=args.link, faults=faults, firmware=args.firmware,
                                    future_syntax=args.future_syntax,
                                    fifo_depth=args.fifo_depth, ok_replies=not args.no_ok)
    print(plotter.path, flush=True)
    _control_by_signals(plotter)
    reactor.addSystemEventTrigger("before", "shutdown", plotter.stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
