"""Reading SVG uploads, checking travel, ordering paths, stats and previews."""

from __future__ import annotations

import gzip
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vfab.geometry.svg as svg_module
from vfab.geometry import (
    Drawing,
    Layer,
    OutOfTravel,
    SVGError,
    check_travel,
    drawing_stats,
    load_svg,
    optimize,
    preview,
)

SAMPLE = Path(__file__).resolve().parent.parent / "vfab" / "samples" / "sample.svg"


def svg(body: str, attributes: str = 'width="100mm" height="100mm" viewBox="0 0 100 100"') -> bytes:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" '
            f'xmlns:inkscape="http://www.inkscape.org/namespaces/inkscape" {attributes}>'
            f'{body}</svg>').encode()


def only_path(drawing: Drawing) -> np.ndarray:
    assert len(drawing.layers) == 1 and len(drawing.layers[0].paths) == 1
    return drawing.layers[0].paths[0]


# --- units, transforms, viewBox, groups -----------------------------------------------


@pytest.mark.parametrize("attributes, d, expected", [
    ('width="100mm" height="100mm" viewBox="0 0 100 100"', "M10 10 L20 10", [[10, 10], [20, 10]]),
    ('width="10cm" height="10cm" viewBox="0 0 10 10"', "M1 1 L2 1", [[10, 10], [20, 10]]),
    ('width="4in" height="4in" viewBox="0 0 4 4"', "M1 1 L2 1", [[25.4, 25.4], [50.8, 25.4]]),
    ('width="96px" height="96px"', "M0 0 L96 0", [[0, 0], [25.4, 0]]),
    ('width="96" height="96"', "M0 0 L48 48", [[0, 0], [12.7, 12.7]]),
    ('width="72pt" height="72pt" viewBox="0 0 72 72"', "M0 0 L72 0", [[0, 0], [25.4, 0]]),
])
def test_units_become_millimetres(attributes, d, expected):
    path = only_path(load_svg(svg(f'<path d="{d}"/>', attributes)))
    np.testing.assert_allclose(path, expected, atol=1e-4)


def test_page_size_in_mm():
    drawing = load_svg(svg('<path d="M0 0 L1 1"/>', 'width="8.5in" height="11in" viewBox="0 0 85 110"'))
    assert drawing.width_mm == pytest.approx(215.9, abs=1e-3)
    assert drawing.height_mm == pytest.approx(279.4, abs=1e-3)


def test_viewbox_offset_and_scale():
    # viewBox 50..150 mapped onto 200 mm: 2 mm per unit, shifted by 50 units.
    path = only_path(load_svg(svg('<path d="M60 60 L70 60"/>',
                                  'width="200mm" height="200mm" viewBox="50 50 100 100"')))
    np.testing.assert_allclose(path, [[20, 20], [40, 20]], atol=1e-4)


@pytest.mark.parametrize("attributes, expected_page", [
    ('width="200mm" viewBox="0 0 100 50"', (200, 100)),
    ('height="100mm" viewBox="0 0 100 50"', (200, 100)),
    ('width="200mm" height="auto" viewBox="0 0 100 50"', (200, 100)),
])
def test_a_missing_width_or_height_follows_the_viewbox_aspect_ratio(attributes, expected_page):
    """An outermost <svg> with one size and a viewBox has the other from the
    viewBox's aspect ratio (SVG 2, CSS sizing), as browsers and Inkscape show
    it: the drawing is not squeezed into a 100 % of nothing."""
    drawing = load_svg(svg('<path d="M0 0 L100 50"/>', attributes))
    assert (drawing.width_mm, drawing.height_mm) == pytest.approx(expected_page, abs=1e-3)
    np.testing.assert_allclose(only_path(drawing), [[0, 0], [200, 100]], atol=1e-4)


def test_a_path_without_data_draws_nothing_and_spoils_nothing():
    """SVG: a <path> without `d` is not rendered; the rest of the drawing is."""
    drawing = load_svg(svg('<path id="empty"/><path d="M10 10 L20 10"/>'))
    np.testing.assert_allclose(only_path(drawing), [[10, 10], [20, 10]], atol=1e-4)


