"""The dashboard of a daemon with two virtual plotters, in headless Chromium (as
tests/test_dashboard.py, whose browser fixtures it uses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.daemon_process import DaemonProcess
from tests.test_dashboard import SIMULATOR, Page, browser, drawing, playwright  # noqa: F401


def test_the_dashboard_lists_every_plotter(browser: Any, tmp_path: Path) -> None:  # noqa: F811
    daemon = DaemonProcess(tmp_path, {"device": SIMULATOR, "plotters": [
        {"name": "left", "tags": ["a3"]}, {"name": "right", "tags": ["a4", "fine"]}]}).start()
    try:
        page = Page(browser, daemon, "/", tmp_path)
        page.wait_for('#plotters:not([hidden]) tr[data-plotter="right"]')
        assert "a4, fine" in page.text('#plotters tr[data-plotter="right"]')
        code, job = daemon.submit(drawing(["one", "two"]), name="for the right", plotter="right")
        assert code == 201
        page.wait_for('#plotters tr[data-plotter="right"] .badge[data-state="plotting"]')
        assert job["id"] in page.text('#plotters tr[data-plotter="right"]')
        assert page.page.get_attribute('#plotters tr[data-plotter="left"] .badge',
                                       "data-state") == "idle"
        page.screenshot("farm")
        assert page.errors == []
    finally:
        daemon.stop()
