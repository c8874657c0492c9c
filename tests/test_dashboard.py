"""The web dashboard in headless Chromium against the real daemon with its simulated plotter.

Playwright drives Debian's /usr/bin/chromium (no browser download; VFAB_CHROMIUM
names another binary). Without that browser the tests skip, except in CI
(CI=true), where they fail. Every
wait is bounded: the tests wait for selectors and page conditions, never for
fixed times. Screenshots go to the test's tmp_path and to test-output/dashboard/.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.daemon_process import DaemonProcess
from tests.keyless_flood import KeylessFlood
from vfab.web.ws import key_token

CHROMIUM = Path(os.environ.get("VFAB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "test-output" / "dashboard"
KEY = "dashboard-test-key"
#: Milliseconds any one wait in the page may take.
WAIT_MS = 30_000
#: Plotting the test drawing takes about 20 s at this simulator speed.
SIMULATOR = {"type": "simulator", "simulator_speed": 4}
#: A small upload limit, so that the 413 answer takes little to provoke.
UPLOAD_LIMIT = "256KB"


def _unavailable(reason: str) -> None:
    """Skip on a developer's machine; fail in CI, where the browser must be installed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the dashboard tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install playwright "
                    "(it drives /usr/bin/chromium and downloads no browser)")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture
def browser(playwright: Any, tmp_path: Path) -> Iterator[Any]:
    """A fresh Chromium profile for each test, phone-sized pages available by resizing."""
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM),
        headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path, {"device": SIMULATOR,
                                       "websocket": {"max_upload_size": UPLOAD_LIMIT}}).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def locked_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path, {"device": SIMULATOR, "websocket": {
        "authenticate": True, "api_key": KEY}}).start()
    try:
        yield process
    finally:
        process.stop()


#: Counts the preview's pixels in the dark ink of what is plotted (the faint ink is light grey).
DARK_PIXELS = """() => {
    const canvas = document.querySelector("#preview");
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let dark = 0;
    for (let i = 0; i < data.length; i += 4) {
        if (data[i + 3] > 200 && data[i] < 120 && data[i + 1] < 120 && data[i + 2] < 140) {
            dark += 1;
        }
    }
    return dark;
}"""


class Page:
    """A dashboard page with the waits the tests need; collects the page's JS errors.

    A wait that times out saves a screenshot and fails with the end of the
    daemon's log, which usually says why the page never got there.
    """

    def __init__(self, context: Any, daemon: DaemonProcess, path: str, shots: Path,
                 ready: str = "#link-state[data-state=live]"):
        self.page = context.new_page()
        self.daemon = daemon
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", self._console)
        self.shots = shots
        self.page.goto(daemon.url + path)
        self.wait_for(ready)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def wait_for(self, selector: str) -> Any:
        """Wait for an element matching `selector` (the tests select on attributes,
        such as [hidden] or [data-state=...], so visibility is not asked for)."""
        return self._bounded(selector, lambda: self.page.wait_for_selector(
            selector, state="attached", timeout=WAIT_MS))

    def wait_until(self, expression: str, argument: Any = None) -> Any:
        return self._bounded(expression, lambda: self.page.wait_for_function(
            expression, arg=argument, timeout=WAIT_MS))

    def _bounded(self, what: str, wait: Callable[[], Any]) -> Any:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            return wait()
        except PlaywrightTimeout:
            shot = self.screenshot("timed-out")
            log = "\n".join(self.daemon_log()[-40:])
            raise AssertionError(f"waited {WAIT_MS} ms for {what}; the page is in {shot}; "
                                 f"page errors: {self.errors}; the daemon's log ends:\n"
                                 f"{log}") from None

    def daemon_log(self) -> list[str]:
        """The daemon's log file once it has one (its stdout stops at start-up)."""
        log_file = self.daemon.workspace / "logs" / "vfab.log"
        if log_file.exists():
            return log_file.read_text(errors="replace").splitlines()
        return list(self.daemon.lines)

    def upload(self, name: str, svg: bytes) -> None:
        self.page.set_input_files("#upload-input", files=[
            {"name": name, "mimeType": "image/svg+xml", "buffer": svg}])

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)

    def drawn_mm(self) -> float:
        return float(self.page.get_attribute("#preview", "data-drawn") or 0)

    def wait_for_ink(self, pixels: int) -> None:
        """Wait until more than `pixels` pixels of the preview are in the plotted ink."""
        self.wait_until(f"() => ({DARK_PIXELS})() > {pixels}")

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / path.name)
        return path


