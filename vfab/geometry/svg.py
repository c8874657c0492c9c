"""Reading an uploaded SVG into a Drawing.

The upload is untrusted: it is decoded and parsed once with defusedxml (no
entities, no external references; a plain DOCTYPE line is fine) before vpype
ever sees it, its geometry is bounded before curves are flattened (so that a
small file cannot ask for billions of points), and every refusal is an
SVGError whose message tells the submitter what to fix.

vpype then does the SVG work: units (mm, cm, in, pt, px at 96 per inch),
viewBox, transforms, nested groups and curves. Curves are flattened with
vpype's quantization equal to the tolerance (chords no longer than it) and
then simplified (Douglas-Peucker, same tolerance), so a flattened curve stays
within about the tolerance of the true one while keeping few vertices.
Straight segments are kept exactly as drawn. Where vpype (through
svgelements) would plot other than the SVG shows, the tree is rewritten
before it reads it (_as_vpype_reads_it): symbols, markers and masks drawn in
place, <use> outside groups, symbol viewports, layers merged by number, and
clip paths, which are cut with shapely once vpype has read them.
"""

from __future__ import annotations

import codecs
import copy as copy_module
import io
import math
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator

import attr
import defusedxml
import defusedxml.ElementTree as SafeElementTree
import numpy as np
import shapely
import svgelements
import vpype

from .drawing import Drawing, Layer
from .errors import SVGError

MM_PER_PX = 25.4 / 96.0
PX_PER_MM = 96.0 / 25.4

#: Coordinates beyond 10 m are broken data, not a drawing that is merely too
#: big for the plotter (that is OutOfTravel, checked later against the model).
GIGANTIC_MM = 10_000.0

#: The default bounds on a drawing (the `uploads` configuration section):
#: the elements it may expand to through <use> references, so that nested
#: <use> elements cannot multiply into billions, and the numbers in its path
#: data and point lists (after <use> expansion), each of which costs time
#: and memory in the SVG libraries. Both admit a drawing of a million segments
#: (100,000 polylines of 10 segments: 100,000 elements, 2.2 million numbers);
#: SECURITY.md says what a drawing at the limits costs.
MAX_ELEMENTS = 500_000
MAX_COORDINATES = 3_000_000
#: Deeper nesting than this is not a drawing (and would exhaust the stack).
MAX_DEPTH = 200

#: Upper bound on the points curve flattening may create: about 160 MB of
#: coordinates. Past it the drawing is refused before vpype allocates them.
MAX_FLATTENED_POINTS = 10_000_000

#: vpype before 1.15 (the last release for Python 3.10) breaks on its own curve
#: simplification with Shapely 2; without it curves are flattened into chords of
#: at most the tolerance, which strays less but makes more points.
_VPYPE_SIMPLIFIES = tuple(int(part) for part in vpype.__version__.split(".")[:2]) >= (1, 15)

SVG_NAMESPACE = "http://www.w3.org/2000/svg"
INKSCAPE_NAMESPACE = "http://www.inkscape.org/namespaces/inkscape"
#: Prefixes kept when a document is written back out (vpype reads layer
#: names from inkscape:label).
_PREFIXES = {"": SVG_NAMESPACE, "inkscape": INKSCAPE_NAMESPACE,
             "sodipodi": "http://sodipodi.sourceforge.net/DTD/sodipodi-0.dtd",
             "xlink": "http://www.w3.org/1999/xlink"}

_XML_DECLARATION = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_TEXT_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")

_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed (an .svgz file); upload the uncompressed .svg"),
    (b"\x89PNG", "a PNG image, not an SVG drawing"),
    (b"\xff\xd8\xff", "a JPEG image, not an SVG drawing"),
    (b"%PDF", "a PDF document, not an SVG drawing"),
    (b"PK\x03\x04", "a ZIP archive, not an SVG drawing"),
)


@attr.s(frozen=True, auto_attribs=True)
class SVGLimits:
    """How big a drawing may be: elements (with <use> copies) and path coordinates."""

    max_elements: int = MAX_ELEMENTS
    max_coordinates: int = MAX_COORDINATES


def load_svg(data: bytes, *, tolerance: float = 0.05,
             limits: SVGLimits = SVGLimits()) -> Drawing:
    """Read an SVG upload into a Drawing in mm; raise SVGError saying what is wrong.

    `tolerance` (mm) is how far flattened curves may stray from the true curve.
    Paths of a single point (or of one repeated point) are dropped: a plotter
    cannot draw them without inventing a mark. Consecutive duplicate points
    are removed, since they draw nothing.
    """
    if not math.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(f"tolerance must be a positive number of mm, got {tolerance!r}")
    text = _decode(data)
    root = _parse_safely(text, limits)
    _check_root(root)
    _check_numbers(root)
    _check_expansion(root, limits)
    try:
        text, layer_names, clips = _as_vpype_reads_it(text, root, limits)
    except RecursionError:
        # Written out, a long chain of <use>s nests deeper than the stack.
        raise SVGError("the SVG's <use> references are chained too deeply") from None
    quantization_px = tolerance * PX_PER_MM
    if _has_curves(root):
        _check_geometry(text, quantization_px)
    try:
        document = vpype.read_multilayer_svg(
            io.StringIO(text), quantization=quantization_px, crop=False,
            simplify=_VPYPE_SIMPLIFIES
        )
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, RecursionError,
            AttributeError, ElementTree.ParseError) as error:
        # AttributeError: vpype meets an element svgelements left out (as for a
        # root hidden by a stylesheet); the upload is at fault, not the daemon.
        raise SVGError(f"the SVG could not be read: {error or 'malformed path data'}") from None
    _apply_clips(document, clips)
    return _to_drawing(document, layer_names)


def _layer_label(group: ElementTree.Element) -> str:
    return group.get(f"{{{INKSCAPE_NAMESPACE}}}label") or group.get("id") or ""