@pytest.mark.parametrize("body, expected", [
    ('<line x1="0" y1="0" x2="10" y2="0" stroke="black" stroke-width="0.1em"/>', [[0, 0], [10, 0]]),
    ('<line x1="0" y1="0" x2="10" y2="0" style="stroke:black;stroke-width:0.1em"/>',
     [[0, 0], [10, 0]]),
    ('<line x1="1em" y1="0" x2="40" y2="0"/>', [[16, 0], [40, 0]]),
    ('<g font-size="10px"><line x1="2em" y1="1ex" x2="40" y2="1ex"/></g>', [[20, 5], [40, 5]]),
    ('<g style="font-size:10px"><g font-size="2em"><line x1="1em" y1="0" x2="40" y2="0"/></g></g>',
     [[20, 0], [40, 0]]),
])
def test_font_relative_lengths_are_resolved(body, expected):
    """em and ex (CSS: the font size, 16 px unless set; ex half of it) in a
    length or a stroke width are valid SVG; they made the upload a 400."""
    path = only_path(load_svg(svg(body, 'width="100mm" height="100mm" viewBox="0 0 100 100"')))
    np.testing.assert_allclose(path, expected, atol=1e-4)


def test_transforms_and_nested_groups():
    body = ('<g transform="translate(10 20)"><g transform="scale(2)">'
            '<path d="M0 0 L5 0" transform="rotate(90)"/></g></g>')
    path = only_path(load_svg(svg(body)))
    np.testing.assert_allclose(path, [[10, 20], [10, 30]], atol=1e-4)


def test_shapes_rect_polyline_line():
    body = ('<rect x="10" y="10" width="20" height="10"/>'
            '<polyline points="0,0 5,5 10,0"/><line x1="1" y1="2" x2="3" y2="4"/>')
    drawing = load_svg(svg(body))
    paths = drawing.layers[0].paths
    assert len(paths) == 3
    rect = paths[0]
    assert rect.min(axis=0).tolist() == pytest.approx([10, 10])
    assert rect.max(axis=0).tolist() == pytest.approx([30, 20])
    np.testing.assert_allclose(rect[0], rect[-1])  # closed


@pytest.mark.parametrize("tolerance", [0.01, 0.05, 0.2])
def test_curves_flattened_within_tolerance(tolerance):
    drawing = load_svg(svg('<circle cx="50" cy="50" r="30"/>'), tolerance=tolerance)
    circle = only_path(drawing)
    radius = np.hypot(*(circle - 50).T)
    np.testing.assert_allclose(radius, 30, rtol=1e-5)  # vertices on the curve
    middles = (circle[1:] + circle[:-1]) / 2
    sagitta = 30 - np.hypot(*(middles - 50).T)
    assert sagitta.max() <= tolerance * 1.5
    if svg_module._VPYPE_SIMPLIFIES:
        # Simplified, not one point per 0.01 mm. (vpype 1.14, the last for Python
        # 3.10, cannot simplify with Shapely 2: there curves keep every chord.)
        assert sagitta.max() > tolerance / 10
        assert len(circle) < 2 * math.pi * 30 / tolerance


def test_cubic_bezier_close_to_curve():
    # A quarter circle as the usual cubic approximation, against its own samples.
    k = 0.5522847498 * 40
    drawing = load_svg(svg(f'<path d="M50 10 C{50 + k} 10 90 {50 - k} 90 50"/>'), tolerance=0.05)
    points = only_path(drawing)
    t = np.linspace(0, 1, 2001)[:, None]
    p0, p1, p2, p3 = map(np.array, ([50, 10], [50 + k, 10], [90, 50 - k], [90, 50]))
    curve = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3
    # Every true curve point lies close to the flattened polyline.
    a, b = points[:-1], points[1:]
    ab = b - a
    share = np.clip(np.einsum("pij,ij->pi", curve[:, None, :] - a, ab) / np.einsum("ij,ij->i", ab, ab), 0, 1)
    nearest = a + share[..., None] * ab
    distance = np.min(np.linalg.norm(curve[:, None, :] - nearest, axis=2), axis=1)
    assert distance.max() <= 0.075


# --- layers ------------------------------------------------------------------------------


def test_layers_named_and_ordered_by_id():
    body = ('<g inkscape:groupmode="layer" inkscape:label="2 Blue"><path d="M0 0 L1 1"/></g>'
            '<g inkscape:groupmode="layer" inkscape:label="1 Red"><path d="M0 0 L2 2"/>'
            '<g><path d="M5 5 L6 6"/></g></g>'
            '<g id="layer7"><path d="M3 3 L4 4"/></g>')
    drawing = load_svg(svg(body))
    assert [layer.name for layer in drawing.layers] == ["1 Red", "2 Blue", "Layer 7"]
    assert [len(layer.paths) for layer in drawing.layers] == [2, 1, 1]