def drawing(layers: list[str]) -> bytes:
    """A two-layer drawing: concentric circles (about 2.4 m of ink), then a few lines."""
    circles = "".join(f'<circle cx="120" cy="100" r="{r}"/>' for r in range(10, 61, 5))
    lines = "".join(f'<line x1="40" y1="{y}" x2="200" y2="{y}"/>' for y in (180, 186, 192))
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" '
        'xmlns:inkscape="http://www.inkscape.org/namespaces/inkscape" '
        'width="297mm" height="210mm" viewBox="0 0 297 210">'
        f'<g inkscape:groupmode="layer" inkscape:label="{layers[0]}" fill="none" '
        f'stroke="black">{circles}</g>'
        f'<g inkscape:groupmode="layer" inkscape:label="{layers[1]}" fill="none" '
        f'stroke="black">{lines}</g></svg>').encode("utf-8")


def job_badge(state: str) -> str:
    return f'#jobs tr[data-job-id] .badge[data-state="{state}"]'


def test_plot_through_the_dashboard(browser: Any, daemon: DaemonProcess, tmp_path: Path) -> None:
    """Upload, watch it draw, pause, resume, change the pen and see it finish."""
    page = Page(browser, daemon, "/", tmp_path)
    page.wait_for('#device-badge[data-state="idle"]')
    page.wait_for('#system-badge[data-state="healthy"]')
    assert page.text("#device-firmware") != "–"

    page.upload("circles and lines.svg", drawing(["1 red", "2 black"]))
    page.wait_for('#upload-message[data-kind="ok"]')
    assert "circles and lines" in page.text("#upload-message")

    # It plots: the badge says so, the bar moves and the preview draws dark ink.
    page.wait_for('#current-badge[data-state="plotting"]')
    assert page.text("#current-name") == "circles and lines"
    page.wait_until("() => Number(document.querySelector('#preview').dataset.drawn) > 100")
    page.wait_until("() => parseInt(document.querySelector('#progress-percent').textContent) >= 5")
    assert "left" in page.text("#progress-eta")
    assert "layer 1 of 2" in page.text("#progress-layer")
    page.wait_for_ink(50)
    page.wait_until("() => document.querySelector('#device-pen').textContent !== '–'")
    page.screenshot("1-plotting")

    # Pause: the daemon stops at a safe point and every badge says paused.
    page.page.click('#current-actions button[data-action="pause"]')
    page.wait_for('#current-badge[data-state="paused"]')
    page.wait_for(job_badge("paused"))
    page.wait_for('#current-actions button[data-action="resume"]')
    paused_at = page.drawn_mm()
    page.screenshot("2-paused")
    job_id = page.page.get_attribute("#jobs tr[data-job-id]", "data-job-id")
    status, job = daemon.request("GET", f"/api/jobs/{job_id}")
    assert status == 200 and job["state"] == "paused"

    # Resume: it plots on from where it stopped.
    page.page.click('#current-actions button[data-action="resume"]')
    page.wait_for('#current-badge[data-state="plotting"]')
    page.wait_until("(before) => Number(document.querySelector('#preview').dataset.drawn) > before",
                    paused_at)

    # The second layer asks for its pen; the prompt names it.
    page.wait_for("#pen-prompt:not([hidden])")
    reason = page.text("#pen-reason")
    assert reason.startswith("next pen:") and "black" in reason
    page.wait_for(job_badge("awaiting_pen"))
    page.screenshot("3-pen-change")
    page.page.click("#pen-ready")
    page.wait_for("#pen-prompt[hidden]")

    page.wait_for('#current-badge[data-state="completed"]')
    page.wait_for(job_badge("completed"))
    page.wait_until("() => document.querySelector('#progress-percent').textContent === '100 %'")
    page.wait_until("() => Number(document.querySelector('#preview').dataset.drawn) > 2500")
    page.wait_for_ink(3000)
    page.screenshot("4-completed")
    # The queue tells two jobs of one name apart: a short id, when, how long.
    row = f'#jobs tr[data-job-id="{job_id}"]'
    assert page.text(f"{row} .job-id") == job_id[:8]
    assert re.fullmatch(r"\d\d:\d\d( [AP]M)?", page.text(f"{row} .col-submitted"))
    created = daemon.request("GET", f"/api/jobs/{job_id}")[1]["created_at"]
    assert page.page.get_attribute(f"{row} .col-submitted time", "datetime") == created
    assert page.text(f"{row} .col-estimate").startswith("took ")

    page.page.set_viewport_size({"width": 390, "height": 844})
    page.wait_until("() => document.querySelector('#preview').clientWidth < 380")
    page.screenshot("5-phone")
    assert page.errors == []


