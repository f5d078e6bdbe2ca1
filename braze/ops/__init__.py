"""braze::* custom ops (importing this package registers them)."""

from braze.ops.library import BRAZE_OPS

__all__ = ["BRAZE_OPS"]
