"""The EiBotBoard (EBB) serial protocol, as the EBB command reference (firmware 2.x) defines it.

Commands are ASCII lines ending in CR. The board answers each one in one of
three legacy forms: most commands with `OK`; `V`, `QM`, `QG` (and `I`, `A`,
`MR`, `PI`) with a single line and no `OK`; queries such as `QS`, `QP`, `QB`,
`QE` with value line(s) followed by `OK`. An error is a line starting with
`!`. Lines end in CR LF, though some replies end in LF CR: any run of CR/LF
ends a line here.

Exactly one command is in flight: the next is written only once the previous
one is answered, so replies can be matched to commands. Motion commands are
acknowledged when they enter the board's motion FIFO (one deep on 2.x and at
boot on 3.x; `take_over` makes it deeper on 3.x), so streaming them back to
back keeps the FIFO full; how far the host may get ahead is the caller's
choice (see `Plotter.send_move`). The timeout runs from the moment a command
is written, so the `OK` of a motion command held back behind a full FIFO must
come within it: keep the motion a full FIFO holds shorter than the device
timeout. An error line fails its command. Some
firmware sends an `OK` after an error line (the 3.x reference), some does not
(2.x, and the 3.0.3 source): after an error, a `V` is sent and every line up
to its answer (which names the firmware version) is dropped, so that replies
can never go out of step. Lines nobody asked for are logged and dropped.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Callable, Iterable

import attr
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from vfab.config import DeviceConfig
from vfab.plotter.errors import DeviceLost, DeviceTimeout, EBBError
from vfab.plotter.kinematics import microstep_code
from vfab.plotter.pen import PenServo

__all__ = ["EBBProtocol", "MotionStatus", "EBBError", "DeviceLost", "DeviceTimeout",
           "parse_version"]

log = Logger()

#: The FIFO depth vfab asks a 3.x board for; the motion queued is bounded by time.
FIFO_DEPTH = 32
#: A 3.x board's FIFO depth at boot, restored when vfab lets go of it.
BOOT_FIFO_DEPTH = 1
#: Firmware that answers QG (idle, FIFO, pen and PRG button in one query).
QG_FIRMWARE = (2, 6, 2)
#: QE (which motors are on, at what microstepping) exists from this firmware on.
QE_FIRMWARE = (2, 8, 0)
#: The layer value (SL/QL: RAM, 0 at power-up) vfab leaves on a board without QE
#: while its motors are on: found again on a later connection, the board kept
#: power and its step counters since.
POWER_MARK = 101
#: Commands answered by exactly one line and no OK.
ONE_LINE_REPLY = frozenset({"V", "QM", "QG", "I", "A", "MR", "PI"})
#: Commands the board does not answer at all (it drops off the USB).
NO_REPLY = frozenset({"RB"})
#: Commands that go through the motion FIFO and may be streamed with `move`.
MOTION_COMMANDS = frozenset({"LM", "LT", "SM", "XM", "HM", "SP", "TP", "EM"})
#: How long a CU command of the take-over may go unanswered (OK replies may be off).
TAKE_OVER_ANSWER_S = 0.5
#: Longest command the board accepts, without the terminating CR.
MAX_COMMAND_LENGTH = 63

_LINE_END = re.compile(rb"[\r\n]+")
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


@attr.s(frozen=True, auto_attribs=True)
class MotionStatus:
    """The QM reply: what the motion engine is doing now."""

    executing: bool
    motor1_moving: bool
    motor2_moving: bool
    fifo_pending: bool

    @property
    def idle(self) -> bool:
        return not (self.executing or self.motor1_moving or self.motor2_moving
                    or self.fifo_pending)


@attr.s(frozen=True, auto_attribs=True)
class GeneralStatus:
    """The QG reply: the board's status byte."""

    button: bool
    pen_up: bool
    motion: MotionStatus

    @classmethod
    def from_byte(cls, byte: int) -> "GeneralStatus":
        return cls(button=bool(byte & 32), pen_up=bool(byte & 16),
                   motion=MotionStatus(bool(byte & 8), bool(byte & 4), bool(byte & 2),
                                       bool(byte & 1)))


