"""The `vfab` command: the daemon, and the client commands that talk to it.

Exit codes: 0 success; 1 the daemon refused or could not be reached, or a
check found a problem; 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vfab import __version__
from vfab.config import ConfigError, load_config

JOB_ID_HELP = "a job id, or any start of one that no other job's id shares"
COMMANDS = ("daemon", "add", "list", "status", "pause", "resume", "cancel", "watch", "check")


def job_id_prefix(text: str) -> str:
    """A job id or the start of one, as typed; an empty one would be the start
    of every id, so it is refused before the daemon is asked."""
    prefix = text.strip()
    if not prefix:
        raise argparse.ArgumentTypeError(
            "an empty job id names no job: give an id, or any start of one that no "
            "other job's id shares (`vfab list jobs` shows them)")
    return prefix


def job_state(text: str) -> str:
    """A job state as the contract names them (any case): a misspelt one is a
    usage error here, not a request the daemon refuses."""
    from vfab.jobs.states import STATES

    state = text.strip().lower()
    if state not in STATES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(STATES)}, got {text!r}")
    return state


def _client_options(defaults: bool) -> argparse.ArgumentParser:
    """The options every client command takes, before the command or after it.

    Only the top-level parser has defaults: a subcommand's own default would
    overwrite what was given before the command (`vfab --url URL add job ...`).
    """
    shared = argparse.ArgumentParser(add_help=False)
    missing = argparse.SUPPRESS
    shared.add_argument("--url", default=None if defaults else missing,
                        help="the daemon's address "
                        "[default: http://<config host>:<config port>]")
    shared.add_argument("--api-key", default=os.environ.get("VFAB_API_KEY") if defaults
                        else missing, help="API key [default: $VFAB_API_KEY]")
    shared.add_argument("--config", "-c", default=None if defaults else missing,
                        help="configuration file, for the default --url")
    return shared


def parser() -> argparse.ArgumentParser:
    shared = _client_options(defaults=False)
    top = argparse.ArgumentParser(
        prog="vfab", description="vfab: a job server for AxiDraw pen plotters.",
        epilog="Exit codes: 0 ok, 1 refused/unreachable/problem found, 2 usage error.",
        parents=[_client_options(defaults=True)])
    top.add_argument("--version", action="version", version=f"vfab {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    commands.add_parser("daemon", help="run the daemon (vfab daemon --help)", add_help=False)

    add = commands.add_parser("add", help="submit a job")
    add_what = add.add_subparsers(dest="what", metavar="job")
    add_what.required = True
    job = add_what.add_parser("job", help="submit an SVG as a job", parents=[shared])
    job.add_argument("name")
    job.add_argument("file", type=Path)
    job.add_argument("--priority", type=int, default=0, help="higher runs first [default: 0]")
    job.add_argument("--preset", help="plot settings preset (default, fast, quality, draft)")
    job.add_argument("--plotter", help="plot on this plotter only [default: any that can]")
    job.add_argument("--tag", action="append", default=[], dest="tags", metavar="TAG",
                     help="a tag the plotter must have (repeatable: it needs them all)")

    listing = commands.add_parser("list", help="list jobs")
    list_what = listing.add_subparsers(dest="what", metavar="jobs|plotters")
    list_what.required = True
    jobs = list_what.add_parser("jobs", help="list jobs, newest first", parents=[shared])
    jobs.add_argument("--state", type=job_state, help="only jobs in this state")
    jobs.add_argument("--limit", type=int)
    jobs.add_argument("--json", action="store_true", help="print JSON")
    plotters = list_what.add_parser("plotters", help="list the daemon's plotters",
                                    parents=[shared])
    plotters.add_argument("--json", action="store_true", help="print JSON")

    status = commands.add_parser("status", help="the daemon's or a job's status",
                                 parents=[shared])
    status.add_argument("job_id", nargs="?", type=job_id_prefix, help=JOB_ID_HELP)
    status.add_argument("--json", action="store_true", help="print JSON")

    for verb in ("pause", "resume", "cancel"):
        control = commands.add_parser(verb, help=f"{verb} a job", parents=[shared])
        control.add_argument("job_id", type=job_id_prefix, help=JOB_ID_HELP)

    watch = commands.add_parser("watch", help="live progress until the job(s) end",
                                parents=[shared])
    watch.add_argument("job_id", nargs="?", type=job_id_prefix, help=JOB_ID_HELP)

    check = commands.add_parser("check", help="check the config, database or device")
    check.add_argument("what", choices=("config", "database", "device"))
    check.add_argument("--config", "-c", default=argparse.SUPPRESS, help="configuration file")
    check.add_argument("--workspace", "-w", help="workspace (for the database)")
    return top


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "daemon":
        from vfab.cli.daemon import run
        run(argv[1:])
        return
    args = parser().parse_args(argv)
    if args.command == "check":
        from vfab.cli.check import run_check
        raise SystemExit(run_check(args.what, config_path=args.config,
                                   workspace=args.workspace))
    from vfab.cli import commands
    from vfab.cli.client import ClientError, DaemonClient

    client = DaemonClient(_url(args), args.api_key)
    try:
        code = getattr(commands, args.command)(client, args)
    except ClientError as error:
        sys.stderr.write(f"vfab: {error}\n")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # Ctrl-C: leave quietly, as the shell expects
    raise SystemExit(code or 0)


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url
    try:
        config = load_config(args.config)
    except ConfigError as error:
        for problem in error.problems:
            sys.stderr.write(f"vfab: {problem}\n")
        raise SystemExit(2) from None
    return f"http://{config.websocket.host}:{config.websocket.port}"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