def _as_vpype_reads_it(text: str, root: ElementTree.Element, limits: SVGLimits
                       ) -> tuple[str, dict[int, str], list[_Clip]]:
    """The document rewritten where vpype (through svgelements) would draw
    something other than the SVG shows (the text itself when nothing needs
    it), the names of the layers that vpype will number other than by their
    own names (see _separate_layers), and the clips to apply once it is read.

    Each step changes `root` in place and says whether it changed anything.
    """
    changed = _complete_root_size(root)
    changed = _give_paths_data(root) or changed
    changed = _resolve_font_relative_lengths(root) or changed
    changed = _hide_documentation_layers(root) or changed
    changed = _hide_unrendered_containers(root) or changed
    changed = _apply_symbol_viewports(root) or changed
    changed = _inline_loose_uses(root) or changed
    clipped = _clipped_elements(root)
    layer_names, layer_ids = _separate_layers(root, every=bool(clipped))
    clips = _move_clipped(root, clipped, layer_ids, limits)
    if not (changed or layer_names or clips):
        return text, layer_names, clips
    for prefix, uri in _PREFIXES.items():
        ElementTree.register_namespace(prefix, uri)
    return ElementTree.tostring(root, encoding="unicode"), layer_names, clips


def _local_tag(element: ElementTree.Element) -> str:
    return element.tag.rpartition("}")[2] if isinstance(element.tag, str) else ""


def _svg_tag(root: ElementTree.Element, local: str) -> str:
    """A tag in the document's own namespace (an <svg> without xmlns has none)."""
    namespace = root.tag.rpartition("}")[0] if isinstance(root.tag, str) else ""
    return f"{namespace}}}{local}" if namespace else local


_ABSOLUTE_LENGTH = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)\s*$")


def _complete_root_size(root: ElementTree.Element) -> bool:
    """Give a root with a viewBox and only one of width and height the other,
    from the viewBox's aspect ratio in the same unit (SVG 2: `auto` sizing).

    svgelements takes the missing one as 100 % of the viewBox in px and fits
    the drawing into that, so `width="200mm" viewBox="0 0 100 50"` came out
    13 mm high and squeezed, where a browser or Inkscape shows 200 x 100 mm.
    """
    view_box = [float(number) for number in _NUMBER.findall(root.get("viewBox") or "")]
    if len(view_box) != 4 or not (view_box[2] > 0 and view_box[3] > 0):
        return False
    sizes = {name: root.get(name) for name in ("width", "height")}
    missing = [name for name, value in sizes.items()
               if value is None or value.strip().lower() == "auto"]
    if len(missing) != 1:
        return False
    (absent,) = missing
    given = "height" if absent == "width" else "width"
    match = _ABSOLUTE_LENGTH.match(sizes[given] or "")
    if match is None:
        return False  # a percentage or nonsense: the viewer's size, unknown here
    ratio = view_box[2] / view_box[3] if absent == "width" else view_box[3] / view_box[2]
    root.set(absent, f"{float(match.group(1)) * ratio!r}{match.group(2)}")
    return True


def _give_paths_data(root: ElementTree.Element) -> bool:
    """An empty `d` for each <path> without one: SVG does not render such a
    path, and svgelements failed the whole document on it."""
    changed = False
    for path in root.iter(_svg_tag(root, "path")):
        if path.get("d") is None:
            path.set("d", "")
            changed = True
    return changed


#: CSS's initial font size (`medium`), in px.
_DEFAULT_FONT_PX = 16.0
_FONT_RELATIVE = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(em|ex)\s*$",
                            re.IGNORECASE)
_STYLE_FONT_RELATIVE = re.compile(r"[\d.]\s*(em|ex)\s*(;|$)", re.IGNORECASE)
#: Attributes and style properties that hold one length vfab reads.
_LENGTHS = frozenset({"x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "rx", "ry",
                      "width", "height", "stroke-width"})


def _in_font_px(value: str, font_px: float) -> str | None:
    """`value` in user units (px) if it is in em or ex (ex: half an em), else None."""
    match = _FONT_RELATIVE.match(value)
    if match is None:
        return None
    ems = float(match.group(1)) * (0.5 if match.group(2).lower() == "ex" else 1.0)
    return repr(ems * font_px)


def _font_px(element: ElementTree.Element, inherited: float) -> float:
    """The element's font size in px: its own (style over attribute), else its parent's."""
    declared = element.get("font-size")
    for declaration in (element.get("style") or "").split(";"):
        name, _, value = declaration.partition(":")
        if name.strip().lower() == "font-size":
            declared = value
    if declared is None:
        return inherited
    relative = _in_font_px(declared, inherited)
    if relative is not None:
        return float(relative)
    size = _user_units(declared.strip(), "0", inherited)
    return size if size is not None and size > 0 else inherited


def _resolve_font_relative_lengths(root: ElementTree.Element) -> bool:
    """Lengths in em or ex (attributes and the style's stroke-width) in px, from
    the font size each element inherits: svgelements leaves them unresolved and
    the document could not be read."""
    if not any(_FONT_RELATIVE.match(value)
               or (name == "style" and _STYLE_FONT_RELATIVE.search(value))
               for element in root.iter() for name, value in element.attrib.items()):
        return False
    changed = False
    pending = [(root, _DEFAULT_FONT_PX)]
    while pending:
        element, inherited = pending.pop()
        font_px = _font_px(element, inherited)
        for name in _LENGTHS & set(element.attrib):
            resolved = _in_font_px(element.get(name), font_px)
            if resolved is not None:
                element.set(name, resolved)
                changed = True
        style = element.get("style")
        if style and ("em" in style or "ex" in style):
            declarations = []
            for declaration in style.split(";"):
                name, colon, value = declaration.partition(":")
                resolved = _in_font_px(value, font_px) if name.strip() in _LENGTHS else None
                declarations.append(f"{name}:{resolved}" if resolved is not None else declaration)
            if declarations != style.split(";"):
                element.set("style", ";".join(declarations))
                changed = True
        pending.extend((child, font_px) for child in element)
    return changed


