"""The daemon's configuration: YAML sections typed and validated as attrs classes.

Every key of the contract has a default, unknown keys are refused with their
path and the closest valid key, and a bad value names the key and what it
expected, so that an operator can fix the file from the message alone.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Callable, Mapping

import attr
import yaml

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEVICE_TYPES = ("axidraw", "simulator", "none")
HOOK_EVENTS = (
    "job_queued",
    "job_started",
    "job_completed",
    "job_failed",
    "job_cancelled",
    "job_paused",
    "awaiting_pen",
    "device_connected",
    "device_lost",
)

#: Travel limits (width, height) in mm of each AxiDraw model.
MODEL_TRAVEL_MM: dict[str, tuple[float, float]] = {
    "V3/A4": (300.0, 218.0),
    "V3/A3": (430.0, 297.0),
    "SE/A2": (594.0, 432.0),
    "SE/A1": (864.0, 594.0),
    "MiniKit": (160.0, 101.6),
    "V3/XLX": (595.0, 218.0),
    "V3/B6": (190.0, 140.0),
}


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is wrong."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


Check = Callable[[Any], Any]


class _Invalid(ValueError):
    """Raised by a check with the 'expected ..., got ...' part of a message."""


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def integer(low: int | None = None, high: int | None = None) -> Check:
    def check(value: Any) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and (low is None or value >= low) and (high is None or value <= high):
            return value
        if low is not None and high is not None:
            wanted = f"an integer {low}-{high}"
        elif low is not None:
            wanted = f"an integer >= {low}"
        else:
            wanted = "an integer"
        raise _Invalid(f"expected {wanted}, got {_shown(value)}")

    return check


def number(low: float | None = None, high: float | None = None) -> Check:
    def check(value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and math.isfinite(value):
            if (low is None or value >= low) and (high is None or value <= high):
                return float(value)
        if low is not None and high is not None:
            wanted = f"a number {low:g}-{high:g}"
        elif low is not None:
            wanted = f"a number >= {low:g}"
        else:
            wanted = "a number"
        raise _Invalid(f"expected {wanted}, got {_shown(value)}")

    return check


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"expected true or false, got {_shown(value)}")


def text(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    raise _Invalid(f"expected a non-empty string, got {_shown(value)}")


def optional_text(value: Any) -> str | None:
    return None if value is None else text(value)


def api_key(value: Any) -> str | None:
    """The API key: printable, not blank, no spaces at either end (a key sent in a
    header loses them, so such a key could never match). Never echoed back."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got a {type(value).__name__}")
    if not value.strip():
        raise _Invalid("expected a key, got an empty or blank string")
    if value != value.strip():
        raise _Invalid("expected a key without spaces at its start or end")
    if not value.isprintable():
        raise _Invalid("expected a key of printable characters")
    return value


def choice(*options: str, fold_case: bool = True) -> Check:
    def check(value: Any) -> str:
        if isinstance(value, str):
            for option in options:
                if value == option or (fold_case and value.lower() == option.lower()):
                    return option
        raise _Invalid(f"expected one of {', '.join(options)}, got {_shown(value)}")

    return check


def text_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise _Invalid(f"expected a list of strings, got {_shown(value)}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2,
               "G": 1024**3, "GB": 1024**3}


def byte_size(value: Any) -> int:
    """A size such as "10MB", "512KB" or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
            if size > 0:
                return size
    raise _Invalid(f"expected a size such as '10MB', got {_shown(value)}")


def tcp_port(value: Any) -> int:
    """A TCP port; 0 asks for any free port (the bound one is logged)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
        return value
    raise _Invalid(f"expected an integer 1-65535, got {_shown(value)}")


def microsteps(value: Any) -> int:
    if value in (1, 2, 4, 8, 16) and not isinstance(value, bool):
        return value
    raise _Invalid(f"expected one of 16, 8, 4, 2, 1, got {_shown(value)}")


def park_position(value: Any) -> tuple[float, float] | None:
    """Where the carriage waits for a pen change: "home" or [x_mm, y_mm]."""
    if value == "home" or value is None:
        return None
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                    for v in value)):
        return (float(value[0]), float(value[1]))
    raise _Invalid(f"expected 'home' or [x_mm, y_mm], got {_shown(value)}")


def setting(default: Any, check: Check, doc: str = "") -> Any:
    """An attrs field whose YAML value is validated by `check`."""
    return attr.ib(default=default, metadata={"check": check, "doc": doc})