@attr.s(auto_attribs=True, eq=False)
class _Command:
    text: str
    name: str
    deferred: defer.Deferred
    lines: list[str] = attr.ib(factory=list)
    timer: IDelayedCall | None = None
    #: For a command that may go unanswered: done after this many seconds.
    answer_within: float | None = None
    #: The V sent after an error line, to find where the replies stand.
    sentinel: bool = False


def command_name(text: str) -> str:
    """The command's name: its first field, upper case (commands are case-insensitive)."""
    return text.split(",", 1)[0].strip().upper()


def parse_version(line: str) -> tuple[int, int, int]:
    """(2, 8, 1) from "EBBv13_and_above EB Firmware Version 2.8.1"."""
    _, _, tail = line.partition("Version")
    match = _VERSION.search(tail or line)
    if match is None:
        raise ValueError(f"no firmware version in the plotter's answer {line!r}")
    return (int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))


@attr.s(auto_attribs=True)
class SerialCounts:
    """Commands sent and commands that failed (error line or no answer in time),
    kept across reconnects for the metrics."""

    commands: int = 0
    errors: int = 0


class EBBProtocol(Protocol):
    """Talks to one EBB: a queue of commands, one in flight, each with a timeout.

    `on_lost(reason)` is called once when the device is lost: the connection
    closed, or a command timed out (which also closes the connection).
    """

    def __init__(self, clock: IReactorTime, timeout: float = 30.0,
                 on_lost: Callable[[Failure], None] | None = None,
                 counts: "SerialCounts | None" = None):
        self.clock = clock
        self.timeout = timeout
        self.on_lost = on_lost
        self.counts = counts if counts is not None else SerialCounts()
        self.firmware_version: tuple[int, int, int] | None = None
        self.version_text: str | None = None
        self._buffer = b""
        self._current: _Command | None = None
        self._queue: deque[_Command] = deque()
        self._lost: Failure | None = None
        self._lost_waiters: list[defer.Deferred] = []
        self._closed = False
        self._resync = False
        #: Motion commands the board's FIFO holds besides the one executing.
        self.fifo_depth = BOOT_FIFO_DEPTH
        #: A PRG press seen by a QG poll, kept until `query_button` reports it.
        self._button_pressed = False

    # -- connection -------------------------------------------------------

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802 (Twisted name)
        self._closed = True
        self._device_lost(Failure(DeviceLost(f"the plotter connection closed: "
                                             f"{reason.getErrorMessage() if reason else 'closed'}")))
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_closed(self) -> defer.Deferred:
        """Fires (with None) once the transport has told us the connection is closed."""
        if self._closed:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._lost_waiters.append(waiter)
        return waiter

    def _device_lost(self, reason: Failure) -> None:
        """Fail everything pending; tell the owner once."""
        if self._lost is not None:
            return
        self._lost = reason
        pending = ([self._current] if self._current else []) + list(self._queue)
        self._current = None
        self._queue.clear()
        for command in pending:
            self._fail(command, Failure(DeviceLost(
                f"the plotter was lost before it answered {command.text!r}")))
        if self.on_lost is not None:
            self.on_lost(reason)

    # -- sending ----------------------------------------------------------

    def command(self, text: str, answer_within: float | None = None) -> defer.Deferred:
        """Send one command; fires with the list of reply lines (without `OK`).

        Fails with EBBError if the board answers `!...`, DeviceTimeout if it
        does not answer within `timeout`, DeviceLost if the connection goes.
        With `answer_within`, no answer in that time is an answer too (a board
        told by other software not to say OK).
        """
        text = text.strip()
        if not text or len(text) > MAX_COMMAND_LENGTH or not text.isascii() \
                or any(c in text for c in "\r\n"):
            return defer.fail(ValueError(
                f"not a valid EBB command (one ASCII line of at most "
                f"{MAX_COMMAND_LENGTH} characters): {text!r}"))
        if self._lost is not None or self.transport is None:
            return defer.fail(DeviceLost(f"the plotter is not connected; cannot send {text!r}"))
        command = _Command(text, command_name(text), defer.Deferred(self._cancelled),
                           answer_within=answer_within)
        self._queue.append(command)
        if self._current is None:
            self._send_next()
        return command.deferred

    def _cancelled(self, deferred: defer.Deferred) -> None:
        """A caller gave up on a command: drop it if not yet sent (a sent one stays in flight)."""
        for command in list(self._queue):
            if command.deferred is deferred:
                self._queue.remove(command)

    def _send_next(self) -> None:
        while self._current is None and (self._queue or self._resync) and self._lost is None:
            if self._resync:
                self._resync = False
                # Nobody waits on it: a loss is reported through on_lost.
                done: defer.Deferred = defer.Deferred()
                done.addErrback(lambda failure: None)
                command = _Command("V", "V", done, sentinel=True)
            else:
                command = self._queue.popleft()
            self._current = command
            if command.answer_within is not None:
                command.timer = self.clock.callLater(command.answer_within,
                                                     self._complete, command)
            else:
                command.timer = self.clock.callLater(self.timeout, self._timed_out, command)
            log.debug("EBB <- {command}", command=command.text)
            self.transport.write(command.text.encode("ascii") + b"\r")
            self.counts.commands += 1
            if command.name in NO_REPLY and self._current is command:
                self._complete(command)

    def _timed_out(self, command: _Command) -> None:
        command.timer = None
        if command is not self._current:
            return
        log.warn("the plotter did not answer {command} within {timeout} s",
                 command=command.text, timeout=self.timeout)
        self._current = None
        self.counts.errors += 1
        self._fail(command, Failure(DeviceTimeout(command.text, self.timeout)))
        self._device_lost(Failure(DeviceTimeout(command.text, self.timeout)))
        if self.transport is not None:
            self.transport.loseConnection()

    # -- receiving --------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted name)
        self._buffer += data
        *lines, self._buffer = _LINE_END.split(self._buffer)
        for raw in lines:
            if raw:
                self._line_received(raw.decode("ascii", errors="replace").strip())

    def _line_received(self, line: str) -> None:
        if not line:
            return
        command = self._current
        log.debug("EBB -> {line}", line=line)
        if command is None:
            log.warn("ignoring a line the plotter sent unasked: {line!r}", line=line)
            return
        if command.sentinel:
            if "Version" not in line:
                log.debug("dropping {line!r} after an error line", line=line)
                return
            self._complete(command)
        elif line.startswith("!"):
            self._current = None
            self.counts.errors += 1
            self._resync = True
            self._fail(command, Failure(EBBError(command.text, line)))
        elif command.name in ONE_LINE_REPLY:
            command.lines.append(line)
            self._complete(command)
        elif line == "OK" or (command.name == "CU" and line == "CUOK"):
            # (CU,10,0 answers CUOK when it ends future syntax mode.)
            self._complete(command)
        else:
            command.lines.append(line)
            return
        self._send_next()

    def _complete(self, command: _Command) -> None:
        self._current = None
        self._stop_timer(command)
        if not command.deferred.called:
            command.deferred.callback(command.lines)

    def _fail(self, command: _Command, failure: Failure) -> None:
        self._stop_timer(command)
        if not command.deferred.called:
            command.deferred.errback(failure)

    @staticmethod
    def _stop_timer(command: _Command) -> None:
        if command.timer is not None and command.timer.active():
            command.timer.cancel()
        command.timer = None

    # -- named commands ---------------------------------------------------

    def _one(self, text: str) -> defer.Deferred:
        """A query whose answer is its first reply line."""
        def first(lines: list[str]) -> str:
            if not lines:
                raise EBBError(text, "the plotter answered without a value")
            return lines[0]
        return self.command(text).addCallback(first)

    def version(self) -> defer.Deferred:
        """V: fires with the firmware version as (major, minor, patch); remembered."""
        def parsed(line: str) -> tuple[int, int, int]:
            self.version_text = line
            self.firmware_version = parse_version(line)
            return self.firmware_version
        return self._one("V").addCallback(parsed)

    @property
    def third_generation(self) -> bool:
        """Firmware 3.x: syntax modes, a configurable FIFO, QU."""
        return self.firmware_version is not None and self.firmware_version >= (3, 0, 0)

    @defer.inlineCallbacks
    def take_over(self):
        """Put the board in the state vfab speaks, whatever software drove it last
        (CU settings last until the board reboots): legacy syntax (3.x), an OK
        after every command, and on 3.x a FIFO as deep as the board allows (up
        to FIFO_DEPTH), read back so that `fifo_depth` is the board's own figure.
        Call after `version()`."""
        if self.third_generation:
            yield self.command("CU,10,0", answer_within=TAKE_OVER_ANSWER_S)
        yield self.command("CU,1,1", answer_within=TAKE_OVER_ANSWER_S)
        if self.third_generation:
            deepest = yield self.query_utility(2)
            yield self.command(f"CU,4,{max(1, min(FIFO_DEPTH, deepest))}")
            self.fifo_depth = yield self.query_utility(3)

    @defer.inlineCallbacks
    def release(self):
        """Leave the board as it boots (on 3.x the one-deep FIFO), for whatever
        software drives it next. Call with the FIFO empty."""
        if self.fifo_depth != BOOT_FIFO_DEPTH:
            yield self.command(f"CU,4,{BOOT_FIFO_DEPTH}")
            self.fifo_depth = BOOT_FIFO_DEPTH

    def query_utility(self, parameter: int) -> defer.Deferred:
        """QU (3.x): fires with the value, from `QU,32` (3.0.2+) or `QU,2,32` (3.0.0-3.0.1)."""
        return self._query_number(f"QU,{parameter}")

    def _query_number(self, name: str) -> defer.Deferred:
        """A query answered with a value line whose last field is an integer, then OK."""
        def parsed(line: str) -> int:
            try:
                return int(line.split(",")[-1])
            except ValueError:
                raise EBBError(name, f"unexpected answer {line!r}") from None
        return self._one(name).addCallback(parsed)

    def enable_motors(self, microstepping: int = 16) -> defer.Deferred:
        """EM: energise both motors at `microstepping` (16, 8, 4, 2, 1); 0 turns them off.

        The board zeroes its step counters (firmware 2.6.2+), so this is home.
        """
        if microstepping == 0:
            return self.disable_motors()
        code = microstep_code(microstepping)
        enabling = self.command(f"EM,{code},{code}")
        if self._marks_power:
            enabling.addCallback(lambda _: self.command(f"SL,{POWER_MARK}"))
        return enabling

    @defer.inlineCallbacks
    def disable_motors(self):
        """EM,0,0: let both motors freewheel (the carriage may be moved by hand)."""
        if self._marks_power:
            yield self.command("SL,0")
        yield self.command("EM,0,0")

    @property
    def _marks_power(self) -> bool:
        """A known firmware without QE: the motors' state is kept in the layer mark."""
        return self.firmware_version is not None and self.firmware_version < QE_FIRMWARE

    def power_kept(self) -> defer.Deferred:
        """Without QE: fires True when the board still holds the mark vfab set with
        the motors on (QL), i.e. it kept power and its counters since."""
        return self._query_number("QL").addCallback(lambda layer: layer == POWER_MARK)

    def configure_pen(self, config: DeviceConfig) -> defer.Deferred:
        """SC: pen-up/down servo positions and raise/lower rates from the plot settings."""
        return self._sequence(PenServo.from_config(config).commands())

    def servo_timeout(self, ms: int) -> defer.Deferred:
        """SR: cut the pen servo's power `ms` after its last move (0 = never)."""
        return self.command(f"SR,{int(ms)}")

    def pen(self, up: bool, duration_ms: int = 0) -> defer.Deferred:
        """SP: raise or lower the pen; the next motion waits `duration_ms`."""
        duration = max(0, min(65535, int(duration_ms)))
        value = 1 if up else 0
        return self.command(f"SP,{value},{duration}" if duration else f"SP,{value}")

    def move(self, command_text: str) -> defer.Deferred:
        """Send a ready motion line (LM, LT, SM, XM, HM, SP...); fires when it is in the FIFO."""
        if command_name(command_text) not in MOTION_COMMANDS:
            return defer.fail(ValueError(f"not a motion command: {command_text!r}"))
        return self.command(command_text)

    @property
    def has_qg(self) -> bool:
        return self.firmware_version is not None and self.firmware_version >= QG_FIRMWARE

    def query_general(self) -> defer.Deferred:
        """QG: fires with a GeneralStatus; a PRG press it reports is kept for `query_button`."""
        def parsed(line: str) -> GeneralStatus:
            try:
                status = GeneralStatus.from_byte(int(line.split(",")[-1], 16))
            except ValueError:
                raise EBBError("QG", f"unexpected answer {line!r}") from None
            self._button_pressed = self._button_pressed or status.button
            return status
        return self._one("QG").addCallback(parsed)

    def query_motion(self) -> defer.Deferred:
        """What the motion engine does: from QG where the firmware has it (QM is
        deprecated in 3.x), else QM. Fires with a MotionStatus."""
        if self.has_qg:
            return self.query_general().addCallback(lambda status: status.motion)

        def parsed(line: str) -> MotionStatus:
            fields = line.split(",")
            if fields[0].strip().upper() != "QM" or len(fields) < 4:
                raise EBBError("QM", f"unexpected answer {line!r}")
            flags = [field.strip() not in ("", "0") for field in fields[1:5]]
            flags += [False] * (4 - len(flags))  # firmware before 2.4.4 has no FIFO field
            return MotionStatus(*flags)
        return self._one("QM").addCallback(parsed)

    @defer.inlineCallbacks
    def wait_idle(self, poll_interval: float = 0.05, max_wait: float | None = None):
        """Poll QM until nothing moves and nothing is queued; fires with None.

        Fails with DeviceTimeout if `max_wait` seconds pass first.
        """
        started = self.clock.seconds()
        while True:
            status = yield self.query_motion()
            if status.idle:
                return None
            if max_wait is not None and self.clock.seconds() - started >= max_wait:
                raise DeviceTimeout("QM", max_wait)
            yield task.deferLater(self.clock, poll_interval)

    def query_steps(self) -> defer.Deferred:
        """QS: fires with the global (motor1, motor2) step positions."""
        return self._query_pair("QS")

    def query_motors(self) -> defer.Deferred:
        """QE: fires with each motor's microstepping (16, 8, 4, 2, 1), or 0 when it is off."""
        return self._query_pair("QE")

    def _query_pair(self, name: str) -> defer.Deferred:
        """A query answered with a value line of two integers, then OK."""
        def parsed(line: str) -> tuple[int, int]:
            try:
                first, second = line.split(",")[:2]
                return int(first), int(second)
            except ValueError:
                raise EBBError(name, f"unexpected answer {line!r}") from None
        return self._one(name).addCallback(parsed)

    def clear_steps(self) -> defer.Deferred:
        """CS: zero the global step positions (this becomes home)."""
        return self.command("CS")

    def query_button(self) -> defer.Deferred:
        """Fires True if the PRG button was pressed since the last time it was asked
        (QG where the firmware has it, QB deprecated in 3.x otherwise)."""
        if not self.has_qg:
            return self._one("QB").addCallback(lambda line: line.strip() == "1")

        def pressed(status: GeneralStatus) -> bool:
            was, self._button_pressed = self._button_pressed, False
            return was
        return self.query_general().addCallback(pressed)

    def query_pen(self) -> defer.Deferred:
        """Fires True if the pen is up (QG where the firmware has it, else QP)."""
        if self.has_qg:
            return self.query_general().addCallback(lambda status: status.pen_up)
        return self._one("QP").addCallback(lambda line: line.strip() == "1")

    def emergency_stop(self, disable_motors: bool = False) -> defer.Deferred:
        """ES: abort the move in progress and empty the FIFO; fires True if a move
        was interrupted (2.x answers five numbers, 3.x only that one)."""
        text = "ES,1" if disable_motors else "ES"

        return self._one(text).addCallback(lambda line: line.split(",")[0].strip() == "1")

    def reset(self) -> defer.Deferred:
        """R: return the board's settings to their power-on state (answers OK)."""
        return self.command("R")

    def reboot(self) -> defer.Deferred:
        """RB: reboot the board; it answers nothing and drops off the USB."""
        return self.command("RB")

    def _sequence(self, commands: Iterable[str]) -> defer.Deferred:
        """Queue several commands at once; fires when all are answered, or with the first failure."""
        sent = [self.command(text) for text in commands]
        return defer.gatherResults(sent, consumeErrors=True).addErrback(
            lambda failure: failure.value.subFailure)
