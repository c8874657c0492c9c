"""Motion: plans of EBB commands (LM or SM moves, SP pen moves) with exact times."""

from .pen import pen_moves
from .plan import LayerPlan, Move, MotionPlan, PathPlan, PenMove
from .planner import (
    estimate_seconds,
    plan_drawing,
    plan_path,
    plan_travel,
    resume_path,
)
from .profile import MIN_MOVE_S

__all__ = [
    "MIN_MOVE_S",
    "LayerPlan",
    "Move",
    "MotionPlan",
    "PathPlan",
    "PenMove",
    "estimate_seconds",
    "pen_moves",
    "plan_drawing",
    "plan_path",
    "plan_travel",
    "resume_path",
]
