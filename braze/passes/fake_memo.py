"""Fake values memoized by what they depend on: an op and the metadata of its inputs.

Why: a decoder of L layers repeats one layer's ops L times on tensors of identical shapes, and under a symbolic batch
each fake-tensor op costs milliseconds (sympy arithmetic on every size and stride). Computing an op once per distinct
(op, input metadata) and sharing the output's fake value with every node that repeats it cuts the fake propagation
of a 30-layer model ~15x. Fake values are metadata only (shape, stride, dtype, device), so sharing one object between
nodes is safe; ops that return an alias of an input, or whose output has data-dependent (unbacked) sizes, are never
memoized.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

_SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


class Unmemoizable(Exception):
    """An argument whose metadata cannot key the memo (a missing fake value, an unhashable constant)."""


def _dim(d: Any) -> Hashable:
    return d.node.expr if isinstance(d, _SYM_TYPES) else d


def value_signature(v: Any) -> Hashable:
    """What an op's output can depend on in `v`: tensor metadata, symbolic expressions, or the constant itself."""
    if isinstance(v, torch.Tensor):
        return ("T", tuple(_dim(d) for d in v.shape), tuple(_dim(d) for d in v.stride()), _dim(v.storage_offset()),
                v.dtype, v.device, v.requires_grad)
    if isinstance(v, _SYM_TYPES):
        return ("S", type(v).__name__, v.node.expr)
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(value_signature(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, value_signature(x)) for k, x in sorted(v.items())))
    if isinstance(v, fx.Node):
        raise Unmemoizable(v.name)
    try:
        hash(v)
    except TypeError as e:
        raise Unmemoizable(type(v).__name__) from e
    return (type(v).__name__, v)  # the type keeps 1, 1.0 and True apart (they promote differently)


def memoizable(target: Any) -> bool:
    """ATen/braze ops whose outputs are new tensors. An op that writes into an input (a KV-cache update) still
    qualifies when nothing it returns aliases an input: its output metadata is a function of the inputs'."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    return not schema.is_mutable or all(r.alias_info is None for r in schema.returns)


def has_unbacked(v: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    try:
        return bool(free_unbacked_symbols(v))
    except Exception:  # noqa: BLE001  (not a symbolic value at all)
        return False


def memo_key(target: Any, fargs: tuple, fkwargs: dict) -> Hashable | None:
    """The memo key of one call: (target, metadata of its arguments); None when the call cannot be memoized."""
    if not memoizable(target):
        return None
    try:
        return (target, value_signature(fargs), value_signature(fkwargs))
    except Unmemoizable:
        return None


def memo_call(memo: dict, target: Any, fargs: tuple, fkwargs: dict, compute: Callable[[], Any]) -> Any:
    """compute() once per (target, metadata of fargs/fkwargs); later calls with equal metadata share its result."""
    key = memo_key(target, fargs, fkwargs)
    if key is None:
        return compute()
    if key in memo:
        return memo[key]
    out = compute()
    if not has_unbacked(out):
        memo[key] = out
    return out


class MemoFakeTensorProp(FakeTensorProp):
    """FakeTensorProp that runs each distinct (op, input metadata) once and shares the result."""

    def __init__(self, module: fx.GraphModule, mode: Any) -> None:
        super().__init__(module, mode)
        self._memo: dict = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function" or not memoizable(n.target):
            return self._propagate(n)
        key = memo_key(n.target, *self.fetch_args_kwargs_from_env(n))
        if key is None:
            return self._propagate(n)
        hit = self._memo.get(key)
        if hit is not None:
            result, meta = hit
            n.meta["val"] = meta
            return result
        result = self._propagate(n)
        if "unbacked_bindings" not in n.meta and not has_unbacked(result) and "val" in n.meta:
            self._memo[key] = (result, n.meta["val"])
        return result

    def _propagate(self, n: fx.Node) -> Any:
        """FakeTensorProp.run_node, also recording a plain-number result: torch 2.11's FakeTensorProp keeps the old
        value when a size becomes a constant (sym_size of the decode graph's S = 1 dim), which left the captured
        seq symbol in the decode plan's reshape arguments."""
        result = super().run_node(n)
        if isinstance(result, (bool, int, float)):
            n.meta["val"] = result
        return result