@attr.s(frozen=True, auto_attribs=False)
class WebSocketConfig:
    enabled: bool = setting(True, boolean)
    host: str = setting("localhost", text)
    port: int = setting(8766, tcp_port)
    authenticate: bool = setting(False, boolean)
    api_key: str | None = setting(None, api_key)
    max_connections: int = setting(100, integer(1))
    heartbeat_interval: float = setting(30.0, number(0.1))
    allowed_origins: tuple[str, ...] = setting((), text_list)
    max_message_size: int = setting(65536, integer(64))


#: The name `uploads.max_size` had before the `uploads` section; still accepted.
OLD_UPLOAD_SIZE_KEY = "max_upload_size"


@attr.s(frozen=True, auto_attribs=False)
class UploadsConfig:
    """How big a submitted drawing may be (SECURITY.md says what each limit costs).
    The defaults admit a drawing of a million segments."""

    max_size: int = setting(50 * 1024**2, byte_size, "bytes of one upload; larger is 413")
    max_elements: int = setting(500_000, integer(1),
                                "SVG elements, counting <use> copies; more is 400")
    max_coordinates: int = setting(3_000_000, integer(1),
                                   "numbers in path data and point lists; more is 400")
    max_concurrent: int = setting(4, integer(1, 1000),
                                  "uploads received at once; more is 503 with Retry-After")


@attr.s(frozen=True, auto_attribs=False)
class DatabaseConfig:
    url: str = setting("sqlite:///workspace/vfab.db", text)
    pool_size: int = setting(10, integer(1))
    max_overflow: int = setting(20, integer(0))


@attr.s(frozen=True, auto_attribs=False)
class DeviceConfig:
    """The plotter and how it draws. Speeds in mm/s, accelerations in mm/s²."""

    type: str = setting("axidraw", choice(*DEVICE_TYPES))
    port: str = setting("/dev/ttyUSB0", text)
    baud_rate: int = setting(9600, integer(1))
    timeout: float = setting(30.0, number(0.1))
    model: str = setting("V3/A3", choice(*MODEL_TRAVEL_MM))
    # Pen servo: heights in percent of the servo range (0 = lowest), rates in
    # percent of full speed per 24 ms, as the AxiDraw software names them.
    pen_pos_up: float = setting(60.0, number(0, 100))
    pen_pos_down: float = setting(30.0, number(0, 100))
    pen_rate_raise: float = setting(75.0, number(1, 100))
    pen_rate_lower: float = setting(50.0, number(1, 100))
    pen_delay_up: float = setting(0.0, number(0, 10000), "extra ms after raising")
    pen_delay_down: float = setting(0.0, number(0, 10000), "extra ms after lowering")
    servo_timeout: float = setting(60.0, number(0, 3600),
                                   "seconds of idle before the pen servo powers off")
    # Motion.
    speed_pen_down: float = setting(50.0, number(1, 400))
    speed_pen_up: float = setting(150.0, number(1, 400))
    accel_pen_down: float = setting(1000.0, number(10, 20000))
    accel_pen_up: float = setting(2000.0, number(10, 20000))
    cornering: float = setting(0.05, number(0.001, 10),
                               "junction deviation in mm: larger takes corners faster")
    microstepping: int = setting(16, microsteps, "16, 8, 4, 2 or 1 microsteps per full step")
    # Geometry.
    tolerance: float = setting(0.05, number(0.001, 5), "curve flattening tolerance, mm")
    optimize: bool = setting(True, boolean, "reorder and merge paths to cut pen-up travel")
    merge_tolerance: float = setting(0.05, number(0, 10))
    # Queue behaviour.
    pen_change_position: tuple[float, float] | None = setting(None, park_position)
    shutdown_grace: float = setting(30.0, number(0, 86400),
                                    "seconds an active plot may run on after SIGTERM")
    progress_save_interval: float = setting(2.0, number(0.1, 600))
    simulator_speed: float = setting(1.0, number(0.01, 10000),
                                     "virtual plotter time factor (10 = ten times faster)")
    firmware: str = setting("2.8.1", choice("2.8.1", "3.0.3"),
                            "the EBB firmware the virtual plotter emulates")
    reconnect_max_delay: float = setting(30.0, number(0.1, 3600))
    motion_queue: float = setting(0.15, number(0.03, 2.0),
                                  "seconds of motion queued ahead on a 3.x board's deep FIFO")

    @property
    def travel_mm(self) -> tuple[float, float]:
        return MODEL_TRAVEL_MM[self.model]


_PLOTTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def plotter_name(value: Any) -> str:
    """A plotter's name: a word people type in `--plotter` and URLs."""
    if isinstance(value, str) and _PLOTTER_NAME.match(value):
        return value
    raise _Invalid(f"expected a name of letters, digits, '.', '_' or '-' (at most 64), "
                   f"got {_shown(value)}")


def tag_list(value: Any) -> tuple[str, ...]:
    """A plotter's tags: free words (a paper size, a pen) that a job may require."""
    tags = text_list(value)
    for tag in tags:
        if not tag.strip() or tag != tag.strip() or "," in tag:
            raise _Invalid(f"expected tags without commas or surrounding spaces, "
                           f"got {_shown(tag)}")
    return tuple(dict.fromkeys(tags))


@attr.s(frozen=True, auto_attribs=True)
class PlotterConfig:
    """One plotter of the daemon: its name, its tags and its `device` settings."""

    name: str
    tags: tuple[str, ...]
    device: DeviceConfig


def host_name() -> str:
    """This machine's name, the host's name on a farm unless `farm.host` sets one."""
    return socket.gethostname() or "localhost"


def optional_host_name(value: Any) -> str | None:
    return None if value is None else plotter_name(value)


@attr.s(frozen=True, auto_attribs=False)
class FarmConfig:
    """Several hosts on one PostgreSQL queue (`database.url: postgresql://...`)."""

    host: str | None = setting(None, optional_host_name,
                               "this host's name on the farm, unique there; "
                               "default: the machine's host name")
    heartbeat_interval: float = setting(5.0, number(0.1),
                                        "seconds between this host's I-am-alive writes")
    host_timeout: float = setting(30.0, number(0.5),
                                  "seconds of silence after which the other hosts count a "
                                  "host as gone and mark its plotting jobs interrupted")


@attr.s(frozen=True, auto_attribs=False)
class LoggingConfig:
    level: str = setting("info", choice(*LOG_LEVELS))
    file: str | None = setting("workspace/logs/vfab.log", optional_text)
    max_size: int = setting(10 * 1024**2, byte_size)
    backup_count: int = setting(5, integer(0, 1000))
    format: str = setting("%(asctime)s - %(name)s - %(levelname)s - %(message)s", text)
    audit: bool = setting(False, boolean)
    security_events: bool = setting(False, boolean)


@attr.s(frozen=True)
class HookAction:
    """One action run on an event: a command (argv, no shell) or a webhook URL."""

    command: tuple[str, ...] | None = attr.ib(default=None)
    webhook: str | None = attr.ib(default=None)
    timeout: float = attr.ib(default=30.0)


@attr.s(frozen=True, auto_attribs=False)
class Config:
    websocket: WebSocketConfig = attr.ib(factory=WebSocketConfig)
    database: DatabaseConfig = attr.ib(factory=DatabaseConfig)
    device: DeviceConfig = attr.ib(factory=DeviceConfig)
    logging: LoggingConfig = attr.ib(factory=LoggingConfig)
    uploads: UploadsConfig = attr.ib(factory=UploadsConfig)
    farm: FarmConfig = attr.ib(factory=FarmConfig)
    hooks: Mapping[str, tuple[HookAction, ...]] = attr.ib(factory=dict)
    #: The `plotters:` list as given; empty means one plotter from `device`.
    plotters: tuple[PlotterConfig, ...] = attr.ib(default=())

    def plotters_here(self) -> tuple[PlotterConfig, ...]:
        """Every plotter of this daemon: the `plotters:` list, or one plotter named
        after the host from `device`."""
        if self.plotters:
            return self.plotters
        return (PlotterConfig(name=plotter_name_of_host(self.farm.host), tags=(),
                              device=self.device),)

    def host(self) -> str:
        """This daemon's host, as jobs, statuses and the farm's other hosts name it."""
        return self.farm.host or host_name()


