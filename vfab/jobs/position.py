"""A place in a job's motion plan: where a plot stopped and where it goes on."""

from __future__ import annotations

from typing import Any

import attr


@attr.s(frozen=True, auto_attribs=True)
class Position:
    """The next move to send is `move` of path `path` of `layer`.

    Positions order as the plot goes. `parked` marks a position saved just
    before the carriage was moved away (to the pen-change position, or home
    at a stop): the board's step counters cannot confirm such a position.
    `inside` are the motor steps of a carriage that stopped inside the move
    (a lost board finishes the move under way): the stroke goes on from there.
    `at` are the motor steps of the carriage once it has done every move sent
    before this position: a carriage found there has done nothing since.
    """

    layer: int = 0
    path: int = 0
    move: int = 0
    parked: bool = attr.ib(default=False, eq=False, order=False)
    inside: tuple[int, int] | None = attr.ib(default=None, eq=False, order=False)
    at: tuple[int, int] | None = attr.ib(default=None, eq=False, order=False)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"layer": self.layer, "path": self.path, "move": self.move}
        if self.parked:
            data["parked"] = True
        if self.inside is not None:
            data["inside"] = list(self.inside)
        if self.at is not None:
            data["at"] = list(self.at)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Position | None":
        if not data:
            return None
        return cls(int(data["layer"]), int(data["path"]), int(data["move"]),
                   parked=bool(data.get("parked", False)),
                   inside=_steps(data.get("inside")), at=_steps(data.get("at")))

    def parked_here(self) -> "Position":
        return attr.evolve(self, parked=True)


def _steps(data: list | None) -> tuple[int, int] | None:
    return (int(data[0]), int(data[1])) if data else None
