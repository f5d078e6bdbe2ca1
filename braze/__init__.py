"""braze: an LLM-inference compiler. The public face: compile(), load(), CompileConfig."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # kernels run under the Triton interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

from braze.api import compile, load  # noqa: E402
from braze.runtime.errors import (  # noqa: E402
    BrazeError,
    CaptureError,
    ConfigError,
    InputMismatchError,
    PackageError,
    ShapeOutOfRangeError,
)

__all__ = [
    "compile", "load", "CompileConfig", "BrazeError", "CaptureError", "ConfigError", "InputMismatchError",
    "PackageError", "ShapeOutOfRangeError",
]
__version__ = "0.1.0"


def __getattr__(name: str):  # CompileConfig is imported lazily: loading a package must not import the compiler
    if name == "CompileConfig":
        from braze.compiler.config import CompileConfig

        return CompileConfig
    raise AttributeError(f"module 'braze' has no attribute {name!r}")
