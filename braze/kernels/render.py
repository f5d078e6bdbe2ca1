"""Render Jinja2 kernel templates from braze/templates/ (one file per kernel family)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    # StrictUndefined: a template that reads a missing variable is a bug, not an empty string.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_template(template_name: str, **context: Any) -> str:
    """Render `braze/templates/<template_name>` with `context` and return Python source."""
    return _environment().get_template(template_name).render(**context)
