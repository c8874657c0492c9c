"""Firmware before QE (2.8.0): a lost cable must not look like a power cut.

Found by an adversarial run: without a way to tell, the daemon energised the
motors again (EM), which zeroed the counters where the carriage stopped, and
the resumed plot was shifted there. The layer mark (EBBProtocol.power_kept)
now tells a pulled cable from a power cut."""

from __future__ import annotations

from plotting_site import Site
from test_every_stroke_once import finish, plot_alone, svg_of
from test_runner import assert_same_drawing

FRAME = svg_of([[[(0, 0), (20, 0), (20, 20), (0, 0), (0, 20), (0, 0)]]])


def test_a_pulled_cable_on_2_6_5_does_not_shift_the_rest_of_the_plot(tmp_path):
    board = {"firmware": "2.6.5"}
    reference = plot_alone(tmp_path, FRAME, board)
    site = Site(tmp_path / "pulled", **board)
    job_id = site.submit(FRAME)
    site.advance(0.3)  # the carriage is 0.2 mm along the first stroke
    site.pull_cable()
    finish(site, job_id)
    strokes = site.strokes
    site.stop()
    assert_same_drawing(strokes, reference)
