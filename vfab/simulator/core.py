"""A virtual EiBotBoard: bytes in, bytes out, and moves that take the time the firmware takes.

`EBBEmulator` answers like firmware 2.8.1 or 3.x (reply forms and line endings
as the command references document them, both syntax modes of 3.x), keeps the
global step counters, and runs motion commands through the motion FIFO: one
command executes, up to the FIFO depth wait (one on 2.x and at boot on 3.x,
up to 32 after `CU,4`), and the next motion command holds up the whole command
processor (so its `OK` is late) until the FIFO has room, as on the real board. Time comes from an
injected clock and may be sped up. It knows nothing of ptys or files' paths
beyond its record directory: a transport feeds it bytes and takes its `send`.
"""

from __future__ import annotations

import os
import re
from collections import deque
from typing import Callable

import attr
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from vfab.plotter.kinematics import microstep_code, microstepping_of_code, motor_steps_to_mm
from vfab.simulator import timing
from vfab.simulator.recording import Recording, RecordWriter

log = Logger()

FIRMWARE_VERSION = "2.8.1"
#: The deepest motion FIFO firmware 3.x offers (QU,2).
FIFO_MAX = 32
UNKNOWN_COMMAND = "!8 Err: Unknown command"
_LINE_END = re.compile(rb"[\r\n]+")

OK = b"OK\r\n"


class _CommandError(Exception):
    """The board's error line for a command it refuses."""


def _fifo(handler: Callable) -> Callable:
    """Mark a command that goes through the motion FIFO (and may have to wait for room)."""
    handler.fifo = True  # type: ignore[attr-defined]
    return handler


@attr.s(auto_attribs=True, eq=False)
class Motion:
    """One command on the motion FIFO: a move, a pen change, a delay or a motor enable."""

    name: str
    seconds: float = 0.0
    delta: tuple[int, int] = (0, 0)
    axis_seconds: tuple[float, float] = (0.0, 0.0)
    steps_at: Callable[[float], tuple[int, int]] | None = None
    pen_up: bool | None = None
    motors: tuple[int, int] | None = None
    home: tuple[int, tuple[int, int]] | None = None  # HM: (frequency, target), resolved at start

    @property
    def moves(self) -> bool:
        return self.delta != (0, 0)

    def done_at(self, elapsed: float) -> tuple[int, int]:
        """Signed steps done `elapsed` (model) seconds after the start."""
        if elapsed >= self.seconds or self.steps_at is None:
            return self.delta if elapsed >= self.seconds else (0, 0)
        return self.steps_at(max(0.0, elapsed))


def _linear(delta: tuple[int, int], seconds: float) -> Callable[[float], tuple[int, int]]:
    """Constant-rate steps (SM, XM, HM): floor of the fraction done, toward zero."""
    def steps_at(elapsed: float) -> tuple[int, int]:
        fraction = min(1.0, elapsed / seconds) if seconds > 0 else 1.0
        return tuple(int(d * fraction) for d in delta)  # type: ignore[return-value]
    return steps_at


@attr.s(auto_attribs=True)
class Faults:
    """Failures to inject, for durability tests. Command numbers count from 1."""

    drop_after: int | None = None      # close the connection when command N+1 arrives
    silent_after: int | None = None    # stop answering after N commands
    error_at: frozenset[int] = frozenset()  # answer these commands with an error line
    button_pressed: bool = False       # the PRG button was pressed before the first QB


