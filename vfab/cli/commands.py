"""The client commands: each takes the client and parsed arguments, returns an exit code."""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from vfab.cli.client import ClientError, DaemonClient

_out = Console(highlight=False)
_err = Console(stderr=True, highlight=False)

FINISHED = ("completed", "failed", "cancelled")


def duration(seconds: float | None) -> str:
    """Seconds as people read them: 45 s, 3 min 20 s, 2 h 05 min."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def speed_of(device: dict[str, Any]) -> float:
    """How much faster than an AxiDraw the daemon's plotter runs (the virtual one may)."""
    return float(device.get("simulator_speed") or 1.0)


def estimate(seconds: float | None, speed: float) -> str:
    """A job's estimate (an AxiDraw's time) as it will take on a plotter of
    `speed`, with the AxiDraw's time beside it where they differ."""
    if seconds is None or speed == 1.0:
        return duration(seconds)
    return f"{duration(seconds / speed)} here, {duration(seconds)} on an AxiDraw"


def time_left(seconds: float | None, speed: float) -> str:
    """Time left here (job_progress eta_seconds), and an AxiDraw's where it differs."""
    if seconds is None or speed == 1.0:
        return duration(seconds)
    return f"{duration(seconds)} ({duration(seconds * speed)} on an AxiDraw)"


def _job_path(job_id: str, action: str = "") -> str:
    return f"/api/jobs/{urllib.parse.quote(job_id, safe='')}" + (f"/{action}" if action else "")


def resolve_job_id(client: DaemonClient, given: str) -> str:
    """The id of the one job whose id is `given` or begins with it, as git takes
    a commit; the HTTP API takes whole ids only."""
    jobs = client.request("GET", "/api/jobs")["jobs"]
    if any(job["id"] == given for job in jobs):
        return given
    matches = [job for job in jobs if job["id"].startswith(given)]
    if not matches:
        raise ClientError(f"no job has an id beginning {given!r} "
                          "(`vfab list jobs` shows them)")
    if len(matches) > 1:
        listed = ", ".join(f"{job['id']} '{job['name']}'" for job in matches)
        raise ClientError(f"{given!r} is the start of {len(matches)} job ids: {listed}; "
                          "give more of the id")
    return matches[0]["id"]


def add(client: DaemonClient, args: argparse.Namespace) -> int:
    try:
        svg = args.file.read_bytes()
    except OSError as error:
        _err.print(f"vfab: cannot read {args.file}: {error.strerror}")
        return 2
    job = client.request("POST", "/api/jobs", body=svg, content_type="image/svg+xml",
                         query={"name": args.name, "priority": args.priority,
                                "preset": args.preset, "plotter": args.plotter,
                                "tags": ",".join(args.tags) or None})
    sys.stdout.write(job["id"] + "\n")
    device = client.request("GET", "/api/device")
    _err.print(f"queued '{job['name']}': {job['paths']} paths on {job['layers']} "
               f"layer(s), about {estimate(job['estimated_seconds'], speed_of(device))}")
    return 0


def list(client: DaemonClient, args: argparse.Namespace) -> int:  # noqa: A001 - the verb
    if args.what == "plotters":
        return list_plotters(client, args)
    answer = client.request("GET", "/api/jobs", query={"state": args.state,
                                                       "limit": args.limit})
    if args.json:
        from vfab.cli import print_json
        print_json(answer)
        return 0
    jobs = answer["jobs"]
    if not jobs:
        _out.print("no jobs" + (f" in state {args.state}" if args.state else ""))
        return 0
    speed = speed_of(client.request("GET", "/api/device"))
    rows = [(job["id"], job["name"], job["state"], str(job["priority"]),
             f"{job['progress'] * 100:.0f}%", _brief_estimate(job["estimated_seconds"], speed),
             _local_minute(job["created_at"])) for job in jobs]
    # Only the name gives way to a narrow terminal: an id must stay whole to be pasted.
    headers = ("ID", "NAME", "STATE", "PRIO", "PROGRESS",
               "ESTIMATE" if speed == 1.0 else "ESTIMATE (AXIDRAW)", "CREATED")
    widths = [max(len(header), *(len(row[index]) for row in rows))
              for index, header in enumerate(headers)]
    gaps = 2 * (len(headers) - 1)
    widths[1] = max(4, min(widths[1], _out.width - gaps - sum(widths) + widths[1]))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header, width in zip(headers, widths):
        table.add_column(header, no_wrap=True, overflow="ellipsis", width=width)
    for row in rows:
        table.add_row(*row)
    # Narrower than the other columns: let the terminal wrap the rows, not cut ids.
    needed = sum(widths) + gaps
    (_out if _out.width >= needed else Console(highlight=False, width=needed)).print(table)
    return 0


