"""twistd dropin: `twistd vfab`. Kept import-cheap: no reactor, no autobahn."""

from vfab.service_maker import vfab

__all__ = ["vfab"]