def _hide_documentation_layers(root: ElementTree.Element) -> bool:
    """Put the "%" layers (notes, registration marks, originals of clones),
    which the AxiDraw convention does not plot, into <defs>.

    They go before vpype reads the text: it numbers unnumbered layers itself
    and would merge such a layer into a numbered one. In <defs> rather than
    removed, a <use> of a shape in one (a clone) still shows it.
    """
    changed = False
    for index, child in enumerate(list(root)):
        if _local_tag(child) == "g" and _layer_label(child).lstrip().startswith("%"):
            defs = ElementTree.Element(_svg_tag(root, "defs"))
            root[index] = defs
            defs.append(child)
            changed = True
    return changed


#: Elements never drawn where they stand, only through a reference. svgelements
#: knows this of <defs>, <clipPath> and <pattern>, but draws the content of
#: these in place (an Illustrator <symbol>, a <marker> or <mask> outside <defs>,
#: the frame of Inkscape 0.92 flowed text, which no SVG viewer draws).
_UNRENDERED = frozenset({"symbol", "marker", "mask", "flowRoot"})
_NOT_DRAWN_INSIDE = frozenset({"defs", "clipPath", "pattern"}) | _UNRENDERED


def _hide_unrendered_containers(root: ElementTree.Element) -> bool:
    """Put every such element outside <defs> into one, in place."""
    if all(next(root.iter(_svg_tag(root, tag)), None) is None for tag in _UNRENDERED):
        return False
    changed = False
    pending = [root]
    while pending:
        parent = pending.pop()
        for index, child in enumerate(list(parent)):
            tag = _local_tag(child)
            if tag in _UNRENDERED:
                defs = ElementTree.Element(_svg_tag(root, "defs"))
                parent[index] = defs
                defs.append(child)
                changed = True
            elif tag not in _NOT_DRAWN_INSIDE:
                pending.append(child)
    return changed


def _href(element: ElementTree.Element) -> str:
    return element.get("href") or element.get(_XLINK_HREF) or ""


def _ids(root: ElementTree.Element) -> dict[str, ElementTree.Element]:
    ids: dict[str, ElementTree.Element] = {}
    for element in root.iter():
        if element.get("id"):
            ids.setdefault(element.get("id"), element)
    return ids


def _user_units(value: str | None, default: str, relative: float) -> float | None:
    """An x/y/width/height attribute in user units, None when it cannot be known."""
    try:
        length = svgelements.Length(value if value is not None else default)
        resolved = length.value(relative_length=relative, ppi=svgelements.DEFAULT_PPI)
    except (ValueError, TypeError, AttributeError):
        return None
    return float(resolved) if isinstance(resolved, (int, float)) else None


def _viewport_size(root: ElementTree.Element) -> tuple[float, float]:
    """The root's user space size, which a percentage of a <use> refers to."""
    numbers = _NUMBER.findall(root.get("viewBox") or "")
    if len(numbers) == 4:
        return float(numbers[2]), float(numbers[3])
    width = _user_units(root.get("width"), "100%", 1000.0)
    height = _user_units(root.get("height"), "100%", 1000.0)
    return width or 1000.0, height or 1000.0


def _apply_symbol_viewports(root: ElementTree.Element) -> bool:
    """Fold the viewport of each <use> of a <symbol> with a viewBox into its transform.

    The symbol's viewBox maps onto the <use>'s x, y, width and height (SVG
    1.1 section 5.6); svgelements applies only x and y, so a scaled or offset
    symbol was drawn at its own size and place.
    """
    uses = list(root.iter(_svg_tag(root, "use")))
    if not uses:
        return False
    ids = _ids(root)
    page_width, page_height = _viewport_size(root)
    changed = False
    for use in uses:
        symbol = _target(use, ids)
        if symbol is None or _local_tag(symbol) != "symbol":
            continue
        view_box = [float(number) for number in _NUMBER.findall(symbol.get("viewBox") or "")]
        if len(view_box) != 4 or not (view_box[2] > 0 and view_box[3] > 0):
            continue
        x = _user_units(use.get("x"), "0", page_width)
        y = _user_units(use.get("y"), "0", page_height)
        width = _user_units(use.get("width"), "100%", page_width)
        height = _user_units(use.get("height"), "100%", page_height)
        if None in (x, y, width, height):
            continue
        viewport = svgelements.Viewbox.viewbox_transform(
            x, y, width, height, *view_box, symbol.get("preserveAspectRatio"))
        use.set("transform", f"{use.get('transform') or ''} {viewport}".strip())
        for name in ("x", "y", "width", "height"):
            use.attrib.pop(name, None)
        changed = True
    return changed


def _target(use: ElementTree.Element,
            ids: dict[str, ElementTree.Element]) -> ElementTree.Element | None:
    href = _href(use)
    return ids.get(href[1:]) if href.startswith("#") else None


@attr.s(frozen=True, auto_attribs=True)
class _Clip:
    """Clipped elements moved into a layer of their own (`content`), their clip
    region into another, to be cut and put back into `layer` once vpype has
    read them."""

    content: int
    region: int
    layer: int


#: How much wider a clip region is taken (px), and the shortest piece kept:
#: far below a motor step (0.0125 mm is 0.05 px).
_CLIP_SLACK_PX = 1e-6
_CLIP_PIECE_PX = 1e-3
_CLIP_REFERENCE = re.compile(r"""url\(\s*['"]?#([^'")\s]+)['"]?\s*\)""")
_CLIP_STYLE = re.compile(r"clip-path\s*:[^;]*;?", re.IGNORECASE)
_GROUPS = frozenset({"g", "svg", "a", "switch"})