def list_plotters(client: DaemonClient, args: argparse.Namespace) -> int:
    answer = client.request("GET", "/api/plotters")
    if args.json:
        from vfab.cli import print_json
        print_json(answer)
        return 0
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in ("NAME", "HOST", "STATUS", "TAGS", "JOB", "PORT"):
        table.add_column(header, no_wrap=True)
    for plotter in answer["plotters"]:
        table.add_row(str(plotter.get("plotter")), str(plotter.get("host")),
                      plotter["status"], ",".join(plotter.get("tags") or []) or "-",
                      plotter.get("current_job_id") or "-", plotter.get("port") or "-")
    _out.print(table)
    return 0


def _device_line(device: dict[str, Any]) -> str:
    return (device["status"] + (f" on {device['port']}" if device.get("port") else "")
            + (f", firmware {device['firmware_version']}"
               if device.get("firmware_version") else ""))


def _local_minute(iso: str) -> str:
    """A job's UTC time as "12-07 16:24" in this machine's zone (as the dashboard
    shows it in the browser's): short, so that the name keeps room."""
    try:
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return str(iso)
    return moment.astimezone().strftime("%m-%d %H:%M")


def _brief_estimate(seconds: float | None, speed: float) -> str:
    """The ESTIMATE column: the time here, and an AxiDraw's in brackets where it differs."""
    if seconds is None or speed == 1.0:
        return duration(seconds)
    return f"{duration(seconds / speed)} ({duration(seconds)})"


def status(client: DaemonClient, args: argparse.Namespace) -> int:
    if args.job_id:
        job = client.request("GET", _job_path(resolve_job_id(client, args.job_id)))
        if args.json:
            from vfab.cli import print_json
            print_json(job)
            return 0
        _print_job(job, speed_of(client.request("GET", "/api/device")))
        return 0
    health = client.request("GET", "/health")
    device = client.request("GET", "/api/device")
    plotters = client.request("GET", "/api/plotters")["plotters"]
    active = [job for state in ("plotting", "paused", "awaiting_pen")
              for job in client.request("GET", "/api/jobs", query={"state": state})["jobs"]]
    queued = client.request("GET", "/api/jobs", query={"state": "queued"})["jobs"]
    interrupted = client.request("GET", "/api/jobs", query={"state": "interrupted"})["jobs"]
    if args.json:
        from vfab.cli import print_json
        print_json({"health": health, "device": device, "plotters": plotters,
                    "active_jobs": active, "queued_jobs": len(queued),
                    "interrupted_jobs": interrupted})
        return 0
    farm = len(plotters) > 1
    _out.print(f"daemon   {client.url}: {health['status']}, up {duration(health['uptime'])}")
    if farm:
        for plotter in plotters:
            tags = ",".join(plotter.get("tags") or [])
            _out.print(f"plotter  {plotter['plotter']}: {_device_line(plotter)}"
                       + (f" [{tags}]" if tags else ""))
    else:
        _out.print(f"device   {_device_line(device)}")
    _out.print(f"queue    {len(queued)} waiting")
    for job in active:
        where = f" on {job['plotter']}" if farm and job.get("plotter") else ""
        _out.print(f"active   {job['id']} '{job['name']}' {job['state']} "
                   f"{job['progress'] * 100:.0f}%{where}")
    for job in interrupted:
        _out.print(f"held     {job['id']} '{job['name']}' interrupted at "
                   f"{job['progress'] * 100:.0f}%: {job['error'] or 'no reason recorded'}")
        waiting = f"plotter {job['plotter']}" if farm and job.get("plotter") else "the queue"
        _out.print(f"         {waiting} waits for it: vfab resume {job['id']} "
                   f"(or vfab cancel {job['id']})")
    return 0


def _print_job(job: dict[str, Any], speed: float) -> None:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key in ("id", "name", "state", "priority", "progress", "layers", "paths",
                "pen_down_mm", "pen_up_mm", "estimated_seconds", "plotting_seconds",
                "created_at", "started_at", "finished_at", "error", "plotter", "host",
                "tags"):
        value = job.get(key)
        if key == "tags":
            value = ",".join(value or []) or None
        elif key == "progress":
            value = f"{value * 100:.1f}%"
        elif key == "estimated_seconds":
            value = estimate(value, speed)
        elif key == "plotting_seconds":
            value = duration(value)  # this plotter's own time, pauses not counted
        table.add_row(key, "-" if value is None else str(value))
    _out.print(table)


def _control(client: DaemonClient, args: argparse.Namespace, action: str) -> int:
    job = client.request("POST", _job_path(resolve_job_id(client, args.job_id), action))
    _out.print(f"job {job['id']} '{job['name']}' is {job['state']}")
    return 0


def pause(client: DaemonClient, args: argparse.Namespace) -> int:
    return _control(client, args, "pause")


def resume(client: DaemonClient, args: argparse.Namespace) -> int:
    return _control(client, args, "resume")


def cancel(client: DaemonClient, args: argparse.Namespace) -> int:
    return _control(client, args, "cancel")


def watch(client: DaemonClient, args: argparse.Namespace) -> int:
    from vfab.cli.watch import watch_jobs
    return watch_jobs(client, None if args.job_id is None
                      else resolve_job_id(client, args.job_id))
