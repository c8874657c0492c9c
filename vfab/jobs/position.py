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
    `behind` is where to go on instead when the board lost power: the moves
    sent before this position that the board may not have executed start there.
    """

    layer: int = 0
    path: int = 0
    move: int = 0
    parked: bool = attr.ib(default=False, eq=False, order=False)
    inside: tuple[int, int] | None = attr.ib(default=None, eq=False, order=False)
    at: tuple[int, int] | None = attr.ib(default=None, eq=False, order=False)
    behind: "Position | None" = attr.ib(default=None, eq=False, order=False)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"layer": self.layer, "path": self.path, "move": self.move}
        if self.parked:
            data["parked"] = True
        if self.inside is not None:
            data["inside"] = list(self.inside)
        if self.at is not None:
            data["at"] = list(self.at)
        if self.behind is not None:
            data["behind"] = self.behind.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Position | None":
        if not data:
            return None
        return cls(int(data["layer"]), int(data["path"]), int(data["move"]),
                   parked=bool(data.get("parked", False)),
                   inside=_steps(data.get("inside")), at=_steps(data.get("at")),
                   behind=cls.from_dict(data.get("behind")))

    def parked_here(self) -> "Position":
        """This position, exact: nothing is in flight, so nothing lies behind it."""
        return attr.evolve(self, parked=True, behind=None)

    def with_behind(self, behind: "Position") -> "Position":
        """This position, with `behind` where a board that lost power goes on
        (none when nothing lies between them)."""
        if behind >= self:
            return attr.evolve(self, behind=None)
        return attr.evolve(self, behind=attr.evolve(behind, behind=None))

    def after_power_loss(self) -> "Position":
        """Where to go on when the board lost power since this position was saved."""
        return self.behind if self.behind is not None else self


def _steps(data: list | None) -> tuple[int, int] | None:
    return (int(data[0]), int(data[1])) if data else None
