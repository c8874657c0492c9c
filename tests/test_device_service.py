"""DeviceService with a Clock and a fake port opener: no serial port, no sleeping."""

from __future__ import annotations

import pytest
import serial
from twisted.application.internet import backoffPolicy
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from vfab.config import DeviceConfig, host_name, plotter_name_of_host
from vfab.events import EventBus
from vfab.plotter.errors import DeviceLost
from vfab.plotter.plotter import Plotter
from vfab.plotter.service import DeviceService
from vfab.simulator import EBBEmulator, LoopbackPort

HANDSHAKE = ["V", "CU,1,1", "SC,8,8", "SC,4,20641", "SC,5,15248", "SC,11,1618", "SC,12,1079",
             "SP,1,130", "SR,60000", "QE"]


class FakePorts:
    """Opens paths onto in-memory virtual boards; a path without a board is missing."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.boards: dict[str, EBBEmulator] = {}
        self.opened: list[tuple[str, int]] = []
        self.ports: list[LoopbackPort] = []

    def plug(self, path: str, **options) -> EBBEmulator:
        self.boards[path] = EBBEmulator(self.clock, **options)
        return self.boards[path]

    def __call__(self, protocol, path, reactor, baudrate):
        self.opened.append((path, baudrate))
        if path not in self.boards:
            raise serial.SerialException(f"[Errno 2] could not open port {path}: "
                                         f"No such file or directory")
        port = LoopbackPort(protocol, self.boards[path], self.clock)
        self.ports.append(port)
        return port

    def commands(self) -> list[str]:
        """Every command line written to any board, in order."""
        written = b"".join(b"".join(port.written) for port in self.ports)
        return written.decode().split("\r")[:-1]


class Harness:
    def __init__(self, **config):
        self.clock = Clock()
        self.bus = EventBus()
        self.messages: list[tuple[str, dict]] = []
        self.bus.subscribe(lambda channel, message: self.messages.append((channel, message)))
        self.ports = FakePorts(self.clock)
        settings = {"type": "axidraw", "port": "/dev/ttyACM0", "timeout": 2.0,
                    "reconnect_max_delay": 10.0}
        settings.update(config)
        self.config = DeviceConfig(**settings)
        self.service = DeviceService(self.config, self.bus, self.clock,
                                     port_opener=self.ports,
                                     retry_policy=backoffPolicy(maxDelay=10.0,
                                                                jitter=lambda: 0.0))

    def statuses(self) -> list[str]:
        return [m["status"] for channel, m in self.messages if channel == "device"]

    def alerts(self) -> list[dict]:
        return [m for channel, m in self.messages if channel == "system"]

    def run(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(int(round(seconds / step))):
            self.clock.advance(step)


def fired(deferred):
    outcome = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    return outcome[0]


@pytest.fixture
def harness() -> Harness:
    return Harness()


def test_missing_port_reports_disconnected_and_retries_with_backoff(harness):
    harness.service.startService()
    assert harness.statuses() == ["disconnected", "connecting", "disconnected"]
    assert harness.ports.opened == [("/dev/ttyACM0", 9600)]
    # ClientService's backoff: 1.5, 2.25, 3.375, 5.06, 7.59, then capped at 10 s.
    delays = [call.getTime() - harness.clock.seconds()
              for call in harness.clock.getDelayedCalls()]
    assert delays == [pytest.approx(1.5)]
    for expected in (1.5, 2.25, 3.375, 5.0625, 7.59375, 10.0, 10.0):
        attempts = len(harness.ports.opened)
        harness.clock.advance(expected - 0.001)
        assert len(harness.ports.opened) == attempts
        harness.clock.advance(0.001)
        assert len(harness.ports.opened) == attempts + 1
    assert harness.service.plotter is None
    assert harness.service.status()["status"] == "disconnected"


def test_connects_when_the_plotter_appears(harness):
    harness.service.startService()
    connected = harness.service.when_connected()
    harness.ports.plug("/dev/ttyACM0")
    harness.run(2.0)
    plotter = fired(connected)
    assert isinstance(plotter, Plotter) and plotter is harness.service.plotter
    assert plotter.firmware_version == (2, 8, 1) and plotter.supports_lm
    assert harness.ports.commands() == HANDSHAKE
    assert harness.statuses() == ["disconnected", "connecting", "disconnected", "connecting",
                                  "idle"]
    status = harness.service.status()
    assert status == {"type": "device_status", "device_id": "axidraw", "status": "idle",
                      "port": "/dev/ttyACM0", "firmware_version": "2.8.1",
                      "current_job_id": None, "pen": "up", "position_mm": [0.0, 0.0],
                      # Every plotter of a farm says which it is (SPEC section 4).
                      "plotter": plotter_name_of_host(), "host": host_name(), "tags": []}
    assert fired(harness.service.when_connected()) is plotter


def test_type_none_never_tries():
    harness = Harness(type="none")
    harness.service.startService()
    harness.run(60, step=1.0)
    assert harness.ports.opened == []
    assert harness.statuses() == ["disconnected"]
    assert fired(harness.service.stopService()) is None


def test_auto_finds_the_ebb_by_usb_id():
    class Port:
        def __init__(self, device, vid, pid):
            self.device, self.vid, self.pid, self.description = device, vid, pid, "n/a"

    listing = [Port("/dev/ttyS0", None, None)]
    harness = Harness(port="auto")
    harness.service._list_ports = lambda: listing
    harness.service.startService()
    assert harness.ports.opened == []  # nothing plugged in
    assert harness.statuses() == ["disconnected"]
    listing.append(Port("/dev/ttyACM3", 0x04D8, 0xFD92))
    harness.ports.plug("/dev/ttyACM3")
    harness.run(2.0)
    assert harness.ports.opened == [("/dev/ttyACM3", 9600)]
    assert harness.service.status()["status"] == "idle"


def test_a_board_that_does_not_answer_is_an_error_and_retried(harness):
    board = harness.ports.plug("/dev/ttyACM0")
    board.go_silent()
    harness.service.startService()
    harness.run(2.0)
    assert harness.statuses() == ["disconnected", "connecting", "error"]
    assert harness.ports.ports[0].connected is False  # closed before retrying
    board.speak()
    harness.run(2.0)
    assert harness.service.status()["status"] == "idle"


def test_a_board_that_refuses_the_handshake_is_an_error(harness):
    board = harness.ports.plug("/dev/ttyACM0")
    board.fail_next("!8 Err: Unknown command")
    harness.service.startService()
    harness.run(0.5)
    assert harness.statuses() == ["disconnected", "connecting", "error"]
    harness.run(2.0)
    assert harness.statuses()[-1] == "idle"


def test_loss_publishes_an_alert_tells_the_runner_and_reconnects(harness):
    board = harness.ports.plug("/dev/ttyACM0")
    harness.service.startService()
    harness.run(1.0)
    plotter = harness.service.plotter
    reasons: list[Failure] = []
    unsubscribe = harness.service.on_lost(reasons.append)
    move = plotter.send_move("SM,5000,100,100")
    harness.run(0.1)
    held = [plotter.send_move("SM,5000,100,100") for _ in range(2)]
    del harness.ports.boards["/dev/ttyACM0"]
    board.drop()
    harness.run(0.1)
    assert fired(move) == []
    for d in held:
        assert fired(d).check(DeviceLost)
    assert len(reasons) == 1 and reasons[0].check(DeviceLost)
    assert harness.service.plotter is None
    assert harness.service.status()["status"] == "disconnected"
    alert, = harness.alerts()
    assert alert["type"] == "system_alert" and alert["severity"] == "error"
    assert alert["title"] == "Plotter disconnected" and "/dev/ttyACM0" in alert["message"]
    # it is plugged back in
    harness.ports.plug("/dev/ttyACM0")
    harness.run(3.0)
    assert harness.service.status()["status"] == "idle"
    assert harness.service.plotter is not None and harness.service.plotter is not plotter
    unsubscribe()


def test_a_retry_to_a_silent_board_counts_as_reconnecting_not_as_a_first_connect(harness):
    """/health must not read "connecting" as hope when the plotter was lost: a
    board that is plugged back but does not answer keeps the daemon degraded."""
    board = harness.ports.plug("/dev/ttyACM0")
    harness.service.startService()
    assert harness.service.status()["status"] == "connecting"
    assert not harness.service.reconnecting  # the first connection at start-up
    harness.run(1.0)
    assert harness.service.status()["status"] == "idle" and not harness.service.reconnecting
    del harness.ports.boards["/dev/ttyACM0"]
    board.drop()
    harness.run(0.1)
    silent = harness.ports.plug("/dev/ttyACM0")
    silent.go_silent()
    harness.run(1.5)
    assert harness.service.status()["status"] == "connecting"
    assert harness.service.reconnecting
    silent.speak()
    harness.run(15.0)
    assert harness.service.status()["status"] == "idle" and not harness.service.reconnecting


def test_a_timeout_while_connected_is_a_loss(harness):
    board = harness.ports.plug("/dev/ttyACM0")
    harness.service.startService()
    harness.run(1.0)
    reasons: list[Failure] = []
    harness.service.on_lost(reasons.append)
    board.go_silent()
    query = harness.service.plotter.query_steps()
    harness.run(2.1)
    assert fired(query).getErrorMessage().startswith("the plotter did not answer 'QS'")
    assert len(reasons) == 1
    assert harness.service.status()["status"] in ("disconnected", "connecting", "error")
    assert len(harness.alerts()) == 1


def test_job_and_position_status(harness):
    harness.ports.plug("/dev/ttyACM0")
    harness.service.startService()
    harness.run(1.0)
    harness.messages.clear()
    harness.service.set_job("job-1", "plotting")
    assert harness.statuses() == ["plotting"]
    assert harness.service.status()["current_job_id"] == "job-1"
    harness.service.update_position(10.0, 5.0, pen_down=True)
    assert harness.service.status()["pen"] == "down"
    harness.service.update_position(11.0, 5.0, pen_down=True)  # within 0.1 s: held back
    harness.service.update_position(12.0, 5.0, pen_down=True)
    assert len(harness.messages) == 2
    harness.clock.advance(0.1)
    assert len(harness.messages) == 3
    assert harness.messages[-1][1]["position_mm"] == [12.0, 5.0]
    harness.service.set_job("job-1", "paused")
    harness.service.set_job(None)
    assert harness.statuses()[-2:] == ["paused", "idle"]
    assert harness.service.status()["current_job_id"] is None
    with pytest.raises(ValueError):
        harness.service.set_job("job-2", "flying")


def test_stop_parks_the_plotter_and_closes_the_port(harness):
    harness.ports.plug("/dev/ttyACM0")
    harness.service.startService()
    harness.run(1.0)
    harness.service.update_position(3.0, 4.0, pen_down=True)
    stopped = harness.service.stopService()
    harness.run(1.0)
    assert fired(stopped) is None
    commands = harness.ports.commands()
    parking = commands[commands.index("SP,1,130"):]
    assert parking[-2:] == ["QS", "EM,0,0"]  # the carriage is home: no move
    assert not [command for command in parking if command.startswith("HM")]
    assert harness.ports.ports[-1].connected is False
    assert harness.service.status()["status"] == "disconnected"
    assert harness.service.status()["pen"] == "up"
    assert harness.clock.getDelayedCalls() == []


@pytest.mark.parametrize("left", [
    {"future_syntax": True, "fifo_depth": 32},
    {"future_syntax": False, "fifo_depth": 8, "ok_replies": False},
    {"future_syntax": True, "fifo_depth": 32, "ok_replies": False},
], ids=["future syntax, FIFO 32", "no OK replies", "both"])
def test_a_3x_board_left_by_other_software_is_taken_over(harness, left):
    board = harness.ports.plug("/dev/ttyACM0", firmware_version="3.0.3", **left)
    harness.service.startService()
    connected = harness.service.when_connected()
    harness.run(5.0)
    plotter = fired(connected)
    assert plotter.firmware_version == (3, 0, 3)
    assert not board.future_syntax and board.ok_replies and board.fifo_depth == 32
    assert harness.ports.commands()[:6] == ["V", "CU,10,0", "CU,1,1", "QU,2", "CU,4,32", "QU,3"]
    assert plotter.unconfirmed_moves == 33
    stopped = harness.service.stopService()
    harness.run(5.0)
    assert fired(stopped) is None
    assert board.fifo_depth == 1, "the boot depth is restored for the next program"
    assert harness.ports.commands()[-1] == "CU,4,1"


def test_stop_takes_the_carriage_home_before_the_motors_go_off(harness):
    """The counters zero where the motors come on again: away from home, every
    later drawing would be shifted."""
    board = harness.ports.plug("/dev/ttyACM0")
    harness.service.startService()
    harness.run(1.0)
    board.data_received(b"SM,500,800,400\r")  # another program moved it
    harness.run(1.0)
    stopped = harness.service.stopService()
    harness.run(5.0)
    assert fired(stopped) is None
    commands = harness.ports.commands()
    home = [i for i, command in enumerate(commands) if command.startswith("HM")]
    assert home and home[-1] < commands.index("EM,0,0")
    assert board.steps == (0, 0)


def test_stop_is_bounded_when_the_board_does_not_answer(harness):
    board = harness.ports.plug("/dev/ttyACM0")
    harness.service.startService()
    harness.run(1.0)
    board.go_silent()
    stopped = harness.service.stopService()
    harness.run(harness.config.timeout + 0.1)
    assert fired(stopped) is None
    assert harness.service.status()["status"] == "disconnected"


def test_stop_while_retrying_cancels_the_retry(harness):
    harness.service.startService()
    waiting = harness.service.when_connected()
    assert fired(harness.service.stopService()) is None
    assert fired(waiting).check(DeviceLost)
    harness.run(30, step=1.0)
    assert len(harness.ports.opened) == 1


def test_park_when_disconnected_is_safe(harness):
    assert fired(harness.service.park()) is None


def test_firmware_without_qe_is_asked_through_its_layer_mark(harness):
    board = harness.ports.plug("/dev/ttyACM0")
    board.firmware_version = "2.6.5"
    harness.service.startService()
    harness.run(2.0)
    assert harness.service.status()["status"] == "idle"
    commands = harness.ports.commands()
    assert "QE" not in commands and "QL" in commands
    assert not harness.service.position_kept


def test_motors_that_are_off_stay_off_until_a_plot_needs_them(harness):
    """The carriage can be pushed home by hand, and a later connection still sees
    a board that lost power (enabling would zero the counters as if kept)."""
    harness.ports.plug("/dev/ttyACM0")
    harness.service.startService()
    harness.run(2.0)
    assert harness.service.status()["status"] == "idle"
    assert "EM,1,1" not in harness.ports.commands()
    assert not harness.service.position_kept


def test_a_board_that_refuses_qe_is_not_trusted_to_have_kept_its_position(harness):
    board = harness.ports.plug("/dev/ttyACM0")
    board.motors = (1, 1)  # on at 16x: a QE answer would say the position was kept
    board._cmd_QE = lambda args: b"!8 Err: Unknown command 'QE:'\r\n"
    harness.service.startService()
    harness.run(2.0)
    assert harness.service.status()["status"] == "idle"
    assert not harness.service.position_kept


def test_a_board_that_kept_power_keeps_its_position(harness):
    board = harness.ports.plug("/dev/ttyACM0")
    board.motors = (1, 1)
    board.steps = (800, 0)  # 5 mm right, 5 mm down of home
    harness.service.startService()
    harness.run(2.0)
    status = harness.service.status()
    assert status["status"] == "idle" and status["position_mm"] == [5.0, 5.0]
    assert "EM,1,1" not in harness.ports.commands()
