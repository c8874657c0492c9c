"""The configuration: defaults, validation messages, overrides and XDG paths."""

from pathlib import Path

import pytest

from vfab.config import (MODEL_TRAVEL_MM, Config, ConfigError, config_from_dict,
                         default_config_path, default_workspace, load_config,
                         database_location, plotter_name_of_host, sqlite_path, with_overrides,
                         workspace_path)


def problems_of(data):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return caught.value.problems


def test_defaults_match_the_contract():
    config = Config()
    assert (config.websocket.host, config.websocket.port) == ("localhost", 8766)
    assert config.websocket.enabled and not config.websocket.authenticate
    assert config.websocket.api_key is None
    assert config.websocket.max_connections == 100
    assert config.websocket.heartbeat_interval == 30
    assert config.websocket.allowed_origins == ()
    assert config.websocket.max_message_size == 65536
    assert config.database.url == "sqlite:///workspace/vfab.db"
    assert (config.database.pool_size, config.database.max_overflow) == (10, 20)
    assert (config.device.type, config.device.port) == ("axidraw", "/dev/ttyUSB0")
    assert (config.device.baud_rate, config.device.timeout) == (9600, 30)
    assert config.device.model == "V3/A3" and config.device.travel_mm == (430, 297)
    assert config.logging.level == "info"
    assert config.logging.file == "workspace/logs/vfab.log"
    assert config.logging.max_size == 10 * 1024 * 1024
    assert config.logging.backup_count == 5
    assert not config.logging.audit and not config.logging.security_events
    assert config.hooks == {}


def test_every_model_has_its_travel():
    assert MODEL_TRAVEL_MM["MiniKit"] == (160, 101.6)
    assert config_from_dict({"device": {"model": "SE/A1"}}).device.travel_mm == (864, 594)


def test_a_bad_value_names_the_key_and_what_was_expected():
    assert problems_of({"websocket": {"port": "abc"}}) == [
        "websocket.port: expected an integer 1-65535, got 'abc'"]


def test_unknown_keys_name_the_path_and_the_closest_key():
    assert problems_of({"websocket": {"prot": 1}}) == [
        "websocket.prot: unknown key (did you mean 'port'?)"]
    assert problems_of({"devcie": {}}) == ["devcie: unknown key (did you mean 'device'?)"]
    assert problems_of({"hooks": {"job_complete": []}}) == [
        "hooks.job_complete: unknown key (did you mean 'job_completed'?)"]


def test_every_problem_is_listed_at_once():
    found = problems_of({"websocket": {"port": 0.5, "max_connections": -1},
                         "device": {"type": "plotbot"}, "logging": {"level": "loud"}})
    assert len(found) == 4
    assert "device.type: expected one of axidraw, simulator, none, got 'plotbot'" in found


def test_authenticate_needs_a_key():
    assert problems_of({"websocket": {"authenticate": True}}) == [
        "websocket.api_key: required when websocket.authenticate is true"]
    config = config_from_dict({"websocket": {"authenticate": True, "api_key": "k"}})
    assert config.websocket.api_key == "k"


@pytest.mark.parametrize("key, why", [
    ("   ", "expected a key, got an empty or blank string"),
    ("", "expected a key, got an empty or blank string"),
    ("\t\n", "expected a key, got an empty or blank string"),
    (" s3cret", "expected a key without spaces at its start or end"),
    ("s3cret\n", "expected a key without spaces at its start or end"),
    ("s3\x00cret", "expected a key of printable characters"),
    (12345, "expected a string, got a int"),
])
def test_a_key_no_client_could_send_is_refused_without_echoing_it(key, why):
    assert problems_of({"websocket": {"authenticate": True, "api_key": key}}) == [
        f"websocket.api_key: {why}"]


def test_hooks_take_commands_and_webhooks():
    config = config_from_dict({"hooks": {
        "job_completed": [{"command": ["/bin/true", "--done"], "timeout": 5},
                          {"webhook": "http://127.0.0.1:9000/vfab"}]}})
    command, webhook = config.hooks["job_completed"]
    assert command.command == ("/bin/true", "--done") and command.timeout == 5
    assert webhook.webhook == "http://127.0.0.1:9000/vfab" and webhook.timeout == 30
    assert problems_of({"hooks": {"job_failed": [{"command": "rm -rf /"}]}}) == [
        "hooks.job_failed[0]: expected a list of strings, got 'rm -rf /'"]


def test_sizes_and_booleans():
    config = config_from_dict({"logging": {"max_size": "512KB", "audit": True}})
    assert config.logging.max_size == 512 * 1024 and config.logging.audit
    assert problems_of({"logging": {"audit": "yes"}}) == [
        "logging.audit: expected true or false, got 'yes'"]