def _clip_of(element: ElementTree.Element,
             ids: dict[str, ElementTree.Element]) -> ElementTree.Element | None:
    """The <clipPath> the element is clipped by, if vfab can apply it."""
    style = element.get("style") or ""
    reference = element.get("clip-path") or ""
    declared = re.search(r"clip-path\s*:([^;]*)", style, re.IGNORECASE)
    if declared:
        reference = declared.group(1)
    found = _CLIP_REFERENCE.search(reference)
    clip = ids.get(found.group(1)) if found else None
    if clip is None or _local_tag(clip) != "clipPath" \
            or (clip.get("clipPathUnits") or "").strip() == "objectBoundingBox":
        return None
    return clip


def _clipped_elements(root: ElementTree.Element
                      ) -> list[tuple[ElementTree.Element, list[ElementTree.Element],
                                      ElementTree.Element]]:
    """Each drawn element with a clip path (outermost only): the element, the
    groups it is in (the top-level one first) and its <clipPath>."""
    if not any(element.get("clip-path") is not None
               or "clip-path" in (element.get("style") or "") for element in root.iter()):
        return []
    ids = _ids(root)
    found = []
    pending = [(root, [])]
    while pending:
        parent, chain = pending.pop()
        for child in parent:
            if _hidden(child):
                continue
            clip = _clip_of(child, ids)
            if clip is not None:
                found.append((child, chain, clip))
            elif _local_tag(child) in _GROUPS:
                pending.append((child, chain + [child]))
    return found


def _move_clipped(root: ElementTree.Element, clipped: list, layer_ids: dict,
                  limits: SVGLimits) -> list[_Clip]:
    """Move each clipped element into a top-level group of its own, and a copy
    of its clip path's shapes into another, both in the groups it was in (so
    that both are read in the same coordinates). svgelements ignores clip
    paths; the cut is made in _apply_clips. Elements clipped by one clip path
    in the same coordinates share one copy of it (matplotlib clips every line
    by the axes), and siblings one group."""
    clips: list[_Clip] = []
    regions: dict[tuple, int] = {}
    contents: dict[tuple, ElementTree.Element] = {}
    number = max(layer_ids.values(), default=1) + 1
    copied = 0
    for element, chain, clip in clipped:
        # Its layer: the top-level group it is in (or is), else layer 1.
        layers = [group for group in chain + [element] if group in layer_ids]
        layer = layer_ids[layers[0]] if layers else 1
        (chain[-1] if chain else root).remove(element)
        element.attrib.pop("clip-path", None)
        if element.get("style"):
            element.set("style", _CLIP_STYLE.sub("", element.get("style")))
        key = (id(clip), element.get("transform"),
               tuple((_local_tag(group), *(group.get(name) for name in _PLACING))
                     for group in chain))
        if key not in regions:
            regions[key] = number
            region = _shells(root, chain, number, _PLACING)
            number += 1
            for transform in (element.get("transform"), clip.get("transform")):
                if transform:
                    region = ElementTree.SubElement(region, _svg_tag(root, "g"),
                                                    {"transform": transform})
            copied += sum(1 for child in clip for _ in child.iter())
            if copied > limits.max_elements:
                raise SVGError(f"the SVG's clip paths, copied where they are used, would "
                               f"make more than {limits.max_elements:,} elements "
                               f"(uploads.max_elements)")
            region.extend(_copy_without_ids(child) for child in clip)
        # Elements side by side with one clip region share a layer until cut.
        together = (regions[key], tuple(id(group) for group in chain))
        if together not in contents:
            contents[together] = _shells(root, chain, number, None)
            clips.append(_Clip(content=number, region=regions[key], layer=layer))
            number += 1
        contents[together].append(element)
    return clips


#: What of a group places its content: all a copy of a clip region needs.
_PLACING = ("transform", "x", "y", "width", "height", "viewBox", "preserveAspectRatio")


def _shells(root: ElementTree.Element, chain: list, number: int,
            kept: tuple[str, ...] | None) -> ElementTree.Element:
    """A new top-level group labelled `number`, holding empty copies of the
    groups in `chain` with their `kept` attributes (None: all but id and
    label); returns the innermost."""
    inner = ElementTree.SubElement(root, _svg_tag(root, "g"), {_INKSCAPE_LABEL: str(number)})
    for group in chain:
        tag = "svg" if _local_tag(group) == "svg" else "g"
        inner = ElementTree.SubElement(inner, _svg_tag(root, tag))
        for name, value in group.attrib.items():
            if name not in ("id", _INKSCAPE_LABEL) if kept is None else name in kept:
                inner.set(name, value)
    return inner


def _copy_without_ids(element: ElementTree.Element) -> ElementTree.Element:
    copy = copy_module.deepcopy(element)
    for part in copy.iter():
        part.attrib.pop("id", None)
    return copy


def _apply_clips(document: vpype.Document, clips: list[_Clip]) -> None:
    """Cut each clipped element's lines to its clip region (the union of the
    clip path's shapes, filled) and put what is inside back into its layer."""
    areas = {}
    for region in {clip.region for clip in clips}:
        lines = document.pop(region) if region in document.layers else []
        shapes = [shapely.Polygon(np.column_stack([line.real, line.imag])).buffer(0)
                  for line in lines if len(line) >= 3]
        # A hair wider, so that a line drawn along the clip's edge is kept; a
        # line that only touches the clip leaves a piece of about that length.
        areas[region] = shapely.union_all(shapes).buffer(_CLIP_SLACK_PX) if shapes \
            else shapely.Polygon()
    for clip in clips:
        content = document.pop(clip.content) if clip.content in document.layers else None
        if content is None:
            continue
        area = areas[clip.region]
        lines = [shapely.LineString(np.column_stack([line.real, line.imag]))
                 for line in content if len(line) >= 2]
        pieces = []
        for cut in shapely.intersection(lines, area):
            for part in shapely.get_parts(cut):
                if part.geom_type == "LineString" and part.length > _CLIP_PIECE_PX:
                    points = shapely.get_coordinates(part)
                    pieces.append(points[:, 0] + 1j * points[:, 1])
        if pieces:
            document.add(vpype.LineCollection(pieces), clip.layer)


