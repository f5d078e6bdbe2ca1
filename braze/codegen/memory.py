"""Memory planning: liveness intervals over the plan's steps, buffers packed into one reusable arena.

`plan_memory` is a pure function of the plan and the graph: it returns a `MemoryLayout` (offsets, arena size,
frees, and the report's byte counts) that the caller applies to the plan.

Buffers written by kernels are grouped by *size class*: a buffer's byte size is an integer coefficient times a
symbolic factor (`B*S`, `B`, `1`, ...), and buffers of one class scale together at every shape. Each class is
packed on its own with integers (first fit by liveness interval, the offset-assignment planners of TFLite / XLA
work this way), so its layout is valid at every shape in range, not just at the example shape; the classes are
stacked, and the arena size is the sum of `height * factor` over the classes, one symbolic term per class (no
`Max` over buffers). Offsets are 64-byte aligned at every shape. Graph outputs get fresh memory each call. The
report compares the planned peak with an eager run's peak (every op's result freed after its last use, as PyTorch
does), both evaluated at the example shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from braze.codegen.symbolic import pexpr
from braze.runtime.plan import Plan, SymbolSpec

ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
                "uint8": 1, "bool": 1, "float64": 8}
ALIGN = 64
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class MemoryLayout:
    """Where every kernel-written buffer lives (all in arena slot 0), and what the report says about it."""

    offsets: dict[str, str] = field(default_factory=dict)  # buffer -> byte offset in the arena (expression)
    slots: list[str] = field(default_factory=list)  # arena sizes in bytes (expressions); [] when nothing packs
    free_after: dict[int, list[str]] = field(default_factory=dict)  # step index -> names dropped after it
    planned_peak_bytes: int = 0  # arena + outputs, at the example shape
    no_reuse_bytes: int = 0  # every buffer in its own allocation, at the example shape
    eager_peak_bytes: int = 0  # eager PyTorch's live-tensor peak, at the example shape

    def apply(self, plan: Plan) -> None:
        """Write the layout into `plan` (buffer slots and offsets, arena sizes, per-step frees)."""
        for buf in plan.buffers:
            if buf.name in self.offsets:
                buf.slot, buf.offset = 0, self.offsets[buf.name]
        plan.slots = list(self.slots)
        for i, step in enumerate(plan.steps):
            step.free_after = list(self.free_after.get(i, []))


class _Sizes:
    """Byte sizes as (integer coefficient, symbolic factor); each distinct shape is parsed once."""

    def __init__(self, symbols: dict[str, sympy.Symbol], hints: dict[str, int]):
        self.symbols = symbols
        self.hints = hints
        self.cache: dict[tuple[tuple[str, ...], str], tuple[int, str]] = {}
        self.factors: dict[str, sympy.Expr] = {"1": sympy.Integer(1)}
        self.factor_hints: dict[str, int] = {"1": 1}

    def of(self, shape: list[str], dtype: str) -> tuple[int, str]:
        key = (tuple(shape), dtype)
        if key not in self.cache:
            self.cache[key] = self._parse(shape, ELEMENT_SIZE[dtype])
        return self.cache[key]

    def _parse(self, shape: list[str], coef: int) -> tuple[int, str]:
        names: list[str] = []
        other: list[sympy.Expr] = []
        for dim in shape:
            dim = dim.strip()
            if dim.isdigit():
                coef *= int(dim)
            elif _NAME.fullmatch(dim) and dim in self.symbols:
                names.append(dim)
            else:
                c, rest = sympy.sympify(dim, locals=self.symbols).as_coeff_Mul()
                if c.is_Integer and c > 0:
                    coef *= int(c)
                else:
                    rest = c * rest
                other.append(rest)
        if coef == 0:
            return 0, "1"
        expr = sympy.Mul(*[self.symbols[n] for n in names], *other)
        if expr == 1:
            return coef, "1"
        key = sympy.srepr(expr) if other else "*".join(sorted(names))
        if key not in self.factors:
            self.factors[key] = expr
            self.factor_hints[key] = _at(expr, self.hints, self.symbols)
        return coef, key

    def hint(self, coef: int, factor: str) -> int:
        return coef * self.factor_hints[factor]


def _at(expr: sympy.Expr, hints: dict[str, int], symbols: dict[str, sympy.Symbol]) -> int:
    if not expr.free_symbols:
        return int(expr)
    return int(expr.xreplace({symbols[k]: sympy.Integer(v) for k, v in hints.items() if k in symbols}))


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _first_fit(items: list[tuple[str, int, int, int]]) -> tuple[int, dict[str, int]]:
    """Integer offsets for (name, first step, last step, size); buffers live at once never overlap."""
    placed: list[tuple[int, int, int, int]] = []  # start, end, offset, size
    offsets: dict[str, int] = {}
    height = 0
    for name, start, end, size in items:
        busy = sorted((p[2], p[2] + p[3]) for p in placed if not (p[1] < start or end < p[0]))
        offset = 0
        for lo, hi in busy:  # lowest gap that fits
            if offset + size <= lo:
                break
            offset = max(offset, hi)
        placed.append((start, end, offset, size))
        offsets[name] = offset
        height = max(height, offset + size)
    return height, offsets


def _pack(items: list[tuple[str, int, int, int]]) -> tuple[int, dict[str, int]]:
    """Two classic orders (largest first, and first-come); the lower arena wins."""
    by_size = sorted(items, key=lambda t: (-t[3], t[1]))
    return min(_first_fit(by_size), _first_fit(items), key=lambda c: c[0])


def _hint_values(gm: fx.GraphModule) -> dict[str, int]:
    hints: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                    hints[s.node.expr.name] = int(s.node.hint) if s.node.hint is not None else 2
    return hints


def plan_memory(plan: Plan, gm: fx.GraphModule, symbols: list[SymbolSpec]) -> MemoryLayout:
    """The arena layout and frees for `plan` (lowered from `gm`); the plan itself is not modified."""
    hints = _hint_values(gm)
    syms = {s.name: sympy.Symbol(s.name, integer=True, positive=True) for s in symbols}
    syms.update({name: sympy.Symbol(name, integer=True, positive=True) for name in hints if name not in syms})
    sizes = _Sizes(syms, hints)
    by_name = {b.name: b for b in plan.buffers}
    layout = MemoryLayout()

    # root buffer of every value (views alias their base); the step that produces each value
    root: dict[str, str] = {}
    produced: dict[str, int] = {}
    for i, s in enumerate(plan.steps):
        for o in s.outputs:
            aliases = (s.kind == "view" or s.params.get("in_place")) and s.inputs  # in place: the input's buffer
            root[o] = root.get(s.inputs[0], s.inputs[0]) if aliases else o
            produced.setdefault(o, i)
    last_use: dict[str, int] = {}
    for i, s in enumerate(plan.steps):
        for inp in s.inputs:
            last_use[root.get(inp, inp)] = i
    keep = {root.get(o, o) for o in plan.outputs if o is not None}
    for k in keep:
        last_use[k] = len(plan.steps)
    for name in root:
        last_use.setdefault(root[name], produced[name])

    # frees: after its last use a value's name can be dropped from the environment
    for name, r in root.items():
        if r in keep or name in keep:
            continue
        layout.free_after.setdefault(last_use.get(r, 0), []).append(name)
    for names in layout.free_after.values():
        names.sort()

    # kernel-written buffers, grouped by size class, each class packed with integers
    classes: dict[str, list[tuple[str, int, int, int]]] = {}
    for i, s in enumerate(plan.steps):
        for o in s.outputs:
            buf = by_name.get(o)
            if buf is None or o in keep:
                continue
            coef, factor = sizes.of(buf.shape, buf.dtype)
            classes.setdefault(factor, []).append((o, i, last_use.get(o, i), _align(coef)))
    base: sympy.Expr = sympy.Integer(0)
    arena_hint = 0
    order = sorted(classes, key=lambda f: (f != "1", -sizes.factor_hints[f], f))  # constant class first
    for factor in order:
        height, offsets = _pack(classes[factor])
        unit = sizes.factors[factor]
        for name, off in offsets.items():
            layout.offsets[name] = pexpr(base + off * unit)
        base = base + height * unit
        arena_hint += sizes.hint(height, factor)
    layout.slots = [pexpr(base)] if classes else []

    layout.planned_peak_bytes = arena_hint + sum(sizes.hint(*sizes.of(by_name[k].shape, by_name[k].dtype))
                                                 for k in keep if k in by_name)
    layout.no_reuse_bytes = sum(sizes.hint(*sizes.of(b.shape, b.dtype)) for b in plan.buffers)
    layout.eager_peak_bytes = eager_peak(gm, hints)
    return layout


def eager_peak(gm: fx.GraphModule, hints: dict[str, int]) -> int:
    """Peak bytes of intermediates when each op's result is freed after its last use (views share storage)."""
    values: dict[Any, int] = {}

    def dim(s: Any) -> int:
        if isinstance(s, int):
            return s
        expr = s.node.expr
        if expr not in values:
            try:
                values[expr] = int(expr.xreplace({f: sympy.Integer(hints[f.name]) for f in expr.free_symbols
                                                  if f.name in hints}))
            except TypeError:  # a symbol with no example value (e.g. a data-dependent size)
                values[expr] = int(s.node.hint) if s.node.hint is not None else 2
        return values[expr]

    nodes = list(gm.graph.nodes)
    last: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[a] = i
    base: dict[fx.Node, fx.Node] = {}
    live = 0
    peak = 0
    sized: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        val = n.meta.get("val")
        if n.op == "call_function" and isinstance(val, torch.Tensor):
            aliases = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
                       and _is_view(n)]
            if aliases:
                base[n] = base.get(aliases[0], aliases[0])
                last[base[n]] = max(last.get(base[n], i), last.get(n, i))
            else:
                size = val.element_size()
                for s in val.shape:
                    size *= dim(s)
                sized[n] = size
                live += size
        peak = max(peak, live)
        for a in list(sized):
            if last.get(a, -1) <= i and a is not n:
                live -= sized.pop(a)
    return peak


def _is_view(n: fx.Node) -> bool:
    from braze.codegen.pointwise_ops import VIEW_OPS

    return n.target in VIEW_OPS
