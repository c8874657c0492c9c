"""The virtual plotter: an EBB (AxiDraw controller) emulator that users can test against.

Pieces: `EBBEmulator` (the board, bytes in and out, on a clock), `Recording`
(what it drew, written as strokes.json, drawing.svg, drawing.png),
`VirtualPlotter` (serves the emulator on a pty) and `LoopbackPort` (connects
a protocol to it in memory, for tests). `python -m vfab.simulator` runs it.
"""

from vfab.simulator.core import EBBEmulator, Faults
from vfab.simulator.loopback import LoopbackPort
from vfab.simulator.pty_port import VirtualPlotter
from vfab.simulator.recording import Recording, RecordWriter

__all__ = ["EBBEmulator", "Faults", "LoopbackPort", "Recording", "VirtualPlotter",
           "start_virtual_plotter"]


def start_virtual_plotter(reactor, *, speed: float = 1.0, record_dir=None, link=None,
                          faults: Faults | None = None,
                          page_mm: tuple[float, float] | None = None,
                          firmware: str = "2.8.1", **board) -> VirtualPlotter:
    """Start a virtual plotter on a pty in `reactor`; its `.path` is the device to open.
    `board`: the CU settings another program left (see EBBEmulator)."""
    emulator = EBBEmulator(reactor, speed=speed, recording=Recording(page_mm),
                           record_dir=record_dir, faults=faults, firmware_version=firmware,
                           **board)
    if record_dir is not None:
        # Off the reactor: in the daemon's own process a long record would stall the plot.
        emulator.record_writer = RecordWriter(record_dir, reactor.callInThread)
    plotter = VirtualPlotter(reactor, emulator, link=link)
    plotter.start()
    return plotter
