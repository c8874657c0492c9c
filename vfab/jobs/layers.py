"""Settings carried in layer names, in the AxiDraw software's convention.

A layer named "2 fine liner +S30 +H25" plots with the pen-down speed at 30 %
and the pen-down height at 25 %; a layer whose name begins with "%" is a
documentation layer and is not plotted. Other "+" codes of the vendor's
software (+D delay and the like) are not honoured and are left alone.
"""

from __future__ import annotations

import re

import attr

from vfab.config import DeviceConfig
from vfab.geometry import Drawing

#: The pen-down speed that "+S100" means: the AxiDraw's top speed at 16x
#: microstepping (8.6979 in/s), as the vendor's software defines it.
TOP_SPEED_MM_S = 8.6979 * 25.4

_CODE = re.compile(r"\+([SH])(\d{1,3})(?!\d)", re.IGNORECASE)


def is_documentation(name: str) -> bool:
    return name.lstrip().startswith("%")


def plotted_layers(drawing: Drawing) -> Drawing:
    """The drawing without its documentation layers."""
    layers = tuple(layer for layer in drawing.layers if not is_documentation(layer.name))
    if len(layers) == len(drawing.layers):
        return drawing
    return attr.evolve(drawing, layers=layers)


def layer_settings(name: str, device: DeviceConfig) -> DeviceConfig:
    """The device settings for a layer, with its name's +S and +H codes applied."""
    changes: dict[str, float] = {}
    for code, value in _CODE.findall(name):
        percent = min(100, max(1 if code.upper() == "S" else 0, int(value)))
        if code.upper() == "S":
            changes["speed_pen_down"] = TOP_SPEED_MM_S * percent / 100.0
        else:
            changes["pen_pos_down"] = float(percent)
    return attr.evolve(device, **changes) if changes else device
