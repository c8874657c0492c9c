"""EBBProtocol byte by byte against a StringTransport and a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from vfab.config import DeviceConfig
from vfab.plotter.ebb import POWER_MARK, EBBProtocol, MotionStatus, parse_version
from vfab.plotter.errors import DeviceLost, DeviceTimeout, EBBError
from vfab.plotter.kinematics import (microstep_code, microstepping_of_code, mm_to_motor_steps,
                                     motor_steps_to_mm, steps_per_mm)
from vfab.plotter.pen import PenServo

TIMEOUT = 5.0


class Board:
    """The host side of a protocol under test: what it wrote, what we answer."""

    def __init__(self):
        self.clock = Clock()
        self.transport = StringTransport()
        self.lost: list[Failure] = []
        self.protocol = EBBProtocol(self.clock, TIMEOUT, on_lost=self.lost.append)
        self.protocol.makeConnection(self.transport)

    def sent(self) -> bytes:
        """Bytes written since the last call."""
        value = self.transport.value()
        self.transport.clear()
        return value

    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(data)


@pytest.fixture
def board() -> Board:
    return Board()


def result(deferred: Deferred):
    outcome = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def failure(deferred: Deferred, *kinds) -> Failure:
    outcome = []
    deferred.addBoth(outcome.append)
    assert outcome and isinstance(outcome[0], Failure), f"expected a failure, got {outcome}"
    assert outcome[0].check(*kinds), outcome[0]
    return outcome[0]


def pending(deferred: Deferred) -> bool:
    return not deferred.called


# -- reply forms ------------------------------------------------------------------

def test_ok_reply(board):
    d = board.protocol.command("SC,4,20000")
    assert board.sent() == b"SC,4,20000\r"
    assert pending(d)
    board.answer(b"OK\r\n")
    assert result(d) == []


def test_version_is_one_line_without_ok(board):
    d = board.protocol.version()
    assert board.sent() == b"V\r"
    board.answer(b"EBBv13_and_above EB Firmware Version 2.8.1\r\n")
    assert result(d) == (2, 8, 1)
    assert board.protocol.firmware_version == (2, 8, 1)
    assert board.protocol.version_text == "EBBv13_and_above EB Firmware Version 2.8.1"


def test_query_motion_one_line_with_lf_cr_ending(board):
    d = board.protocol.query_motion()
    assert board.sent() == b"QM\r"
    board.answer(b"QM,1,1,0,1\n\r")
    assert result(d) == MotionStatus(True, True, False, True)
    d = board.protocol.query_motion()
    board.answer(b"QM,0,0,0\n\r")  # legacy firmware: no FIFO field
    assert result(d).idle


def test_query_general_one_line(board):
    d = board.protocol.command("QG")
    board.answer(b"3E\r\n")
    assert result(d) == ["3E"]


def test_query_steps_value_then_ok(board):
    d = board.protocol.query_steps()
    assert board.sent() == b"QS\r"
    board.answer(b"1421,-429\n\r")
    assert pending(d)
    board.answer(b"OK\r\n")
    assert result(d) == (1421, -429)


@pytest.mark.parametrize("method, command, reply, expected", [
    ("query_pen", b"QP\r", b"1\n\rOK\r\n", True),
    ("query_pen", b"QP\r", b"0\n\rOK\r\n", False),
    ("query_button", b"QB\r", b"1\r\nOK\r\n", True),
    ("query_button", b"QB\r", b"0\r\nOK\r\n", False),
])
def test_value_then_ok_queries(board, method, command, reply, expected):
    d = getattr(board.protocol, method)()
    assert board.sent() == command
    board.answer(reply)
    assert result(d) is expected


def test_query_enables_value_then_ok(board):
    d = board.protocol.command("QE")
    board.answer(b"16,16\r\nOK\r\n")
    assert result(d) == ["16,16"]


def test_replies_split_anywhere_and_mixed_line_endings(board):
    d1 = board.protocol.query_steps()
    d2 = board.protocol.command("CS")
    for byte in b"12,-3\n\rOK\r\n":
        board.answer(bytes([byte]))
    assert result(d1) == (12, -3)
    assert board.sent() == b"QS\rCS\r"
    board.answer(b"\nOK\n")
    assert result(d2) == []


def test_error_line_fails_with_the_command_and_message(board):
    d = board.protocol.command("XX,1")
    queued = board.protocol.command("CS")
    assert board.sent() == b"XX,1\r"
    board.answer(b"!8 Err: Unknown command\r\n")
    error = failure(d, EBBError).value
    assert error.command == "XX,1"
    assert error.message == "!8 Err: Unknown command"
    assert "XX,1" in str(error)
    assert board.sent() == b"V\r"  # where do the replies stand?
    board.answer(b"EBBv13_and_above EB Firmware Version 2.8.1\r\n")
    assert board.sent() == b"CS\r"  # the queue moves on
    board.answer(b"OK\r\n")
    assert result(queued) == []
    assert board.lost == []


def test_an_ok_after_an_error_line_cannot_put_the_replies_out_of_step(board):
    """The 3.x reference has legacy errors end in OK; 2.x and the 3.0.3 source don't."""
    d = board.protocol.command("SM,1")
    steps = board.protocol.query_steps()
    assert board.sent() == b"SM,1\r"
    board.answer(b"!4 Err: Missing parameter(s)\r\n")
    failure(d, EBBError)
    assert board.sent() == b"V\r"
    board.answer(b"OK\r\n")  # the error's own OK, late
    assert pending(steps)
    board.answer(b"EBBv13_and_above EB Firmware Version 3.0.3\r\n")
    assert board.sent() == b"QS\r"
    board.answer(b"5,6\r\nOK\r\n")
    assert result(steps) == (5, 6)


