"""Drawings as real tools write them (tests/drawings/), plotted end to end.

Each file is submitted to an in-process site (plotting_site.Site), plotted to
completion on the emulated board (pens changed as asked), and what the board
drew with the pen down is compared with what the SVG shows, worked out by
hand, pen by pen: every expected point lies on a stroke and every stroke
point on the expected drawing, the lengths agree, and the job's layers and
pen_down_mm say the same. Files that cannot be plotted must be refused with
the contract's answer (400 a bad SVG, 422 outside the travel) and a reason.
"""

from __future__ import annotations

from pathlib import Path

import attr
import numpy as np
import pytest
from twisted.python.failure import Failure

from plotting_site import SETTINGS, Site
from test_runner import distance_to_strokes, drawn_length
from vfab.geometry import SVGError, SVGLimits, load_svg
from vfab.jobs import states
from vfab.web.errors import client_error

DRAWINGS = Path(__file__).parent / "drawings"
MM_PER_PX = 25.4 / 96
PT = 25.4 / 72


def line(*points: tuple[float, float]) -> np.ndarray:
    return np.array(points, dtype=float)


def rect(x: float, y: float, width: float, height: float) -> np.ndarray:
    return line((x, y), (x + width, y), (x + width, y + height), (x, y + height), (x, y))


def ellipse_arc(cx: float, cy: float, rx: float, ry: float, start_deg: float = 0.0,
                end_deg: float = 360.0) -> np.ndarray:
    angles = np.radians(np.linspace(start_deg, end_deg, 721))
    return np.column_stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)])


def rounded_rect(x: float, y: float, width: float, height: float, r: float) -> np.ndarray:
    corners = [(x + width - r, y + r, -90), (x + width - r, y + height - r, 0),
               (x + r, y + height - r, 90), (x + r, y + r, 180)]
    parts = [ellipse_arc(cx, cy, r, r, start, start + 90) for cx, cy, start in corners]
    return np.vstack(parts + [parts[0][:1]])


def bezier(*controls: tuple[float, float]) -> np.ndarray:
    t = np.linspace(0.0, 1.0, 721)[:, None]
    points = [np.array(c, dtype=float) for c in controls]
    while len(points) > 1:
        points = [(1 - t) * a + t * b for a, b in zip(points, points[1:])]
    return points[0]


