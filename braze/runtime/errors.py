"""Errors a user sees: each names the problem (input, dim, value, valid range or options) in one line."""


class BrazeError(Exception):
    """Base class of every error braze raises on purpose."""


class ShapeOutOfRangeError(BrazeError, ValueError):
    """A call's dynamic dim is outside the range the model was compiled for."""


class InputMismatchError(BrazeError, ValueError):
    """Wrong number of inputs, a wrong dtype, device or static dim."""


class ConfigError(BrazeError, ValueError):
    """An option with a bad value: a compile option, a generate / sampling option or a load option."""


class PackageError(BrazeError):
    """A kernel package that is missing, corrupted or from an incompatible version."""


class DigestMismatchError(PackageError):
    """A package whose manifest digest is not the sha256 it was pinned to (braze.load(path, sha256=...))."""


class CaptureError(BrazeError):
    """The model could not be captured as a graph."""


class KVCacheUnsupportedError(CaptureError):
    """The graph captured, but its attention cannot be put over a KV cache: the forward plan still runs."""


class SamplingError(BrazeError, RuntimeError):
    """The logits to sample from are not a distribution (NaN, +inf, or every token masked out)."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name if it has no message): for one-line reports of errors
    whose full text runs long (export, transformers, I/O)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