def test_unasked_lines_are_ignored(board):
    board.answer(b"OK\r\nstray\r\n")
    d = board.protocol.command("CS")
    board.answer(b"OK\r\n")
    assert result(d) == []


def test_reboot_expects_no_reply(board):
    d = board.protocol.reboot()
    assert board.sent() == b"RB\r"
    assert result(d) == []


# -- one command in flight ------------------------------------------------------------

def test_one_command_in_flight(board):
    first = board.protocol.move("SM,100,10,10")
    second = board.protocol.move("SM,100,-10,-10")
    third = board.protocol.query_steps()
    assert board.sent() == b"SM,100,10,10\r"
    board.answer(b"OK\r\n")
    assert result(first) == []
    assert board.sent() == b"SM,100,-10,-10\r"
    assert pending(second) and pending(third)
    board.answer(b"OK\r\n")
    assert board.sent() == b"QS\r"
    board.answer(b"0,0\n\rOK\r\n")
    assert result(third) == (0, 0)


def test_cancelled_queued_command_is_not_sent(board):
    first = board.protocol.command("CS")
    second = board.protocol.command("QB")
    second.cancel()
    failure(second, CancelledError)
    board.answer(b"OK\r\n")
    assert result(first) == []
    assert board.sent() == b"CS\r"


def test_invalid_command_text_is_refused(board):
    failure(board.protocol.command("SM,1\rCS"), ValueError)
    failure(board.protocol.command("X" * 64), ValueError)
    failure(board.protocol.move("SC,4,1"), ValueError)
    assert board.sent() == b""


# -- timeouts and loss ----------------------------------------------------------------

def test_timeout_is_device_loss(board):
    d = board.protocol.command("QM")
    queued = board.protocol.command("CS")
    board.clock.advance(TIMEOUT - 0.01)
    assert pending(d)
    board.clock.advance(0.01)
    error = failure(d, DeviceTimeout).value
    assert error.command == "QM" and error.seconds == TIMEOUT
    failure(queued, DeviceLost)
    assert len(board.lost) == 1 and board.lost[0].check(DeviceTimeout)
    assert board.transport.disconnecting
    failure(board.protocol.command("V"), DeviceLost)
    board.protocol.connectionLost(Failure(Exception("closed")))
    assert len(board.lost) == 1  # told once


def test_answered_command_cancels_its_timeout(board):
    d = board.protocol.command("CS")
    board.answer(b"OK\r\n")
    result(d)
    assert board.clock.getDelayedCalls() == []


def test_connection_loss_fails_everything_pending(board):
    d1 = board.protocol.command("SM,100,1,1")
    d2 = board.protocol.command("SM,100,1,1")
    closed = board.protocol.when_closed()
    board.protocol.connectionLost(Failure(Exception("unplugged")))
    failure(d1, DeviceLost)
    failure(d2, DeviceLost)
    assert result(closed) is None
    assert len(board.lost) == 1 and board.lost[0].check(DeviceLost)
    assert "unplugged" in board.lost[0].getErrorMessage()
    failure(board.protocol.command("V"), DeviceLost)
    assert board.clock.getDelayedCalls() == []


# -- named commands -------------------------------------------------------------------