def scaled(path: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(path, dtype=float) * factor


@attr.s(frozen=True, auto_attribs=True)
class Drawn:
    """What the file shows: polylines in mm (curves finely sampled), per pen."""

    layers: list[list[np.ndarray]]
    model: str = "V3/A4"
    #: How far a drawn point may stray: a motor step for straight lines, the
    #: flattening tolerance (0.05 mm) and a step for curves.
    within: float = 0.03


@attr.s(frozen=True, auto_attribs=True)
class Refused:
    status: int
    words: str
    model: str = "V3/A4"


TICK = line((0, 0), (0, 5))
CASES: dict[str, Drawn | Refused] = {
    # Inkscape: layers, a sublayer, hidden layer and sublayer, a locked layer, a
    # documentation layer, a transform on a layer.
    "inkscape_layers.svg": Drawn([
        [line((10, 10), (60, 10), (60, 40)), line((10, 60), (40, 60))],
        [line((5, 100), (25, 100))],
        [line((100, 100), (100, 150))]]),
    "inkscape_px_viewbox.svg": Drawn([[rect(10, 10, 100, 50)]]),
    "inkscape_layer_transforms.svg": Drawn([[
        line((37.5, 20), (37.5, 40)), line((17.5, 50), (27.5, 50)),
        line((87.5, 30), (107.5, 50))]]),
    "empty_inkscape.svg": Refused(400, "nothing to plot"),
    "clones_of_templates.svg": Drawn([[line((20, 20), (30, 20), (30, 30)),
                                       line((40, 20), (50, 20), (50, 30))]]),
    "inkscape092_flowed_text.svg": Drawn([[line((20, 80), (100, 80))]]),
    "layer_names_with_digits.svg": Drawn([[line((10, 10), (50, 10))],
                                         [line((10, 20), (50, 20))]]),
    # Units and viewports.
    "units_in.svg": Drawn([[line((25.4, 25.4), (76.2, 25.4), (76.2, 50.8))]]),
    "units_pt.svg": Drawn([[line((72 * PT, 72 * PT), (144 * PT, 72 * PT))]]),
    "units_cm.svg": Drawn([[line((10, 10), (50, 10), (50, 30))]]),
    "units_px_no_viewbox.svg": Drawn([[line((25.4, 25.4), (50.8, 25.4))]]),
    "units_in_no_viewbox.svg": Drawn([[line((25.4, 12.7), (50.8, 12.7))]]),
    "units_on_shapes.svg": Drawn([[line((25.4, 10), (50.8, 10)), rect(10, 20, 10, 5)]]),
    "no_size_viewbox_only.svg": Drawn([[line((0, 25.4), (50.8, 25.4))]]),
    "viewbox_offset.svg": Drawn([[line((0, 0), (50, 50), (100, 0))]]),
    "viewbox_scaled.svg": Drawn([[line((0, 0), (200, 0), (200, 100))]]),
    "preserve_aspect_meet.svg": Drawn([[rect(50, 0, 100, 100)]]),
    "preserve_aspect_none.svg": Drawn([[line((0, 0), (200, 100))]]),
    # Shapes and path data.
    "shapes.svg": Drawn([[
        rect(10, 10, 30, 20), rounded_rect(50, 10, 30, 20, 5), ellipse_arc(20, 60, 10, 10),
        ellipse_arc(60, 60, 15, 5), line((10, 90), (90, 90)),
        line((10, 80), (20, 85), (30, 80)), line((40, 80), (50, 85), (60, 80), (40, 80))]],
        within=0.08),
    "path_commands.svg": Drawn([[
        rect(10, 15, 10, 10), line((40, 15), (50, 15), (60, 15), (70, 25)),
        line((10, 45), (20, 45), (30, 45), (30, 55), (30, 65)),
        line((10, 75), (30, 75), (35, 80)), line((70, 45), (70, 4.5), (70, 45))]]),
    "path_curves.svg": Drawn([[
        np.vstack([bezier((10, 50), (30, 10), (50, 50)), bezier((50, 50), (70, 90), (90, 50))]),
        np.vstack([bezier((10, 80), (10, 60), (40, 60), (40, 80)),
                   bezier((40, 80), (40, 100), (70, 100), (70, 80))]),
        np.vstack([bezier((10, 20), (10, 10), (30, 10), (30, 20)),
                   bezier((30, 20), (40, 30), (50, 20))])]], within=0.08),
    "path_arcs.svg": Drawn([[
        ellipse_arc(30, 50, 20, 20, 180, 360), ellipse_arc(70, 50, 10, 10),
        ellipse_arc(20, 80, 10, 10, 180, 0)]], within=0.08),
    # References: <use>, <symbol>, <defs>, and containers that are never drawn.
    "use_defs_top_level.svg": Drawn([[line((10, 10), (10, 15)), line((20, 10), (20, 15)),
                                      line((30, 10), (30, 15))]]),
    "use_in_layer.svg": Drawn([[line((10, 10), (10, 15)), line((20, 10), (20, 15))]]),
    "symbol_in_defs.svg": Drawn([[line((20, 30), (40, 30))]]),
    "symbol_illustrator.svg": Drawn([[
        scaled(line((100, 110), (110, 100), (120, 110)), MM_PER_PX),
        scaled(line((150, 120), (170, 100), (190, 120)), MM_PER_PX)]]),
    "unrendered_containers.svg": Drawn([[line((10, 10), (60, 10))]]),
    # Style: CSS classes, hidden elements; fills plot their outline (README).
    "css_classes.svg": Drawn([[line((10, 10), (40, 10))]]),
    "fill_only.svg": Drawn([[rect(10, 10, 20, 10)]]),
    "clip_path.svg": Drawn([[line((20, 50), (50, 50))]]),
    # The group's transform moves its clip too: the circle is at (50, 60).
    "inkscape_clip_group.svg": Drawn([[
        line((50 - 20 * np.sqrt(0.75), 50), (50 + 20 * np.sqrt(0.75), 50)),
        line((50 - 20 * np.sqrt(0.4375), 45), (50 + 20 * np.sqrt(0.4375), 45)),
        line((10, 90), (20, 90))]], within=0.08),
    # Text and images are not plotted; alone they are nothing to plot.
    "text_and_path.svg": Drawn([[line((10, 60), (50, 60))]]),
    "text_only.svg": Refused(400, "text must be converted to paths"),
    "image_and_path.svg": Drawn([[line((10, 60), (50, 60))]]),
    # Files from other tools (DOCTYPE lines included).
    "doctype_svg11.svg": Drawn([[line((10, 10), (90, 10))]]),
    "illustrator_doctype.svg": Drawn([
        [scaled(rect(37.8, 37.8, 75.6, 37.8), MM_PER_PX)],
        [scaled(line((37.8, 113.4), (113.4, 113.4)), MM_PER_PX)]]),
    "illustrator_entities.svg": Refused(400, "entities"),
    "matplotlib.svg": Drawn([[
        scaled(rect(0, 0, 288, 216), PT), scaled(rect(72, 36, 144, 144), PT),
        scaled(line((72, 180), (72, 183.5)), PT), scaled(line((216, 180), (216, 183.5)), PT),
        scaled(line((72, 180), (144, 108), (216, 36)), PT),
        scaled(line((72, 144), (216, 144)), PT),  # clipped by the axes
        scaled(line((72, 180), (72, 36)), PT), scaled(line((72, 180), (216, 180)), PT)]]),
    # Encodings and declarations.
    "utf8_bom.svg": Drawn([[line((10, 10), (20, 10))]]),
    "utf16_bom.svg": Drawn([[line((10, 10), (20, 10))]]),
    "latin1_declared.svg": Drawn([[line((10, 10), (20, 10))]]),
    "no_declaration_crlf.svg": Drawn([[line((10, 10), (20, 10))]]),
    # Sizes and the travel.
    "tiny.svg": Drawn([[rect(10, 10, 0.1, 0.1), line((20, 20), (20.1, 20))]]),
    "a3_edge.svg": Drawn([[rect(0, 0, 430, 297)]], model="V3/A3"),
    "a3_beyond.svg": Refused(422, "x=430.5 mm but the V3/A3 travel ends at 430 mm",
                             model="V3/A3"),
    "minikit_edge.svg": Drawn([[line((0, 0), (160, 0), (160, 101.6))]], model="MiniKit"),
    "negative.svg": Refused(422, "x=-1.0 mm, left of the home corner"),
    "a4_portrait_on_v3_a4.svg": Refused(422, "y=287.0 mm but the V3/A4 travel ends at 218 mm"),
    "se_a2_edge.svg": Drawn([[line((594, 0), (0, 432))]], model="SE/A2"),
    "single_dot.svg": Refused(400, "nothing to plot"),
}


def test_the_corpus_is_all_here():
    assert sorted(CASES) == sorted(path.name for path in DRAWINGS.glob("*.svg"))


def plot_to_the_end(site: Site, job_id: str) -> tuple[dict, list[list[np.ndarray]]]:
    """Plot the job through, putting in the next pen whenever it is asked for;
    the job and the strokes drawn with each pen."""
    pens = []
    drawn = 0
    while True:
        site.wait_for(lambda: site.state(job_id) in states.FINISHED | {states.AWAITING_PEN},
                      limit=7200, step=1.0)
        strokes = site.strokes
        pens.append(strokes[drawn:])
        drawn = len(strokes)
        if site.state(job_id) != states.AWAITING_PEN:
            return site.job(job_id), pens
        site.settle(site.life.queue.resume(job_id))


def dense(path: np.ndarray, step: float = 0.05) -> np.ndarray:
    """The polyline's points every `step` mm (its vertices included)."""
    pieces = [path[:1]]
    for start, end in zip(path[:-1], path[1:]):
        count = max(1, int(np.ceil(np.linalg.norm(end - start) / step)))
        t = np.linspace(0.0, 1.0, count + 1)[1:, None]
        pieces.append(start + t * (end - start))
    return np.vstack(pieces)


@pytest.mark.parametrize("name", sorted(CASES))
def test_plotted_as_the_svg_shows(tmp_path, name):
    case = CASES[name]
    site = Site(tmp_path, attr.evolve(SETTINGS, model=case.model))
    svg = (DRAWINGS / name).read_bytes()
    if isinstance(case, Refused):
        with pytest.raises(Exception) as caught:
            site.submit(svg, name=name)
        error = client_error(Failure(caught.value))
        assert error is not None, f"{name}: not a client error: {caught.value!r}"
        assert error.status == case.status, error
        assert case.words.lower() in error.message.lower(), error
        assert "\n" not in error.message
        return
    job_id = site.submit(svg, name=name)
    job, pens = plot_to_the_end(site, job_id)
    assert job["state"] == states.COMPLETED, job
    assert (job["layers"], len(pens)) == (len(case.layers), len(case.layers)), job
    for number, (strokes, expected) in enumerate(zip(pens, case.layers), 1):
        assert strokes, f"pen {number} drew nothing"
        # Everything drawn is on the drawing, and the whole drawing is drawn.
        stray = distance_to_strokes(np.vstack([dense(s) for s in strokes]), expected)
        missed = distance_to_strokes(np.vstack([dense(path) for path in expected]), strokes)
        assert stray.max() <= case.within, \
            f"pen {number} drew {stray.max():.3f} mm off the drawing"
        assert missed.max() <= case.within, \
            f"pen {number}: a part {missed.max():.3f} mm from any stroke"
        assert drawn_length(strokes) == pytest.approx(drawn_length(expected), rel=0.01,
                                                      abs=0.05)
    expected_mm = drawn_length([path for layer in case.layers for path in layer])
    assert job["pen_down_mm"] == pytest.approx(expected_mm, rel=0.01, abs=0.05)


def use_chain(links: int) -> bytes:
    """A <use> outside any group at the end of `links` groups that each <use> the previous."""
    groups = "".join(f'<g id="a{i}"><use href="#a{i - 1}"/></g>' for i in range(1, links))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="100mm" height="100mm" '
            f'viewBox="0 0 100 100"><defs><g id="a0"><path d="M0 0 L1 1"/></g>{groups}'
            f'</defs><use href="#a{links - 1}" x="5" y="5"/></svg>').encode()


