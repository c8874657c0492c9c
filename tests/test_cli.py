"""The `vfab` client commands against a real daemon on the virtual plotter."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.daemon_process import DaemonProcess, run_vfab
from tests.test_runner import ONE_LAYER


def test_add_list_status_watch_and_cancel(tmp_path):
    drawing = tmp_path / "squares.svg"
    drawing.write_bytes(ONE_LAYER)
    daemon = DaemonProcess(tmp_path, {"device": {"type": "simulator", "model": "V3/A4",
                                                 "simulator_speed": 10}}).start()
    url = ["--url", daemon.url]
    try:
        added = run_vfab("add", "job", "squares", str(drawing), "--priority", "3", *url)
        assert added.returncode == 0, added.stderr
        job_id = added.stdout.strip()
        assert len(job_id) == 12
        # The virtual plotter runs ten times an AxiDraw's speed: both times, each true.
        job = json.loads(run_vfab("status", job_id, "--json", *url).stdout)
        here = re.search(r"about (\d+) s here, (\d+) s on an AxiDraw", added.stderr)
        assert here, added.stderr
        assert int(here.group(2)) == round(job["estimated_seconds"])
        assert abs(int(here.group(1)) - job["estimated_seconds"] / 10) <= 1
        watched = run_vfab("watch", job_id, *url, timeout=120)
        assert watched.returncode == 0, watched.stderr
        listed = run_vfab("list", "jobs", *url)
        assert listed.returncode == 0 and job_id in listed.stdout
        assert "completed" in listed.stdout
        as_json = json.loads(run_vfab("list", "jobs", "--json", *url).stdout)
        assert as_json["jobs"][0]["id"] == job_id
        status = json.loads(run_vfab("status", job_id, "--json", *url).stdout)
        assert status["state"] == "completed" and status["priority"] == 3
        overall = run_vfab("status", *url)
        assert overall.returncode == 0 and "daemon" in overall.stdout

        second = run_vfab("add", "job", "again", str(drawing), *url).stdout.strip()
        daemon.wait_for_job(second, {"plotting"})
        # Held paused, so that it cannot end by itself before a watcher slow to
        # start on a loaded machine is following it.
        paused = run_vfab("pause", second, *url)
        assert paused.returncode == 0, paused.stderr
        # `vfab watch` with no id follows every active job until it ends.
        # The first watch opened a WebSocket only if its job had not ended first.
        before = len(re.findall(r"websocket client \S+ connected", daemon.log))
        watcher = subprocess.Popen([sys.executable, "-m", "vfab", "watch", *url],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while len(re.findall(r"websocket client \S+ connected", daemon.log)) <= before:
            assert time.monotonic() < deadline and watcher.poll() is None, daemon.log
            time.sleep(0.05)
        cancelled = run_vfab("cancel", second, *url)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
        _, stderr = watcher.communicate(timeout=60)
        assert watcher.returncode == 1  # the job it watched did not complete
        assert "cancelled" in stderr
        refused = run_vfab("cancel", second, *url)
        assert refused.returncode == 1 and "cancelled" in refused.stderr
        missing = run_vfab("status", "nosuchjob", *url)
        assert missing.returncode == 1 and "nosuchjob" in missing.stderr
    finally:
        assert daemon.stop() == 0, daemon.log


def test_a_bad_drawing_is_refused_in_words(tmp_path):
    junk = tmp_path / "junk.svg"
    junk.write_text("<html>not a drawing</html>")
    daemon = DaemonProcess(tmp_path).start()
    try:
        result = run_vfab("add", "job", "junk", str(junk), "--url", daemon.url)
        assert result.returncode == 1 and result.stdout == ""
        assert "vfab:" in result.stderr and "svg" in result.stderr.lower()
        missing = run_vfab("add", "job", "x", str(tmp_path / "missing.svg"), "--url",
                           daemon.url)
        assert missing.returncode == 2 and "cannot read" in missing.stderr
    finally:
        assert daemon.stop() == 0


def test_twistd_and_vfab_know_the_plugin():
    twistd = Path(sys.executable).parent / "twistd"
    listing = subprocess.run([str(twistd), "--help"], capture_output=True, text=True,
                             timeout=60)
    assert listing.returncode == 0 and "vfab" in listing.stdout
    assert run_vfab("--help").returncode == 0
    assert run_vfab("--version").stdout.startswith("vfab ")


def test_status_and_watch_say_which_interrupted_job_holds_the_queue(tmp_path):
    drawing = tmp_path / "squares.svg"
    drawing.write_bytes(ONE_LAYER)

    def daemon_at(speed: float) -> DaemonProcess:
        return DaemonProcess(tmp_path, {"device": {
            "type": "simulator", "model": "V3/A4", "simulator_speed": speed,
            "shutdown_grace": 0}}).start()

    daemon = daemon_at(1)  # a plot of about 15 s: the stop finds it plotting
    try:
        held = run_vfab("add", "job", "held", str(drawing), "--url", daemon.url).stdout.strip()
        daemon.wait_for_job(held, {"plotting"})
        waiting = run_vfab("add", "job", "waiting", str(drawing), "--url", daemon.url)
        waiting = waiting.stdout.strip()
    finally:
        assert daemon.stop() == 0, daemon.log
    daemon = daemon_at(10)
    url = ["--url", daemon.url]
    try:
        status = run_vfab("status", *url)
        assert status.returncode == 0, status.stderr
        assert f"held     {held} 'held' interrupted" in status.stdout
        assert "the daemon stopped" in status.stdout
        assert f"vfab resume {held}" in status.stdout
        assert json.loads(run_vfab("status", held, "--json", *url).stdout)["error"]
        watcher = subprocess.Popen([sys.executable, "-m", "vfab", "watch", waiting, *url],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # It has said what holds the queue once its WebSocket is up.
        deadline = time.monotonic() + 30
        while not re.search(r"websocket client \S+ connected", daemon.log):
            assert time.monotonic() < deadline and watcher.poll() is None, daemon.log
            time.sleep(0.05)
        assert run_vfab("resume", held, *url).returncode == 0
        _, stderr = watcher.communicate(timeout=120)
        assert watcher.returncode == 0, stderr
        said = " ".join(stderr.split())  # as rich wrapped it for the terminal
        assert f"job {held} 'held' is interrupted and holds the queue" in said
        assert f"vfab resume {held}" in said
    finally:
        assert daemon.stop() == 0, daemon.log


def test_ctrl_c_ends_watch_quietly_with_130(tmp_path):
    daemon = DaemonProcess(tmp_path).start()  # no plotter: the job stays queued
    try:
        drawing = tmp_path / "squares.svg"
        drawing.write_bytes(ONE_LAYER)
        job_id = run_vfab("add", "job", "squares", str(drawing), "--url",
                          daemon.url).stdout.strip()
        watcher = subprocess.Popen([sys.executable, "-m", "vfab", "watch", job_id,
                                    "--url", daemon.url],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        daemon.wait_for_log(r"websocket client \S+ connected")
        watcher.send_signal(signal.SIGINT)
        _, stderr = watcher.communicate(timeout=60)
        assert watcher.returncode == 130, stderr
        assert "1006" not in stderr and "closed the connection" not in stderr
        assert "Traceback" not in stderr
    finally:
        assert daemon.stop() == 0, daemon.log


def test_list_keeps_ids_whole_and_any_unique_prefix_names_a_job(tmp_path):
    daemon = DaemonProcess(tmp_path).start()  # no plotter: the jobs stay queued
    url = ["--url", daemon.url]
    long_name = "a-drawing-whose-name-is-far-too-long-for-one-row-of-the-table"
    try:
        # 17 ids of hex digits: at least two begin with the same digit.
        ids = [daemon.submit(ONE_LAYER, name=long_name)[1]["id"] for _ in range(17)]
        daemon.request("POST", f"/api/jobs/{ids[1]}/cancel")  # a wider state column
        listed = run_vfab("list", "jobs", *url, env={"COLUMNS": "80"})
        assert listed.returncode == 0, listed.stderr
        assert all(job_id in listed.stdout for job_id in ids), listed.stdout
        assert long_name not in listed.stdout
        lines = listed.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80
        assert lines[0].split() == ["ID", "NAME", "STATE", "PRIO", "PROGRESS", "ESTIMATE",
                                    "CREATED"]

        first = ids[0]
        unique = next(first[:n] for n in range(1, len(first) + 1)
                      if sum(job_id.startswith(first[:n]) for job_id in ids) == 1)
        shown = run_vfab("status", unique, "--json", *url)
        assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == first
        cancelled = run_vfab("cancel", unique, *url)
        assert cancelled.returncode == 0 and f"job {first} " in cancelled.stdout

        shared = next(job_id[0] for job_id in ids
                      if sum(other.startswith(job_id[0]) for other in ids) > 1)
        ambiguous = run_vfab("pause", shared, *url)
        assert ambiguous.returncode == 1
        assert "give more of the id" in ambiguous.stderr
        assert all(job_id in ambiguous.stderr for job_id in ids if job_id.startswith(shared))
        unknown = run_vfab("resume", "zz", *url)
        assert unknown.returncode == 1
        assert "no job has an id beginning 'zz'" in unknown.stderr
    finally:
        assert daemon.stop() == 0, daemon.log


# -- in process, against a fake daemon ---------------------------------------------------

class FakeDaemon:
    """The HTTP API as the client commands ask it, for one queued job."""

    url = "http://fake:8766"
    api_key = None

    def __init__(self, speed: float | None):
        self.job = {"id": "3c4531aa3f0e", "name": "sample", "state": "queued", "priority": 0,
                    "progress": 0.0, "layers": 1, "paths": 4, "pen_down_mm": 900.0,
                    "pen_up_mm": 300.0, "estimated_seconds": 132.0, "plotting_seconds": 0.0,
                    "created_at": "2026-12-07T15:40:00.000Z", "started_at": None,
                    "finished_at": None, "error": None}
        self.device = {"status": "idle", **({} if speed is None else {"simulator_speed": speed})}

    def request(self, method: str, path: str, **options) -> dict:
        if path == "/api/device":
            return self.device
        if path == "/api/jobs":
            return {"jobs": [self.job]}
        assert path == f"/api/jobs/{self.job['id']}", path
        return self.job


def printed(monkeypatch, command, client, **args) -> str:
    import argparse
    import io

    from rich.console import Console

    from vfab.cli import commands
    out = io.StringIO()
    monkeypatch.setattr(commands, "_out", Console(file=out, width=80, highlight=False))
    assert command(client, argparse.Namespace(**args)) == 0
    return out.getvalue()


def test_list_and_status_show_the_time_here_and_an_axidraws(monkeypatch):
    """On the virtual plotter at speed 4 the sample takes 33 s, not 2 min 12 s
    (issue 15, item 2); on an AxiDraw the one time is the AxiDraw's."""
    from vfab.cli import commands
    virtual = FakeDaemon(speed=4)
    listed = printed(monkeypatch, commands.list, virtual, what="jobs", state=None, limit=None, json=False)
    assert "ESTIMATE (AXIDRAW)" in listed and "33 s (2 min 12 s)" in listed
    assert "sample" in listed  # in 80 columns the name is not cut to make room
    shown = printed(monkeypatch, commands.status, virtual, job_id="3c45", json=False)
    assert "33 s here, 2 min 12 s on an AxiDraw" in shown
    real = FakeDaemon(speed=None)
    listed = printed(monkeypatch, commands.list, real, what="jobs", state=None, limit=None, json=False)
    assert "ESTIMATE " in listed and "(AXIDRAW)" not in listed and "2 min 12 s" in listed
    shown = printed(monkeypatch, commands.status, real, job_id="3c45", json=False)
    assert "2 min 12 s" in shown and "here" not in shown