@pytest.mark.parametrize("microstepping, line", [
    (16, b"EM,1,1\r"), (8, b"EM,2,2\r"), (4, b"EM,3,3\r"), (2, b"EM,4,4\r"), (1, b"EM,5,5\r"),
    (0, b"EM,0,0\r"),
])
def test_enable_motors(board, microstepping, line):
    board.protocol.enable_motors(microstepping)
    assert board.sent() == line


def test_without_qe_the_motors_state_is_kept_in_the_layer_mark(board):
    """Firmware before 2.8.0 cannot say whether its motors are on: vfab sets a
    layer value with them and clears it before they go off (QL reads it back)."""
    board.protocol.firmware_version = (2, 6, 5)
    on = board.protocol.enable_motors(16)
    assert board.sent() == b"EM,1,1\r"
    board.answer(b"OK\r\n")
    assert board.sent() == f"SL,{POWER_MARK}\r".encode()
    board.answer(b"OK\r\n")
    result(on)
    off = board.protocol.disable_motors()
    assert board.sent() == b"SL,0\r"
    board.answer(b"OK\r\n")
    assert board.sent() == b"EM,0,0\r"
    board.answer(b"OK\r\n")
    result(off)
    kept = board.protocol.power_kept()
    assert board.sent() == b"QL\r"
    board.answer(f"{POWER_MARK}\r\nOK\r\n".encode())
    assert result(kept) is True


def test_with_qe_the_layer_is_left_alone(board):
    board.protocol.firmware_version = (2, 8, 1)
    board.protocol.enable_motors(16)
    assert board.sent() == b"EM,1,1\r"
    board.answer(b"OK\r\n")
    assert board.sent() == b""


def test_configure_pen_as_the_vendor_software(board):
    config = DeviceConfig(pen_pos_up=60, pen_pos_down=30, pen_rate_raise=75, pen_rate_lower=50)
    d = board.protocol.configure_pen(config)
    expected = [b"SC,8,8\r", b"SC,4,20641\r", b"SC,5,15248\r", b"SC,11,1618\r",
                b"SC,12,1079\r"]
    for line in expected:
        assert board.sent() == line
        assert pending(d)
        board.answer(b"OK\r\n")
    assert result(d) is not None


def test_configure_pen_reports_the_first_refusal(board):
    d = board.protocol.configure_pen(DeviceConfig())
    board.sent()
    board.answer(b"!8 Err: Unknown command\r\n")
    for _ in range(4):
        board.answer(b"OK\r\n")
    assert failure(d, EBBError).value.command == "SC,8,8"


def test_pen_servo_timings():
    servo = PenServo.from_config(DeviceConfig())
    assert (servo.raise_ms, servo.lower_ms) == (130, 146)
    flat = PenServo.from_config(DeviceConfig(pen_pos_up=50, pen_pos_down=50, pen_delay_up=20))
    assert (flat.raise_ms, flat.lower_ms) == (20, 0)


def test_pen_and_servo_timeout(board):
    board.protocol.pen(True, 130)
    assert board.sent() == b"SP,1,130\r"
    board.answer(b"OK\r\n")
    board.protocol.pen(False)
    assert board.sent() == b"SP,0\r"
    board.answer(b"OK\r\n")
    board.protocol.servo_timeout(60000)
    assert board.sent() == b"SR,60000\r"


def test_wait_idle_polls_until_nothing_moves(board):
    d = board.protocol.wait_idle(poll_interval=0.1)
    assert board.sent() == b"QM\r"
    board.answer(b"QM,1,1,1,0\n\r")
    assert pending(d) and board.sent() == b""
    board.clock.advance(0.1)
    assert board.sent() == b"QM\r"
    board.answer(b"QM,0,0,0,0\n\r")
    assert result(d) is None


def test_wait_idle_is_bounded(board):
    d = board.protocol.wait_idle(poll_interval=1.0, max_wait=2.0)
    for _ in range(3):
        board.sent()
        board.answer(b"QM,1,1,1,1\n\r")
        board.clock.advance(1.0)
    failure(d, DeviceTimeout)


def test_clear_steps_reset_and_emergency_stop(board):
    board.protocol.clear_steps()
    assert board.sent() == b"CS\r"
    board.answer(b"OK\r\n")
    board.protocol.reset()
    assert board.sent() == b"R\r"
    board.answer(b"OK\r\n")
    d = board.protocol.emergency_stop(disable_motors=True)
    assert board.sent() == b"ES,1\r"
    board.answer(b"1,0,0,10,20\n\rOK\r\n")  # 2.x: interrupted, then four step counts
    assert result(d) is True
    d = board.protocol.emergency_stop()
    board.answer(b"0\n\rOK\r\n")  # 3.x: only Interrupted
    assert result(d) is False