def test_a_use_chain_outside_groups_is_drawn_or_refused_in_words():
    drawing = load_svg(use_chain(100))
    np.testing.assert_allclose(drawing.layers[0].paths[0], [[5, 5], [6, 6]], atol=1e-5)
    with pytest.raises(SVGError, match="chained too deeply"):
        load_svg(use_chain(600))


def test_layers_that_vpype_would_number_alike_stay_pens_of_their_own():
    """Each layer is a pen (README): in vpype's order (by number, then as in
    the file) and with its own name; loose shapes still join layer 1."""
    layer = '<g inkscape:groupmode="layer" inkscape:label="{}"><path d="M0 {} L10 {}"/></g>'
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" '
           'xmlns:inkscape="http://www.inkscape.org/namespaces/inkscape" width="100mm" '
           'height="100mm" viewBox="0 0 100 100"><path d="M0 0 L10 0"/>'
           + "".join(layer.format(label, y, y) for label, y in
                     [("2 blue", 2), ("1 red", 1), ("1 red fine", 3), ("pen 2", 4)])
           + '<g id="layer9"><path d="M0 9 L10 9"/></g></svg>').encode()
    drawing = load_svg(svg)
    assert [(layer.name, sorted(round(path[0][1], 3) for path in layer.paths))
            for layer in drawing.layers] == [
        ("1 red", [0, 1]), ("1 red fine", [3]), ("2 blue", [2]), ("pen 2", [4]),
        ("Layer 9", [9])]


