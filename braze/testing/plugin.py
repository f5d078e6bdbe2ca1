"""pytest plugin entry point (the golden fixture lives in braze.testing.golden)."""
