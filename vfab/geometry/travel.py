"""Whether a drawing fits the plotter's travel."""

from __future__ import annotations

from .drawing import Drawing
from .errors import OutOfTravel

#: Slack for rounding: svgelements converts mm with 0.0393701 in/mm, so a
#: frame drawn exactly at 430 mm reads as 430.0002 mm. A micrometre is a tenth
#: of a motor step: such a point still rounds to the step of the limit.
SLACK_MM = 1e-3


def check_travel(drawing: Drawing, travel_mm: tuple[float, float], *,
                 model: str | None = None) -> None:
    """Raise OutOfTravel, saying how far outside, if any point is off the travel area.

    The travel area runs from the home corner (0, 0) to `travel_mm` (x, y).
    """
    bounds = drawing.bounds()
    if bounds is None:
        return
    min_x, min_y, max_x, max_y = bounds
    limit_x, limit_y = travel_mm
    which = f"the {model} travel" if model else "the travel"
    problems = []
    if min_x < -SLACK_MM:
        problems.append(f"the drawing reaches x={min_x:.1f} mm, left of the home corner "
                        "(x must be >= 0)")
    if min_y < -SLACK_MM:
        problems.append(f"the drawing reaches y={min_y:.1f} mm, above the home corner "
                        "(y must be >= 0)")
    if max_x > limit_x + SLACK_MM:
        problems.append(f"the drawing reaches x={max_x:.1f} mm but {which} ends at "
                        f"{limit_x:g} mm")
    if max_y > limit_y + SLACK_MM:
        problems.append(f"the drawing reaches y={max_y:.1f} mm but {which} ends at "
                        f"{limit_y:g} mm")
    if problems:
        raise OutOfTravel("; ".join(problems))
