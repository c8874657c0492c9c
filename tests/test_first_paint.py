"""The dashboard's first paint (issue 15 item 9): GET / holds what the API knows,
in app.js's own markup, escaped, and nothing at all when a key is required."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import fail
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from tests.test_http_api import serve  # noqa: F401 (the fixture: a WebService on a real port)
from tests.web_fakes import FakeDevice, WebHarness
from vfab.jobs.states import AWAITING_PEN, COMPLETED, INTERRUPTED, PLOTTING, QUEUED
from vfab.web import dashboard
from vfab.web.dashboard import FirstPaint, duration, ordered_jobs, percent

KEY = "s3cret-key"
TIMEOUT = 10
STATIC = Path(dashboard.__file__).parent / "static"
HOSTILE = '<script>alert("x")</script> & <b>'


class Element:
    def __init__(self, tag: str, attributes: dict[str, str | None]):
        self.tag, self.attributes = tag, attributes
        self.text = ""
        self.children: list[Element] = []

    def find(self, css_class: str) -> Element:
        """The first descendant with `css_class`."""
        for child in self.children:
            if css_class in (child.attributes.get("class") or "").split():
                return child
            try:
                return child.find(css_class)
            except LookupError:
                continue
        raise LookupError(css_class)


class Page(HTMLParser):
    """The parts of a page the tests read: elements by id, the queue's rows, text."""

    VOID = {"meta", "link", "input", "br", "img"}

    def __init__(self, text: str):
        super().__init__()
        self.by_id: dict[str, Element] = {}
        self.rows: list[Element] = []
        self.snapshot: Any = None
        self._open: list[Element] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs))
        if self._open:
            self._open[-1].children.append(element)
        if "id" in element.attributes:
            self.by_id[element.attributes["id"] or ""] = element
        if tag == "tr" and "data-job-id" in element.attributes:
            self.rows.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop().tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data
        if self._open and self._open[-1].attributes.get("id") == "first-paint":
            self.snapshot = json.loads(data)

    def __getitem__(self, element_id: str) -> Element:
        return self.by_id[element_id]

    def hidden(self, element_id: str) -> bool:
        return "hidden" in self[element_id].attributes


async def get(web: WebHarness, path: str = "/",
              headers: dict[str, str] | None = None) -> tuple[int, Headers, str]:
    response = await Agent(reactor).request(
        b"GET", web.url(path), Headers({k: [v] for k, v in (headers or {}).items()}),
    ).addTimeout(TIMEOUT, reactor)
    body = await readBody(response).addTimeout(TIMEOUT, reactor)
    return response.code, response.headers, body.decode("utf-8")




def a_farm_of_jobs(web: WebHarness) -> dict[str, dict[str, Any]]:
    jobs = web.jobs
    done = jobs.add("done", state=COMPLETED)
    done.update(started_at="2026-01-01T00:00:10.000Z", finished_at="2026-01-01T00:03:30.000Z",
                progress=1.0)
    plotting = jobs.add(HOSTILE, state=PLOTTING)
    plotting["progress"] = 0.456
    low = jobs.add("low", priority=0)
    high = jobs.add("high", priority=5)
    held = jobs.add("held", state=INTERRUPTED)
    held["error"] = "the device was lost"
    web.device.state.update(status="plotting", current_job_id=plotting["id"], pen="down",
                            position_mm=[12.34, 3.5])
    return {"done": done, "plotting": plotting, "low": low, "high": high, "held": held}


