"""braze.testing: golden-output checks for compiled models (the pytest plugin's `golden` fixture and helpers).

Usable without pytest too: `assert_matches(compiled_out, eager_out, exact=False)`.
"""

from braze.testing.golden import (
    Golden,
    GoldenWarning,
    assert_matches,
    compare,
    default_tolerances,
    flatten_output,
    load_snapshot,
    save_snapshot,
    tolerance_for,
)

__all__ = [
    "Golden", "GoldenWarning", "assert_matches", "compare", "default_tolerances", "flatten_output",
    "load_snapshot", "save_snapshot", "tolerance_for",
]