def test_lone_points_and_duplicates_dropped():
    body = '<path d="M10 10 L10 10"/><path d="M1 1 L1 1 L2 2 L2 2 L3 1"/>'
    path = only_path(load_svg(svg(body)))
    np.testing.assert_allclose(path, [[1, 1], [2, 2], [3, 1]], rtol=1e-5)
    assert path.dtype == np.float64 and not path.flags.writeable


def test_declared_encoding_is_honoured():
    data = ('<?xml version="1.0" encoding="ISO-8859-1"?>'
            '<svg xmlns="http://www.w3.org/2000/svg" '
            'xmlns:inkscape="http://www.inkscape.org/namespaces/inkscape" '
            'width="10mm" height="10mm" viewBox="0 0 10 10">'
            '<g inkscape:groupmode="layer" inkscape:label="Stift \xe9"><path d="M0 0 L1 1"/></g>'
            '</svg>').encode("latin-1")
    assert load_svg(data).layers[0].name == "Stift \xe9"


def test_utf8_bom_accepted():
    assert load_svg(b"\xef\xbb\xbf" + svg('<path d="M0 0 L1 1"/>')).layers



def test_sample_is_a_single_layer_that_fits_a4():
    drawing = load_svg(SAMPLE.read_bytes())
    assert len(drawing.layers) == 1
    check_travel(drawing, (300.0, 218.0), model="V3/A4")
    stats = drawing_stats(drawing)
    assert 3000 < stats.pen_down_mm < 9000


