"""A connected plotter, as the job runner uses it: moves, pen, idle, steps, button, home.

Wraps an EBBProtocol whose handshake is done, with the pen timings and the
microstepping of the plot settings. Every method returns a Deferred.
"""

from __future__ import annotations

from twisted.internet import defer, task

from vfab.config import DeviceConfig
from vfab.plotter.ebb import QE_FIRMWARE, EBBProtocol, command_name
from vfab.plotter.errors import EBBError
from vfab.plotter.kinematics import steps_per_mm
from vfab.plotter.pen import PenServo

#: Firmware that has LM (low-level moves with acceleration).
LM_FIRMWARE = (2, 7, 0)
#: Firmware that has HM (home move).
HM_FIRMWARE = (2, 6, 2)
#: While a move is held back from a deep FIFO, how often the board is asked
#: whether it already ran dry (host seconds): at first, and again after it did;
#: each time it had not, half as often, down to the slowest.
HOLD_POLL_S = 0.02
HOLD_POLL_SLOWEST_S = 0.32
#: A shorter hold is no hold (and a clock's rounding cannot make it endless).
HOLD_MIN_S = 0.001
#: Commands a plan may stream through `send_move`.
PLAN_COMMANDS = frozenset({"LM", "LT", "SM", "XM", "HM", "SP"})
#: SM limits: steps per command and step rates (steps per second).
_SM_MAX_STEPS = 16777215
_SM_MAX_RATE = 25000.0
_SM_MIN_RATE = 1.31
_SM_MAX_MS = 16777215


class Plotter:
    """The runner's handle on a connected plotter; None-safe callers check `connected`."""

    def __init__(self, protocol: EBBProtocol, config: DeviceConfig):
        self.protocol = protocol
        self.config = config
        self.servo = PenServo.from_config(config)
        self.pen_is_up = True
        #: Board seconds per host second: the virtual plotter may run faster, and
        #: so may a board emulated by a test rig (learnt in `_hold_back`).
        self._time_factor = config.simulator_speed if config.type == "simulator" else 1.0
        #: When (host clock) the motion sent so far will have been executed.
        self._queued_until = 0.0
        #: Since when (host clock) the board has had `_batch_seconds` of motion to run,
        #: having had none before: how fast it runs, once it is idle again.
        self._batch_since: float | None = None
        self._batch_seconds = 0.0
        self._poll_interval = HOLD_POLL_S

    @property
    def connected(self) -> bool:
        return not self.protocol.lost

    @property
    def firmware_version(self) -> tuple[int, int, int] | None:
        return self.protocol.firmware_version

    @property
    def supports_lm(self) -> bool:
        return self.firmware_version is not None and self.firmware_version >= LM_FIRMWARE

    @property
    def supports_hm(self) -> bool:
        return self.firmware_version is not None and self.firmware_version >= HM_FIRMWARE

    @property
    def unconfirmed_moves(self) -> int:
        """Moves the board may have taken without executing them yet: the one
        running and those waiting in its motion FIFO."""
        return self.protocol.fifo_depth + 1

    @property
    def microstepping(self) -> int:
        return self.config.microstepping

    def send_move(self, command_text: str, seconds: float = 0.0) -> defer.Deferred:
        """Stream one ready motion line (LM/SM/XM/HM/SP) that takes the board `seconds`;
        fires when the board's FIFO took it.

        A one-deep FIFO (2.x) holds the line back by itself. A deep one (3.x)
        would take many seconds of motion, so the line waits while more than
        `motion_queue` seconds of motion are ahead of it (less its own time,
        but never less than a third of that), and a pause or cancel still acts
        within about `motion_queue` seconds.
        """
        name = command_name(command_text)
        if name not in PLAN_COMMANDS:
            return defer.fail(ValueError(f"not a motion command: {command_text!r}"))
        if name == "SP":
            self.pen_is_up = command_text.split(",")[1].strip() == "1"
        if self._wait_before(seconds) > 0:
            sending = self._hold_back(seconds)
            sending.addCallback(lambda _: self.protocol.command(command_text))
        else:
            sending = self.protocol.command(command_text)
        return sending.addCallback(self._taken, seconds)

    @defer.inlineCallbacks
    def _hold_back(self, seconds: float):
        """Wait until a move of `seconds` may join a deep FIFO: by the plan's times,
        or as soon as the board is idle. A board idle before its time runs faster
        than planned: it ran the batch in at most the time since it began, so
        that speed (a lower bound of its own) is the pace from now on."""
        clock = self.protocol.clock
        while True:
            yield task.deferLater(clock, min(self._wait_before(seconds), self._poll_interval))
            if self._wait_before(seconds) <= 0:
                return None
            status = yield self.protocol.query_motion()
            if not status.idle:
                self._poll_interval = min(HOLD_POLL_SLOWEST_S, self._poll_interval * 2)
            else:
                self._poll_interval = HOLD_POLL_S
                now = clock.seconds()
                if self._batch_since is not None and now > self._batch_since:
                    self._time_factor = max(self._time_factor,
                                            self._batch_seconds / (now - self._batch_since))
                self._queued_until = now
                self._batch_since = None
                return None

    def _wait_before(self, seconds: float) -> float:
        """Host seconds to wait before a move of `seconds` may join a deep FIFO."""
        if self.protocol.fifo_depth <= 1:
            return 0.0
        budget = self.config.motion_queue
        allowed = max(budget - seconds, budget / 3.0)
        ahead = (self._queued_until - self.protocol.clock.seconds()) * self._time_factor
        wait = (ahead - allowed) / self._time_factor
        return wait if wait >= HOLD_MIN_S else 0.0

    def _taken(self, lines: list[str], seconds: float) -> list[str]:
        now = self.protocol.clock.seconds()
        if self._batch_since is None or self._queued_until < now:
            self._batch_since, self._batch_seconds = now, 0.0
        self._batch_seconds += seconds
        self._queued_until = max(self._queued_until, now) + seconds / self._time_factor
        return lines

    def configure_pen(self, config: DeviceConfig) -> defer.Deferred:
        """Set the pen servo's heights and rates from `config` (the pen must be up)."""
        self.servo = PenServo.from_config(config)
        return self.protocol.configure_pen(config)

    def pen_up(self) -> defer.Deferred:
        """Raise the pen; the following moves wait until it is up."""
        self.pen_is_up = True
        return self.protocol.pen(True, self.servo.raise_ms)

    def pen_down(self) -> defer.Deferred:
        """Lower the pen; the following moves wait until it is down."""
        self.pen_is_up = False
        return self.protocol.pen(False, self.servo.lower_ms)

    def wait_idle(self, poll_interval: float = 0.05,
                  max_wait: float | None = None) -> defer.Deferred:
        """Fires when every accepted move has been executed."""
        return self.protocol.wait_idle(poll_interval, max_wait)

    def query_steps(self) -> defer.Deferred:
        """Fires with the (motor1, motor2) step counters; (0, 0) is home."""
        return self.protocol.query_steps()

    def button_pressed(self) -> defer.Deferred:
        """Fires True if the PRG button was pressed since the last check."""
        return self.protocol.query_button()

    def motors_on(self) -> defer.Deferred:
        """Energise the motors; the board zeroes its counters, so where the carriage is is home."""
        return self.protocol.enable_motors(self.microstepping)

    @defer.inlineCallbacks
    def ensure_motors_on(self):
        """Energise the motors unless they already are; fires True when they were, so that
        the board's step counters (where the carriage is) are still valid."""
        kept = yield motors_kept(self.protocol, self.microstepping)
        if not kept:
            yield self.motors_on()
        return kept

    def motors_off(self) -> defer.Deferred:
        return self.protocol.disable_motors()

    @defer.inlineCallbacks
    def home(self, speed: float):
        """Raise the pen and return to home (step counters 0, 0) at `speed` mm/s; fires when there."""
        if not self.pen_is_up:
            yield self.pen_up()
        frequency = speed * steps_per_mm(self.microstepping)
        if self.supports_hm:
            yield self.protocol.move(f"HM,{int(max(2, min(25000, round(frequency))))}")
        else:
            yield self.protocol.wait_idle()
            steps = yield self.protocol.query_steps()
            for line in _sm_moves_back(steps, frequency):
                yield self.protocol.move(line)
        yield self.protocol.wait_idle()