#: Containers svgelements draws through as if they were not there.
_TRANSPARENT = frozenset({"a", "switch"})


_LAYER_NUMBER = re.compile(r"\d+")  # as vpype reads one from a label or id
_INKSCAPE_LABEL = f"{{{INKSCAPE_NAMESPACE}}}label"
_HIDDEN_STYLE = re.compile(r"(?:^|;)\s*display\s*:\s*none", re.IGNORECASE)


def _separate_layers(root: ElementTree.Element, every: bool = False
                     ) -> tuple[dict[int, str], dict[ElementTree.Element, int]]:
    """Give two top-level groups that vpype would number alike numbers of their own.

    vpype numbers a layer by the first digits in its label, else in its id,
    else by its place, and merges layers of one number: Inkscape layers
    "black 0.5mm" and "red 0.5mm" became one pen, though each layer is a pen
    (README). When that would happen every layer is relabelled with a number
    that keeps vpype's order (by number, then as in the document) and is its
    own; returned are the names vfab gives those layers, from the old labels,
    and the number vpype gives each top-level group. Nothing is changed (and
    no names returned) when no two layers share a number, unless `every`.
    """
    groups = [child for child in _rendered_children(root)
              if _local_tag(child) in ("g", "svg") and not _hidden(child)]
    numbers = []
    for place, group in enumerate(groups):
        found = (_LAYER_NUMBER.search(group.get(_INKSCAPE_LABEL) or "")
                 or _LAYER_NUMBER.search(group.get("id") or ""))
        numbers.append(max(1, int(found.group())) if found else place + 1)
    if len(set(numbers)) == len(numbers) and not every:
        return {}, dict(zip(groups, numbers))
    # Room for every layer between two numbers; number 1 stays 1, where vpype
    # also puts the shapes outside any group.
    spacing = len(groups) + 1
    taken: dict[int, int] = {}
    names = {}
    layer_ids = {}
    for group, number in zip(groups, numbers):
        unique = (number - 1) * spacing + 1 + taken.get(number, 0)
        taken[number] = taken.get(number, 0) + 1
        names[unique] = group.get(_INKSCAPE_LABEL) or f"Layer {number}"
        group.set(_INKSCAPE_LABEL, str(unique))
        layer_ids[group] = unique
    return names, layer_ids


def _hidden(element: ElementTree.Element) -> bool:
    """Hidden by its own attributes (svgelements leaves such a group out)."""
    return ((element.get("display") or "").strip().lower() == "none"
            or bool(_HIDDEN_STYLE.search(element.get("style") or "")))


def _rendered_children(parent: ElementTree.Element) -> Iterator[ElementTree.Element]:
    """The children of `parent` as svgelements places them: through <a> and <switch>."""
    for child in parent:
        if _local_tag(child) in _TRANSPARENT:
            yield from _rendered_children(child)
        else:
            yield child


def _inline_loose_uses(root: ElementTree.Element) -> bool:
    """Replace each <use> outside any group by a copy of what it shows.

    vpype reads the shapes outside the top-level groups (layers) into layer
    1, but leaves out a <use> there (as Illustrator writes symbol instances):
    its shapes were never drawn. The copy sits in an <a>, which svgelements
    draws through, its groups made <a> too, so that its shapes join layer 1
    as the <use> would, and no copied group becomes a layer of its own.
    """
    loose = []
    pending = [root]
    while pending:
        parent = pending.pop()
        for index, child in enumerate(parent):
            if _local_tag(child) == "use":
                loose.append((parent, index, child))
            elif _local_tag(child) in _TRANSPARENT:
                pending.append(child)
    if not loose:
        return False
    copier = _TransparentCopier(root)
    for parent, index, use in loose:
        parent[index] = copier.inlined(use)
    return True


class _TransparentCopier:
    """Copies of referenced elements with groups and nested <use>s made <a>s.

    Iterative, since <use> chains may run deeper than Python's stack (their
    size and cycles are refused before, by _check_expansion).
    """

    def __init__(self, root: ElementTree.Element):
        self.ids = _ids(root)
        self.page = _viewport_size(root)
        self.a_tag = _svg_tag(root, "a")

    def inlined(self, use: ElementTree.Element) -> ElementTree.Element:
        """An <a> standing for the <use>, with a copy of what it refers to."""
        wrapper, inner = self._wrapper(use)
        pending = [(inner, _target(use, self.ids))]
        while pending:
            parent, element = pending.pop()
            if element is None:
                continue
            if _local_tag(element) == "use":
                copy, inner = self._wrapper(element)
                children = [_target(element, self.ids)]
            else:
                copy = inner = self._copy(element)
                children = list(element)
            parent.append(copy)
            pending.extend((inner, child) for child in reversed(children))
        return wrapper

    def _wrapper(self, use: ElementTree.Element) -> tuple[ElementTree.Element,
                                                         ElementTree.Element]:
        """An <a> with the <use>'s attributes, and the <a> inside it that holds
        the copy: moved by the use's x and y (which move the copy, not the
        use's own coordinates, where its clip path lies)."""
        wrapper = inner = ElementTree.Element(self.a_tag)
        for name, value in use.attrib.items():
            if name not in ("x", "y", "width", "height", "href", _XLINK_HREF, "id"):
                wrapper.set(name, value)
        x = _user_units(use.get("x"), "0", self.page[0]) or 0.0
        y = _user_units(use.get("y"), "0", self.page[1]) or 0.0
        if x or y:
            inner = ElementTree.SubElement(wrapper, self.a_tag,
                                           {"transform": f"translate({x!r}, {y!r})"})
        return wrapper, inner

    def _copy(self, element: ElementTree.Element) -> ElementTree.Element:
        """The element without its children or id; a group or symbol made an <a>."""
        container = _local_tag(element) in ("g", "symbol")
        copy = ElementTree.Element(self.a_tag if container else element.tag)
        left_out = ("id", "viewBox", "preserveAspectRatio") if container else ("id",)
        for name, value in element.attrib.items():
            if name not in left_out:
                copy.set(name, value)
        copy.text = element.text
        return copy