def test_an_upload_answered_after_the_job_started_shows_it_plotting(
        browser: Any, daemon: DaemonProcess, tmp_path: Path) -> None:
    """The 201 may reach the page after the WebSocket said the job is plotting;
    the older "queued" in that answer must not hide the plot (a CI failure)."""
    page = Page(browser, daemon, "/", tmp_path)
    page.wait_for('#device-badge[data-state="idle"]')

    def answer_once_plotting(route: Any) -> None:
        response = route.fetch()
        job = response.json()
        daemon.wait_for_job(job["id"], {"plotting"}, timeout=30)
        route.fulfill(response=response)

    page.page.route("**/api/jobs?*", answer_once_plotting)
    page.upload("late answer.svg", drawing(["1 red", "2 black"]))
    page.wait_for('#upload-message[data-kind="ok"]')
    page.wait_for('#current-badge[data-state="plotting"]')
    page.wait_for(job_badge("plotting"))
    assert page.text("#current-name") == "late answer"
    page.page.unroute("**/api/jobs?*")

    page.page.once("dialog", lambda dialog: dialog.accept())
    page.page.click('#current-actions button[data-action="cancel"]')
    page.wait_for('#current-badge[data-state="cancelled"]')
    assert page.errors == []


def test_upload_errors_and_dropping(browser: Any, daemon: DaemonProcess, tmp_path: Path) -> None:
    """400, 413 and 422 show the daemon's own message; a dropped file is queued."""
    page = Page(browser, daemon, "/", tmp_path)
    page.upload("notes.svg", b"this is not an SVG")
    page.wait_until("() => document.querySelector('#upload-message').textContent"
                    ".startsWith('notes.svg was not queued (400): ')")

    padding = b"<!--" + b"x" * 300_000 + b"-->"
    page.upload("big.svg", drawing(["1", "2"]).replace(b"</svg>", padding + b"</svg>"))
    page.wait_until("() => document.querySelector('#upload-message').textContent"
                    ".startsWith('big.svg was not queued (413): ')")
    assert "uploads.max_size" in page.text("#upload-message")

    huge = ('<svg xmlns="http://www.w3.org/2000/svg" width="2000mm" height="20mm" '
            'viewBox="0 0 2000 20"><line x1="0" y1="10" x2="1900" y2="10" '
            'stroke="black"/></svg>').encode("utf-8")
    page.upload("banner.svg", huge)
    page.wait_until("() => document.querySelector('#upload-message').textContent"
                    ".startsWith('banner.svg was not queued (422): ')")
    assert page.page.get_attribute("#upload-message", "data-kind") == "error"
    page.screenshot("upload-error")
    assert page.page.query_selector("#jobs tr[data-job-id]") is None
    # The browser reports each refused request on its console; nothing else may be there.
    assert all("status of 4" in error for error in page.errors), page.errors

    page.page.evaluate("""(svg) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([svg], "dropped drawing.svg", {type: "image/svg+xml"}));
        document.querySelector("#dropzone").dispatchEvent(new DragEvent("drop",
            {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", drawing(["1", "2"]).decode("utf-8"))
    page.wait_for('#upload-message[data-kind="ok"]')
    assert "dropped drawing" in page.text("#upload-message")

    # Cancel asks first; the answer here is yes. (It also spares the daemon's
    # shutdown the wait for a plot in progress.)
    page.wait_for('#jobs tr[data-job-id] button[data-action="cancel"]')
    page.page.once("dialog", lambda dialog: dialog.accept())
    page.page.click('#jobs tr[data-job-id] button[data-action="cancel"]')
    page.wait_for(job_badge("cancelled"))


def test_api_key(browser: Any, locked_daemon: DaemonProcess, tmp_path: Path) -> None:
    """With authentication on, the page loads without a key and asks for it;
    /?api_key=KEY opens it; a refused key brings up the form."""
    asking = Page(browser, locked_daemon, "/", tmp_path, ready="#key-dialog[open]")
    asking.wait_for('#link-state[data-state="locked"]')
    asking.page.close()
    page = Page(browser, locked_daemon, f"/?api_key={KEY}", tmp_path)
    page.wait_for('#device-badge[data-state="idle"]')

    # A key that stops working (changed in the config, say) is asked for again.
    page.page.evaluate("() => localStorage.setItem('vfab.api_key', 'stale')")
    page.upload("square.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="50mm" '
                              b'height="50mm" viewBox="0 0 50 50"><rect x="10" y="10" '
                              b'width="30" height="30" stroke="black" fill="none"/></svg>')
    page.wait_for("#key-dialog[open]")
    page.wait_for('#link-state[data-state="locked"]')
    page.screenshot("api-key")
    page.page.fill("#key-input", KEY)
    page.page.click("#key-dialog button[type=submit]")
    page.wait_for('#link-state[data-state="live"]')
    assert page.page.evaluate("() => localStorage.getItem('vfab.api_key')") == KEY

    page.upload("square.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="50mm" '
                              b'height="50mm" viewBox="0 0 50 50"><rect x="10" y="10" '
                              b'width="30" height="30" stroke="black" fill="none"/></svg>')
    page.wait_for('#upload-message[data-kind="ok"]')
    page.wait_for("#jobs tr[data-job-id]")


def test_the_dashboard_gets_in_through_a_keyless_flood(browser: Any, locked_daemon: DaemonProcess,
                                                       tmp_path: Path) -> None:
    """Twenty keyless clients from the same address keep the keyless budget full;
    the dashboard sends its key in the upgrade (a subprotocol token), so it is
    live at every load all the same (issue 14 item 1)."""
    with KeylessFlood(locked_daemon.ws_url):
        page = Page(browser, locked_daemon, f"/?api_key={KEY}", tmp_path)  # waits for live
        for _ in range(3):
            page.page.reload()
            page.wait_for("#link-state[data-state=live]")
            page.wait_for('#device-badge[data-state="idle"]')
    # The browser's token is the daemon's, for any key.
    for key in (KEY, "ключ 🔑 ü?>", "a"):
        token = page.page.evaluate(
            "async ([key, query]) => (await import(`./stream.js${query}`)).keyToken(key)",
            [key, f"?api_key={KEY}"])
        assert token == key_token(key)
    assert page.errors == []


def test_a_wrong_key_refused_at_the_upgrade_asks_for_the_key(
        browser: Any, locked_daemon: DaemonProcess, tmp_path: Path) -> None:
    """A browser sees a refused upgrade only as 1006: the dashboard asks the HTTP
    API whether the key was the reason, and asks for it rather than retrying."""
    page = Page(browser, locked_daemon, f"/?api_key={KEY}", tmp_path)
    page.page.evaluate("() => document.querySelector('#key-dialog').showModal()")
    page.page.fill("#key-input", "stale")
    page.page.click("#key-dialog button[type=submit]")
    page.wait_for('#link-state[data-state="locked"]')
    page.wait_for("#key-dialog[open]")
    assert "refused the key" in page.text("#key-why")
    page.page.fill("#key-input", KEY)
    page.page.click("#key-dialog button[type=submit]")
    page.wait_for('#link-state[data-state="live"]')
    # The browser reports the refused upgrade and the API's 401 on its console.
    assert all("401" in error or "Authentication failed" in error
               for error in page.errors), page.errors


#: A job name a browser must show as text, never run.
HOSTILE_NAME = '<script>document.title="owned"</script> & co'
#: Seconds one headless Chromium run may take.
CHROMIUM_SECONDS = 60


def headless(url: str, profile: Path, *args: str) -> str:
    """What a plain `chromium --headless URL` prints, in a session of its own
    that is killed whole (renderers and all) when it is done or too slow."""
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing: apt-get install -y chromium")
    process = subprocess.Popen(
        [str(CHROMIUM), *CHROMIUM_ARGS, f"--user-data-dir={profile}", *args, url],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=CHROMIUM_SECONDS)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    return out.decode("utf-8", "replace")


def test_the_first_paint_shows_the_queue_and_the_plotter(daemon: DaemonProcess,
                                                         tmp_path: Path) -> None:
    """`chromium --headless --dump-dom` of the dashboard (issue 15 item 9) dumps
    the page at its load event, before app.js (imported after it) has opened the
    WebSocket: the job and the plotter's state must be there all the same."""
    status, job = daemon.submit(drawing(["1", "2"]), name=HOSTILE_NAME)
    assert status == 201
    daemon.wait_for_job(job["id"], {"plotting"})
    dom = headless(daemon.url + "/", tmp_path / "profile-dump", "--dump-dom")
    row = re.search(r'<tr data-job-id="%s">(.*?)</tr>' % job["id"], dom)
    assert row, dom
    escaped = html.escape(HOSTILE_NAME, quote=False)
    assert f'<span class="job-name">{escaped}</span>' in row.group(1)
    assert re.search(r'id="current-name">%s<' % re.escape(escaped), dom), dom
    assert 'id="device-badge" data-state="plotting">plotting<' in dom, dom
    assert re.search(r"<title>vfab</title>", dom)  # the name's script never ran
    shot = tmp_path / "first-paint.png"
    headless(daemon.url + "/", tmp_path / "profile-shot", f"--screenshot={shot}",
             "--window-size=1280,900")
    assert shot.stat().st_size > 10_000
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SHOTS / shot.name)
    daemon.request("POST", f"/api/jobs/{job['id']}/cancel")


