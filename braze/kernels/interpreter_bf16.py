"""bf16 arithmetic under the Triton interpreter, as a GPU computes it.

The interpreter keeps bf16 tensors as their uint16 bit patterns and hands them to numpy as they are: an add, a
compare or a tl.dot of two bf16 tensors is integer arithmetic on the bits, and its fp32 -> bf16 cast truncates
where a GPU rounds to nearest even. A bf16 model (the default dtype on a GPU, and what a CUDA-compiled package
carries) would run to silent garbage on CPU. `install` wraps the interpreter's builder so every floating-point
operation on bf16 operands decodes them to fp32, computes there and rounds the result back to bf16 (RNE), which
is what the hardware's bf16 units and Triton's fp32-upcast lowering produce; tl.dot of bf16 accumulates exact
products in fp32, like the tensor cores. Bit moves (loads, stores, selects, reshapes, bitcasts) are untouched.
It only changes the interpreter's Python builder: compiled GPU kernels never see it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

_installed = False


def bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    """Exact: a bf16 value is the top half of an fp32."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even (torch's and the GPU's conversion); NaN stays a quiet NaN."""
    values = np.asarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def install() -> None:
    """Patch triton.runtime.interpreter once per process (a no-op when the interpreter's layout is not the one
    this was written against, pinned in constraints.txt)."""
    global _installed
    if _installed:
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:  # pragma: no cover - triton is a dependency
        return
    builder_cls = getattr(interp, "InterpreterBuilder", None)
    handle_cls = getattr(interp, "TensorHandle", None)
    reduce_cls = getattr(interp, "ReduceOps", None)
    needed = ("binary_op", "unary_op", "ternary_op", "cast_impl", "create_fma", "create_dot", "create_rsqrt",
              "create_erf")
    if builder_cls is None or handle_cls is None or reduce_cls is None or not all(
            hasattr(builder_cls, n) for n in needed) or not all(hasattr(reduce_cls, n) for n in ("sum", "min_max")):
        return
    _installed = True
    bf16, fp32 = tl.bfloat16, tl.float32

    def is_bf16(h: Any) -> bool:
        return getattr(h, "dtype", None) == bf16

    def widen(h: Any) -> Any:
        return handle_cls(bf16_to_fp32(h.data), fp32) if is_bf16(h) else h

    def narrow(h: Any) -> Any:
        """An fp32 result back to bf16; a comparison's booleans keep their data, typed as the interpreter does."""
        if h.data.dtype == np.float32:
            return handle_cls(fp32_to_bf16(h.data), bf16)
        return handle_cls(h.data, bf16)

    def in_fp32(method: Any) -> Any:
        @functools.wraps(method)
        def wrapped(self: Any, *args: Any) -> Any:
            handles = [a for a in args if isinstance(a, handle_cls)]
            if not any(is_bf16(h) for h in handles):
                return method(self, *args)
            return narrow(method(self, *[widen(a) if isinstance(a, handle_cls) else a for a in args]))
        return wrapped

    for name in ("binary_op", "unary_op", "create_fma", "create_rsqrt", "create_erf"):
        setattr(builder_cls, name, in_fp32(getattr(builder_cls, name)))

    ternary = builder_cls.ternary_op

    @functools.wraps(ternary)
    def ternary_op(self: Any, lhs: Any, rhs: Any, other: Any, op: Any) -> Any:
        if op is np.where or not any(is_bf16(h) for h in (lhs, rhs, other)):
            return ternary(self, lhs, rhs, other, op)  # a select moves bits
        return narrow(ternary(self, widen(lhs), widen(rhs), widen(other), op))

    builder_cls.ternary_op = ternary_op

    cast = builder_cls.cast_impl

    @functools.wraps(cast)
    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        dst = dst_type.scalar
        if is_bf16(src) and dst != bf16:
            return cast(self, widen(src), dst_type)
        if dst == bf16 and not is_bf16(src):
            values = src.data.astype(np.float32) if src.data.dtype != np.float32 else src.data
            return handle_cls(fp32_to_bf16(values), bf16)
        return cast(self, src, dst_type)

    builder_cls.cast_impl = cast_impl

    dot = builder_cls.create_dot

    @functools.wraps(dot)
    def create_dot(self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any) -> Any:
        if not (is_bf16(a) or is_bf16(b) or is_bf16(d)):
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = dot(self, widen(a), widen(b), widen(d), input_precision, max_num_imprecise_acc)
        return narrow(out) if is_bf16(d) else out

    builder_cls.create_dot = create_dot

    def reduce_in_fp32(method: Any) -> Any:
        @functools.wraps(method)
        def wrapped(self: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
            tensor = input[0] if isinstance(input, tuple) else input
            if tensor.dtype.scalar != bf16:
                return method(self, input, *args, **kwargs)
            wide = tl.core.tensor(handle_cls(bf16_to_fp32(tensor.handle.data), fp32),
                                  tensor.type.with_element_ty(fp32) if tensor.type.is_block() else fp32)
            result = method(self, wide, *args, **kwargs)
            results = result if isinstance(result, tuple) else (result,)
            back = tuple(tl.core.tensor(narrow(r.handle), r.type.with_element_ty(bf16) if r.type.is_block() else bf16)
                         if r.dtype.scalar == fp32 else r for r in results)
            return back if isinstance(result, tuple) else back[0]
        return wrapped

    reduce_cls.sum = reduce_in_fp32(reduce_cls.sum)
    reduce_cls.min_max = reduce_in_fp32(reduce_cls.min_max)
