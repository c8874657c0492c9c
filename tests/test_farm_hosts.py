"""Several daemons (hosts) on one PostgreSQL queue, as processes: a job received by
one host is plotted by another, its drawing carried by the database; every host
hears every other's events within a second."""

from __future__ import annotations

import json
import threading
import time

import pytest
from websockets.sync.client import connect

from tests.daemon_process import DaemonProcess, run_vfab, wait_until
from tests.test_farm_daemon import length, square, strokes_of

#: Seconds between heartbeats in these tests (the default is 5).
BEAT = 0.5


def host(tmp_path, name: str, url: str, plotters: list[dict] | None = None,
         **farm: float) -> DaemonProcess:
    """A daemon named `name` on the farm at `url`: virtual plotters, or none at all."""
    config = {"database": {"url": url},
              "farm": {"host": name, "heartbeat_interval": BEAT, **farm}}
    if plotters:
        config["device"] = {"type": "simulator", "model": "V3/A4", "simulator_speed": 20}
        config["plotters"] = plotters
    return DaemonProcess(tmp_path / name, config)


class Events:
    """Every `jobs` message a daemon's WebSocket sends, with when it arrived."""

    def __init__(self, daemon: DaemonProcess):
        self.messages: list[tuple[float, dict]] = []
        self._socket = connect(daemon.ws_url, open_timeout=10)
        self._socket.send(json.dumps({"type": "SUBSCRIBE", "channels": ["jobs", "device"]}))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for frame in self._socket:
                self.messages.append((time.monotonic(), json.loads(frame)))
        except OSError:
            return

    def arrivals(self, kind: str, job_id: str) -> dict[str, float]:
        """When each `to_state` (job_state_change) or the first progress arrived."""
        seen: dict[str, float] = {}
        for moment, message in list(self.messages):
            if message.get("type") != kind or message.get("job_id") != job_id:
                continue
            key = message.get("to_state", "progress")
            seen.setdefault(key, moment)
        return seen

    def close(self) -> None:
        self._socket.close()
        self._thread.join(10)


def test_a_job_received_by_one_host_is_plotted_by_another(tmp_path, postgres_url):
    studio = host(tmp_path, "studio", postgres_url,
                  [{"name": "left", "tags": ["a4"]}]).start()
    desk = host(tmp_path, "desk", postgres_url).start()  # no plotter of its own
    watchers: list[Events] = []
    try:
        wait_until(lambda: any(p["plotter"] == "left"
                               for p in desk.request("GET", "/api/plotters")[1]["plotters"]),
                   "the desk to know the studio's plotter", timeout=30)
        watchers = [Events(studio), Events(desk)]
        code, job = desk.submit(square(3)[0], name="sent to the desk", tags="a4")
        assert code == 201, job
        done = desk.wait_for_job(job["id"], {"completed", "failed"}, timeout=120)
        assert (done["state"], done["plotter"], done["host"]) == ("completed", "left", "studio")
        wait_until(lambda: abs(length(strokes_of(studio, "left")) - 4 * 16) < 0.5,
                   "the studio's plotter to have drawn the square", timeout=30)
        # The drawing went through the database (the hosts share no folder): the
        # studio's copy is what the database holds.
        import psycopg

        with psycopg.connect(postgres_url) as connection:
            kept = connection.execute("SELECT svg FROM drawings WHERE job_id = %s",
                                      (job["id"],)).fetchone()[0]
        assert bytes(kept) == square(3)[0]
        assert (studio.workspace / "jobs" / f"{job['id']}.svg").read_bytes() == square(3)[0]
        assert studio.request("GET", f"/api/jobs/{job['id']}")[1]["state"] == "completed"

        at_studio = watchers[0].arrivals("job_state_change", job["id"])
        at_desk = watchers[1].arrivals("job_state_change", job["id"])
        assert {"queued", "plotting", "completed"} <= set(at_desk) & set(at_studio)
        for state in ("plotting", "completed"):  # told by the studio, heard at the desk
            assert at_desk[state] - at_studio[state] < 1.0, (state, at_desk, at_studio)
        assert watchers[1].arrivals("job_progress", job["id"])  # progress too
        plotters = desk.request("GET", "/api/plotters")[1]["plotters"]
        assert [(p["plotter"], p["host"]) for p in plotters][-1] == ("left", "studio")

        checked = run_vfab("check", "database", "--config", str(desk.config_path))
        assert checked.returncode == 0, checked.stderr
        assert "database OK: postgresql://vfab@127.0.0.1:" in checked.stdout
        assert "2 host(s)" in checked.stdout
    finally:
        for watcher in watchers:
            watcher.close()
        assert desk.stop() == 0, desk.log
        assert studio.stop() == 0, studio.log


#: Three hosts of two virtual plotters each, and their tags.
FARM = {"north": [{"name": "n1", "tags": ["a3"]}, {"name": "n2", "tags": ["a4", "fine"]}],
        "south": [{"name": "s1", "tags": ["a3", "fine"]}, {"name": "s2", "tags": ["a4"]}],
        "west": [{"name": "w1", "tags": ["a3", "a4"]}, {"name": "w2", "tags": []}]}
TAGS = {plotter["name"]: set(plotter["tags"]) for plotters in FARM.values()
        for plotter in plotters}
