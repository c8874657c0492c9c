"""Turning a submitted SVG into what a job needs: its drawing, figures and plan.

These functions are pure and may take seconds on a large drawing: the queue
runs them in a child process for a submission or a preview (vfab.jobs.planning)
and in a thread for the job about to plot, never on the reactor.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import gc
import threading
from pathlib import Path
from typing import Any

import attr
import numpy as np

from vfab.config import DeviceConfig
from vfab.geometry import Drawing, SVGLimits, check_travel, drawing_stats, load_svg, optimize
from vfab.jobs.errors import DiskFull, InvalidJobInput
from vfab.jobs.layers import layer_settings, plotted_layers
from vfab.motion import MotionPlan, pen_moves, plan_drawing, plan_travel
from vfab.motion.ebb import TICKS_PER_S
from vfab.motion.planfile import PlanWriter, fingerprint
from vfab.motion.planner import plan_drawing_rows

#: The errors that mean "no space": a full disk or a full quota.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

#: Named plot settings a job may ask for: factors on the configured speeds.
PRESETS: dict[str, dict[str, float]] = {
    "default": {},
    "fast": {"speed_pen_down": 1.5, "speed_pen_up": 1.25, "accel_pen_down": 1.5},
    "quality": {"speed_pen_down": 0.5, "accel_pen_down": 0.5, "cornering": 0.5},
    "draft": {"speed_pen_down": 2.0, "speed_pen_up": 1.5, "accel_pen_down": 2.0,
              "cornering": 2.0},
}


def device_settings(device: DeviceConfig, preset: str | None) -> DeviceConfig:
    """The device settings with a preset's factors applied (capped at the device limits)."""
    if preset is None:
        return device
    if preset not in PRESETS:
        raise InvalidJobInput(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    changes = {}
    for name, factor in PRESETS[preset].items():
        check = attr.fields_dict(DeviceConfig)[name].metadata["check"]
        try:
            changes[name] = check(getattr(device, name) * factor)
        except ValueError:
            # Beyond what the configuration accepts: keep the configured value.
            continue
    return attr.evolve(device, **changes)


@attr.s(frozen=True, auto_attribs=True)
class PreparedJob:
    drawing: Drawing
    plan: MotionPlan
    #: The device settings of each layer (its name may change speed and pen height).
    layer_settings: tuple[DeviceConfig, ...]
    layers: int
    paths: int
    pen_down_mm: float
    pen_up_mm: float

    #: The plan's time plus the detours to the pen-change position between layers.
    estimated_seconds: float


_collector_lock = threading.Lock()
_collector_holders = 0
_collector_was_enabled = False


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector held off while a drawing is prepared.

    Reading and planning create millions of small acyclic objects (points, moves,
    command strings), which the collector would otherwise traverse again and again
    as they pile up (about a quarter of the time); reference counting frees them
    as usual. Reentrant and thread-safe: the collector runs again once the last
    preparation ends, if it ran before the first began.
    """
    global _collector_holders, _collector_was_enabled
    with _collector_lock:
        if _collector_holders == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _collector_holders += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_holders -= 1
            if _collector_holders == 0 and _collector_was_enabled:
                # The plan's millions of objects live as long as the plot: moved to
                # the permanent generation, no collection ever walks them again (a
                # full collection over them would stall the reactor feeding the
                # plot for hundreds of milliseconds). They are still freed by
                # reference counting when the plan goes.
                gc.freeze()
                gc.enable()


def prepare_drawing(svg: bytes, device: DeviceConfig,
                    limits: SVGLimits = SVGLimits()) -> Drawing:
    """The layers and paths to plot, in the order they are plotted."""
    drawing = plotted_layers(load_svg(svg, tolerance=device.tolerance, limits=limits))
    check_travel(drawing, device.travel_mm, model=device.model)
    if device.optimize:
        drawing = optimize(drawing, device.merge_tolerance)
    return drawing


def prepare(svg: bytes, device: DeviceConfig, *, use_lm: bool = True,
            limits: SVGLimits = SVGLimits()) -> PreparedJob:
    """Read, check, order and plan a drawing for this device.

    Raises SVGError when it is not a drawing and OutOfTravel when it does not
    fit the model's travel.
    """
    with _collector_paused():
        drawing = prepare_drawing(svg, device, limits)
        stats = drawing_stats(drawing)
        settings = tuple(layer_settings(layer.name, device) for layer in drawing.layers)
        plan = plan_layers(drawing, settings, use_lm=use_lm)
    return PreparedJob(drawing=drawing, plan=plan, layer_settings=settings,
                       layers=stats.layers, paths=stats.paths,
                       pen_down_mm=stats.pen_down_mm, pen_up_mm=stats.pen_up_mm,
                       estimated_seconds=job_seconds(plan, device, use_lm=use_lm))


def plan_layers(drawing: Drawing, settings: tuple[DeviceConfig, ...], *,
                use_lm: bool = True) -> MotionPlan:
    """Plan each layer on its own, from home and back, with its own settings: the
    carriage goes home for the pen change between two layers anyway."""
    layers, total, home_s = [], 0.0, 0.0
    for index, (layer, layer_device) in enumerate(zip(drawing.layers, settings)):
        plan = plan_drawing(attr.evolve(drawing, layers=(layer,)), layer_device, use_lm=use_lm)
        layers.append(attr.evolve(plan.layers[0], index=index))
        total += plan.estimated_seconds
        home_s = plan.home_s
    up, down = pen_moves(settings[0]) if settings else (None, None)
    return MotionPlan(layers=tuple(layers), estimated_seconds=total, pen_up=up,
                      pen_down=down, home_s=home_s)


def job_seconds(plan: MotionPlan, device: DeviceConfig, *, use_lm: bool = True) -> float:
    """How long the job takes on the plotter, pen changes aside.

    The plan goes home between layers; when pen changes happen elsewhere
    (`pen_change_position`), the detour differs. The operator's time to
    change the pen is not counted.
    """
    ends = [(layer.paths[0].start_mm, layer.paths[-1].end_mm)
            for layer in plan.layers if layer.paths]
    return plan.estimated_seconds + _pen_change_detours(ends, device, use_lm)


def _pen_change_detours(ends: list[tuple[tuple[float, float], tuple[float, float]]],
                        device: DeviceConfig, use_lm: bool) -> float:
    """The time the detours to the pen-change position add, for drawn layers
    that begin and end at `ends` [(first point, last point)]."""
    if device.pen_change_position is None:
        return 0.0
    park, home = device.pen_change_position, (0.0, 0.0)
    total = 0.0
    for (_, end), (start, _) in zip(ends, ends[1:]):
        total += (_travel_seconds(end, park, device, use_lm)
                  + _travel_seconds(park, start, device, use_lm)
                  - _travel_seconds(end, home, device, use_lm)
                  - _travel_seconds(home, start, device, use_lm))
    return total


def _travel_seconds(start: tuple[float, float], end: tuple[float, float],
                    device: DeviceConfig, use_lm: bool) -> float:
    return sum(move.duration_s for move in plan_travel(start, end, device, use_lm=use_lm))


def write_plan(svg: bytes, device: DeviceConfig, target: Path, *, use_lm: bool = True,
               limits: SVGLimits = SVGLimits()) -> dict[str, Any]:
    """Read, check, order and plan a drawing, and write its plan to `target` (a plan
    file, vfab.motion.planfile); returns the job's figures.

    The plan is made as numpy rows, layer by layer, and written as it is made:
    no Python object per move or point. Raises what `prepare` raises, and
    DiskFull when the disk cannot hold the plan (nothing is left behind).
    """
    with _collector_paused():
        drawing = prepare_drawing(svg, device, limits)
        stats = drawing_stats(drawing)
        settings = tuple(layer_settings(layer.name, device) for layer in drawing.layers)
        plan_seconds, ends = 0.0, []
        try:
            with PlanWriter(target) as writer:
                for layer, layer_device in zip(drawing.layers, settings):
                    rows = plan_drawing_rows(list(layer.paths), layer_device, use_lm=use_lm)
                    up, down = pen_moves(layer_device)
                    count = len(rows.length_mm)
                    plan_seconds += (rows.home_s + count * (up.duration_s + down.duration_s)
                                     + float(np.sum(rows.travel["ticks"])
                                             + np.sum(rows.draw["ticks"])) / TICKS_PER_S)
                    if count:
                        ends.append((tuple(rows.start_mm[0].tolist()),
                                     tuple(rows.end_mm[-1].tolist())))
                    writer.add_layer(layer.name, rows)
                    del rows
                estimated = plan_seconds + _pen_change_detours(ends, device, use_lm)
                figures = {"layers": stats.layers, "paths": stats.paths,
                           "pen_down_mm": stats.pen_down_mm, "pen_up_mm": stats.pen_up_mm,
                           "plan_seconds": plan_seconds, "estimated_seconds": estimated,
                           "width_mm": drawing.width_mm, "height_mm": drawing.height_mm}
                writer.finish(fingerprint=fingerprint(device, use_lm=use_lm),
                              figures=figures,
                              pen=pen_moves(settings[0] if settings else device))
        except OSError as error:
            if error.errno in _NO_SPACE:
                raise DiskFull("the plan of the drawing") from error
            raise
    return figures


def forget_frozen() -> None:
    """A plot has ended and its plan is gone: hand back to the collector what
    `gc.freeze()` held with it, so that cycles frozen alongside the plan are
    freed rather than kept for the daemon's life (the next plan is frozen anew)."""
    gc.unfreeze()


def _malloc_trim() -> "ctypes._CFuncPtr | None":
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    return getattr(ctypes.CDLL(name), "malloc_trim", None)


_trim = _malloc_trim()


def release_freed_memory() -> threading.Thread | None:
    """Hand the memory a finished plot's plan freed back to the system.

    glibc keeps freed heap memory for reuse, and a plan's millions of small
    objects leave it in pieces between longer-lived ones, so the daemon's RSS
    crept up by about a megabyte a plot (benchmarks/bench_memory.py) with no
    Python object left behind. Trimming a big heap takes tens of milliseconds,
    so it runs in a thread of its own (the call releases the GIL), never on
    the reactor. Returns that thread, or None where there is nothing to call.
    """
    if _trim is None:
        return None
    trimming = threading.Thread(target=_trim, args=(0,), name="vfab-malloc-trim",
                                daemon=True)
    trimming.start()
    return trimming
