"""The virtual plotter: the emulator core on a Clock, and the whole path through a real pty."""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock

from vfab.config import DeviceConfig
from vfab.events import EventBus
from vfab.plotter.service import DeviceService
from vfab.simulator import EBBEmulator, Faults, Recording
from vfab.simulator.recording import PNG_FILE, STROKES_FILE, SVG_FILE, RecordWriter
from vfab.simulator.timing import lm_timing


class Host:
    """Sends lines to an emulator and collects its replies, on a Clock."""

    def __init__(self, speed: float = 1.0, faults: Faults | None = None, record_dir=None,
                 **board):
        self.clock = Clock()
        self.emulator = EBBEmulator(self.clock, speed=speed, faults=faults,
                                    record_dir=record_dir, **board)
        self.replies: list[bytes] = []
        self.dropped = False
        self.emulator.send = self.replies.append
        self.emulator.disconnect = lambda: setattr(self, "dropped", True)

    def send(self, *lines: str) -> None:
        self.emulator.data_received(b"".join(line.encode() + b"\r" for line in lines))

    def take(self) -> bytes:
        data = b"".join(self.replies)
        self.replies.clear()
        return data

    def ask(self, line: str) -> bytes:
        self.send(line)
        return self.take()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


@pytest.fixture
def host() -> Host:
    return Host()


def test_version_and_reply_forms(host):
    assert host.ask("V") == b"EBBv13_and_above EB Firmware Version 2.8.1\r\n"
    assert host.ask("v") == b"EBBv13_and_above EB Firmware Version 2.8.1\r\n"
    assert host.ask("QM") == b"QM,0,0,0,0\n\r"
    assert host.ask("QS") == b"0,0\n\rOK\r\n"
    assert host.ask("QP") == b"1\n\rOK\r\n"
    assert host.ask("QB") == b"0\r\nOK\r\n"
    assert host.ask("QE") == b"0,0\r\nOK\r\n"
    assert host.ask("QG") == b"10\r\n"
    assert host.ask("SC,10,200") == b"OK\r\n"
    assert host.ask("SR,60000") == b"OK\r\n"
    assert host.ask("QU,1") == b"!8 Err: Unknown command\r\n"
    assert host.ask("SM,0,1,1").startswith(b"!0 Err")
    assert host.ask("SP").startswith(b"!0 Err: Missing")


def test_sm_duration_and_step_counts(host):
    host.send("EM,1,1", "SM,1000,800,-800")
    assert host.take() == b"OK\r\nOK\r\n"
    host.advance(0.5)
    assert host.ask("QS") == b"400,-400\n\rOK\r\n"
    assert host.ask("QM") == b"QM,1,1,1,0\n\r"
    host.advance(0.5)
    assert host.ask("QM") == b"QM,0,0,0,0\n\r"
    assert host.ask("QS") == b"800,-800\n\rOK\r\n"
    assert host.ask("QE") == b"16,16\r\nOK\r\n"
    assert host.emulator.recording.motion_seconds == pytest.approx(1.0)


def test_sm_step_rate_limits(host):
    assert host.ask("SM,10,1000,0") == b"!0 Err: <axis1> step rate > 25K steps/second\r\n"
    assert host.ask("SM,10000,0,1") == b"!0 Err: <axis2> step rate < 1.31Hz\r\n"


def test_xm_mixes_axes(host):
    host.send("XM,100,10,3")
    host.advance(0.1)
    assert host.take() == b"OK\r\n"
    assert host.ask("QS") == b"13,7\n\rOK\r\n"


@pytest.mark.parametrize("command, seconds, steps", [
    ("LM,42950000,50,13400,0,0,0", 0.07696, (50, 0)),     # doc example 6: 77 ms
    ("LM,17179000,75,-687,8592000,75,687", 0.5, (75, 75)),  # doc example 7: 500 ms
    ("LM,85899346,10,0,17180814,-2,0", 0.01, (10, -2)),     # doc example 3: 10 ms
])
def test_lm_timing_matches_the_command_reference(host, command, seconds, steps):
    host.send("SP,0", command)
    host.take()
    host.advance(seconds - 0.0001)
    assert host.ask("QM").startswith(b"QM,1")
    host.advance(0.0001)
    assert host.ask("QM") == b"QM,0,0,0,0\n\r"
    assert host.ask("QS") == f"{steps[0]},{steps[1]}\n\rOK\r\n".encode()
    assert host.emulator.recording.motion_seconds == pytest.approx(seconds)


