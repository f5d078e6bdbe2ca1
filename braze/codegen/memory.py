"""Memory planning: liveness intervals over the plan's steps, buffers packed into reusable arena slots.

Buffers written by kernels are assigned to slots greedily (a slot is free once the last reader of its current
buffer, or of any view of it, has run); a slot's size is the symbolic max of its buffers' sizes. Graph outputs
get fresh memory each call. The report compares the planned peak with an eager run's peak (every op's result
freed after its last use, as PyTorch does), both evaluated at the example shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sympy
import torch
import torch.fx as fx

from braze.codegen.symbolic import FloorDiv, pexpr, product, shape_of

if TYPE_CHECKING:
    from braze.codegen.lower import LoweringRecord
    from braze.runtime.plan import Plan, SymbolSpec

ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
                "uint8": 1, "bool": 1, "float64": 8}


def _hint_values(gm: fx.GraphModule) -> dict[sympy.Symbol, int]:
    hints: dict[sympy.Symbol, int] = {}
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                    hints[s.node.expr] = int(s.node.hint) if s.node.hint is not None else 2
    return hints


def plan_memory(plan: Plan, gm: fx.GraphModule, record: LoweringRecord, symbols: list[SymbolSpec]) -> None:
    hints = _hint_values(gm)
    syms = {s.name: sym for sym in hints for s in symbols if sym.name == s.name}
    by_name = {b.name: b for b in plan.buffers}

    def nbytes(buf) -> sympy.Expr:
        return product(sympy.sympify(s, locals=syms) for s in buf.shape) * ELEMENT_SIZE[buf.dtype]

    # root buffer of every value (views alias their base)
    root: dict[str, str] = {}
    for s in plan.steps:
        for o in s.outputs:
            root[o] = root.get(s.inputs[0], s.inputs[0]) if (s.kind == "view" and s.inputs) else o
    last_use: dict[str, int] = {}
    for i, s in enumerate(plan.steps):
        for inp in s.inputs:
            last_use[root.get(inp, inp)] = i
    keep = {root.get(o, o) for o in plan.outputs if o is not None}
    end = len(plan.steps)
    for k in keep:
        last_use[k] = end
    for name in list(root):
        last_use.setdefault(root[name], plan.steps.index(next(s for s in plan.steps if name in s.outputs)))

    # frees: after its last use a value's name can be dropped from the environment
    frees: dict[int, list[str]] = {}
    for name, r in root.items():
        if r in keep or name in keep:
            continue
        frees.setdefault(last_use.get(r, 0), []).append(name)
    for i, s in enumerate(plan.steps):
        s.free_after = sorted(frees.get(i, []))

    # one arena for kernel-written buffers: greedy by size, each placed at the lowest offset that does not overlap
    # (in time and space) a buffer already placed — the offset-assignment planners of TFLite / XLA work this way
    def at_hint(e: sympy.Expr) -> int:
        return int(e.subs(hints)) if getattr(e, "free_symbols", None) else int(e)

    intervals = []  # (name, first step, last step, size expr)
    for i, s in enumerate(plan.steps):
        for o in s.outputs:
            buf = by_name.get(o)
            if buf is None or o in keep:
                continue
            size = FloorDiv(nbytes(buf) + 63, 64) * 64  # 64-byte aligned
            intervals.append((o, i, last_use.get(o, i), size))
    def pack(order):
        placed: list[tuple[int, int, sympy.Expr, sympy.Expr, int, int]] = []  # start, end, offset, size, hints
        offsets: dict[str, sympy.Expr] = {}
        arena, arena_h = sympy.Integer(0), 0
        for name, start, end, size in order:
            size_h = at_hint(size)
            conflicts = sorted((p for p in placed if not (p[1] < start or end < p[0])), key=lambda p: p[4])
            offset, off_h = sympy.Integer(0), 0
            for p in conflicts:  # first gap (at the example shape) that fits
                if off_h + size_h <= p[4]:
                    break
                if p[4] + p[5] > off_h:
                    offset, off_h = p[2] + p[3], p[4] + p[5]
            placed.append((start, end, offset, size, off_h, size_h))
            offsets[name] = offset
            if off_h + size_h > arena_h:
                arena, arena_h = offset + size, off_h + size_h
        # the arena must hold every buffer at every shape in range, not just at the example shape
        arena = sympy.Max(*[offsets[n] + sz for n, _, _, sz in order]) if order else arena
        return arena_h, arena, offsets

    # two classic orders (largest first, and first-come); keep the smaller arena at the example shape
    candidates = [pack(sorted(intervals, key=lambda t: -at_hint(t[3]))), pack(intervals)]
    _, arena_size, offsets = min(candidates, key=lambda c: c[0])
    for name, off in offsets.items():
        by_name[name].slot = 0
        by_name[name].offset = pexpr(off)
    plan.slots = [pexpr(arena_size)] if intervals else []
    slot_sizes = [arena_size] if intervals else []

    record.planned_peak_bytes = sum(at_hint(s) for s in slot_sizes) + sum(
        at_hint(nbytes(by_name[k])) for k in keep if k in by_name)
    record.no_reuse_bytes = sum(at_hint(nbytes(b)) for b in plan.buffers)
    record.eager_peak_bytes = eager_peak(gm, hints)


def eager_peak(gm: fx.GraphModule, hints: dict[sympy.Symbol, int]) -> int:
    """Peak bytes of intermediates when each op's result is freed after its last use (views share storage)."""
    nodes = list(gm.graph.nodes)
    last: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[a] = i
    base: dict[fx.Node, fx.Node] = {}
    live = 0
    peak = 0
    sizes: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        val = n.meta.get("val")
        if n.op == "call_function" and isinstance(val, torch.Tensor):
            aliases = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
                       and val.untyped_storage is not None and _is_view(n)]
            if aliases:
                base[n] = base.get(aliases[0], aliases[0])
                last[base[n]] = max(last.get(base[n], i), last.get(n, i))
            else:
                size = product(shape_of(val)) * val.element_size()
                sizes[n] = int(size.subs(hints)) if getattr(size, "free_symbols", None) else int(size)
                live += sizes[n]
        peak = max(peak, live)
        for a in list(sizes):
            if last.get(a, -1) <= i and a is not n:
                live -= sizes.pop(a)
    return peak


def _is_view(n: fx.Node) -> bool:
    from braze.codegen.pointwise_ops import VIEW_OPS

    return n.target in VIEW_OPS