def test_watch_shows_the_time_left_here_and_an_axidraws():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from vfab.cli.watch import JobBoard
    job = FakeDaemon(speed=4).job
    progress = Progress(console=Console(file=io.StringIO()))
    board = JobBoard(progress, progress.console, [job], speed=4.0)
    assert progress.tasks[0].fields["eta"] == "33 s here, 2 min 12 s on an AxiDraw"
    JobBoard(progress, progress.console, [{**job, "id": "half", "progress": 0.5}], 4.0)
    assert progress.tasks[1].fields["eta"] == "16 s here, 1 min 06 s on an AxiDraw"
    board.on_message({"type": "job_progress", "job_id": job["id"], "progress": 0.5,
                      "current_layer": 1, "total_layers": 1, "eta_seconds": 16.5})
    assert progress.tasks[0].fields["eta"] == "16 s (1 min 06 s on an AxiDraw)"


def test_client_options_go_before_the_command_or_after_it():
    from vfab.cli import parser
    before = parser().parse_args(["--url", "http://a:1", "--api-key", "K", "add", "job",
                                  "n", "f.svg"])
    assert (before.command, before.url, before.api_key) == ("add", "http://a:1", "K")
    after = parser().parse_args(["list", "jobs", "--url", "http://b:2"])
    assert after.url == "http://b:2"
    both = parser().parse_args(["-c", "a.yaml", "status", "--url", "http://b:2"])
    assert (both.config, both.url) == ("a.yaml", "http://b:2")
    checked = parser().parse_args(["-c", "a.yaml", "check", "config"])
    assert checked.config == "a.yaml"


def test_an_empty_job_id_is_refused_before_the_daemon_is_asked(capsys):
    """An empty prefix begins every id: `vfab cancel ""` must not pick a job."""
    import pytest

    from vfab.cli import main
    for argv in (["cancel", ""], ["pause", " "], ["resume", "\t"], ["status", ""],
                 ["watch", " "]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--url", "http://127.0.0.1:9"])
        assert exit_.value.code == 2, argv
        assert "an empty job id names no job" in capsys.readouterr().err


def test_a_state_that_does_not_exist_is_a_usage_error():
    """`list jobs --state` takes the contract's state names (any case); another
    word is a usage error (2) found before any daemon is asked."""
    result = run_vfab("list", "jobs", "--state", "finished", "--url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "--state" in result.stderr and "awaiting_pen" in result.stderr