@defer.inlineCallbacks
def motors_kept(protocol: EBBProtocol, microstepping: int):
    """Fires True when the motors are on at `microstepping`: the board kept power and
    its step counters. Firmware before QE (2.8.0) says it through the layer mark
    vfab sets whenever it turns the motors on (see EBBProtocol.power_kept)."""
    if protocol.firmware_version is None:
        return False
    try:
        if protocol.firmware_version < QE_FIRMWARE:
            kept = yield protocol.power_kept()
            return kept
        motors = yield protocol.query_motors()
    except EBBError:
        return False
    return motors == (microstepping, microstepping)


def _sm_moves_back(steps: tuple[int, int], frequency: float) -> list[str]:
    """SM lines that undo `steps` at most `frequency` steps/s, within SM's limits."""
    remaining = [-steps[0], -steps[1]]
    frequency = max(2.0, min(_SM_MAX_RATE, frequency))
    lines = []
    while remaining != [0, 0]:
        largest = max(abs(remaining[0]), abs(remaining[1]))
        chunk = min(largest, _SM_MAX_STEPS, int(frequency * _SM_MAX_MS / 1000))
        part = [int(r * chunk / largest) for r in remaining]
        duration = max(1, round(1000 * chunk / frequency))
        if any(p and abs(p) * 1000 / duration < _SM_MIN_RATE for p in part):
            # The short axis would step too slowly for SM: move the axes one at a time.
            lines += [f"SM,{max(1, round(1000 * abs(p) / frequency))},{p if i == 0 else 0},"
                      f"{p if i == 1 else 0}" for i, p in enumerate(part) if p]
        else:
            lines.append(f"SM,{duration},{part[0]},{part[1]}")
        remaining = [r - p for r, p in zip(remaining, part)]
    return lines
