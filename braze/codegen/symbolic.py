"""Sympy for shapes and index math.

Dynamic dims are sympy Symbols (the names torch.export gave them, e.g. `s44`); every shape, stride, grid and
index in generated code is a sympy expression over them, simplified before it is printed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from functools import reduce
from typing import Any

import sympy
import torch


class FloorDiv(sympy.Function):
    """Integer floor division of non-negative index expressions."""

    is_integer = True

    @classmethod
    def eval(cls, base, divisor):
        if divisor == 1:
            return base
        if base == 0:
            return sympy.Integer(0)
        if base.is_Integer and divisor.is_Integer:
            return sympy.Integer(int(base) // int(divisor))
        if isinstance(base, FloorDiv):  # (a // b) // c == a // (b * c)
            return FloorDiv(base.args[0], base.args[1] * divisor)
        return None


class ModularIndexing(sympy.Function):
    """(base // divisor) % modulus: one coordinate of an unravelled flat index."""

    is_integer = True

    @classmethod
    def eval(cls, base, divisor, modulus):
        if modulus == 1 or base == 0:
            return sympy.Integer(0)
        if base.is_Integer and divisor.is_Integer and modulus.is_Integer:
            return sympy.Integer((int(base) // int(divisor)) % int(modulus))
        return None


def to_sympy(value: Any) -> sympy.Expr:
    """int / SymInt / sympy -> sympy expression."""
    if isinstance(value, sympy.Basic):
        return value
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    if isinstance(value, (int, bool)):
        return sympy.Integer(int(value))
    raise TypeError(f"not a size: {value!r}")


def shape_of(t: Any) -> tuple[sympy.Expr, ...]:
    return tuple(to_sympy(s) for s in t.shape)


def strides_of(t: Any) -> tuple[sympy.Expr, ...]:
    return tuple(to_sympy(s) for s in t.stride())


def product(values: Iterable[sympy.Expr]) -> sympy.Expr:
    return reduce(lambda a, b: a * b, values, sympy.Integer(1))


def contiguous_strides(shape: tuple[sympy.Expr, ...]) -> tuple[sympy.Expr, ...]:
    strides = []
    acc = sympy.Integer(1)
    for size in reversed(shape):
        strides.append(acc)
        acc = acc * size
    return tuple(reversed(strides))


def same_shape(a: tuple[sympy.Expr, ...], b: tuple[sympy.Expr, ...]) -> bool:
    return len(a) == len(b) and all(sympy.simplify(x - y) == 0 for x, y in zip(a, b))


class CodePrinter(sympy.printing.str.StrPrinter):
    """Prints index expressions as Python/Triton integer arithmetic."""

    def _print_FloorDiv(self, expr):
        return f"(({self._print(expr.args[0])}) // ({self._print(expr.args[1])}))"

    def _print_ModularIndexing(self, expr):
        base, div, mod = expr.args
        inner = self._print(base) if div == 1 else f"(({self._print(base)}) // ({self._print(div)}))"
        return f"(({inner}) % ({self._print(mod)}))"

    def _print_Pow(self, expr):
        base, exp = expr.args
        if exp.is_Integer and int(exp) > 0:
            return "(" + "*".join([f"({self._print(base)})"] * int(exp)) + ")"
        return super()._print_Pow(expr)

    def _print_Max(self, expr):
        return "max(" + ", ".join(self._print(a) for a in expr.args) + ")"

    def _print_Min(self, expr):
        return "min(" + ", ".join(self._print(a) for a in expr.args) + ")"


_PRINTER = CodePrinter()


def pexpr(expr: Any) -> str:
    """Print a (simplified) sympy expression as code."""
    return _print_code(sympy.Integer(expr) if isinstance(expr, int) else to_sympy(expr), not isinstance(expr, int))


# Index expressions repeat across a model's layers (same shapes, same strides), and expanding and printing them is
# most of a fused kernel's code generation: both are pure functions of the (immutable, hashable) sympy expression.
@functools.lru_cache(maxsize=1 << 16)
def _print_code(expr: sympy.Expr, expand: bool) -> str:
    return _PRINTER.doprint(sympy.expand(expr) if expand else expr)


def free_symbol_names(exprs: Iterable[Any]) -> set[str]:
    names: set[str] = set()
    for e in exprs:
        if isinstance(e, sympy.Basic):
            names |= {s.name for s in e.free_symbols}
    return names


def simplify_index(expr: sympy.Expr) -> sympy.Expr:
    """Fold unravel/ravel pairs: c*m*MI(x, d*m, M) + c*MI(x, d, m) -> c*MI(x, d, m*M) (FloorDiv is M = inf).

    This is what turns `16*(x // 16) + x % 16` back into `x` when a contiguous tensor is read in order.
    """
    return _simplify_index(to_sympy(expr))


@functools.lru_cache(maxsize=1 << 16)  # a pure function of an immutable expression (see _print_code)
def _simplify_index(expr: sympy.Expr) -> sympy.Expr:
    expr = sympy.expand(expr)
    terms: list[list] = []  # [coeff, base, div, mod (None = inf)]
    rest = sympy.Integer(0)
    for term in sympy.Add.make_args(expr):
        coeff, factors = sympy.Integer(1), []
        for f in sympy.Mul.make_args(term):
            (factors if isinstance(f, (FloorDiv, ModularIndexing)) else [coeff]).append(f)
            if not isinstance(f, (FloorDiv, ModularIndexing)):
                coeff = coeff * f
        if len(factors) == 1:
            f = factors[0]
            if isinstance(f, FloorDiv):
                terms.append([coeff, f.args[0], f.args[1], None])
            else:
                terms.append([coeff, f.args[0], f.args[1], f.args[2]])
        else:
            rest = rest + term
    changed = True
    while changed:
        changed = False
        for i in range(len(terms)):
            for j in range(len(terms)):
                if i == j or terms[i] is None or terms[j] is None:
                    continue
                c1, b1, d1, m1 = terms[i]  # the higher digit
                c2, b2, d2, m2 = terms[j]  # the lower digit
                if m2 is None or sympy.simplify(b1 - b2) != 0:
                    continue
                if sympy.simplify(d1 - d2 * m2) == 0 and sympy.simplify(c1 - c2 * m2) == 0:
                    terms[j] = [c2, b2, d2, None if m1 is None else m1 * m2]
                    terms[i] = None
                    changed = True
        terms = [t for t in terms if t is not None]
    out = rest
    for c, b, d, m in terms:
        if m is None:
            out = out + c * (b if d == 1 else FloorDiv(b, d))
        else:
            out = out + c * ModularIndexing(b, d, m)
    return out