def plotter_name_of_host(host: str | None = None) -> str:
    """The name of the one plotter of a `device:`-only configuration: the host's
    name (`host`, else the machine's), made a valid plotter name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", (host or host_name()).split(".")[0])[:64]
    return name.lstrip("._-") or "plotter"


SECTIONS: dict[str, type] = {
    "websocket": WebSocketConfig,
    "database": DatabaseConfig,
    "device": DeviceConfig,
    "logging": LoggingConfig,
    "uploads": UploadsConfig,
    "farm": FarmConfig,
}


def _unknown(path: str, key: Any, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
    return f"{path}{key}: unknown key{hint}"


def _section(name: str, cls: type, data: Any, problems: list[str]) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        problems.append(f"{name}: expected a mapping of keys, got {_shown(data)}")
        return cls()
    fields = {a.name: a for a in attr.fields(cls)}
    values = {}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            problems.append(_unknown(f"{name}.", key, sorted(fields)))
            continue
        try:
            values[key] = field.metadata["check"](value)
        except _Invalid as error:
            problems.append(f"{name}.{key}: {error}")
    return cls(**values)


def _hook_action(where: str, data: Any, problems: list[str]) -> HookAction | None:
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping with 'command' or 'webhook'")
        return None
    for key in data:
        if key not in ("command", "webhook", "timeout"):
            problems.append(_unknown(f"{where}.", key, ["command", "timeout", "webhook"]))
    command, webhook = data.get("command"), data.get("webhook")
    if (command is None) == (webhook is None):
        problems.append(f"{where}: expected exactly one of 'command' or 'webhook'")
        return None
    try:
        timeout = number(0.1, 86400)(data.get("timeout", 30))
        if command is not None:
            argv = text_list(command)
            if not argv:
                raise _Invalid("expected a non-empty argv list")
            return HookAction(command=argv, timeout=timeout)
        url = text(webhook)
        if not url.startswith(("http://", "https://")):
            raise _Invalid(f"expected an http:// or https:// URL, got {_shown(url)}")
        return HookAction(webhook=url, timeout=timeout)
    except _Invalid as error:
        problems.append(f"{where}: {error}")
        return None


def _hooks(data: Any, problems: list[str]) -> dict[str, tuple[HookAction, ...]]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"hooks: expected a mapping of events, got {_shown(data)}")
        return {}
    hooks = {}
    for event, actions in data.items():
        if event not in HOOK_EVENTS:
            problems.append(_unknown("hooks.", event, list(HOOK_EVENTS)))
            continue
        if not isinstance(actions, list):
            problems.append(f"hooks.{event}: expected a list of actions")
            continue
        parsed = [_hook_action(f"hooks.{event}[{i}]", a, problems) for i, a in enumerate(actions)]
        hooks[event] = tuple(a for a in parsed if a is not None)
    return hooks


def _old_upload_size(data: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """`websocket.max_upload_size`, the old name of `uploads.max_size`, moved there."""
    websocket, uploads = data.get("websocket"), data.get("uploads") or {}
    if not isinstance(websocket, dict) or OLD_UPLOAD_SIZE_KEY not in websocket \
            or not isinstance(uploads, dict):
        return data
    if "max_size" in uploads:
        problems.append(f"websocket.{OLD_UPLOAD_SIZE_KEY}: the old name of uploads.max_size, "
                        f"which is set too; keep only uploads.max_size")
    websocket = dict(websocket)
    uploads = {"max_size": websocket.pop(OLD_UPLOAD_SIZE_KEY), **uploads}
    return {**data, "websocket": websocket, "uploads": uploads}


def _device_problems(where: str, device: DeviceConfig, problems: list[str]) -> None:
    if device.pen_change_position is not None:
        (x, y), (width, height) = device.pen_change_position, device.travel_mm
        if x > width or y > height:
            problems.append(f"{where}.pen_change_position: [{x:g}, {y:g}] is outside the "
                            f"{device.model} travel ({width:g} x {height:g} mm)")


def _plotters(data: Any, device: DeviceConfig, problems: list[str]) -> tuple[PlotterConfig, ...]:
    """The `plotters:` list: each entry is the `device` section's settings with its
    own keys on top, plus a unique `name` and its `tags`."""
    if data is None:
        return ()
    if not isinstance(data, list) or not data:
        problems.append(f"plotters: expected a non-empty list of plotters, got {_shown(data)}")
        return ()
    fields = {a.name: a for a in attr.fields(DeviceConfig)}
    plotters: list[PlotterConfig] = []
    for index, entry in enumerate(data):
        where = f"plotters[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping of keys, got {_shown(entry)}")
            continue
        name: str | None = None
        tags: tuple[str, ...] = ()
        values = {}
        for key, value in entry.items():
            try:
                if key == "name":
                    name = plotter_name(value)
                elif key == "tags":
                    tags = tag_list(value)
                elif key in fields:
                    values[key] = fields[key].metadata["check"](value)
                else:
                    problems.append(_unknown(f"{where}.", key, sorted([*fields, "name", "tags"])))
            except _Invalid as error:
                problems.append(f"{where}.{key}: {error}")
        if "name" not in entry:
            problems.append(f"{where}.name: every plotter needs a name")
            continue
        if name is None:
            continue
        if any(plotter.name == name for plotter in plotters):
            problems.append(f"{where}.name: {name!r} is already the name of another plotter")
            continue
        settings = attr.evolve(device, **values)
        _device_problems(f"{where}", settings, problems)
        plotters.append(PlotterConfig(name=name, tags=tags, device=settings))
    return tuple(plotters)


def config_from_dict(data: Any) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"configuration: expected a mapping of sections, got {_shown(data)}"])
    problems: list[str] = []
    data = _old_upload_size(data, problems)
    sections = {}
    for key, value in data.items():
        if key in SECTIONS:
            sections[key] = _section(key, SECTIONS[key], value, problems)
        elif key not in ("hooks", "plotters"):
            problems.append(_unknown("", key, sorted([*SECTIONS, "hooks", "plotters"])))
    hooks = _hooks(data.get("hooks"), problems)
    ws = sections.get("websocket")
    key_refused = any(problem.startswith("websocket.api_key:") for problem in problems)
    if ws is not None and ws.authenticate and not ws.api_key and not key_refused:
        problems.append("websocket.api_key: required when websocket.authenticate is true")
    device = sections.get("device")
    if device is not None:
        _device_problems("device", device, problems)
    plotters = _plotters(data.get("plotters"), device or DeviceConfig(), problems)
    if problems:
        raise ConfigError(problems)
    return Config(hooks=hooks, plotters=plotters, **sections)


def load_config(path: Path | str | None = None) -> Config:
    """Read the configuration file.

    With no `path`, the default file is used when it exists and the built-in
    defaults otherwise; a named file that is missing is an error.
    """
    if path is None:
        path, named = default_config_path(), False
    else:
        path, named = Path(path).expanduser(), True
    if not path.exists():
        if named:
            raise ConfigError([f"--config: no such file: {path}"])
        return Config()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"--config: cannot read {path}: {error}"]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"--config: {path}{where} is not valid YAML: "
                           f"{getattr(error, 'problem', error)}"]) from None
    return config_from_dict(data)


def with_overrides(config: Config, *, host: str | None = None, port: int | None = None,
                   log_level: str | None = None) -> Config:
    """Apply command-line values, which win over the file."""
    websocket = config.websocket
    if host is not None:
        websocket = attr.evolve(websocket, host=host)
    if port is not None:
        websocket = attr.evolve(websocket, port=port)
    logging = config.logging
    if log_level is not None:
        logging = attr.evolve(logging, level=log_level)
    return attr.evolve(config, websocket=websocket, logging=logging)


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.home() / fallback


def default_config_path() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "vfab" / "config.yaml"


def default_workspace() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "vfab" / "workspace"


def workspace_path(value: str, workspace: Path) -> Path:
    """Resolve a configured path; one beginning with `workspace/` is inside the workspace."""
    if value == "workspace" or value.startswith("workspace/"):
        return workspace / value[len("workspace/"):]
    return Path(value).expanduser()


def sqlite_path(url: str, workspace: Path) -> Path:
    """The file of a `sqlite:///...` database URL."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigError([f"database.url: expected a sqlite:/// URL, got {url!r}"])
    return workspace_path(url[len(prefix):], workspace)


def database_location(url: str, workspace: Path) -> Path | str:
    """Where the jobs are kept: a SQLite file's path, or a PostgreSQL URL as given
    (`postgresql://USER[:PASS]@HOST[:PORT]/DB`, a farm's shared queue)."""
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        try:
            parts.port  # urlsplit checks the port only when it is read
        except ValueError:
            raise ConfigError([f"database.url: the port of {parts.hostname!r} is not a "
                               f"number 0-65535"]) from None
        if not parts.hostname and "host=" not in parts.query or parts.path in ("", "/"):
            raise ConfigError([f"database.url: expected postgresql://USER[:PASS]@HOST[:PORT]"
                               f"/DB, got {_hidden_password(url)!r}"])
        return url
    if not url.startswith("sqlite:///"):
        raise ConfigError([f"database.url: expected sqlite:///FILE or "
                           f"postgresql://USER[:PASS]@HOST[:PORT]/DB, got "
                           f"{_hidden_password(url)!r}"])
    return sqlite_path(url, workspace)


def _hidden_password(url: str) -> str:
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)
