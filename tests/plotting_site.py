"""A plotting site in one process, on a Clock: the emulated board, a real SQLite store
in a temp dir, and the daemon's device service, queue, scheduler and runner.

A site may have several plotters (`plotters=[("left", ("a3",)), ...]`), each
with a board of its own, as a farm on one daemon; `board` is the first one's.

The board outlives the daemon: a "daemon life" can stop gracefully, be killed
(kill -9: it simply stops existing, mid-move, writing nothing more) or lose the
cable, and a new life starts on the same board and database, as on a real
site. Time moves from one scheduled event to the next, exactly, so a plot of
minutes takes milliseconds and nothing depends on timing luck.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import attr
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from vfab.config import DeviceConfig
from vfab.events import EventBus
from vfab.jobs.queue import QueueService
from vfab.plotter.service import DeviceService
from vfab.simulator import EBBEmulator, LoopbackPort
from vfab.store.jobstore import JobStore

SETTINGS = DeviceConfig(type="axidraw", port="/dev/vfab-test", model="V3/A4",
                        shutdown_grace=0.0, progress_save_interval=0.5)


#: More events than this at one instant means something reschedules itself at
#: once for ever: a busy loop that a real reactor would spin on too.
STANDSTILL_EVENTS = 10_000


class LifeClock:
    """One daemon life's view of the site's clock: its calls die with it."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self.alive = True

    def seconds(self) -> float:
        return self._clock.seconds()

    def callLater(self, delay: float, function: Callable, *args: Any, **kwargs: Any):  # noqa: N802
        def call() -> None:
            if self.alive:
                function(*args, **kwargs)
        return self._clock.callLater(delay, call)

    def callFromThread(self, function: Callable, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        if self.alive:
            function(*args, **kwargs)

    def callWhenRunning(self, function: Callable, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        return None  # the store's pool is started by hand (see SynchronousThreads)

    def addSystemEventTrigger(self, *args: Any, **kwargs: Any) -> int:  # noqa: N802
        return 0

    def removeSystemEventTrigger(self, trigger: int) -> None:  # noqa: N802
        return None


class SynchronousThreads:
    """adbapi's thread pool, run in the caller's thread: the store answers at once."""

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def callInThreadWithCallback(self, on_result: Callable, function: Callable,  # noqa: N802
                                 *args: Any, **kwargs: Any) -> None:
        try:
            result = function(*args, **kwargs)
        except Exception:  # the interaction's error goes back to its Deferred
            on_result(False, Failure())
        else:
            on_result(True, result)


def open_store(path: Path, clock: LifeClock) -> JobStore:
    store = JobStore(path, reactor=clock)
    store.open()
    pool = store._pool
    pool.threadpool = SynchronousThreads()
    pool._start()
    return store


class InProcessPlanning:
    """The planning child's work, done in-process (the child is tested on its own)."""

    def run(self, function: Callable, *args: Any) -> Deferred:
        return maybeDeferred(function, *args)

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None


@attr.s(auto_attribs=True)
class Life:
    clock: LifeClock
    store: JobStore
    device: DeviceService
    queue: QueueService
    bus: EventBus
    ports: list = attr.Factory(list)
    #: Every plotter's device service, by name (the first is `device`).
    devices: dict = attr.Factory(dict)


class Site:
    """The board and the database that stay; daemon lives that come and go."""

    def __init__(self, tmp_path: Path, settings: DeviceConfig = SETTINGS, *,
                 firmware: str = "2.8.1",
                 plotters: Sequence[tuple[str, tuple[str, ...]]] | None = None, **board: Any):
        """`board`: the state other software left the board in (EBBEmulator's options);
        `plotters`: (name, tags) of each plotter, default one named after the host."""
        self.clock = Clock()
        self.settings = settings
        self.database = tmp_path / "vfab.db"
        self.jobs_dir = tmp_path / "jobs"
        self.plotters = list(plotters or [(None, ())])
        self.boards = {name: EBBEmulator(self.clock, firmware_version=firmware, **board)
                       for name, _ in self.plotters}
        self.board = next(iter(self.boards.values()))
        self.messages: list[tuple[str, dict]] = []
        self.life: Life | None = None
        self.start()

    # -- daemon lives ------------------------------------------------------------

    def start(self) -> Life:
        clock = LifeClock(self.clock)
        bus = EventBus()
        bus.subscribe(lambda channel, message: self.messages.append((channel, message)))
        store = open_store(self.database, clock)
        life_ports: list = []

        def port_opener(board: EBBEmulator) -> Callable:
            def open_port(protocol: Any, path: str, reactor: Any, baud: int) -> None:
                if not clock.alive:
                    raise OSError("this daemon is gone")
                life_ports.append(LoopbackPort(protocol, board, clock))
            return open_port

        devices = [DeviceService(self.settings, bus, clock, port_opener=port_opener(board),
                                 retry_policy=lambda attempt: 0.5, plotter=name, tags=tags)
                   for (name, tags), board in zip(self.plotters, self.boards.values())]
        queue = QueueService(store=store, devices=devices, bus=bus,
                             jobs_dir=self.jobs_dir, reactor=clock,
                             planning=InProcessPlanning())
        for device in devices:
            device.startService()
        queue.startService()
        self.life = Life(clock, store, devices[0], queue, bus, life_ports,
                         {device.plotter_name: device for device in devices})
        return self.life

    def stop(self) -> None:
        """SIGTERM: the daemon stops in order (queue, device, database)."""
        life = self.life
        self.settle(life.queue.stopService())
        for device in life.devices.values():
            self.settle(device.stopService())
        life.store.close()
        life.clock.alive = False
        self.life = None

    def kill(self) -> None:
        """kill -9: the daemon is gone at once; the board finishes what it took."""
        life = self.life
        life.clock.alive = False
        for port in life.ports:
            port.connected = False  # no goodbye: the protocol never hears of it
        life.store.close()
        self.life = None

    def pull_cable(self) -> None:
        """The USB cable is pulled and put back: the board keeps power."""
        self.board.drop()

    def power_cut(self) -> None:
        """The plotter loses power and comes back; its operator pushes the carriage
        home, as the daemon's alert asks."""
        self.board.power_cut()
        self.board.move_home_by_hand()

    # -- time --------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass, event by event."""
        self.advance_to(self.clock.seconds() + seconds)

    def advance_to(self, when: float) -> None:
        clock = self.clock
        at_this_instant = 0
        while clock.calls and clock.calls[0].getTime() <= when:
            step = max(0.0, clock.calls[0].getTime() - clock.seconds())
            at_this_instant = at_this_instant + 1 if step == 0.0 else 0
            if at_this_instant > STANDSTILL_EVENTS:
                raise AssertionError(f"time stands still at {clock.seconds()}: "
                                     f"the next call is {clock.calls[0]}")
            clock.advance(step)
        clock.advance(max(0.0, when - clock.seconds()))

    def settle(self, deferred: Deferred, limit: float = 3600.0) -> Any:
        """Let time pass until `deferred` fires (at most `limit` s); return its result."""
        results: list = []
        deferred.addBoth(results.append)
        deadline = self.clock.seconds() + limit
        while not results and self.clock.seconds() < deadline:
            if not self.clock.calls:
                break
            self.advance_to(min(deadline, self.clock.calls[0].getTime()))
        assert results, "the Deferred never fired"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def wait_for(self, condition: Callable[[], bool], limit: float = 600.0,
                 step: float = 0.05) -> None:
        deadline = self.clock.seconds() + limit
        while not condition():
            assert self.clock.seconds() < deadline, "the condition never held"
            self.advance(step)

    # -- what a person sees -----------------------------------------------------

    def job(self, job_id: str) -> dict:
        return self.settle(self.life.queue.get(job_id))

    def state(self, job_id: str) -> str:
        return self.job(job_id)["state"]

    def submit(self, svg: bytes, name: str = "job", **farm: Any) -> str:
        """Queue a drawing; `farm`: the `plotter` it asks for and the `tags` it requires."""
        return self.settle(self.life.queue.submit(name, svg, **farm))["id"]

    @property
    def strokes(self) -> list:
        return self.strokes_of(self.board)

    def strokes_of(self, board: EBBEmulator) -> list:
        """What a board drew: one array of points per stroke."""
        import numpy as np
        return [np.asarray(stroke) for stroke in board.recording.strokes
                if len(stroke) > 1]
