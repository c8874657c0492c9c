"""`vfab daemon`: the daemon reference's options, run through twistd.

The PID file, daemonizing and the switch to another user are twistd's work;
this only translates the options and reports problems in one line.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import sys
from typing import Any


def parser() -> argparse.ArgumentParser:
    # -h is the host, as in the daemon reference, so help is --help only.
    parser = argparse.ArgumentParser(
        prog="vfab daemon", add_help=False,
        description="Run the vfab job server (HTTP API, WebSocket, queue and plotter).")
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("--host", "-h", help="bind address [default: localhost]")
    parser.add_argument("--port", "-p", help="port; 0 = any free port [default: 8766]")
    parser.add_argument("--workspace", "-w",
                        help="jobs, database, logs [default: $XDG_DATA_HOME/vfab/workspace]")
    parser.add_argument("--log-level", "-l",
                        help="debug, info, warning, error, critical [default: info]")
    parser.add_argument("--config", "-c",
                        help="configuration file [default: $XDG_CONFIG_HOME/vfab/config.yaml]")
    parser.add_argument("--pid-file", help="write the PID here; removed at exit")
    parser.add_argument("--daemonize", "-d", action="store_true",
                        help="detach; returns once the daemon listens")
    parser.add_argument("--user", "-u", help="user to run as after binding (root only)")
    parser.add_argument("--group", "-g", help="group to run as after binding (root only)")
    parser.add_argument("--nice", help="process priority (-20..19)")
    return parser


def _usage_error(message: str) -> None:
    sys.stderr.write(f"vfab daemon: {message}\n")
    raise SystemExit(2)


def _check_account(option: str, kind: str, value: str, by_name: Any, by_id: Any) -> None:
    """A user or group given by name or number must exist."""
    try:
        by_id(int(value)) if value.isdigit() else by_name(value)
    except KeyError:
        _usage_error(f"{option}: no such {kind} {value!r}")


def twistd_argv(args: argparse.Namespace) -> list[str]:
    """The twistd command line for these options."""
    argv = [f"--pidfile={os.path.abspath(args.pid_file) if args.pid_file else ''}"]
    if not args.daemonize:
        argv.append("--nodaemon")
    if args.user is not None or args.group is not None:
        if os.geteuid() != 0:
            _usage_error("--user and --group need root: the daemon already runs as "
                         f"{pwd.getpwuid(os.geteuid()).pw_name}")
    if args.user is not None:
        _check_account("--user", "user", args.user, pwd.getpwnam, pwd.getpwuid)
        argv.append(f"--uid={args.user}")
    if args.group is not None:
        _check_account("--group", "group", args.group, grp.getgrnam, grp.getgrgid)
        argv.append(f"--gid={args.group}")
    argv.append("vfab")
    for option in ("host", "port", "workspace", "log_level", "config", "nice"):
        value = getattr(args, option)
        if value is not None:
            argv.append(f"--{option.replace('_', '-')}={value}")
    return argv


def run(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    from twisted.application import app
    from twisted.scripts.twistd import ServerOptions, runApp

    from vfab.service_maker import vfab

    class VfabServerOptions(ServerOptions):
        """twistd's options with vfab's service maker handed over, not looked up:
        plugin discovery misses the dropin after a modern editable install."""

        @property
        def subCommands(self) -> Any:
            self.loadedPlugins = {vfab.tapname: vfab}
            yield (vfab.tapname, None, vfab.options, vfab.description)

    sys.argv = ["vfab daemon", *twistd_argv(args)]
    app.run(runApp, VfabServerOptions)