#: Records every queue row ever put in the page, by job id, from the parser on.
ROW_WATCH = """
window.vfabRows = new Map();
new MutationObserver((records) => {
  for (const record of records) {
    for (const node of record.addedNodes) {
      if (node.nodeType !== 1) continue;
      const rows = node.matches("tr[data-job-id]") ? [node]
        : [...node.querySelectorAll("tr[data-job-id]")];
      for (const row of rows) {
        if (!window.vfabRows.has(row.dataset.jobId)) window.vfabRows.set(row.dataset.jobId, new Set());
        window.vfabRows.get(row.dataset.jobId).add(row);
      }
    }
  }
}).observe(document, { childList: true, subtree: true });
"""
#: Per job id, how many row elements it ever had.
ROWS_MADE = "() => Object.fromEntries([...window.vfabRows].map(([id, rows]) => [id, rows.size]))"


def test_app_js_takes_the_rendered_rows_over(browser: Any, daemon: DaemonProcess,
                                             tmp_path: Path) -> None:
    """The rows the daemon rendered become app.js's rows: live updates change
    them in place, and no job ever has two rows or loses its row."""
    ids = [daemon.submit(drawing(["1", "2"]), name=f"job {n}")[1]["id"] for n in range(3)]
    browser.add_init_script(ROW_WATCH)
    page = Page(browser, daemon, "/", tmp_path)  # waits for live
    page.wait_for(f'#jobs tr[data-job-id="{ids[0]}"] .badge[data-state="plotting"]')
    assert page.page.evaluate(ROWS_MADE) == {job_id: 1 for job_id in ids}
    late = daemon.submit(drawing(["1", "2"]), name="late")[1]["id"]
    page.wait_for(f'#jobs tr[data-job-id="{late}"]')
    assert page.page.evaluate(ROWS_MADE) == {job_id: 1 for job_id in [*ids, late]}
    shown = page.page.eval_on_selector_all("#jobs tr[data-job-id]",
                                           "(rows) => rows.map((row) => row.dataset.jobId)")
    assert sorted(shown) == sorted([*ids, late])
    for job_id in [late, *reversed(ids)]:
        daemon.request("POST", f"/api/jobs/{job_id}/cancel")
    page.wait_for(f'#jobs tr[data-job-id="{ids[0]}"] .badge[data-state="cancelled"]')
    assert page.page.evaluate(ROWS_MADE) == {job_id: 1 for job_id in [*ids, late]}
    assert page.errors == []