class EBBEmulator:
    """The board's command processor and motion engine, on an injected clock."""

    def __init__(self, clock: IReactorTime, *, speed: float = 1.0,
                 recording: Recording | None = None, record_dir: str | os.PathLike | None = None,
                 faults: Faults | None = None, firmware_version: str = FIRMWARE_VERSION,
                 future_syntax: bool = False, fifo_depth: int = 1, ok_replies: bool = True):
        """`future_syntax`, `fifo_depth` and `ok_replies` are the CU settings another
        program may have left (they survive until the board reboots)."""
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed!r}")
        self.clock = clock
        self.speed = speed
        self.recording = recording if recording is not None else Recording()
        self.record_dir = record_dir
        #: Writes the record; start_virtual_plotter gives it a thread to write in.
        self.record_writer = RecordWriter(record_dir) if record_dir is not None else None
        self.faults = faults if faults is not None else Faults()
        self.firmware_version = firmware_version
        self.version = tuple(int(part) for part in firmware_version.split("."))
        self.generation = self.version[0]
        if future_syntax and self.generation < 3:
            raise ValueError("future syntax mode exists from firmware 3.0 on")
        self.future_syntax = future_syntax
        self.fifo_depth = max(1, min(fifo_depth, FIFO_MAX))
        self.ok_replies = ok_replies
        self._raw_reply = False
        #: Where replies go; a transport replaces this.
        self.send: Callable[[bytes], None] = lambda data: None
        #: How the drop fault closes the connection; a transport replaces this.
        self.disconnect: Callable[[], None] = lambda: None
        self.commands_seen = 0
        self.connected = True
        self._buffer = b""
        self._input: deque[tuple[str, str | None]] = deque()
        self._silent = False
        self._dropped = False
        self._fail_next: str | None = None
        self._running: Motion | None = None
        self._running_since = 0.0
        self._finish_call: IDelayedCall | None = None
        self._waiting: deque[Motion] = deque()
        self._idle_since: float | None = None  # FIFO ran dry after a pen-down move
        self._now_override: float | None = None
        self._power_on()
        self.button = self.faults.button_pressed
        self.steps = (0, 0)
        self._accumulators = (0, 0)

    def _power_on(self) -> None:
        """Settings as after a reset (R)."""
        self.pen_up = True
        self.microstepping = 16
        self.motors = (0, 0)
        self.servo = {4: 12000, 5: 16000, 11: 0, 12: 0, 8: 8, 9: 3}
        self.servo_timeout_ms = 60000
        self.layer = 0
        self.nickname = ""
        self.node_count = 0

    # -- faults -------------------------------------------------------------

    def drop(self) -> None:
        """Fault: the USB cable is pulled; the connection closes."""
        self.connected = False
        self.disconnect()

    def go_silent(self) -> None:
        """Fault: stop answering (commands are swallowed) until `speak()`."""
        self._silent = True

    def speak(self) -> None:
        self._silent = False

    def fail_next(self, message: str = "!0 Err: simulated fault") -> None:
        """Fault: answer the next command with this error line instead of running it."""
        self._fail_next = message

    def reset_counters(self) -> None:
        """Fault: the board forgets its step counters (a brown-out); the carriage stays put."""
        current = self.position_steps()
        self.steps = (self.steps[0] - current[0], self.steps[1] - current[1])
        self._accumulators = (0, 0)

    def power_cut(self) -> None:
        """Fault: the board loses power and comes back (the USB link drops too): the
        carriage stops where it is, the moves it had taken are gone, the pen is up,
        and everything is as at boot, the counters zero where the carriage stands."""
        self._abort()
        self._input.clear()
        self._buffer = b""
        self._idle_since = None
        if not self.pen_up:
            self.recording.pen_changed(True)
        self.drop()
        self.reset_counters()
        self._power_on()

    def move_home_by_hand(self) -> None:
        """Someone pushes the carriage to the home corner (the motors are off, so the
        counters do not change): what vfab asks for after a power loss."""
        if self._running is not None or self._waiting or any(self.motors):
            raise RuntimeError("the carriage cannot be moved by hand while the motors are on")
        self.recording.jumped((0.0, 0.0))

    def press_button(self) -> None:
        """The PRG button is pressed: the next QB (or QG) reports it once."""
        self.button = True

    # -- input --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Bytes from the host; each CR (or LF) ends a command."""
        if not self.connected:
            return
        self._buffer += data
        *lines, self._buffer = _LINE_END.split(self._buffer)
        for raw in lines:
            if not raw:
                continue
            self.commands_seen += 1
            number = self.commands_seen
            if self.faults.drop_after is not None and number > self.faults.drop_after \
                    and not self._dropped:
                # A cable is pulled once: after a replug the board talks again.
                self._dropped = True
                self.drop()
                return
            if self._silent or (self.faults.silent_after is not None
                                and number > self.faults.silent_after):
                continue
            error = None
            if number in self.faults.error_at:
                error = "!0 Err: simulated fault"
            if self._fail_next is not None:
                error, self._fail_next = self._fail_next, None
            self._input.append((raw.decode("ascii", errors="replace").strip(), error))
        self._process()

    def _process(self) -> None:
        """Run queued commands in order; a motion command waits for room in the FIFO."""
        while self._input:
            line, error = self._input[0]
            name, args = _split(line)
            if error is not None:
                self._input.popleft()
                self._reply(self._form(name, error.encode("ascii") + b"\r\n",
                                       self.future_syntax, self.ok_replies))
                continue
            handler = getattr(self, "_cmd_" + name, None) if name.isalnum() else None
            fifo = getattr(handler, "fifo", False) and not _immediate_pen(name, args)
            if fifo and self._running is not None and len(self._waiting) >= self.fifo_depth:
                return  # the command processor blocks here, holding this OK back
            self._input.popleft()
            if handler is None:
                self._reply(self._form(name, UNKNOWN_COMMAND.encode("ascii") + b"\r\n",
                                       self.future_syntax, self.ok_replies))
                continue
            # The reply's form is chosen before the command runs (the reference's note).
            future, ok = self.future_syntax, self.ok_replies
            try:
                result = handler(args)
            except _CommandError as error_line:
                self._reply(self._form(name, str(error_line).encode("ascii") + b"\r\n",
                                        future, ok))
                continue
            if isinstance(result, Motion):
                self._enqueue(result)
                result = OK
            if self._raw_reply:
                self._raw_reply = False
            else:
                result = self._form(name, result, future, ok)
            if result:
                self._reply(result)

    def _form(self, name: str, legacy: bytes, future: bool, ok: bool) -> bytes:
        """The reply in the syntax mode in force: legacy as the handlers write it (less
        its OK after CU,1,0), or future syntax: the command, `,data` if any, NL."""
        if not future:
            if not ok and legacy.endswith(OK):
                return legacy[:-len(OK)]
            if ok and self.generation >= 3 and legacy.startswith(b"!"):
                return legacy + OK  # 3.x: "the OK<CR><NL> ... when there is an error"
            return legacy
        if not legacy:
            return b""
        text = legacy.decode("ascii")
        lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
        if lines and lines[-1] == "OK":
            lines.pop()
        data = ",".join(lines)
        if data.upper().startswith(name + ","):
            data = data[len(name) + 1:]
        return (name + ("," + data if data else "") + "\n").encode("ascii")

    def _reply(self, data: bytes) -> None:
        if self.connected:
            self.send(data)

    # -- motion engine ------------------------------------------------------

    def _now(self) -> float:
        """Clock time; while a finished motion is handled, the time it was due to finish.

        Callbacks run late (a real reactor is busy, a test Clock jumps), but the
        board's timeline must not drift: what was queued starts when the
        previous motion ended, not when we got round to it.
        """
        return self._now_override if self._now_override is not None else self.clock.seconds()

    def _elapsed(self) -> float:
        """Model seconds since the running motion started."""
        return max(0.0, (self._now() - self._running_since) * self.speed)

    def _enqueue(self, motion: Motion) -> None:
        self._waiting.append(motion)
        if self._running is None:
            self._start_next()

    def _start_next(self) -> None:
        """Execute what waits in the FIFO, in order, until a motion takes time."""
        while self._waiting:
            motion = self._waiting.popleft()
            self._begin(motion)
            if motion.seconds > 0:
                self._running = motion
                self._running_since = self._now()
                due = self._running_since + motion.seconds / self.speed
                self._finish_call = self.clock.callLater(max(0.0, due - self.clock.seconds()),
                                                         self._finished)
                return
            self._end(motion)

    def _begin(self, motion: Motion) -> None:
        """Effects at the start of execution: pen, motors, HM's target; starvation check."""
        if motion.home is not None:
            frequency, target = motion.home
            motion.delta = (target[0] - self.steps[0], target[1] - self.steps[1])
            motion.seconds = timing.hm_seconds(frequency, *motion.delta)
            motion.axis_seconds = (motion.seconds, motion.seconds)
            motion.steps_at = _linear(motion.delta, motion.seconds)
        if self._idle_since is not None:
            if motion.moves and not self.pen_up:
                gap = (self._now() - self._idle_since) * self.speed
                self.recording.starved(gap)
            self._idle_since = None
        if motion.pen_up is not None:
            self.pen_up = motion.pen_up
            self.recording.pen_changed(motion.pen_up)
        if motion.motors is not None:
            first, second = motion.motors
            if first:
                self.microstepping = microstepping_of_code(first)
            self.motors = (first, second)
            self.steps = (0, 0)
            self._accumulators = (0, 0)
        elif motion.moves:
            self.motors = tuple(m or microstep_code(self.microstepping)
                                for m in self.motors)  # type: ignore[assignment]

    def _end(self, motion: Motion) -> None:
        """Effects at the end: the steps are taken and the pen drew them."""
        if motion.moves:
            start = self.recording.position
            points = []
            first_done = min(motion.axis_seconds)
            if 0 < first_done < motion.seconds and all(motion.delta):
                points.append(self._mm_after(start, motion.done_at(first_done)))
            points.append(self._mm_after(start, motion.delta))
            self.recording.moved(points)
            self.steps = (self.steps[0] + motion.delta[0], self.steps[1] + motion.delta[1])
        self.recording.motion_seconds += motion.seconds
        if motion.motors == (0, 0):
            self.write_record()

    def _mm_after(self, start: tuple[float, float], done: tuple[int, int]) -> tuple[float, float]:
        dx, dy = motor_steps_to_mm(done[0], done[1], self.microstepping)
        return (start[0] + dx, start[1] + dy)

    def _finished(self) -> None:
        self._finish_call = None
        motion, self._running = self._running, None
        if motion is None:
            return
        self._now_override = self._running_since + motion.seconds / self.speed
        try:
            self._end(motion)
            if self._waiting:
                self._start_next()
            elif motion.moves and not self.pen_up:
                self._idle_since = self._now()
            self._process()
        finally:
            self._now_override = None

    def _abort(self) -> tuple[int, int, int, int, int]:
        """Stop the running move where it is and empty the FIFO (ES, R): whether
        anything was interrupted, the steps of the FIFO's first command, and the
        running move's steps not taken (ES's five numbers on 2.x)."""
        interrupted = int(self._running is not None or bool(self._waiting))
        waiting = self._waiting[0].delta if self._waiting else (0, 0)
        remaining = (0, 0)
        if self._running is not None:
            motion = self._running
            done = motion.done_at(self._elapsed())
            remaining = (motion.delta[0] - done[0], motion.delta[1] - done[1])
            if self._finish_call is not None and self._finish_call.active():
                self._finish_call.cancel()
            self._finish_call = None
            motion.delta, motion.seconds = done, self._elapsed()
            self._running = None
            self._end(motion)
        self._waiting.clear()
        self._accumulators = (0, 0)
        return (interrupted, abs(waiting[0]), abs(waiting[1]), abs(remaining[0]),
                abs(remaining[1]))

    def flush(self) -> None:
        """Run everything accepted to completion at once (used when the plotter stops)."""
        while self._running is not None:
            if self._finish_call is not None and self._finish_call.active():
                self._finish_call.cancel()
            self._finished()

    def queued_seconds(self) -> float:
        """Motion taken and not yet executed (model seconds): what a pause waits for."""
        running = self._running.seconds - self._elapsed() if self._running is not None else 0.0
        return max(0.0, running) + sum(motion.seconds for motion in self._waiting)

    def position_steps(self) -> tuple[int, int]:
        """The global step counters now, including the part of the running move done."""
        if self._running is None:
            return self.steps
        done = self._running.done_at(self._elapsed())
        return (self.steps[0] + done[0], self.steps[1] + done[1])

    def write_record(self, *, now: bool = False) -> None:
        """Write strokes.json, drawing.svg and drawing.png, if there is a record directory."""
        if self.record_dir is not None:
            self.record_writer.write(self.recording, now=now)

    def stop(self) -> None:
        """The plotter is switched off: finish accepted moves and write the record."""
        self.flush()
        self.connected = False
        self.write_record(now=True)

    # -- commands: motion (through the FIFO) ---------------------------------

    @_fifo
    def _cmd_SM(self, args: list[str]) -> Motion:
        duration = _int(args, 0, 1, 16777215)
        steps1 = _int(args, 1, -16777215, 16777215)
        steps2 = _int(args, 2, -16777215, 16777215, default=0)
        return self._constant_rate("SM", duration, steps1, steps2)

    @_fifo
    def _cmd_XM(self, args: list[str]) -> Motion:
        duration = _int(args, 0, 1, 16777215)
        a = _int(args, 1, -16777215, 16777215)
        b = _int(args, 2, -16777215, 16777215)
        return self._constant_rate("XM", duration, a + b, a - b)

    def _constant_rate(self, name: str, duration_ms: int, steps1: int, steps2: int) -> Motion:
        problem = timing.sm_rate_problem(duration_ms, steps1, steps2)
        if problem is not None:
            raise _CommandError(f"!0 Err: {problem}")
        seconds = duration_ms / 1000.0
        delta = (steps1, steps2)
        self._accumulators = (0, 0)
        return Motion(name, seconds, delta, (seconds, seconds), _linear(delta, seconds))

    @_fifo
    def _cmd_LM(self, args: list[str]) -> Motion:
        rate1 = _int(args, 0, 0, 2**31 - 1)
        steps1 = _int(args, 1, -2**31, 2**31 - 1)
        accel1 = _int(args, 2, -2**31, 2**31 - 1)
        rate2 = _int(args, 3, 0, 2**31 - 1)
        steps2 = _int(args, 4, -2**31, 2**31 - 1)
        accel2 = _int(args, 5, -2**31, 2**31 - 1)
        clear = _int(args, 6, 0, 3, default=0)
        start = (0 if clear & 1 else self._accumulators[0],
                 0 if clear & 2 else self._accumulators[1])
        moving = [steps != 0 and (rate or accel) for rate, steps, accel in
                  ((rate1, steps1, accel1), (rate2, steps2, accel2))]
        if not any(moving):
            raise _CommandError("!0 Err: LM has no motion on either axis")
        move, self._accumulators = timing.lm_timing(
            rate1, steps1 if moving[0] else 0, accel1, rate2, steps2 if moving[1] else 0, accel2,
            start)
        if move.rolled_over:
            self.recording.warn(f"LM,{','.join(args)}: the step rate fell below zero and "
                                f"rolled over; the move is not what the host planned")
        delta = (steps1 if moving[0] else 0, steps2 if moving[1] else 0)

        def steps_at(elapsed: float) -> tuple[int, int]:
            return (timing.lm_steps_at(rate1, delta[0], accel1, start[0], elapsed),
                    timing.lm_steps_at(rate2, delta[1], accel2, start[1], elapsed))
        return Motion("LM", move.seconds, delta, move.axis_seconds, steps_at)

    @_fifo
    def _cmd_LT(self, args: list[str]) -> Motion:
        intervals = _int(args, 0, 0, 2**32 - 1)
        rate1 = _int(args, 1, -2**31 + 1, 2**31 - 1)
        accel1 = _int(args, 2, -2**31, 2**31 - 1)
        rate2 = _int(args, 3, -2**31 + 1, 2**31 - 1)
        accel2 = _int(args, 4, -2**31, 2**31 - 1)
        clear = _int(args, 5, 0, 3, default=0)
        start = (0 if clear & 1 else self._accumulators[0],
                 0 if clear & 2 else self._accumulators[1])
        delta = (timing.lt_steps(intervals, rate1, accel1, start[0]),
                 timing.lt_steps(intervals, rate2, accel2, start[1]))
        seconds = intervals * timing.TICK_SECONDS
        self._accumulators = (0, 0)

        def steps_at(elapsed: float) -> tuple[int, int]:
            ticks = int(elapsed / timing.TICK_SECONDS)
            return (timing.lt_steps(ticks, rate1, accel1, start[0]),
                    timing.lt_steps(ticks, rate2, accel2, start[1]))
        return Motion("LT", seconds, delta, (seconds, seconds), steps_at)

    @_fifo
    def _cmd_HM(self, args: list[str]) -> Motion:
        frequency = _int(args, 0, 2, 25000)
        if len(args) >= 3:
            target = (_int(args, 1, -4294967, 4294967), _int(args, 2, -4294967, 4294967))
        else:
            target = (0, 0)
        self._accumulators = (0, 0)
        return Motion("HM", home=(frequency, target))

    @_fifo
    def _cmd_SP(self, args: list[str]) -> Motion | bytes:
        """SP,0 / SP,1 through the FIFO; from 3.0.1 SP,2 raises the pen at once and
        SP,3 also makes every queued pen move a raise."""
        value = _int(args, 0, 0, 3 if self.version >= (3, 0, 1) else 1)
        duration = _int(args, 1, 0, 65535, default=0)
        if value < 2:
            return Motion("SP", duration / 1000.0, pen_up=bool(value))
        if value == 3:
            for motion in self._waiting:
                if motion.pen_up is not None:
                    motion.pen_up = True
        if not self.pen_up:
            self.pen_up = True
            self.recording.pen_changed(True)
        return OK

    @_fifo
    def _cmd_TP(self, args: list[str]) -> Motion:
        duration = _int(args, 0, 0, 65535, default=0)
        pens = [motion.pen_up for motion in self._waiting if motion.pen_up is not None]
        pen_up = pens[-1] if pens else self.pen_up
        return Motion("TP", duration / 1000.0, pen_up=not pen_up)

    @_fifo
    def _cmd_EM(self, args: list[str]) -> Motion:
        first = _int(args, 0, 0, 5)
        second = _int(args, 1, 0, 5, default=self.motors[1])
        return Motion("EM", motors=(first, second))

    # -- commands: immediate -------------------------------------------------

    def _cmd_V(self, args: list[str]) -> bytes:
        return f"EBBv13_and_above EB Firmware Version {self.firmware_version}\r\n".encode()

    def _cmd_QM(self, args: list[str]) -> bytes:
        running = self._running
        moving = [False, False]
        if running is not None:
            elapsed = self._elapsed()
            moving = [running.delta[i] != 0 and elapsed < running.axis_seconds[i]
                      for i in (0, 1)]
        fields = (int(running is not None), int(moving[0]), int(moving[1]),
                  int(bool(self._waiting)))
        return ("QM," + ",".join(map(str, fields)) + "\n\r").encode()

    def _cmd_QG(self, args: list[str]) -> bytes:
        status = self._cmd_QM(args).decode().strip().split(",")[1:]
        executing, motor1, motor2, fifo = (int(v) for v in status)
        byte = (32 * int(self.button) + 16 * int(self.pen_up) + 8 * executing
                + 4 * motor1 + 2 * motor2 + fifo)
        self.button = False
        return f"{byte:02X}\r\n".encode()

    def _cmd_QS(self, args: list[str]) -> bytes:
        first, second = self.position_steps()
        return f"{first},{second}\n\r".encode() + OK

    def _cmd_CS(self, args: list[str]) -> bytes:
        current = self.position_steps()
        self.steps = (self.steps[0] - current[0], self.steps[1] - current[1])
        return OK

    def _cmd_QP(self, args: list[str]) -> bytes:
        return f"{int(self.pen_up)}\n\r".encode() + OK

    def _cmd_QB(self, args: list[str]) -> bytes:
        pressed, self.button = self.button, False
        return f"{int(pressed)}\r\n".encode() + OK

    def _cmd_QE(self, args: list[str]) -> bytes:
        states = [self.microstepping if m else 0 for m in self.motors]
        return f"{states[0]},{states[1]}\r\n".encode() + OK

    def _cmd_QR(self, args: list[str]) -> bytes:
        return b"1\n\r" + OK

    def _cmd_QC(self, args: list[str]) -> bytes:
        return b"0394,0300\r\n" + OK

    def _cmd_QL(self, args: list[str]) -> bytes:
        return f"{self.layer}\r\n".encode() + OK

    def _cmd_SL(self, args: list[str]) -> bytes:
        self.layer = _int(args, 0, 0, 127)
        return OK

    def _cmd_QT(self, args: list[str]) -> bytes:
        return f"{self.nickname}\r\n".encode() + OK

    def _cmd_ST(self, args: list[str]) -> bytes:
        self.nickname = ",".join(args)[:16]
        return OK

    def _cmd_QN(self, args: list[str]) -> bytes:
        return f"{self.node_count}\r\n".encode() + OK

    def _cmd_SN(self, args: list[str]) -> bytes:
        self.node_count = _int(args, 0, 0, 2**32 - 1)
        return OK

    def _cmd_NI(self, args: list[str]) -> bytes:
        self.node_count = (self.node_count + 1) % 2**32
        return OK

    def _cmd_ND(self, args: list[str]) -> bytes:
        self.node_count = (self.node_count - 1) % 2**32
        return OK

    def _cmd_SC(self, args: list[str]) -> bytes:
        parameter = _int(args, 0, 0, 255)
        value = _int(args, 1, 0, 65535)
        if parameter == 10:
            self.servo[11] = self.servo[12] = value
        else:
            self.servo[parameter] = value
        return OK

    def _cmd_SR(self, args: list[str]) -> bytes:
        self.servo_timeout_ms = _int(args, 0, 0, 2**32 - 1)
        _int(args, 1, 0, 1, default=0)
        return OK

    def _cmd_ES(self, args: list[str]) -> bytes:
        disable = _int(args, 0, 0, 1, default=0)
        fields = self._abort()
        if disable:
            self.motors = (0, 0)
        if self.generation >= 3:
            return f"{fields[0]}\n\r".encode() + OK  # 3.x: only Interrupted
        return (",".join(map(str, fields)) + "\n\r").encode() + OK

    def _cmd_R(self, args: list[str]) -> bytes:
        self._abort()
        self._power_on()
        self.recording.pen_changed(True)
        return OK

    def _cmd_RB(self, args: list[str]) -> bytes:
        self._cmd_R(args)
        self.future_syntax, self.fifo_depth, self.ok_replies = False, 1, True
        return b""

    def _cmd_CU(self, args: list[str]) -> bytes:
        """Configure User options: 1 (OK replies), and on 3.x 4 (FIFO depth) and 10
        (future syntax); the others are accepted and change nothing here."""
        parameter = _int(args, 0, 0, 255)
        value = _int(args, 1, -32768, 32767)
        if parameter == 1:
            self.ok_replies = bool(value)
        elif parameter == 4 and self.generation >= 3:
            self.fifo_depth = max(1, min(value, FIFO_MAX))
        elif parameter == 10 and self.generation >= 3:
            # The reply is made before the mode changes (the reference's own note).
            self._raw_reply = True
            before, self.future_syntax = self.future_syntax, bool(value)
            if before:
                return b"CUOK\r\n"
            return b"\n" if value else (OK if self.ok_replies else b"")
        return OK

    def _cmd_QU(self, args: list[str]) -> bytes:
        """Query Utility (3.x): 2 the deepest FIFO, 3 the FIFO depth, 6 (3.0.1+) the
        commands in the FIFO; others read 0. Before 3.0.2 the reply repeats the
        parameter (`QU,2,32`), from 3.0.2 it does not (`QU,32`)."""
        if self.generation < 3:
            raise _CommandError(UNKNOWN_COMMAND)
        parameter = _int(args, 0, 0, 255)
        values = {2: FIFO_MAX, 3: self.fifo_depth}
        if self.version >= (3, 0, 1):
            values[6] = len(self._waiting)
        value = values.get(parameter, 0)
        if self.version < (3, 0, 2):
            return f"QU,{parameter},{value}\r\n".encode() + OK
        return f"QU,{value}\r\n".encode() + OK

    def _cmd_PI(self, args: list[str]) -> bytes:
        return b"PI,0\r\n"

    def _ok(self, args: list[str]) -> bytes:
        """Commands that are accepted and have no effect on a virtual plotter."""
        return OK

    _cmd_S2 = _cmd_SE = _cmd_PC = _cmd_PG = _cmd_PD = _cmd_PO = _cmd_BL = _ok
    _cmd_C = _cmd_O = _cmd_T = _cmd_AC = _cmd_MW = _ok


def _immediate_pen(name: str, args: list[str]) -> bool:
    """SP,2 and SP,3 (3.0.1+) bypass the motion FIFO: they need no room in it."""
    return name == "SP" and bool(args) and args[0].strip() in ("2", "3")


def _split(line: str) -> tuple[str, list[str]]:
    name, *args = line.split(",")
    return name.strip().upper(), [arg.strip() for arg in args]


def _int(args: list[str], index: int, low: int, high: int, default: int | None = None) -> int:
    """Parameter `index` as an integer in [low, high], as the firmware's parser checks it."""
    if index >= len(args) or args[index] == "":
        if default is None:
            raise _CommandError("!0 Err: Missing parameter(s)")
        return default
    try:
        value = int(args[index])
    except ValueError:
        raise _CommandError(f"!0 Err: Parameter {index + 1} is not a number: "
                            f"'{args[index]}'") from None
    if not low <= value <= high:
        raise _CommandError(f"!0 Err: Parameter {index + 1} outside allowed range")
    return value
