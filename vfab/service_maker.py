"""vfab's twistd service maker, named by the dropin and handed to twistd by
`vfab daemon`. Import-cheap: no reactor, no autobahn."""

from twisted.application.service import ServiceMaker

vfab = ServiceMaker(
    "vfab",
    "vfab.tap",
    "A job server for AxiDraw pen plotters, with HTTP and WebSocket monitoring.",
    "vfab",
)