# --- bad input -----------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE svg [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
]>
<svg xmlns="http://www.w3.org/2000/svg"><text>&lol2;</text></svg>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE svg [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<svg xmlns="http://www.w3.org/2000/svg"><text>&xxe;</text></svg>"""

DOCTYPE_ONLY = (b'<?xml version="1.0"?><!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
                b'"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">'
                + svg('<path d="M0 0 L1 1"/>'))


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"   \n", "empty"),
    (b"this is not xml", "not well-formed XML"),
    (b"<svg", "not well-formed XML"),
    (b"<html><body/></html>", "root element is <html>"),
    (b'<svg xmlns="http://example.com/other"/>', "namespace"),
    (BILLION_LAUGHS, "DOCTYPE"),
    (XXE, "DOCTYPE"),
    (svg('<path d="M0 0 L nan 5"/>'), "NaN"),
    (svg('<circle cx="5" cy="5" r="inf"/>'), "NaN"),
    (svg('<path d="M0 0 L 1e400 5"/>'), "non-finite"),
    (svg('<path d="M0 0 L 1e9 5"/>'), "beyond 10 m"),
    (svg('<g transform="scale(1e6)"><circle r="50" cx="0" cy="0"/></g>'), "beyond 10 m"),
    (svg('<circle r="3000" cx="3000" cy="3000"/>' * 200), "points"),
    (svg('<use href="#a"/><g id="a"><use href="#a"/></g>'), "refers to itself"),
    (svg('<path id="p0" d="M0 0 L1 1"/>' + "".join(
        f'<g id="p{i}">' + f'<use href="#p{i - 1}"/>' * 10 + "</g>" for i in range(1, 9))),
     "expand to more than"),
    (svg("<g>" * 300 + '<path d="M0 0 L1 1"/>' + "</g>" * 300), "levels deep"),
    (svg(""), "nothing to plot"),
    (svg("<text>words only</text>"), "nothing to plot"),
    (svg('<path d="M5 5"/>'), "nothing to plot"),
    (gzip.compress(svg('<path d="M0 0 L1 1"/>')), "svgz"),
    (b"\x89PNG\r\n\x1a\n....", "PNG"),
    ('<svg xmlns="http://www.w3.org/2000/svg"><path d="M0 0 L1 1"/>caf\xe9</svg>'.encode("latin-1"),
     "not valid utf-8"),
    (b'<?xml version="1.0" encoding="no-such-codec"?><svg/>', "unknown text encoding"),
])
def test_bad_input_is_a_one_line_svg_error(data, words):
    with pytest.raises(SVGError) as caught:
        load_svg(data)
    message = str(caught.value)
    assert words.lower() in message.lower()
    assert "\n" not in message


def test_a_doctype_line_without_entities_is_read():
    # matplotlib, Illustrator and Graphviz write one; the DTD is never fetched.
    np.testing.assert_allclose(only_path(load_svg(DOCTYPE_ONLY)), [[0, 0], [1, 1]], atol=1e-5)


def test_entity_bomb_never_expanded():
    # A much bigger bomb must be refused as fast as the small one (no expansion).
    big = BILLION_LAUGHS.replace(b"]>", b' <!ENTITY lol9 "' + b"&lol2;" * 1000 + b'">\n]>')
    with pytest.raises(SVGError, match="DOCTYPE"):
        load_svg(big)


# --- travel ----------------------------------------------------------------------------------


def line_drawing(*paths) -> Drawing:
    return Drawing(layers=(Layer("one", [np.array(p, dtype=float) for p in paths]),),
                   width_mm=500, height_mm=500)


def test_check_travel_names_how_far_outside():
    drawing = line_drawing([[10, 10], [455.2, 100]])
    with pytest.raises(OutOfTravel) as caught:
        check_travel(drawing, (430.0, 297.0), model="V3/A3")
    assert str(caught.value) == "the drawing reaches x=455.2 mm but the V3/A3 travel ends at 430 mm"


def test_check_travel_negative_and_y():
    with pytest.raises(OutOfTravel, match=r"x=-3\.0 mm, left of the home corner"):
        check_travel(line_drawing([[-3, 10], [5, 5]]), (300, 218))
    with pytest.raises(OutOfTravel, match=r"y=220\.0 mm but the travel ends at 218 mm"):
        check_travel(line_drawing([[3, 220], [5, 5]]), (300, 218))


def test_check_travel_edges_are_inside():
    check_travel(line_drawing([[0, 0], [300, 218 + 1e-7]]), (300, 218))
    frame = load_svg(svg('<rect x="0" y="0" width="430" height="297"/>',
                         'width="430mm" height="297mm" viewBox="0 0 430 297"'))
    check_travel(frame, (430, 297), model="V3/A3")
    with pytest.raises(OutOfTravel):
        check_travel(line_drawing([[0, 0], [300.01, 5]]), (300, 218))


def test_svg_geometry_outside_the_travel_is_out_of_travel():
    drawing = load_svg(svg('<path d="M10 10 L450 10"/>',
                           'width="500mm" height="100mm" viewBox="0 0 500 100"'))
    with pytest.raises(OutOfTravel, match="x=450.0 mm"):
        check_travel(drawing, (430, 297), model="V3/A3")


# --- ordering ------------------------------------------------------------------------------


def segments(drawing: Drawing) -> Counter:
    """Every drawn segment as an unordered pair of points."""
    found: Counter = Counter()
    for layer in drawing.layers:
        for path in layer.paths:
            for a, b in zip(path[:-1].tolist(), path[1:].tolist()):
                found[frozenset((tuple(a), tuple(b)))] += 1
    return found


def shuffled_hatching(count: int = 200, seed: int = 1) -> Drawing:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        y = 10 + i * 0.5
        line = np.array([[10.0, y], [200.0, y]])
        lines.append(line[::-1] if rng.random() < 0.5 else line)
    order = rng.permutation(count)
    return Drawing(layers=(Layer("hatch", [lines[i] for i in order]),), width_mm=210, height_mm=297)


def test_optimize_cuts_pen_up_travel_and_keeps_every_segment():
    drawing = shuffled_hatching()
    ordered = optimize(drawing, merge_tolerance=0.05)
    assert segments(ordered) == segments(drawing)
    before, after = drawing_stats(drawing), drawing_stats(ordered)
    assert after.pen_down_mm == pytest.approx(before.pen_down_mm)
    assert after.pen_up_mm < before.pen_up_mm / 20
    assert after.paths == before.paths  # 0.5 mm apart: nothing to merge


def test_optimize_merges_touching_paths_reversing_where_needed():
    a = [[0, 0], [10, 0]]
    b = [[20, 0], [10, 0]]  # touches a's end with its own end
    c = [[20.01, 0], [30, 5]]  # within the merge tolerance of b's start
    ordered = optimize(line_drawing(a, b, c), merge_tolerance=0.05)
    assert len(ordered.layers[0].paths) == 1
    np.testing.assert_allclose(ordered.layers[0].paths[0],
                               [[0, 0], [10, 0], [20, 0], [20.01, 0], [30, 5]])


def test_optimize_starts_near_home_and_layers_keep_their_order():
    far, near = [[100, 100], [120, 100]], [[5, 5], [1, 1]]
    drawing = Drawing(layers=(Layer("first", [np.array(far, float), np.array(near, float)]),
                              Layer("second", [np.array([[0, 0], [1, 0]], float)])),
                      width_mm=200, height_mm=200)
    ordered = optimize(drawing, merge_tolerance=0.0)
    assert [layer.name for layer in ordered.layers] == ["first", "second"]
    np.testing.assert_allclose(ordered.layers[0].paths[0], [[1, 1], [5, 5]])


def test_optimize_is_fast_for_many_paths():
    rng = np.random.default_rng(5)
    starts = rng.uniform(0, 400, (20000, 2))
    paths = [np.array([s, s + rng.uniform(-3, 3, 2)]) for s in starts]
    drawing = Drawing(layers=(Layer("many", paths),), width_mm=400, height_mm=400)
    ordered = optimize(drawing, merge_tolerance=0.0)
    assert sum(len(p) for p in ordered.layers[0].paths) == 40000
    assert drawing_stats(ordered).pen_up_mm < drawing_stats(drawing).pen_up_mm / 10


def _drawable(path: list[tuple[int, int]]) -> np.ndarray | None:
    """The path without repeated consecutive points, or None if less than a segment is left."""
    points = np.array(path, dtype=float)
    keep = np.ones(len(points), bool)
    keep[1:] = np.any(points[1:] != points[:-1], axis=1)
    return points[keep] if keep.sum() >= 2 else None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=2, max_size=5),
                min_size=1, max_size=25))
def test_optimize_never_changes_a_drawn_segment(raw):
    paths = [points for points in map(_drawable, raw) if points is not None]
    if not paths:
        return
    drawing = Drawing(layers=(Layer("l", paths),), width_mm=20, height_mm=20)
    ordered = optimize(drawing, merge_tolerance=0.0)  # only exactly touching ends merge
    assert segments(ordered) == segments(drawing)



@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=2, max_size=12),
                min_size=1, max_size=60), st.sampled_from([0.0, 0.5, 1.0]))
def test_optimize_looking_ahead_picks_exactly_what_the_query_at_each_step_picks(
        raw, tolerance):
    """The queries made ahead, all at once, answer as the query made at each step
    did (ties among equally near entries included): the order, and so the plan,
    is the same."""
    import vfab.geometry.order as order_module

    # Some paths closed (the first point again at the end).
    closed = [path + path[:1] if len(path) > 3 and path[0] != path[-1] and len(path) % 3 == 0
              else path for path in raw]
    paths = [points for points in map(_drawable, closed) if points is not None]
    if not paths:
        return
    ahead, ahead_end = order_module.order_paths(tuple(paths), np.zeros(2), tolerance)
    saved = order_module._AHEAD_K
    order_module._AHEAD_K = 0  # no query made ahead: each made when the pen gets there
    try:
        step, step_end = order_module.order_paths(tuple(paths), np.zeros(2), tolerance)
    finally:
        order_module._AHEAD_K = saved
    assert len(ahead) == len(step) and np.array_equal(ahead_end, step_end)
    assert all(np.array_equal(a, b) for a, b in zip(ahead, step))


# --- stats and preview -----------------------------------------------------------------------


def test_drawing_stats_counts_pen_down_and_pen_up():
    drawing = Drawing(layers=(Layer("a", [np.array([[3, 4], [6, 8]], float)]),
                              Layer("b", [np.array([[6, 0], [6, 1], [7, 1]], float)])),
                      width_mm=10, height_mm=10)
    stats = drawing_stats(drawing)
    assert (stats.layers, stats.paths) == (2, 2)
    assert stats.pen_down_mm == pytest.approx(5 + 2)
    # home -> (3,4): 5; (6,8) -> (6,0): 8; (7,1) -> home: sqrt(50)
    assert stats.pen_up_mm == pytest.approx(5 + 8 + math.sqrt(50))


def test_preview_respects_the_point_budget_and_rounds():
    drawing = load_svg(SAMPLE.read_bytes())
    small = preview(drawing, 500)
    points = [point for layer in small["layers"] for path in layer["paths"] for point in path]
    assert len(points) <= 500
    assert all(len(path) >= 2 for layer in small["layers"] for path in layer["paths"])
    assert all(round(v, 2) == v for point in points for v in point)
    assert small["width_mm"] == pytest.approx(297, abs=0.01)
    full = preview(drawing, 10**6)
    assert sum(len(p) for layer in full["layers"] for p in layer["paths"]) == drawing.point_count
    assert full["layers"][0]["name"] == drawing.layers[0].name
