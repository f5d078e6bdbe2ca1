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

from braze.codegen.symbolic import pexpr, product, shape_of

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

    # arena slots for kernel-written buffers
    slot_sizes: list[sympy.Expr] = []
    slot_free_at: list[int] = []
    for i, s in enumerate(plan.steps):
        for o in s.outputs:
            buf = by_name.get(o)
            if buf is None or o in keep:
                continue
            size = nbytes(buf)
            hint = int(size.subs(hints)) if size.free_symbols else int(size)
            best = None
            for k, free_at in enumerate(slot_free_at):
                if free_at < i:
                    cur = slot_sizes[k]
                    cur_hint = int(cur.subs(hints)) if cur.free_symbols else int(cur)
                    score = abs(cur_hint - hint)
                    if best is None or score < best[0]:
                        best = (score, k)
            if best is None:
                slot_sizes.append(size)
                slot_free_at.append(last_use.get(o, i))
                buf.slot = len(slot_sizes) - 1
            else:
                k = best[1]
                slot_sizes[k] = sympy.Max(slot_sizes[k], size)
                slot_free_at[k] = last_use.get(o, i)
                buf.slot = k
    plan.slots = [pexpr(s) for s in slot_sizes]

    def at_hint(e: sympy.Expr) -> int:
        return int(e.subs(hints)) if e.free_symbols else int(e)

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
