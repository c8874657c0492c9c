"""Reading and planning drawings away from the reactor.

Reading an SVG and planning its motion is pure Python and numpy that holds
the interpreter lock for long stretches: in a thread of the daemon it stalls
the reactor, and with it the feed of the plot that is running. So the work
that happens while another job may be plotting (a submission's figures, a
preview) runs in a child process started with `reactor.spawnProcess`, and only
its small result comes back. A drawing that crashes or exhausts the child
costs the child, not the daemon; the daemon kills its children when it stops.

The child is this module run as a program: it imports what reading and
planning need, then reads one pickled (function, arguments) from stdin and
writes the pickled outcome to stdout. Starting Python and importing vpype,
shapely and scipy takes about a second, longer than reading a drawing of
10,000 segments: so once started, the daemon keeps one spare child ready,
imported and waiting for its request, and starts the next spare when a child
ends. An idle spare costs its memory (about 90 MB) and no CPU.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable

import attr
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from vfab.config import DeviceConfig
from vfab.geometry import SVGError, SVGLimits
from vfab.jobs.errors import NotAccepting

_log = Logger()

#: Children reading drawings at once; more requests wait (the machine has few cores).
CONCURRENT_CHILDREN = 2
#: How much lower the children's priority is than the daemon's.
CHILD_NICENESS = 10
#: How much of a child's stderr is kept for the log when it fails.
_STDERR_LIMIT = 4096


@attr.s(frozen=True, auto_attribs=True)
class DrawingSummary:
    """What a job records at submission: its figures and its estimated time."""

    layers: int
    paths: int
    pen_down_mm: float
    pen_up_mm: float
    estimated_seconds: float


def summarize(svg: bytes | Path, device: DeviceConfig,
              limits: SVGLimits = SVGLimits()) -> DrawingSummary:
    """Read, check and plan a drawing (given whole, or as the file it was
    uploaded to, which only the child reads); keep only its figures."""
    from vfab.jobs.prepare import prepare

    prepared = prepare(svg.read_bytes() if isinstance(svg, Path) else svg, device,
                       limits=limits)
    return DrawingSummary(layers=prepared.layers, paths=prepared.paths,
                          pen_down_mm=prepared.pen_down_mm, pen_up_mm=prepared.pen_up_mm,
                          estimated_seconds=prepared.estimated_seconds)


def plan_to_file(svg: bytes | Path, device: DeviceConfig, limits: SVGLimits, target: Path,
                 use_lm: bool = True) -> DrawingSummary:
    """Read, check and plan a drawing once, writing the whole plan to `target` (the
    daemon reads it from there a window at a time); keep only its figures."""
    from vfab.jobs.prepare import write_plan

    figures = write_plan(svg.read_bytes() if isinstance(svg, Path) else svg, device, target,
                         use_lm=use_lm, limits=limits)
    return DrawingSummary(layers=figures["layers"], paths=figures["paths"],
                          pen_down_mm=figures["pen_down_mm"], pen_up_mm=figures["pen_up_mm"],
                          estimated_seconds=figures["estimated_seconds"])


def preview_from_plan(target: Path, max_points: int) -> dict[str, Any]:
    """The drawing as planned (the points each stroke passes), simplified for display."""
    import numpy as np

    from vfab.geometry import Drawing, Layer
    from vfab.geometry import preview as drawing_preview
    from vfab.motion.planfile import PlanFile

    with PlanFile(target) as plan:
        paths = plan.path_rows(0, plan.path_count)
        layers = []
        for layer in plan.header["layers"]:
            strokes = []
            for row in paths[layer["first_path"]:layer["first_path"] + layer["paths"]]:
                start = int(row["draw_start"])
                ends = plan.rows(start, start + int(row["draw_count"]))["end_mm"]
                strokes.append(np.vstack([row["start_mm"][None, :], ends]))
            layers.append(Layer(layer["name"], tuple(strokes)))
        figures = plan.figures
    return drawing_preview(Drawing(layers=tuple(layers), width_mm=figures["width_mm"],
                                   height_mm=figures["height_mm"]), max_points)


def preview(svg: bytes, device: DeviceConfig, max_points: int,
            limits: SVGLimits = SVGLimits()) -> dict[str, Any]:
    """The drawing simplified for display, in plotting order."""
    from vfab.geometry import preview as drawing_preview
    from vfab.jobs.prepare import prepare_drawing

    return drawing_preview(prepare_drawing(svg, device, limits), max_points)


class _Child(ProcessProtocol):
    """One child process: started ahead (a spare), then given one request and
    asked for its answer."""

    def __init__(self) -> None:
        self._stdout: list[bytes] = []
        self._stderr = b""
        self.ended: Deferred[Any] = Deferred()
        #: Has been given its request (a spare that has not is idle).
        self.busy = False
        #: Killed because the daemon stops, not because of the drawing.
        self.stopped = False
        self._exited: list[Deferred[None]] = []

    def exited(self) -> Deferred[None]:
        """Fires once the process has ended and been reaped, whatever its answer."""
        waiting: Deferred[None] = Deferred()
        self._exited.append(waiting)
        return waiting

    def send(self, request: bytes) -> Deferred[Any]:
        """Give the child its one request; fires with the answer."""
        self.busy = True
        self.transport.write(request)
        self.transport.closeStdin()
        return self.ended

    def outReceived(self, data: bytes) -> None:
        self._stdout.append(data)

    def errReceived(self, data: bytes) -> None:
        self._stderr = (self._stderr + data)[-_STDERR_LIMIT:]

    def processEnded(self, reason: Failure) -> None:
        self._answer(reason)
        for waiting in self._exited:
            waiting.callback(None)

    def _answer(self, reason: Failure) -> None:
        try:
            kind, value = pickle.loads(b"".join(self._stdout))
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError):
            if self.stopped or not self.busy:
                # Killed as the daemon stops, or a spare that ended while idle.
                self.ended.errback(NotAccepting())
                return
            _log.error("the planning process died ({reason}): {stderr}",
                       reason=reason.getErrorMessage(),
                       stderr=self._stderr.decode("utf-8", "replace").strip())
            self.ended.errback(SVGError(
                "this drawing could not be read: the process reading it ran out of memory "
                "or crashed (is it extremely large?)"))
            return
        if kind == "ok":
            self.ended.callback(value)
        else:
            self.ended.errback(value)


class PlanningProcess:
    """Runs drawing work in child processes, one per request, a few at a time.

    Once `start`ed, one spare child is kept ready (imported, waiting for its
    request), so that a request does not wait for Python to start; `stop`
    kills it with the rest.
    """

    def __init__(self, reactor: Any, concurrency: int = CONCURRENT_CHILDREN):
        self._reactor = reactor
        self._children: dict[Any, _Child] = {}
        self._slots = DeferredSemaphore(concurrency)
        self._spare: _Child | None = None
        self._keep_spare = False

    def start(self) -> None:
        """Keep a spare child ready from now on; a child this user cannot start is
        said once here (each submission then says it to its submitter), and the
        daemon goes on without a spare."""
        self._keep_spare = True
        self._start_spare()

    @property
    def spare(self) -> int | None:
        """The process id of the spare child, if one is ready (or starting)."""
        return self._spare.transport.pid if self._spare is not None else None

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """`function(*args)` in a child; fires with its result or fails with its exception.

        Requests beyond the concurrency wait their turn, so a flood of uploads
        cannot start a flood of processes.
        """
        return self._slots.run(self._send, function, *args)

    def _send(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        child, self._spare = self._spare, None
        if child is None:
            child = self._spawn()
        return child.send(pickle.dumps((function, args)))

    def _spawn(self) -> _Child:
        child = _Child()
        transport = self._reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-m", "vfab.jobs.planning"],
            env=dict(os.environ))
        self._children[transport] = child
        child.ended.addBoth(self._ended, transport)
        return child

    def _start_spare(self) -> None:
        if self._keep_spare and self._spare is None:
            try:
                self._spare = self._spawn()
            except OSError as error:
                self._keep_spare = False
                _log.warn("cannot start a planning child ({python}): {error}; each "
                          "submission will say so until this user may run that Python",
                          python=sys.executable, error=error)

    def _ended(self, result: Any, transport: Any) -> Any:
        child = self._children.pop(transport, None)
        if child is self._spare:
            # A spare that died idle is not replaced until a request has been
            # served: a child that cannot start must not be restarted in a loop.
            self._spare = None
            return None
        self._start_spare()
        return result

    def stop(self) -> Deferred[None]:
        """Kill what is still running, the spare too: the daemon is stopping.
        Fires once every child has ended (and been reaped)."""
        self._keep_spare = False
        ending = []
        for transport, child in list(self._children.items()):
            child.stopped = True
            ending.append(child.exited())
            try:
                transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        return DeferredList(ending).addCallback(lambda _: None)


def _serve() -> None:
    """The child: import what the work needs, then run one pickled request from
    stdin and answer on stdout.

    It runs at a lower priority than the daemon, so that on a machine with
    few cores the reactor feeding the plotter always gets the CPU first.
    A spare whose daemon went away reads the end of its stdin and exits.
    """
    os.nice(CHILD_NICENESS)
    import vfab.jobs.prepare  # noqa: F401  (the imports are the second a spare saves)

    try:
        function, args = pickle.load(sys.stdin.buffer)
    except EOFError:
        return
    try:
        answer = ("ok", function(*args))
    except Exception as error:  # every failure goes back to the daemon to report
        answer = ("error", error)
    try:
        data = pickle.dumps(answer)
    except (pickle.PicklingError, TypeError, AttributeError):
        data = pickle.dumps(("error", RuntimeError(repr(answer[1]))))
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    _serve()
