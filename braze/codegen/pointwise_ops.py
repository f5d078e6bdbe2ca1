"""How each fusable ATen op is written in Triton.

One table per op kind, the way Thunder registers ops once: an elementwise op maps to a function from its
operands' Triton expressions (already fp32 for floats) to the result expression. A node whose op or
arguments are not covered here is not fusable and runs eagerly (the report says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

aten = torch.ops.aten

Expr = str


def _tanh(x: Expr) -> Expr:
    return f"(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"


def _gelu(x: Expr, approximate: str = "none") -> Expr:
    if approximate == "tanh":
        inner = f"({math.sqrt(2.0 / math.pi)!r} * ({x} + 0.044715 * {x} * {x} * {x}))"
        return f"(0.5 * {x} * (1.0 + {_tanh(inner)}))"
    return f"(0.5 * {x} * (1.0 + tl.erf({x} * {1.0 / math.sqrt(2.0)!r})))"


def _div_mode(a: Expr, b: Expr, rounding_mode: str | None = None, integer: bool = False) -> Expr | None:
    """torch.div with rounding_mode (MoE routing's `perm // top_k`). Integers: Triton's // truncates toward zero
    and % takes the dividend's sign (C semantics, as the interpreter reproduces), so floor division steps the
    truncated quotient down when the remainder is nonzero and its sign differs from the divisor's."""
    if rounding_mode is None:
        return None if integer else f"({a} / {b})"
    if not integer:
        q = f"({a} / {b})"
        return f"tl.floor({q})" if rounding_mode == "floor" else f"tl.where({q} < 0, -tl.floor(-{q}), tl.floor({q}))"
    if rounding_mode == "trunc":
        return f"({a} // {b})"
    r = f"({a} % {b})"
    return f"(({a} // {b}) - ((({r}) != 0) & ((({r}) < 0) != (({b}) < 0))).to(({a} // {b}).dtype))"


def _remainder(a: Expr, b: Expr, integer: bool = False) -> Expr:
    """torch.remainder: the result takes the divisor's sign (Python's %). Floats: a - floor(a / b) * b, as torch
    computes it; integers: C's % stepped by b where the signs differ."""
    if not integer:
        return f"({a} - tl.floor({a} / {b}) * {b})"
    r = f"({a} % {b})"
    return f"tl.where(({r} != 0) & (({r} < 0) != ({b} < 0)), {r} + {b}, {r})"


def _round_half_even(a: Expr) -> Expr:
    """torch.round: to the nearest integer, ties to even (floor(a + 0.5), one down on an odd tie)."""
    r = f"tl.floor({a} + 0.5)"
    return f"tl.where(({r} - {a} == 0.5) & ({r} - 2.0 * tl.floor({r} * 0.5) != 0.0), {r} - 1.0, {r})"


def _pow(x: Expr, exponent: float) -> Expr | None:
    if float(exponent).is_integer() and 1 <= exponent <= 4:
        return "(" + " * ".join([f"({x})"] * int(exponent)) + ")"
    if exponent == 0.5:
        return f"tl.sqrt({x})"
    if exponent == -0.5:
        return f"tl.rsqrt({x})"
    if exponent == -1:
        return f"(1.0 / {x})"
    if exponent == 0:
        return f"({x} * 0 + 1)"
    return None


def _log1p(x: Expr) -> Expr:
    """log(1 + x) to full precision near 0 (Goldberg's correction: u = 1 + x rounded, log(u) * (x / (u - 1))), and
    without overflow for large x (the quotient first; u = inf: x itself)."""
    u = f"(1.0 + {x})"
    quotient = f"({x} / tl.where({u} == 1.0, 1.0, {u} - 1.0))"  # (the lanes where u == 1 take x: no 0 / 0)
    return f"tl.where(({u} == 1.0) | ({u} == float('inf')), {x}, tl.log({u}) * {quotient})"


def _expm1(x: Expr) -> Expr:
    """exp(x) - 1 to full precision near 0 (Kahan's correction: u = exp(x), (u - 1) * (x / log(u))), and without
    overflow below exp's own (the quotient first; u = inf: inf; u = 0: -1)."""
    u = f"tl.exp({x})"
    quotient = f"({x} / tl.where({u} == 1.0, 1.0, tl.log({u})))"
    return (f"tl.where({u} == 1.0, {x}, tl.where({u} == 0.0, -1.0, "
            f"tl.where({u} == float('inf'), {u}, ({u} - 1.0) * {quotient})))")


# Elementwise ops: op -> (arity of tensor-or-scalar operands, builder). Builders receive operand expressions
# and the node's remaining kwargs.
# torch's max / min / relu / clamp propagate NaN; tl.maximum / tl.minimum return the other operand unless told
NAN = "propagate_nan=tl.PropagateNan.ALL"

ELEMENTWISE: dict[object, Callable[..., Expr | None]] = {
    aten.add.Tensor: lambda a, b, alpha=1: f"({a} + {b})" if alpha == 1 else f"({a} + {alpha!r} * {b})",
    aten.add.Scalar: lambda a, b, alpha=1: f"({a} + {b})",
    aten.sub.Tensor: lambda a, b, alpha=1: f"({a} - {b})" if alpha == 1 else f"({a} - {alpha!r} * {b})",
    aten.sub.Scalar: lambda a, b, alpha=1: f"({a} - {b})",
    aten.rsub.Scalar: lambda a, b, alpha=1: f"({b} - {a})",
    aten.mul.Tensor: lambda a, b: f"({a} * {b})",
    aten.mul.Scalar: lambda a, b: f"({a} * {b})",
    aten.div.Tensor: lambda a, b: f"({a} / {b})",
    aten.div.Scalar: lambda a, b: f"({a} / {b})",
    aten.div.Tensor_mode: _div_mode,
    aten.div.Scalar_mode: _div_mode,
    aten.neg.default: lambda a: f"(-{a})",
    aten.exp.default: lambda a: f"tl.exp({a})",
    aten.exp2.default: lambda a: f"tl.exp2({a})",
    aten.log.default: lambda a: f"tl.log({a})",
    aten.log2.default: lambda a: f"tl.log2({a})",
    aten.log1p.default: _log1p,
    aten.expm1.default: _expm1,
    aten.sqrt.default: lambda a: f"tl.sqrt({a})",
    aten.rsqrt.default: lambda a: f"tl.rsqrt({a})",
    aten.reciprocal.default: lambda a: f"(1.0 / {a})",
    aten.sin.default: lambda a: f"tl.sin({a})",
    aten.cos.default: lambda a: f"tl.cos({a})",
    aten.tanh.default: _tanh,
    aten.sigmoid.default: lambda a: f"tl.sigmoid({a})",
    aten.silu.default: lambda a: f"({a} * tl.sigmoid({a}))",
    aten.gelu.default: _gelu,
    aten.relu.default: lambda a: f"tl.maximum({a}, 0.0, {NAN})",
    aten.abs.default: lambda a: f"tl.abs({a})",
    aten.erf.default: lambda a: f"tl.erf({a})",
    aten.floor.default: lambda a: f"tl.floor({a})",
    aten.trunc.default: lambda a: f"tl.where({a} < 0, tl.ceil({a}), tl.floor({a}))",
    aten.round.default: _round_half_even,
    aten.sign.default: lambda a: f"tl.where({a} > 0, 1, tl.where({a} < 0, -1, 0))",
    aten.isnan.default: lambda a: f"({a} != {a})",
    aten.remainder.Tensor: _remainder,
    aten.remainder.Scalar: _remainder,
    # torch.fmod: C's fmod, the dividend's sign; Triton's % is exactly that for floats (frem) and integers
    aten.fmod.Tensor: lambda a, b: f"({a} % {b})",
    aten.fmod.Scalar: lambda a, b: f"({a} % {b})",
    aten.ceil.default: lambda a: f"tl.ceil({a})",
    aten.pow.Tensor_Scalar: _pow,
    # base ** x for a positive finite base (codegen checks it): exp2(x * log2(base)), within fp32 rounding
    aten.pow.Scalar: lambda base, x: f"tl.exp2({x} * {math.log2(float(base))!r})",
    aten.maximum.default: lambda a, b: f"tl.maximum({a}, {b}, {NAN})",
    aten.minimum.default: lambda a, b: f"tl.minimum({a}, {b}, {NAN})",
    aten.where.self: lambda c, a, b: f"tl.where({c}, {a}, {b})",
    aten.eq.Tensor: lambda a, b: f"({a} == {b})",
    aten.eq.Scalar: lambda a, b: f"({a} == {b})",
    aten.ne.Tensor: lambda a, b: f"({a} != {b})",
    aten.ne.Scalar: lambda a, b: f"({a} != {b})",
    aten.lt.Tensor: lambda a, b: f"({a} < {b})",
    aten.lt.Scalar: lambda a, b: f"({a} < {b})",
    aten.le.Tensor: lambda a, b: f"({a} <= {b})",
    aten.le.Scalar: lambda a, b: f"({a} <= {b})",
    aten.gt.Tensor: lambda a, b: f"({a} > {b})",
    aten.gt.Scalar: lambda a, b: f"({a} > {b})",
    aten.ge.Tensor: lambda a, b: f"({a} >= {b})",
    aten.ge.Scalar: lambda a, b: f"({a} >= {b})",
    aten.logical_not.default: lambda a: f"({a} == 0)",
    aten.logical_and.default: lambda a, b: f"(({a} != 0) & ({b} != 0))",
    aten.logical_or.default: lambda a, b: f"(({a} != 0) | ({b} != 0))",
    aten.bitwise_and.Tensor: lambda a, b: f"({a} & {b})",
    aten.bitwise_or.Tensor: lambda a, b: f"({a} | {b})",
    aten.bitwise_xor.Tensor: lambda a, b: f"({a} ^ {b})",
    aten.logical_xor.default: lambda a, b: f"(({a} != 0) ^ ({b} != 0))",
    aten.__lshift__.Scalar: lambda a, b: f"({a} << {b})",
    aten.__rshift__.Scalar: lambda a, b: f"({a} >> {b})",
    aten.bitwise_not.default: lambda a: f"(~{a})",  # a bool operand: fused.py's _elementwise writes `a == 0`
    aten.clamp.default: lambda a, lo=None, hi=None: _clamp(a, lo, hi),
    aten.masked_fill.Scalar: lambda a, m, v: f"tl.where({m}, {v}, {a})",
}


def _clamp(a: Expr, lo, hi) -> Expr:
    out = a
    if lo is not None:
        out = f"tl.maximum({out}, {lo}, {NAN})"
    if hi is not None:
        out = f"tl.minimum({out}, {hi}, {NAN})"
    return out


BITWISE = {op for op in ELEMENTWISE if "bitwise" in str(op) and op is not aten.bitwise_not.default}

# Ops that only reinterpret the index (no arithmetic): handled by index remapping in the kernel builder.
VIEW_OPS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.alias.default,
}