def _decode(data: bytes) -> str:
    """The upload as text: UTF-8 unless a BOM or the XML declaration says otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("load_svg expects the uploaded bytes")
    data = bytes(data)
    if not data.strip():
        raise SVGError("the upload is empty; send an SVG file")
    for magic, what in _MAGIC:
        if data.startswith(magic):
            raise SVGError(f"the upload is {what}")
    if data.startswith(codecs.BOM_UTF8):
        encoding, data = "utf-8", data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        declared = _XML_DECLARATION.match(data)
        encoding = declared.group(1).decode("ascii") if declared else "utf-8"
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise SVGError(f"the SVG declares an unknown text encoding {encoding!r}; "
                           "save it as UTF-8") from None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise SVGError(f"the SVG is not valid {encoding} text (byte 0x{byte:02x} at offset "
                       f"{error.start}); save it as UTF-8 or declare its encoding") from None
    # The text is decoded now; a leftover encoding declaration would only
    # confuse the parsers that read the str.
    text = _TEXT_DECLARATION.sub("", text.lstrip("\ufeff"), count=1)
    if "\x00" in text:
        raise SVGError("the upload contains NUL bytes; it is not an SVG text file")
    return text


#: Characters of the document parsed at a time.
_PARSE_PIECE = 1 << 20


def _parse_safely(text: str, limits: SVGLimits) -> ElementTree.Element:
    """The document's tree, counted as it is built: the parse stops as soon as the
    elements or the path coordinates pass a limit, so a file far over one is
    refused in the time it takes to read up to it, with no more memory.

    A plain <!DOCTYPE svg PUBLIC ...> line is harmless and in many real files
    (matplotlib, Illustrator, Graphviz): the external DTD is never loaded. What
    makes a DOCTYPE dangerous is its entities, and those are refused."""
    parser = ElementTree.XMLPullParser(events=("end",), _parser=SafeElementTree.DefusedXMLParser(
        target=ElementTree.TreeBuilder(), forbid_dtd=False, forbid_entities=True,
        forbid_external=True))
    elements = coordinates = 0
    root = None

    def count() -> None:
        nonlocal elements, coordinates, root
        for _, element in parser.read_events():
            root = element
            elements += 1
            coordinates += _count_numbers(element, limits.max_coordinates - coordinates)
            if elements > limits.max_elements:
                raise _too_many_elements(limits)
            if coordinates > limits.max_coordinates:
                raise _too_many_coordinates(limits)

    try:
        for start in range(0, len(text), _PARSE_PIECE):
            parser.feed(text[start:start + _PARSE_PIECE])
            count()
        parser.close()
        count()
    except defusedxml.EntitiesForbidden:
        raise SVGError("the SVG's <!DOCTYPE ...> declares XML entities, which are refused "
                       "for safety; remove the <!ENTITY ...> declarations") from None
    except defusedxml.ExternalReferenceForbidden:
        raise SVGError("the SVG refers to external XML resources, which are refused "
                       "for safety") from None
    except ElementTree.ParseError as error:
        raise SVGError(f"the upload is not well-formed XML ({error})") from None
    assert root is not None  # a document without a root element does not parse
    return root


def _check_root(root: ElementTree.Element) -> None:
    tag = root.tag if isinstance(root.tag, str) else ""
    namespace, _, local = tag.rpartition("}")
    namespace = namespace.lstrip("{")
    if local != "svg":
        raise SVGError(f"the document is XML but not SVG: its root element is <{local}>, "
                       "not <svg>")
    if namespace not in ("", SVG_NAMESPACE):
        raise SVGError(f"the <svg> root is in namespace {namespace!r}, not {SVG_NAMESPACE!r}")
    # SVG libraries drop a hidden root altogether (and vpype then fails).
    style = re.sub(r"\s+", "", root.get("style") or "").lower()
    if (root.get("display") or "").strip().lower() == "none" or "display:none" in style:
        raise SVGError("the SVG has nothing to plot: its <svg> element is hidden "
                       "(display:none)")


_XLINK_HREF = "{http://www.w3.org/1999/xlink}href"


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
#: Values up to this long are counted with findall (a number takes at least one
#: character, so at most this many numbers: a bounded list).
_FINDALL_CHARS = 1_000_000


def _too_many_elements(limits: SVGLimits) -> SVGError:
    return SVGError(f"the SVG has or would expand to more than {limits.max_elements:,} "
                    f"elements (counting <use> copies; uploads.max_elements); simplify it "
                    f"or split it into several jobs")


def _too_many_coordinates(limits: SVGLimits) -> SVGError:
    return SVGError(f"the SVG's paths hold more than {limits.max_coordinates:,} coordinates "
                    f"(counting <use> copies; uploads.max_coordinates); simplify it (e.g. "
                    f"vpype linesimplify) or split it into several jobs")


def _count_numbers(element: ElementTree.Element, limit: int) -> int:
    """The numbers in an element's path data or point list, counted up to just past `limit`."""
    count = 0
    for name in ("d", "points"):
        value = element.get(name)
        if value:
            if len(value) <= _FINDALL_CHARS:
                # Too short to hold more than the limit: count in one C call.
                count += len(_NUMBER.findall(value))
                if count > limit:
                    return count
                continue
            for _ in _NUMBER.finditer(value):
                count += 1
                if count > limit:
                    return count
    return count


