"""`vfab check config|database|device` (exit 0 ok, 1 problem with the reason), and the
example configuration that documents every key."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import attr
import pytest
import yaml

from tests.daemon_process import run_vfab
from vfab.config import HOOK_EVENTS, SECTIONS, Config, load_config
from vfab.store.migrations import SCHEMA_VERSION, migrate

EXAMPLE = Path(__file__).parent.parent / "etc" / "config.example.yaml"


def write_config(tmp_path: Path, data: dict, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


# -- the example configuration --------------------------------------------------------

def test_the_example_config_loads_and_holds_the_defaults():
    assert load_config(EXAMPLE) == Config()


def test_the_example_config_names_every_key():
    data = yaml.safe_load(EXAMPLE.read_text())
    for section, cls in SECTIONS.items():
        keys = {field.name for field in attr.fields(cls)}
        assert set(data[section]) == keys, f"{section}: missing {keys - set(data[section])}"
    assert "hooks" in data
    text = EXAMPLE.read_text()
    for event in HOOK_EVENTS:
        assert event in text
    # Every key has its one-line comment.
    for line in text.splitlines():
        if line.startswith("  ") and not line.lstrip().startswith("#") and ":" in line:
            assert " # " in line, f"no comment: {line!r}"


# -- config -----------------------------------------------------------------------------

def test_check_config_ok():
    result = run_vfab("check", "config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK: ")


def test_check_config_lists_every_schema_problem(tmp_path):
    config = write_config(tmp_path, {"websocket": {"port": "abc", "hots": "x"},
                                     "device": {"type": "plotbot"}})
    result = run_vfab("check", "config", "--config", config)
    assert result.returncode == 1
    problems = result.stderr.splitlines()
    assert "problem: websocket.port: expected an integer 1-65535, got 'abc'" in problems
    assert any(p.startswith("problem: websocket.hots: unknown key (did you mean 'host'?)")
               for p in problems)
    assert any(p.startswith("problem: device.type:") for p in problems)


def test_check_config_lists_what_the_schema_cannot_see(tmp_path):
    config = write_config(tmp_path, {
        "logging": {"format": "%(when)s"},
        "database": {"url": "mysql://db/vfab"},
        "hooks": {"job_completed": [{"command": [str(tmp_path / "missing-notify")]},
                                    {"command": [sys.executable, "-c", "pass"]}]},
    })
    result = run_vfab("check", "config", "--config", config)
    assert result.returncode == 1
    problems = result.stderr.splitlines()
    assert len(problems) == 3, problems
    assert problems[0].startswith("problem: logging.format: ")
    assert problems[1].startswith("problem: database.url: ")
    assert problems[2].startswith("problem: hooks.job_completed[0].command: ")


def test_a_key_file_others_can_read_is_a_warning_not_a_problem(tmp_path):
    """The daemon starts with it (and warns), so the check says so but passes:
    `check config` exits 1 only for a configuration that is wrong."""
    config = write_config(tmp_path, {"websocket": {"authenticate": True, "api_key": "k"}})
    os.chmod(config, 0o644)
    result = run_vfab("check", "config", "--config", config)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("warning: websocket.api_key: ")
    assert "chmod 600" in result.stderr and "config OK" in result.stdout
    os.chmod(config, 0o600)
    quiet = run_vfab("check", "config", "--config", config)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_a_missing_named_config_is_a_problem(tmp_path):
    result = run_vfab("check", "config", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1 and "no such file" in result.stderr


# -- database ---------------------------------------------------------------------------

def test_check_database(tmp_path):
    config = write_config(tmp_path, {})
    workspace = tmp_path / "ws"
    result = run_vfab("check", "database", "--config", config, "--workspace", str(workspace))
    assert result.returncode == 1 and "no database at" in result.stderr
    workspace.mkdir()
    connection = sqlite3.connect(workspace / "vfab.db")
    migrate(connection)
    connection.close()
    result = run_vfab("check", "database", "--config", config, "--workspace", str(workspace))
    assert result.returncode == 0, result.stderr
    assert f"schema {SCHEMA_VERSION} (current), 0 jobs" in result.stdout
    (workspace / "vfab.db").write_bytes(b"this is not a database" * 100)
    result = run_vfab("check", "database", "--config", config, "--workspace", str(workspace))
    assert result.returncode == 1 and "cannot be read" in result.stderr


# -- device -------------------------------------------------------------------------------

@pytest.fixture
def virtual_plotter(tmp_path):
    """`python -m vfab.simulator --link TMP/ttyEBB`, stopped after the test."""
    link = tmp_path / "ttyEBB"
    process = subprocess.Popen([sys.executable, "-m", "vfab.simulator", "--link", str(link)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not link.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the virtual plotter did not start: "
                                     f"{process.communicate(timeout=10)}")
            time.sleep(0.05)
        yield link
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_check_device_finds_the_plotter_and_its_firmware(tmp_path, virtual_plotter):
    config = write_config(tmp_path, {"device": {"type": "axidraw",
                                                "port": str(virtual_plotter)}})
    result = run_vfab("check", "device", "--config", config)
    assert result.returncode == 0, result.stderr
    assert f"device OK: AxiDraw at {virtual_plotter}, firmware 2.8.1" in result.stdout


def test_check_device_says_why_a_port_is_missing(tmp_path):
    config = write_config(tmp_path, {"device": {"type": "axidraw",
                                                "port": str(tmp_path / "ttyACM9")}})
    result = run_vfab("check", "device", "--config", config)
    assert result.returncode == 1
    assert f"cannot open the plotter at {tmp_path / 'ttyACM9'}: no such port" in result.stderr


def test_check_device_says_when_nothing_answers(tmp_path):
    controller, terminal = os.openpty()
    try:
        config = write_config(tmp_path, {"device": {"type": "axidraw", "timeout": 0.5,
                                                    "port": os.ttyname(terminal)}})
        result = run_vfab("check", "device", "--config", config)
    finally:
        os.close(controller)
        os.close(terminal)
    assert result.returncode == 1
    assert "nothing answered the version query" in result.stderr


def test_check_device_on_the_built_in_simulator(tmp_path):
    config = write_config(tmp_path, {"device": {"type": "simulator"}})
    result = run_vfab("check", "device", "--config", config)
    assert result.returncode == 0 and "virtual plotter" in result.stdout
