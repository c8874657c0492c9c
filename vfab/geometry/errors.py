"""What can be wrong with a submitted drawing, in words the submitter can act on."""


class SVGError(ValueError):
    """The upload is not a drawing vfab can read (HTTP 400)."""


class OutOfTravel(ValueError):
    """The drawing reaches outside the plotter's travel (HTTP 422)."""
