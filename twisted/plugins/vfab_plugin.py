"""twistd dropin: `twistd vfab`. Kept import-cheap: no reactor, no autobahn."""

from twisted.application.service import ServiceMaker

vfab = ServiceMaker(
    "vfab",
    "vfab.tap",
    "A job server for AxiDraw pen plotters, with HTTP and WebSocket monitoring.",
    "vfab",
)
