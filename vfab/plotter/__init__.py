"""The plotter: the EBB serial protocol, AxiDraw kinematics, and the device service.

`kinematics` (mm <-> motor steps) is shared with the motion planner; `ebb`
speaks the EiBotBoard protocol; `plotter.Plotter` is what the job runner
drives; `service.DeviceService` keeps the connection and publishes its status.
"""

from vfab.plotter.errors import DeviceError, DeviceLost, DeviceTimeout, EBBError

__all__ = ["DeviceError", "DeviceLost", "DeviceTimeout", "EBBError"]
