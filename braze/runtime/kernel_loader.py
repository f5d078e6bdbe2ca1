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


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def load_kernel_module(source: str) -> Any:
    """Import `source` as a module (cached by content hash and mode) and return it.

    @triton.jit decides at decoration time whether a kernel is interpreted, from a knob triton reads once; braze
    sets that knob while the module runs so the mode follows TRITON_INTERPRET even when triton was imported first.
    """
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    key = f"{digest}-{int(_interpret())}"
    if key in _LOADED:
        return _LOADED[key]
    path = kernel_cache_dir() / f"k_{digest}.py"
    if not path.exists() or path.read_text() != source:  # never trust a cached file we did not just compare
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    module_name = f"braze_kernels.k_{key.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    from triton import knobs

    saved = knobs.runtime.interpret
    knobs.runtime.interpret = _interpret()
    try:
        spec.loader.exec_module(module)
    finally:
        knobs.runtime.interpret = saved
    _LOADED[key] = module
    return module


def load_kernel(source: str, name: str) -> Any:
    """Return the @triton.jit function `name` defined in `source`."""
    return getattr(load_kernel_module(source), name)


def check_interpreter_ready() -> None:
    """Triton decides at its own import whether its library functions are interpreted; fail clearly if it was
    imported (e.g. by transformers) before TRITON_INTERPRET was set, instead of deep inside a kernel."""
    if not _interpret():
        return
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(getattr(standard, "sigmoid", None), InterpretedFunction):
        from braze.runtime.errors import BrazeError

        raise BrazeError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run under "
                         "the CPU interpreter: import braze before transformers/triton, or export TRITON_INTERPRET=1")