#: Seconds of silence after which a host counts as gone, in this test.
HOST_TIMEOUT = 3.0


def long_drawing() -> bytes:
    """Sixty lines of 150 mm: long enough to be killed in the middle of it."""
    lines = "".join(f'<line x1="20" y1="{20 + 2.5 * n}" x2="170" y2="{20 + 2.5 * n}" '
                    f'stroke="black"/>' for n in range(60))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="200mm" height="200mm" '
            f'viewBox="0 0 200 200">{lines}</svg>').encode()


def plotting_starts(url: str) -> dict[str, tuple[int, int]]:
    """Per job: how many times it started plotting, and how many times it was
    interrupted (each interruption is followed by one more start)."""
    import psycopg

    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT job_id, SUM(CASE WHEN to_state = 'plotting' THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN to_state = 'interrupted' THEN 1 ELSE 0 END) FROM job_events "
            "GROUP BY job_id").fetchall()
    return {job_id: (int(starts), int(interrupted)) for job_id, starts, interrupted in rows}


@pytest.mark.timeout(400)
def test_a_farm_of_three_hosts_survives_a_killed_host_and_a_restarted_database(
        tmp_path, postgres_server, record_property):
    import random

    url = postgres_server.create_database()
    daemons = {name: host(tmp_path, name, url, plotters, host_timeout=HOST_TIMEOUT).start()
               for name, plotters in FARM.items()}
    pick = random.Random(16)
    sizes: dict[str, int] = {}
    try:
        for daemon in daemons.values():
            wait_until(lambda: len(daemon.request("GET", "/api/plotters")[1]["plotters"]) == 6,
                       "every host to know the farm's six plotters", timeout=30)
        def submit(number: int, to: list[str]) -> None:
            plotter = pick.choice(sorted(TAGS))
            tags = sorted(tag for tag in TAGS[plotter] if pick.random() < 0.7)
            code, job = daemons[pick.choice(to)].submit(
                square(number % 16)[0], name=f"square {number}", tags=",".join(tags))
            assert code == 201, job
            sizes[job["id"]] = 10 + 2 * (number % 16)

        for number in range(30):
            submit(number, list(FARM))
        code, long_job = daemons["north"].submit(long_drawing(), name="long", plotter="w1")
        assert code == 201, long_job
        daemons["west"].wait_for_job(long_job["id"], {"plotting"}, timeout=60)
        wait_until(lambda: daemons["west"].request(
            "GET", f"/api/jobs/{long_job['id']}")[1]["progress"] > 0.05,
            "the long job to be under way", timeout=60)

        daemons["west"].kill()  # kill -9, in the middle of the long job
        killed = time.monotonic()
        daemons["north"].wait_for_job(long_job["id"], {"interrupted"}, timeout=30)
        noticed = time.monotonic() - killed
        record_property("killed_host_noticed_seconds", round(noticed, 2))
        assert noticed <= HOST_TIMEOUT + 3 * BEAT + 2.0, noticed
        job = daemons["south"].request("GET", f"/api/jobs/{long_job['id']}")[1]
        assert "host west went silent" in job["error"] and job["plotter"] == "w1"
        for number in range(30, 60):
            submit(number, ["north", "south"])

        postgres_server.restart()  # under the farm, plots going on
        daemons["west"] = host(tmp_path, "west", url, FARM["west"],
                               host_timeout=HOST_TIMEOUT).start()
        for job_id in [long_job["id"], *sizes]:
            state = daemons["south"].request("GET", f"/api/jobs/{job_id}")[1]["state"]
            if state == "interrupted":  # the killed host's: resumed where they were
                code, answer = daemons["south"].request("POST", f"/api/jobs/{job_id}/resume")
                assert code == 200, answer
        done = {job_id: daemons[pick.choice(list(FARM))].wait_for_job(
                    job_id, {"completed", "failed", "cancelled"}, timeout=300)
                for job_id in [long_job["id"], *sizes]}
        assert {job["state"] for job in done.values()} == {"completed"}
        assert done[long_job["id"]]["plotter"] == "w1"  # it stayed with its sheet
        starts = plotting_starts(url)
        drawn: dict[str, float] = {name: 0.0 for name in TAGS}
        for job_id, size in sizes.items():
            job = done[job_id]
            assert set(job["tags"]) <= TAGS[job["plotter"]], job
            assert job["host"] == next(name for name, plotters in FARM.items()
                                       if job["plotter"] in {p["name"] for p in plotters})
            begun, interrupted = starts[job_id]
            assert begun == 1 + interrupted, (job_id, starts[job_id])
            drawn[job["plotter"]] += 4 * size
        assert starts[long_job["id"]][1] >= 1
        # The hosts that lived throughout drew each of their jobs once, whole.
        for name in ("n1", "n2", "s1", "s2"):
            daemon = daemons["north" if name.startswith("n") else "south"]
            wait_until(lambda: abs(length(strokes_of(daemon, name)) - drawn[name])
                       <= 0.005 * drawn[name] + 0.01,
                       f"plotter {name}'s record of {drawn[name]} mm", timeout=60)
    finally:
        codes = {name: daemon.stop() for name, daemon in daemons.items()}
        assert codes == {name: 0 for name in daemons}, "\n".join(
            daemon.log for daemon in daemons.values())