def test_a_clipped_layer_stays_a_pen_and_clips_are_bounded():
    """A clip on a layer itself cuts that layer; clip paths copied for many
    differently placed elements are refused before they pile up."""
    head = ('<svg xmlns="http://www.w3.org/2000/svg" '
            'xmlns:inkscape="http://www.inkscape.org/namespaces/inkscape" width="100mm" '
            'height="100mm" viewBox="0 0 100 100"><defs><clipPath id="c">{}</clipPath></defs>')
    layers = ('<g inkscape:label="1 first"><path d="M0 5 L90 5"/></g>'
              '<g inkscape:label="2 clipped" clip-path="url(#c)"><path d="M0 50 L90 50"/></g>')
    drawing = load_svg((head.format('<rect x="20" y="0" width="30" height="100"/>')
                        + layers + "</svg>").encode())
    assert [layer.name for layer in drawing.layers] == ["1 first", "2 clipped"]
    np.testing.assert_allclose(drawing.layers[1].paths[0], [[20, 50], [50, 50]], atol=1e-4)
    # A clipped <use> outside groups: its x and y move the shape, not the clip.
    use = '<path id="p" d="M0 50 L90 50"/></defs><use href="#p" x="5" clip-path="url(#c)"/>'
    drawing = load_svg((head.format('<rect x="20" y="0" width="30" height="100"/>')
                        .replace("</defs>", "") + use + "</svg>").encode())
    np.testing.assert_allclose(drawing.layers[0].paths[0], [[20, 50], [50, 50]], atol=1e-4)
    rects = '<rect x="20" y="0" width="1" height="1"/>' * 1000
    placed = "".join(f'<path clip-path="url(#c)" transform="translate({i} 0)" d="M0 0 L1 1"/>'
                     for i in range(600))
    with pytest.raises(SVGError, match="clip paths"):  # the bomb, smaller
        load_svg((head.format(rects) + placed + "</svg>").encode(),
                 limits=SVGLimits(max_elements=5000))
