"""Errors a user sees: each names the problem (input, dim, value, valid range or options)."""


class BrazeError(Exception):
    """Base class of every error braze raises on purpose."""


class ShapeOutOfRangeError(BrazeError, ValueError):
    """A call's dynamic dim is outside the range the model was compiled for."""


class InputMismatchError(BrazeError, ValueError):
    """Wrong number of inputs, a wrong dtype, device or static dim."""


class ConfigError(BrazeError, ValueError):
    """A compile option with a bad value."""


class PackageError(BrazeError):
    """A kernel package that is missing, corrupted or from an incompatible version."""


class CaptureError(BrazeError):
    """The model could not be captured as a graph."""
