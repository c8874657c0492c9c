"""A connected plotter, as the job runner uses it: moves, pen, idle, steps, button, home.

Wraps an EBBProtocol whose handshake is done, with the pen timings and the
microstepping of the plot settings. Every method returns a Deferred.
"""

from __future__ import annotations

from twisted.internet import defer

from vfab.config import DeviceConfig
from vfab.plotter.ebb import EBBProtocol, command_name
from vfab.plotter.errors import EBBError
from vfab.plotter.kinematics import steps_per_mm
from vfab.plotter.pen import PenServo

#: Firmware that has LM (low-level moves with acceleration).
LM_FIRMWARE = (2, 7, 0)
#: Firmware that has HM (home move).
HM_FIRMWARE = (2, 6, 2)
#: Firmware that answers QE (motor enables and microstepping).
QE_FIRMWARE = (2, 8, 0)
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
        running and the one waiting in its one-deep motion FIFO."""
        return 2

    @property
    def microstepping(self) -> int:
        return self.config.microstepping

    def send_move(self, command_text: str) -> defer.Deferred:
        """Stream one ready motion line (LM/SM/XM/HM/SP); fires when the board's FIFO took it."""
        name = command_name(command_text)
        if name not in PLAN_COMMANDS:
            return defer.fail(ValueError(f"not a motion command: {command_text!r}"))
        if name == "SP":
            self.pen_is_up = command_text.split(",")[1].strip() == "1"
        return self.protocol.command(command_text)

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
    its step counters. Firmware before QE (2.8.0) cannot say, so that is False."""
    if protocol.firmware_version is None or protocol.firmware_version < QE_FIRMWARE:
        return False
    try:
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