@pytest_twisted.ensureDeferred
async def test_the_page_holds_what_the_api_knows(serve):
    web = await serve()
    jobs = a_farm_of_jobs(web)
    status, headers, text = await get(web)
    assert status == 200
    assert headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]
    page = Page(text)

    # The queue: what holds the plotter, the queue by priority, the interrupted, the finished.
    order = ["plotting", "high", "low", "held", "done"]
    assert [row.attributes["data-job-id"] for row in page.rows] == [jobs[n]["id"] for n in order]
    names = [row.find("job-name").text for row in page.rows]
    assert names == [HOSTILE, "high", "low", "held", "done"]
    plotting, done = page.rows[0], page.rows[-1]
    assert plotting.find("badge").attributes["data-state"] == "plotting"
    assert plotting.find("mini-figure").text == "46 %"
    assert plotting.find("mini-fill").attributes["style"] == "width: 45.6%"
    assert [b.attributes["data-action"] for b in plotting.find("actions").children] == \
        ["pause", "cancel"]
    assert plotting.find("actions").attributes["data-for"] == f"{jobs['plotting']['id']}:plotting"
    assert done.find("col-estimate").text == "took 3 min 20 s"
    assert page.rows[1].find("col-estimate").text == "13 s"
    assert page.rows[3].find("col-name").attributes["title"] == \
        f"{jobs['held']['id']}: the device was lost"
    assert page.hidden("jobs-empty") and not page.hidden("jobs-table")

    # The card of the job on the plotter, the plotter, the daemon.
    assert page["current-name"].text == HOSTILE
    assert page["current-title"].text == "Now plotting"
    assert page["current-badge"].attributes["data-state"] == "plotting"
    assert not page.hidden("current-badge") and not page.hidden("progress")
    assert page["progress-percent"].text == "46 %"
    assert page["device-badge"].attributes["data-state"] == "plotting"
    assert page["device-badge"].text == "plotting"
    assert page["device-port"].text == "/dev/null" and page["device-pen"].text == "down"
    assert page["device-position"].text == "12.3, 3.5 mm"
    assert page["system-badge"].attributes["data-state"] == "healthy"
    assert page["system-jobs"].text == "1 active, 2 queued"

    # app.js starts from the same snapshot, and the name is escaped everywhere.
    assert [job["id"] for job in page.snapshot["jobs"]] == [jobs[n]["id"] for n in order]
    assert page.snapshot["device"]["status"] == "plotting"
    assert "<script>alert" not in text and "<b>" not in text
    assert text.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;") == 2


@pytest_twisted.ensureDeferred
async def test_a_job_that_holds_the_queue_and_a_pen_change(serve):
    web = await serve()
    held = web.jobs.add("held", state=INTERRUPTED)
    page = Page((await get(web))[2])
    assert page["current-title"].text == "Holding the queue"
    assert page["current-error"].text.startswith("interrupted. The queue waits for this job")
    assert not page.hidden("current-error") and page.hidden("pen-prompt")
    held["state"] = AWAITING_PEN
    page = Page((await get(web, "/index.html"))[2])
    assert not page.hidden("pen-prompt")
    assert page["pen-ready"].attributes["data-job-id"] == held["id"]
    buttons = page["current-actions"].children
    assert [b.attributes["data-action"] for b in buttons] == ["cancel"]  # the prompt resumes


@pytest_twisted.ensureDeferred
async def test_an_empty_queue_says_so(serve):
    web = await serve()
    page = Page((await get(web))[2])
    assert page.rows == [] and page.snapshot["jobs"] == []
    assert not page.hidden("jobs-empty") and page.hidden("jobs-table")
    assert page["current-name"].text == "Nothing is plotting."
    assert page.hidden("progress") and page.hidden("current-badge")
    assert page["device-badge"].attributes["data-state"] == "idle"


@pytest_twisted.ensureDeferred
async def test_the_page_lists_every_plotter(serve):
    """With several plotters the Plotters list is painted, in plotters.js's rows,
    and the "Plotter" card shows the first, as app.js does."""
    statuses = [
        {**FakeDevice().status(), "plotter": "left", "tags": ["a3"]},
        {**FakeDevice("plotting").status(), "plotter": "right", "tags": ["a4", "fine"],
         "current_job_id": "abc123"},
    ]
    web = await serve(plotters=lambda: statuses)
    text = (await get(web))[2]
    page = Page(text)
    assert not page.hidden("plotters")
    rows = re.findall(r'<tr data-plotter="([^"]+)"><td>[^<]*</td><td><span class="badge" '
                      r'data-state="([^"]+)">[^<]*</span></td><td>([^<]*)</td><td>([^<]*)</td>',
                      text)
    assert rows == [("left", "idle", "a3", "–"), ("right", "plotting", "a4, fine", "abc123")]
    assert page["device-badge"].attributes["data-state"] == "idle"
    assert [status["plotter"] for status in page.snapshot["plotters"]] == ["left", "right"]
    assert page.snapshot["device"]["plotter"] == "left"


@pytest_twisted.ensureDeferred
async def test_one_plotter_leaves_the_list_hidden(serve):
    web = await serve()
    page = Page((await get(web))[2])
    assert page.hidden("plotters") and len(page.snapshot["plotters"]) == 1