def test_long_lm_is_computed_in_closed_form():
    # A 10-minute move: 15 million ticks; must not loop per tick.
    started = time.perf_counter()
    move, _ = lm_timing(85899346 // 4, 150000, 0, 0, 0, 0)
    assert move.seconds == pytest.approx(600.0, rel=1e-6)
    move, _ = lm_timing(1000, 3_000_000, 30, 1000, -3_000_000, 30)
    assert move.axis_seconds[0] == move.axis_seconds[1]
    assert time.perf_counter() - started < 0.5


def test_lm_first_axis_finishing_early_bends_the_line(host):
    # axis 1 stops after 400 steps, axis 2 goes on to 800: a bent line.
    host.send("SP,0", "LM,85899346,400,0,85899346,800,0", "SP,1")
    host.advance(1.0)
    stroke = host.emulator.recording.strokes[0]
    assert stroke == [(0.0, 0.0), (5.0, 0.0), (7.5, -2.5)]


def test_fifo_holds_the_third_motion_command_back(host):
    host.send("SM,1000,100,100", "SM,1000,100,100", "SM,1000,100,100", "QS")
    assert host.take() == b"OK\r\nOK\r\n"  # one executes, one waits; the third (and QS) wait
    assert host.ask("QM") == b""  # the whole command processor is blocked
    host.advance(0.999)
    assert host.take() == b""
    host.advance(0.001)
    assert host.take() == b"OK\r\n100,100\n\rOK\r\nQM,1,1,1,1\n\r"
    host.advance(2.0)
    assert host.ask("QS") == b"300,300\n\rOK\r\n"


def test_pen_state_changes_when_sp_executes(host):
    host.send("SM,500,10,10", "SP,0,200")
    host.take()
    assert host.ask("QP") == b"1\n\rOK\r\n"  # SP still waiting in the FIFO
    host.advance(0.5)
    assert host.ask("QP") == b"0\n\rOK\r\n"
    assert host.ask("QM") == b"QM,1,0,0,0\n\r"  # the SP delay runs
    host.advance(0.2)
    assert host.ask("QM") == b"QM,0,0,0,0\n\r"
    assert host.ask("TP") == b"OK\r\n"
    assert host.ask("QP") == b"1\n\rOK\r\n"


def test_strokes_in_mm(host):
    host.send("EM,1,1", "SP,0", "SM,100,800,800", "SM,100,800,-800", "SP,1",
              "SM,100,-1600,0", "SP,0", "SP,1")
    host.advance(1.0)
    recording = host.emulator.recording
    assert recording.strokes == [[(0.0, 0.0), (10.0, 0.0), (10.0, 10.0)], [(0.0, 0.0)]]
    assert recording.pen_down_mm == pytest.approx(20.0)
    assert recording.pen_up_mm == pytest.approx(14.1421, abs=1e-3)


def test_microstepping_scales_millimetres(host):
    host.send("EM,2,2", "SP,0", "SM,100,400,400", "SP,1")
    host.advance(1.0)
    assert host.emulator.recording.strokes == [[(0.0, 0.0), (10.0, 0.0)]]


def test_clear_steps_and_enable_zero_the_counters_not_the_carriage(host):
    host.send("SM,100,50,50")
    host.advance(0.1)
    host.take()
    assert host.ask("CS") == b"OK\r\n"
    assert host.ask("QS") == b"0,0\n\rOK\r\n"
    host.send("SM,100,10,10", "EM,1,1")
    host.advance(0.1)
    host.take()
    assert host.ask("QS") == b"0,0\n\rOK\r\n"
    assert host.emulator.recording.position == pytest.approx((0.75, 0.0))


def test_home_returns_to_zero(host):
    host.send("SM,1000,1600,-400", "HM,3200")
    host.take()
    host.advance(1.0)
    assert host.ask("QM") == b"QM,1,1,1,0\n\r"
    host.advance(0.005 + 0.5)
    assert host.ask("QM") == b"QM,0,0,0,0\n\r"
    assert host.ask("QS") == b"0,0\n\rOK\r\n"
    host.send("HM,1000,800,0")
    host.advance(1.0)
    host.take()
    assert host.ask("QS") == b"800,0\n\rOK\r\n"


def test_speed_factor_runs_faster():
    host = Host(speed=10)
    host.send("SM,1000,100,100")
    host.advance(0.1)
    host.take()
    assert host.ask("QM") == b"QM,0,0,0,0\n\r"
    assert host.emulator.recording.motion_seconds == pytest.approx(1.0)  # model time


def test_starvation_is_recorded_when_the_fifo_runs_dry_with_the_pen_down(host):
    host.send("SP,0", "SM,100,10,10", "SM,100,10,10")
    host.advance(0.2)
    assert host.emulator.recording.starvations == []  # streamed back to back
    host.advance(0.3)  # nothing queued: the pen sits on the paper
    host.send("SM,100,10,10", "SP,1")
    host.advance(0.1)
    starvations = host.emulator.recording.starvations
    assert len(starvations) == 1
    assert starvations[0]["gap_seconds"] == pytest.approx(0.3)
    host.advance(1.0)
    host.send("SM,100,10,10")  # pen up: a pause is no starvation
    host.advance(0.1)
    assert len(host.emulator.recording.starvations) == 1


def test_emergency_stop_reports_and_stops(host):
    host.send("SM,1000,1000,0", "SM,1000,500,0")
    host.advance(0.5)
    host.take()
    assert host.ask("ES") == b"1,500,0,500,0\n\rOK\r\n"
    assert host.ask("QM") == b"QM,0,0,0,0\n\r"
    assert host.ask("QS") == b"500,0\n\rOK\r\n"


def test_button_press_is_reported_once():
    host = Host(faults=Faults(button_pressed=True))
    assert host.ask("QB") == b"1\r\nOK\r\n"
    assert host.ask("QB") == b"0\r\nOK\r\n"
    host.emulator.press_button()
    assert host.ask("QG") == b"30\r\n"
    assert host.ask("QB") == b"0\r\nOK\r\n"


def test_fault_drop_after_n_commands():
    host = Host(faults=Faults(drop_after=2))
    host.send("V", "QS")
    assert not host.dropped
    host.send("QB")
    assert host.dropped
    assert host.take() == (b"EBBv13_and_above EB Firmware Version 2.8.1\r\n"
                           b"0,0\n\rOK\r\n")  # nothing for QB


def test_fault_silence_and_errors():
    host = Host(faults=Faults(silent_after=3, error_at=frozenset({2})))
    assert host.ask("CS") == b"OK\r\n"
    assert host.ask("CS") == b"!0 Err: simulated fault\r\n"
    host.emulator.fail_next("!8 Err: Unknown command")
    assert host.ask("V") == b"!8 Err: Unknown command\r\n"
    assert host.ask("V") == b""


def test_fault_go_silent_and_reset_counters(host):
    host.send("SM,100,10,10")
    host.advance(0.1)
    host.take()
    host.emulator.go_silent()
    assert host.ask("QS") == b""
    host.emulator.speak()
    host.emulator.reset_counters()
    assert host.ask("QS") == b"0,0\n\rOK\r\n"
    assert host.emulator.recording.position != (0.0, 0.0)


def test_record_files_on_motors_off(tmp_path):
    host = Host(record_dir=tmp_path)
    host.send("SP,0", "SM,100,800,0", "SP,1", "EM,0,0")
    host.advance(0.2)
    data = json.loads((tmp_path / STROKES_FILE).read_text())
    assert data["strokes"] == [[[0.0, 0.0], [5.0, 5.0]]]
    assert data["pen_down_mm"] == pytest.approx(7.0711, abs=1e-3)
    assert data["motion_seconds"] == pytest.approx(0.1)
    assert data["starvations"] == []
    assert "<polyline" in (tmp_path / SVG_FILE).read_text()
    assert (tmp_path / PNG_FILE).read_bytes().startswith(b"\x89PNG")


def test_recording_page_and_dots():
    recording = Recording(page_mm=(30.0, 20.0))
    recording.pen_changed(False)
    recording.pen_changed(True)
    assert recording.strokes == [[(0.0, 0.0)]]
    assert 'width="30mm"' in recording.svg()
    assert recording.png().size == (120, 80)


# -- through a real pty and SerialPort ----------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_device_service_draws_on_the_virtual_plotter_through_a_pty(tmp_path):
    bus = EventBus()
    statuses: list[str] = []
    bus.subscribe(lambda channel, message: statuses.append(message.get("status")))
    config = DeviceConfig(type="simulator", simulator_speed=100.0, timeout=5.0)
    service = DeviceService(config, bus, global_reactor, record_dir=tmp_path)
    service.startService()
    try:
        plotter = yield service.when_connected().addTimeout(10, global_reactor)
        assert plotter.firmware_version == (2, 8, 1) and plotter.supports_lm
        assert service.status()["port"].startswith("/dev/")
        version = yield plotter.protocol.version().addTimeout(5, global_reactor)
        assert version == (2, 8, 1)
        yield plotter.pen_down().addTimeout(5, global_reactor)
        yield plotter.send_move("SM,1000,800,800").addTimeout(5, global_reactor)
        yield plotter.send_move("LM,85899346,800,0,85899346,800,0").addTimeout(5, global_reactor)
        yield plotter.pen_up().addTimeout(5, global_reactor)
        yield plotter.wait_idle(poll_interval=0.01).addTimeout(10, global_reactor)
        steps = yield plotter.query_steps().addTimeout(5, global_reactor)
        assert steps == (1600, 1600)
        yield plotter.home(100).addTimeout(10, global_reactor)
    finally:
        yield service.stopService().addTimeout(15, global_reactor)
    data = json.loads((tmp_path / STROKES_FILE).read_text())
    assert data["strokes"] == [[[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]]]
    assert data["pen_down_mm"] == pytest.approx(20.0)
    assert statuses[:3] == ["disconnected", "connecting", "idle"]
    assert statuses[-1] == "disconnected"
    assert (tmp_path / PNG_FILE).exists() and (tmp_path / SVG_FILE).exists()


def test_command_line_serves_a_pty_until_sigterm(tmp_path):
    import os
    import select
    import signal
    import subprocess
    import sys

    import serial as pyserial

    link = tmp_path / "axidraw"
    process = subprocess.Popen(
        [sys.executable, "-m", "vfab.simulator", "--link", str(link), "--speed", "100",
         "--record-dir", str(tmp_path / "record")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "the simulator did not print its path"
        assert process.stdout.readline().decode().strip() == str(link)
        with pyserial.Serial(str(link), 9600, timeout=5) as port:
            port.write(b"V\r")
            assert port.readline() == b"EBBv13_and_above EB Firmware Version 2.8.1\r\n"
            port.write(b"SP,0\rSM,10,80,80\rSP,1\r")
            assert port.read(12) == b"OK\r\nOK\r\nOK\r\n"
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    data = json.loads((tmp_path / "record" / STROKES_FILE).read_text())
    assert data["strokes"] == [[[0.0, 0.0], [1.0, 0.0]]]
    assert not link.exists()


def test_the_record_is_written_off_the_reactor_newest_first(tmp_path):
    """In the daemon's process the record must not stall the plot; a write that a
    newer one overtook is skipped, and a stop writes at once."""
    queued = []
    writer = RecordWriter(tmp_path, lambda function, *args: queued.append((function, args)))
    recording = Recording()
    recording.pen_changed(False)
    recording.moved([(1.0, 0.0)])
    writer.write(recording)
    recording.moved([(2.0, 0.0)])
    writer.write(recording)
    assert len(queued) == 2 and not (tmp_path / STROKES_FILE).exists()
    for function, args in reversed(queued):  # the newer one runs first
        function(*args)
    data = json.loads((tmp_path / STROKES_FILE).read_text())
    assert data["strokes"] == [[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]]
    recording.moved([(3.0, 0.0)])
    writer.write(recording, now=True)
    assert json.loads((tmp_path / STROKES_FILE).read_text())["strokes"][0][-1] == [3.0, 0.0]



def test_an_unchanged_record_is_written_once(tmp_path, monkeypatch):
    """A stop right after a motors-off must not serialise a long plot's record a
    second time (a million strokes took the simulator past its 30 s to exit), yet
    it still writes at once what was only queued."""
    written = []
    monkeypatch.setattr(Recording, "write", lambda self, directory: written.append(
        self.as_dict()["strokes"]))
    queued = []
    writer = RecordWriter(tmp_path, lambda function, *args: queued.append((function, args)))
    recording = Recording()
    recording.pen_changed(False)
    recording.moved([(1.0, 0.0)])
    writer.write(recording)  # the motors went off
    writer.write(recording)
    assert len(queued) == 1 and written == []
    writer.write(recording, now=True)  # the stop: the queued one has not run yet
    assert written == [[[[0.0, 0.0], [1.0, 0.0]]]]
    for function, args in queued:
        function(*args)
    writer.write(recording, now=True)
    assert len(written) == 1
    recording.moved([(2.0, 0.0)])
    writer.write(recording, now=True)
    assert written[-1] == [[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]]

# -- firmware 3.x: syntax modes and the FIFO depth (EBB Command Set, v3.0+) ------------

def test_3x_future_syntax_replies_as_the_reference_shows():
    host = Host(firmware_version="3.0.3")
    assert host.ask("QR") == b"1\n\rOK\r\n"  # legacy, the boot default
    assert host.ask("CU,10,1") == b"\n"  # "a response of <NL>"
    assert host.ask("QR") == b"QR,1\n"  # "might be QR,1<NL>"
    assert host.ask("V") == b"V,EBBv13_and_above EB Firmware Version 3.0.3\n"
    assert host.ask("QU,2") == b"QU,32\n"
    assert host.ask("SP,1") == b"SP\n"
    assert host.ask("QM") == b"QM,0,0,0,0\n"
    assert host.ask("SM,100") == b"SM,!0 Err: Missing parameter(s)\n"
    assert host.ask("CU,10,0") == b"CUOK\r\n"  # "a response of CUOK<CR><NL>"
    assert host.ask("SM,100") == b"!0 Err: Missing parameter(s)\r\nOK\r\n"
    assert host.ask("QU,2") == b"QU,32\r\nOK\r\n"


def test_3x_fifo_depth_is_set_and_read_within_its_bounds():
    host = Host(firmware_version="3.0.3")
    assert host.ask("QU,3") == b"QU,1\r\nOK\r\n"  # one deep at boot
    host.ask("CU,4,100")
    assert host.ask("QU,3") == b"QU,32\r\nOK\r\n"  # set to the most there is
    host.ask("RB")
    assert host.emulator.fifo_depth == 1 and not host.emulator.future_syntax


def test_ok_replies_can_be_turned_off_as_other_software_may_leave_them():
    host = Host()
    assert host.ask("CU,1,0") == b"OK\r\n"  # answered before it takes effect
    assert host.ask("SP,1") == b""
    assert host.ask("QS") == b"0,0\n\r"
    host.ask("CU,1,1")
    assert host.ask("SP,1") == b"OK\r\n"


def test_2x_knows_no_future_syntax():
    host = Host()
    assert host.ask("QU,2").startswith(b"!8")
    with pytest.raises(ValueError):
        Host(future_syntax=True)


def test_3x_deep_fifo_takes_that_many_commands_and_holds_the_next_back():
    host = Host(firmware_version="3.0.3")
    host.ask("CU,4,3")
    host.send(*["SM,1000,100,100"] * 5, "QS")
    assert host.take() == b"OK\r\n" * 4  # one executes, three wait; the fifth holds QS back
    assert host.emulator.recording.starvations == []
    host.advance(1.0)
    assert host.take() == b"OK\r\n100,100\n\rOK\r\n"
    assert host.ask("QM") == b"QM,1,1,1,1\n\r"
    assert host.ask("QU,6") == b"QU,3\r\nOK\r\n"  # how full the FIFO is (3.0.1+)
    host.advance(4.0)
    assert host.ask("QS") == b"500,500\n\rOK\r\n"
    assert host.ask("QG") == b"10\r\n"  # pen up, nothing executing, FIFO empty


def test_3x_emergency_stop_answers_only_interrupted():
    host = Host(firmware_version="3.0.3")
    host.ask("CU,4,8")
    host.send("SM,1000,1000,0", "SM,1000,500,0", "SM,1000,500,0")
    host.advance(0.5)
    host.take()
    assert host.ask("ES") == b"1\n\rOK\r\n"  # "Interrupted<NL><CR>OK<CR><NL>"
    assert host.ask("ES") == b"0\n\rOK\r\n"
    assert host.ask("QS") == b"500,0\n\rOK\r\n"
    host.ask("CU,10,1")
    assert host.ask("ES") == b"ES,0\n"  # "ES,Interrupted<NL>"


@pytest.mark.parametrize("version, reply", [
    ("3.0.0", b"QU,2,32\r\nOK\r\n"),  # the parameter is echoed before 3.0.2 (issue #228)
    ("3.0.1", b"QU,2,32\r\nOK\r\n"),
    ("3.0.2", b"QU,32\r\nOK\r\n"),
    ("3.0.3", b"QU,32\r\nOK\r\n"),
])
def test_qu_reply_form_by_version(version, reply):
    assert Host(firmware_version=version).ask("QU,2") == reply


def test_sp_2_raises_the_pen_at_once_and_sp_3_keeps_it_up():
    host = Host(firmware_version="3.0.3")
    host.ask("CU,4,8")
    host.send("SP,0", "SM,1000,400,0", "SP,1", "SP,0", "SM,1000,400,0")
    host.advance(0.5)
    assert not host.emulator.pen_up
    assert host.ask("SP,2").endswith(b"OK\r\n")  # bypasses the FIFO
    assert host.emulator.pen_up
    assert host.ask("SP,3").endswith(b"OK\r\n")
    host.advance(3.0)
    assert host.emulator.pen_up, "SP,3 turned the queued lowering into a raise"
    assert Host(firmware_version="3.0.0").ask("SP,2").startswith(b"!")  # added in 3.0.1
