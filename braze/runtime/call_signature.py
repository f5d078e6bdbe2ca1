"""The call a plan was compiled for: the structure of (args, kwargs) and the value of every non-tensor argument.

torch.export bakes non-tensor arguments (a float scale, a flag, a mask left at None) into the graph as constants,
so a plan answers only calls that pass the same ones. braze.compile's lazy entry points compile once per signature
(as torch.compile recompiles when a guard fails); a CompiledModel refuses a call with another signature and names
the argument, rather than silently computing the answer to the call it was compiled for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

Signature = tuple[tuple[str, str], ...]
# kinds of values a signature compares by value; anything else by type only (an object's identity would make
# every call a new signature)
_VALUE_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format,
                torch.layout)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "a tensor"
    if isinstance(value, _VALUE_TYPES):
        return f"{type(value).__name__} {value!r}"
    return f"a {type(value).__name__}"


def _name(path: tuple) -> str:
    """'x' / 'scale=' style names: path[0] picks args (0) or kwargs (1), the rest is pytree's key string."""
    first = f"positional argument {path[1].idx}" if path[0].idx == 0 else f"{path[1].key}="
    return first + pytree.keystr(path[2:])


def call_signature(args: tuple, kwargs: dict[str, Any]) -> Signature:
    """Every leaf of (args, kwargs) by its path: tensors as tensors (their shapes are the plan's to check), other
    values by value. A kwarg left out and one passed at its default differ: the cost is one more compile."""
    leaves, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    return tuple((_name(path), _describe(value)) for path, value in leaves)


def signature_difference(compiled_for: Signature, called: Signature) -> str:
    """One line naming the first argument whose kind or value differs between the two signatures."""
    want, got = dict(compiled_for), dict(called)
    for name, desc in called:
        if name not in want:
            return f"{name} is {desc} here and was not passed when the model was compiled"
        if want[name] != desc:
            return f"{name} is {desc} here and was {want[name]} when the model was compiled"
    missing = next(name for name, _ in compiled_for if name not in got)
    return f"{missing} was passed when the model was compiled and is missing here"