def test_command_line_values_win(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("websocket:\n  port: 9000\n  host: 0.0.0.0\nlogging:\n  level: error\n")
    config = with_overrides(load_config(path), port=0, log_level="debug")
    assert (config.websocket.host, config.websocket.port) == ("0.0.0.0", 0)
    assert config.logging.level == "debug"


def test_a_missing_default_file_means_defaults_but_a_named_one_is_an_error(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert load_config() == Config()
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_bad_yaml_says_where(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("websocket:\n  port: [1,\n")
    with pytest.raises(ConfigError, match="line 3 is not valid YAML"):
        load_config(path)


def test_xdg_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "d"))
    assert default_config_path() == tmp_path / "c" / "vfab" / "config.yaml"
    assert default_workspace() == tmp_path / "d" / "vfab" / "workspace"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_workspace() == Path.home() / ".local/share/vfab/workspace"


def test_workspace_relative_paths(tmp_path):
    assert workspace_path("workspace/logs/vfab.log", tmp_path) == tmp_path / "logs/vfab.log"
    assert workspace_path("/var/log/vfab.log", tmp_path) == Path("/var/log/vfab.log")
    assert sqlite_path("sqlite:///workspace/vfab.db", tmp_path) == tmp_path / "vfab.db"
    assert sqlite_path("sqlite:////srv/vfab.db", tmp_path) == Path("/srv/vfab.db")
    with pytest.raises(ConfigError, match="database.url"):
        sqlite_path("postgresql://db/vfab", tmp_path)
    assert database_location("postgresql://me:secret@db:5433/vfab", tmp_path) == (
        "postgresql://me:secret@db:5433/vfab")
    assert database_location("sqlite:///workspace/vfab.db", tmp_path) == tmp_path / "vfab.db"
    for wrong in ("mysql://db/vfab", "postgresql://me:secret@db:port/vfab",
                  "postgresql://db"):
        with pytest.raises(ConfigError, match="database.url") as raised:
            database_location(wrong, tmp_path)
        assert "secret" not in str(raised.value)


def test_the_pen_change_position_must_be_within_the_travel():
    assert problems_of({"device": {"model": "V3/A4", "pen_change_position": [310, 10]}}) == [
        "device.pen_change_position: [310, 10] is outside the V3/A4 travel (300 x 218 mm)"]
    config = config_from_dict({"device": {"pen_change_position": [100, 0]}})
    assert config.device.pen_change_position == (100.0, 0.0)


def test_plotters_take_the_device_keys_on_top_of_the_device_section():
    config = config_from_dict({
        "device": {"type": "simulator", "speed_pen_down": 40},
        "plotters": [{"name": "left", "port": "/dev/ttyACM0", "tags": ["a3", "a3"]},
                     {"name": "right", "model": "V3/A4", "speed_pen_down": 20}]})
    left, right = config.plotters_here()
    assert (left.name, left.tags, left.device.port) == ("left", ("a3",), "/dev/ttyACM0")
    assert (left.device.type, left.device.speed_pen_down) == ("simulator", 40)
    assert (right.name, right.tags, right.device.model) == ("right", (), "V3/A4")
    assert right.device.speed_pen_down == 20 and config.device.speed_pen_down == 40


def test_a_device_section_alone_is_one_plotter_named_after_the_host():
    config = config_from_dict({"device": {"type": "none"}})
    (only,) = config.plotters_here()
    assert only.name == plotter_name_of_host() and only.tags == ()
    assert only.device is config.device


def test_plotter_entries_are_checked_like_the_device_section():
    assert problems_of({"plotters": [
        {"name": "a", "prot": "/dev/x"},
        {"name": "a"},
        {"port": "/dev/y"},
        {"name": "b c", "tags": "a3"},
        {"name": "d", "model": "V3/A4", "pen_change_position": [310, 0]},
    ]}) == [
        "plotters[0].prot: unknown key (did you mean 'port'?)",
        "plotters[1].name: 'a' is already the name of another plotter",
        "plotters[2].name: every plotter needs a name",
        "plotters[3].name: expected a name of letters, digits, '.', '_' or '-' (at most 64), "
        "got 'b c'",
        "plotters[3].tags: expected a list of strings, got 'a3'",
        "plotters[4].pen_change_position: [310, 0] is outside the V3/A4 travel (300 x 218 mm)",
    ]
    assert problems_of({"plotters": []}) == [
        "plotters: expected a non-empty list of plotters, got []"]