@pytest.mark.parametrize("line, version", [
    ("EBBv13_and_above EB Firmware Version 2.8.1", (2, 8, 1)),
    ("EBBv13_and_above EB Firmware Version 2.5.3", (2, 5, 3)),
    ("EBBv13_and_above Protocol emulated by Eggduino-Firmware V1.6a", (1, 6, 0)),
])
def test_parse_version(line, version):
    assert parse_version(line) == version


def test_parse_version_rejects_garbage():
    with pytest.raises(ValueError):
        parse_version("hello")


# -- kinematics -------------------------------------------------------------------------

def test_kinematics_axidraw_mixed_axes():
    assert steps_per_mm(16) == 80 and steps_per_mm(8) == 40 and steps_per_mm(1) == 5
    assert mm_to_motor_steps(10, 0) == (800, 800)
    assert mm_to_motor_steps(0, 10) == (800, -800)
    assert mm_to_motor_steps(10, 5, microstepping=8) == (600, 200)
    assert motor_steps_to_mm(800, -800) == (0.0, 10.0)
    assert motor_steps_to_mm(*mm_to_motor_steps(123.4, 56.7)) == pytest.approx((123.4, 56.7))
    assert [microstep_code(m) for m in (16, 8, 4, 2, 1)] == [1, 2, 3, 4, 5]
    assert microstepping_of_code(3) == 4
    with pytest.raises(ValueError):
        steps_per_mm(3)


# -- firmware 3.x and QG ------------------------------------------------------------

def versioned(board: Board, line: bytes) -> None:
    d = board.protocol.version()
    board.sent()
    board.answer(line)
    result(d)


def test_3x_take_over_reads_sets_and_reads_back_the_fifo_depth(board):
    versioned(board, b"EBBv13_and_above EB Firmware Version 3.0.1\r\n")
    d = board.protocol.take_over()
    assert board.sent() == b"CU,10,0\r"
    board.answer(b"CUOK\r\n")  # it was in future syntax mode
    assert board.sent() == b"CU,1,1\r"
    board.answer(b"OK\r\n")
    assert board.sent() == b"QU,2\r"
    board.answer(b"QU,2,32\r\nOK\r\n")  # 3.0.0-3.0.1 echo the parameter
    assert board.sent() == b"CU,4,32\r"
    board.answer(b"OK\r\n")
    assert board.sent() == b"QU,3\r"
    board.answer(b"QU,32\r\nOK\r\n")  # 3.0.2 and later do not
    assert result(d) is None
    assert board.protocol.fifo_depth == 32
    d = board.protocol.release()
    assert board.sent() == b"CU,4,1\r"
    board.answer(b"OK\r\n")
    assert result(d) is None and board.protocol.fifo_depth == 1


def test_2x_take_over_leaves_the_fifo_alone(board):
    versioned(board, b"EBBv13_and_above EB Firmware Version 2.8.1\r\n")
    d = board.protocol.take_over()
    assert board.sent() == b"CU,1,1\r"
    board.answer(b"OK\r\n")
    assert result(d) is None and board.protocol.fifo_depth == 1
    assert result(board.protocol.release()) is None
    assert board.sent() == b""


def test_qg_answers_motion_pen_and_button_and_keeps_a_press(board):
    versioned(board, b"EBBv13_and_above EB Firmware Version 3.0.3\r\n")
    d = board.protocol.query_motion()
    assert board.sent() == b"QG\r"
    board.answer(b"2D\r\n")  # PRG pressed, pen down, executing, motor 1, FIFO
    assert result(d) == MotionStatus(True, True, False, True)
    d = board.protocol.query_pen()
    board.answer(b"10\r\n")
    assert result(d) is True
    d = board.protocol.query_button()
    assert board.sent() == b"QG\rQG\r"
    board.answer(b"10\r\n")  # QG forgets the press once read: the protocol did not
    assert result(d) is True
    d = board.protocol.query_button()
    board.answer(b"10\r\n")
    assert result(d) is False


def test_firmware_without_qg_polls_qm_and_qb(board):
    versioned(board, b"EBBv13_and_above EB Firmware Version 2.5.3\r\n")
    d = board.protocol.query_motion()
    assert board.sent() == b"QM\r"
    board.answer(b"QM,0,0,0,0\n\r")
    assert result(d).idle
    d = board.protocol.query_button()
    assert board.sent() == b"QB\r"
    board.answer(b"0\r\nOK\r\n")
    assert result(d) is False