def _check_expansion(root: ElementTree.Element, limits: SVGLimits) -> None:
    """Refuse <use> cycles, <use> bombs, absurd nesting and path data too large to
    read, before any SVG library expands or parses them."""
    depth = {root: 0}
    ids = {}
    uses = False
    for parent in root.iter():
        if parent.get("id"):
            ids.setdefault(parent.get("id"), parent)
        uses = uses or (isinstance(parent.tag, str) and parent.tag.endswith("use"))
        for child in parent:
            depth[child] = depth[parent] + 1
            if depth[child] > MAX_DEPTH:
                raise SVGError(f"the SVG nests elements more than {MAX_DEPTH} levels deep")
    if not uses:
        # Nothing expands: _parse_safely has counted every element and number.
        return
    sizes: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def expanded(element: ElementTree.Element) -> tuple[int, int]:
        """(elements, path numbers) the element stands for once <use> is expanded."""
        key = id(element)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise SVGError("the SVG has a <use> element that refers to itself")
        active.add(key)
        elements, numbers = 1, _count_numbers(element, limits.max_coordinates)
        parts = [expanded(child) for child in element]
        href = element.get("href") or element.get(_XLINK_HREF) or ""
        if isinstance(element.tag, str) and element.tag.endswith("use") and href.startswith("#"):
            target = ids.get(href[1:])
            if target is not None:
                parts.append(expanded(target))
        elements += sum(part[0] for part in parts)
        numbers += sum(part[1] for part in parts)
        active.discard(key)
        sizes[key] = (elements, numbers)
        if elements > limits.max_elements:
            raise _too_many_elements(limits)
        if numbers > limits.max_coordinates:
            raise _too_many_coordinates(limits)
        return elements, numbers

    try:
        expanded(root)
    except RecursionError:
        raise SVGError("the SVG's <use> references are chained too deeply") from None


_GEOMETRY_ATTRIBUTES = ("d", "points", "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r",
                        "rx", "ry", "width", "height", "transform", "viewBox")
_GEOMETRY_NAMES = frozenset(_GEOMETRY_ATTRIBUTES)
_NON_FINITE = re.compile(r"(?<![A-Za-z])(nan|inf|infinity)(?![A-Za-z])", re.IGNORECASE)


def _check_numbers(root: ElementTree.Element) -> None:
    """Refuse NaN and infinity spelled out in geometry, which SVG parsers would skip silently."""
    for element in root.iter():
        # Both spellings contain an n: most elements need no regular expression.
        if not any(("n" in value or "N" in value) and name in _GEOMETRY_NAMES
                   for name, value in element.attrib.items()):
            continue
        for name in _GEOMETRY_ATTRIBUTES:
            value = element.get(name)
            if value is not None and _NON_FINITE.search(value):
                local = element.tag.rpartition("}")[2] if isinstance(element.tag, str) else "?"
                raise SVGError(f"the SVG has a non-finite number (NaN or infinity) in the "
                               f"{name!r} attribute of a <{local}> element")


def _segment_bound(segment: svgelements.PathSegment) -> tuple[list[complex], float, bool]:
    """The points that bound a segment, a bound on its length, and whether vpype subdivides it."""
    if isinstance(segment, svgelements.Move):
        return [complex(segment.end)], 0.0, False
    if isinstance(segment, (svgelements.Line, svgelements.Close)):
        start, end = complex(segment.start), complex(segment.end)
        return [start, end], abs(end - start), False
    if isinstance(segment, svgelements.Arc):
        if segment.rx == 0 or segment.ry == 0:
            start, end = complex(segment.start), complex(segment.end)
            return [start, end], abs(end - start), False
        radius = max(abs(segment.rx), abs(segment.ry))
        center = complex(segment.center)
        corners = [center + radius * complex(dx, dy) for dx in (-1, 1) for dy in (-1, 1)]
        return [complex(segment.start), complex(segment.end), *corners], \
            abs(segment.sweep) * radius, True
    if isinstance(segment, svgelements.QuadraticBezier):
        points = [complex(segment.start), complex(segment.control), complex(segment.end)]
    elif isinstance(segment, svgelements.CubicBezier):
        points = [complex(segment.start), complex(segment.control1),
                  complex(segment.control2), complex(segment.end)]
    else:
        raise SVGError(f"the SVG uses an unsupported path segment ({type(segment).__name__})")
    # A Bézier curve is never longer than its control polygon.
    return points, sum(abs(b - a) for a, b in zip(points, points[1:])), True


_CURVE_COMMANDS = re.compile(r"[AaCcQqSsTt]")


def _has_curves(root: ElementTree.Element) -> bool:
    """Whether anything in the document is flattened into new points.

    Only curves are: circles, ellipses, rounded rectangles, and paths with
    arcs or Bézier segments. Without them vpype creates no points beyond those
    written in the file (bounded by the upload size), so the costly parse in
    _check_geometry is not needed; _to_drawing still refuses non-finite and
    gigantic coordinates.
    """
    for element in root.iter():
        tag = element.tag.rpartition("}")[2] if isinstance(element.tag, str) else ""
        if tag in ("circle", "ellipse") or (tag == "rect" and (
                element.get("rx") or element.get("ry") or "r" in (element.get("style") or ""))):
            return True
        if tag == "path" and _CURVE_COMMANDS.search(element.get("d") or ""):
            return True
    return False