@pytest_twisted.ensureDeferred
async def test_with_the_key_required_the_page_holds_no_data(serve):
    """Contract section 3: the dashboard's files hold no data; the page says what
    it waits for instead of claiming an empty queue."""
    web = await serve(authenticate=True, api_key=KEY)
    a_farm_of_jobs(web)
    status, headers, text = await get(web, headers={"X-API-Key": KEY})
    assert status == 200
    page = Page(text)
    assert page.rows == [] and page.snapshot is None and "first-paint" not in text
    for held in ("job-", "&lt;script", "/dev/null", "2.8.1", "12.3", "healthy"):
        assert held not in text, held
    assert "API key" in page["current-name"].text
    assert page.hidden("jobs-table") and "API key" in page["jobs-empty"].text
    assert page.hidden("progress")
    status, _, keyless = await get(web)  # the page needs no key: it holds nothing
    assert status == 200 and Page(keyless).rows == [] and "&lt;script" not in keyless


@pytest_twisted.ensureDeferred
async def test_a_snapshot_that_fails_leaves_the_page_to_the_websocket(serve):
    web = await serve()
    web.jobs.list = lambda *args, **kwargs: fail(RuntimeError("the store is broken"))
    status, _, text = await get(web)
    assert status == 200 and "first-paint" not in text
    assert text == (STATIC / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("path, status", [("/index.html/more", 404), ("/style.css", 200)])
@pytest_twisted.ensureDeferred
async def test_other_paths_are_not_the_page(serve, path, status):
    web = await serve()
    assert (await get(web, path))[0] == status


def test_rows_are_the_rows_app_js_builds():
    """app.js takes the rendered rows over and fills them with fillRow: they must
    have the cells and classes of its newRow, in its order."""
    app = (STATIC / "app.js").read_text(encoding="utf-8")
    template = re.search(r"function newRow\(id\) \{.*?`(.*?)`", app, re.S).group(1)
    expected = re.findall(r'class="([^"]+)"', template)
    web_job = {"id": "abcdef0123456789", "name": "n", "state": QUEUED, "progress": 0,
               "created_at": "2026-01-01T00:00:00Z", "estimated_seconds": 5}
    text = FirstPaint((STATIC / "index.html").read_text(encoding="utf-8"), 0.0).render(
        [web_job], [], None)
    row = re.search(r'<tr data-job-id="abcdef0123456789">(.*?)</tr>', text).group(1)
    assert re.findall(r'class="([^"]+)"', row) == expected + ["button quiet"]


def test_times_are_time_elements_the_page_localises(monkeypatch):
    """The daemon's zone is not the reader's: the first paint names it, and
    carries the moment itself for app.js to write in the browser's way."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    import time
    time.tzset()
    try:
        web_job = {"id": "abcdef0123456789", "name": "n", "state": QUEUED, "progress": 0,
                   "created_at": "2026-01-01T13:05:00.000Z", "estimated_seconds": 5}
        now = 1767272700.0  # 2026-01-01T13:05:00Z
        text = FirstPaint((STATIC / "index.html").read_text(encoding="utf-8"), now).render(
            [web_job], [], None)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    cell = re.search(r'<td class="col-submitted">(.*?)</td>', text).group(1)
    assert cell == '<time datetime="2026-01-01T13:05:00.000Z">14:05 CET</time>'
    app = (STATIC / "app.js").read_text(encoding="utf-8")
    assert 'row.querySelector(".col-submitted time")' in app


@pytest.mark.parametrize("seconds, text", [
    (None, "–"), (float("nan"), "–"), (0.4, "0 s"), (0.5, "1 s"), (42, "42 s"),
    (200, "3 min 20 s"), (3900, "1 h 05 min"), (-3, "0 s"),
])
def test_durations_read_as_on_the_dashboard(seconds, text):
    assert duration(seconds) == text


def test_percent_and_order_as_app_js():
    assert percent(0.4567) == "46 %" and percent(0.005) == "1 %" and percent(None) == "–"
    jobs = [{"id": str(n), "state": state, "priority": priority, "created_at": created}
            for n, (state, priority, created) in enumerate([
                (COMPLETED, 0, "1"), (QUEUED, 0, "2"), (QUEUED, 0, "1"), (QUEUED, 9, "3"),
                (COMPLETED, 0, "4"), (PLOTTING, 0, "0")])]
    assert [job["id"] for job in ordered_jobs(jobs)] == ["5", "3", "2", "1", "4", "0"]
    finished = [{"id": str(n), "state": COMPLETED, "created_at": f"{n:03d}"} for n in range(30)]
    assert [job["id"] for job in ordered_jobs(finished)] == [str(n) for n in range(29, 9, -1)]


@pytest_twisted.ensureDeferred
async def test_head_of_the_page(serve):
    web = await serve()
    web.jobs.add("one")
    response = await Agent(reactor).request(b"HEAD", web.url("/")).addTimeout(TIMEOUT, reactor)
    assert response.code == 200
    assert await readBody(response).addTimeout(TIMEOUT, reactor) == b""
