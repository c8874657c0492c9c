"""vfab: a Twisted job server for AxiDraw pen plotters."""

__version__ = "0.1.0"
