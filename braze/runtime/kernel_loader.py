"""Turn generated Triton source into callable kernels.

Triton's @jit reads the function's source through `inspect`, so a kernel must live in a real file:
we write each source once into a content-addressed cache directory and import it from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

_LOADED: dict[str, Any] = {}


def kernel_cache_dir() -> Path:
    root = os.environ.get("BRAZE_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "braze_kernels")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_kernel_module(source: str) -> Any:
    """Import `source` as a module (cached by content hash) and return it."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    if digest in _LOADED:
        return _LOADED[digest]
    path = kernel_cache_dir() / f"k_{digest}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    module_name = f"braze_kernels.k_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    _LOADED[digest] = module
    return module


def load_kernel(source: str, name: str) -> Any:
    """Return the @triton.jit function `name` defined in `source`."""
    return getattr(load_kernel_module(source), name)