# Copies and casts: the value is the input's value (cast); they are fusable "pointwise identity" nodes.
COPY_OPS = {
    aten.clone.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.lift_fresh_copy.default,
    aten.contiguous.default,
}

# Reductions over the last dim: op -> reduction kind.
REDUCTIONS = {
    aten.sum.dim_IntList: "sum",
    aten.mean.dim: "mean",
    aten.amax.default: "max",
    aten.amin.default: "min",
    aten.argmax.default: "argmax",  # the first index of the max (of the first NaN, as torch)
    aten.argmin.default: "argmin",
}
ARG_REDUCTIONS = {aten.argmax.default, aten.argmin.default}

# Scans over the last dim (the row is in registers, as for reductions): op -> tl combine function.
SCANS = {aten.cumsum.default: "tl.cumsum"}

# Ops that produce values from the index alone.
INDEX_OPS = {
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    aten.full.default,
    aten.scalar_tensor.default,
    aten.full_like.default,  # its input gives the shape only: not read
}

OTHER_FUSABLE = {aten.cat.default, aten.embedding.default, aten.constant_pad_nd.default}

TRITON_DTYPES = {
    torch.float32: "tl.float32",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.int64: "tl.int64",
    torch.int32: "tl.int32",
    torch.int16: "tl.int16",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}