def _check_geometry(text: str, quantization_px: float) -> None:
    """Refuse NaN/inf and gigantic coordinates, and curves that would flatten to too many points.

    This runs before vpype flattens curves into points, which is where a tiny
    file with an enormous circle would otherwise exhaust memory.
    """
    try:
        svg = svgelements.SVG.parse(io.StringIO(text))
        if svg is None:
            # svgelements drops a hidden root (display:none) altogether.
            raise SVGError("the SVG has nothing to plot: its <svg> element is hidden "
                           "(display:none)")
        _measure_geometry(svg, quantization_px)
    except SVGError:
        raise
    # svgelements parses path data lazily and fails on malformed data (a curve
    # command without numbers, a relative move with no current point) with
    # these; the upload is at fault.
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, ZeroDivisionError,
            RecursionError, ElementTree.ParseError) as error:
        raise SVGError(f"the SVG could not be read: {error or 'malformed path data'}") from None


def _measure_geometry(svg: svgelements.SVG, quantization_px: float) -> None:
    limit_px = GIGANTIC_MM * PX_PER_MM
    points_needed = 0
    for element in svg.elements():
        if not isinstance(element, svgelements.Shape):
            continue
        if isinstance(element, (svgelements.Polyline, svgelements.Polygon)):
            points = [complex(point) for point in element.points]
            segments: list[tuple[list[complex], float, bool]] = [(points, 0.0, False)]
            points_needed += len(points)
        else:
            path = element if isinstance(element, svgelements.Path) else svgelements.Path(element)
            if not isinstance(element, svgelements.Path):
                path.reify()
            segments = [_segment_bound(segment) for segment in path]
        for points, length, curved in segments:
            for point in points:
                if not (math.isfinite(point.real) and math.isfinite(point.imag)):
                    raise SVGError(f"the SVG has a non-finite coordinate (NaN or infinity) "
                                   f"in a <{_tag(element)}> element")
                if abs(point.real) > limit_px or abs(point.imag) > limit_px:
                    worst = max(abs(point.real), abs(point.imag)) * MM_PER_PX
                    raise SVGError(f"the SVG has a coordinate {worst:.6g} mm from the origin in "
                                   f"a <{_tag(element)}> element; coordinates beyond "
                                   f"{GIGANTIC_MM / 1000:g} m are refused")
            if not math.isfinite(length):
                raise SVGError(f"the SVG has a <{_tag(element)}> element of infinite length")
            points_needed += max(2, math.ceil(length / quantization_px)) if curved else 1
        if points_needed > MAX_FLATTENED_POINTS:
            raise SVGError(f"flattening the curves at a tolerance of "
                           f"{quantization_px * MM_PER_PX:g} mm would need more than "
                           f"{MAX_FLATTENED_POINTS:,} points; simplify the drawing or raise "
                           "device.tolerance")


def _tag(element: svgelements.SVGElement) -> str:
    return type(element).__name__.lower()


def _clean_path(line: np.ndarray) -> np.ndarray | None:
    """(N, 2) mm coordinates without consecutive duplicates, or None if nothing is drawn."""
    points = np.column_stack([line.real, line.imag]) * MM_PER_PX
    if len(points) < 2:
        return None
    keep = np.ones(len(points), dtype=bool)
    keep[1:] = np.any(points[1:] != points[:-1], axis=1)
    points = points[keep]
    return points if len(points) >= 2 else None


def _clean_paths(lines: list[np.ndarray]) -> list[np.ndarray]:
    """_clean_path of every line, vectorised over them all; the Nones left out."""
    if not lines:
        return []
    sizes = np.fromiter((len(line) for line in lines), dtype=np.int64, count=len(lines))
    joined = np.concatenate([np.asarray(line) for line in lines]) if sizes.sum() \
        else np.zeros(0, dtype=complex)
    points = np.column_stack([joined.real, joined.imag]) * MM_PER_PX
    owner = np.repeat(np.arange(len(lines)), sizes)
    keep = np.ones(len(points), dtype=bool)
    keep[1:] = (owner[1:] != owner[:-1]) | np.any(points[1:] != points[:-1], axis=1)
    points, owner = points[keep], owner[keep]
    kept = np.bincount(owner, minlength=len(lines))
    bounds = np.concatenate([[0], np.cumsum(kept)]).tolist()
    return [points[bounds[i]:bounds[i + 1]]
            for i in np.flatnonzero((kept >= 2) & (sizes >= 2)).tolist()]


def _to_drawing(document: vpype.Document, layer_names: dict[int, str]) -> Drawing:
    layers = []
    for layer_id in sorted(document.layers):
        collection = document.layers[layer_id]
        paths = _clean_paths(list(collection))
        if not paths:
            continue
        name = layer_names.get(layer_id) or collection.property(vpype.METADATA_FIELD_NAME)
        layers.append(Layer(name=str(name) if name else f"Layer {layer_id}", paths=paths))
    if not layers:
        raise SVGError("the SVG has nothing to plot: no paths or shapes with a length "
                       "(text must be converted to paths; fills and images are not plotted)")
    for layer in layers:
        joined = np.concatenate(layer.paths)
        if np.isfinite(joined).all() and not np.abs(joined).max() > GIGANTIC_MM:
            continue
        for path in layer.paths:
            if not np.isfinite(path).all():
                raise SVGError("the SVG produces non-finite coordinates (NaN or infinity)")
            if np.abs(path).max() > GIGANTIC_MM:
                raise SVGError(f"the SVG has coordinates beyond {GIGANTIC_MM / 1000:g} m "
                               "from the origin")
    if document.page_size is not None:
        width_px, height_px = document.page_size
    else:
        width_px = height_px = 0.0
    width_mm, height_mm = width_px * MM_PER_PX, height_px * MM_PER_PX
    if not (math.isfinite(width_mm) and math.isfinite(height_mm)):
        raise SVGError("the SVG page size is not a finite number")
    return Drawing(layers=tuple(layers), width_mm=width_mm, height_mm=height_mm)
