"""The plotters of a farm as the queue sees them: a name, a host and tags.

A job may name a plotter and may require tags; a plotter can take it when the
name is its own (or none is asked for) and it has every tag. Which plotter
took a job is the store's to say (`taken_by`), so that a job that was begun
stays with the plotter that holds its sheet.
"""

from __future__ import annotations

from typing import Iterable

import attr

from vfab.jobs.errors import NoPlotterCanTake


@attr.s(frozen=True, auto_attribs=True)
class FarmPlotter:
    """One plotter of the farm, as the queue matches jobs to it."""

    name: str
    host: str
    tags: tuple[str, ...] = ()

    def can_take(self, plotter: str | None, tags: Iterable[str]) -> bool:
        """Whether a job that asks for `plotter` (None: any) and requires `tags` fits here."""
        return (plotter is None or plotter == self.name) and set(tags) <= set(self.tags)


def check_takers(plotters: Iterable[FarmPlotter], plotter: str | None,
                 tags: tuple[str, ...]) -> list[FarmPlotter]:
    """The plotters that can take such a job; NoPlotterCanTake (HTTP 422) if none can."""
    plotters = list(plotters)
    takers = [candidate for candidate in plotters if candidate.can_take(plotter, tags)]
    if takers:
        return takers
    names = ", ".join(candidate.name for candidate in plotters) or "none"
    if plotter is not None and all(candidate.name != plotter for candidate in plotters):
        raise NoPlotterCanTake(f"no plotter is named {plotter!r} (the plotters: {names})")
    wanted = ", ".join(tags)
    if plotter is not None:
        raise NoPlotterCanTake(f"plotter {plotter!r} does not have every tag of {wanted}")
    raise NoPlotterCanTake(f"no plotter has every tag of {wanted} (the plotters: {names})")


def parse_tags(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Tags as clients send them: a comma-separated string or a list; blanks dropped."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
