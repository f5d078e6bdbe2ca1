"""fuse_moe_experts: the MoE experts' gather and activation inside the grouped matmul (kernels/grouped_matmul.py),
and the routing's sort and offsets in one launch (kernels/moe_routing.py).

HF's grouped experts compute `gate_up = grouped_mm(hidden[perm // top_k], W_gate_up, offs)`, then
`silu(gate_up[:, :H]) * gate_up[:, H:]`. Left apart that is three launches and two round trips through memory (the
gathered copy of the hidden states, and the [pairs, 2H] projection); folded, the gate/up grouped matmul reads each
pair's hidden row in place (`rows`, `row_div`) and stores silu(gate) * up from its fp32 accumulators (`glu`).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.graph_utils import _erase_dead_from, aten, is_op, new_node, val
from braze.passes.normalize import floor_div_by_int, index_bound

GROUPED_MM = torch.ops.braze.grouped_mm.default


def _row_source(index: fx.Node) -> tuple[fx.Node, int] | None:
    """(rows, row_div) when `index` is rows // row_div of provably non-negative rows (the floor division the
    kernel does as an integer division), or the non-negative rows themselves."""
    rows, row_div = floor_div_by_int(index) or (index, 1)
    return (rows, row_div) if index_bound(rows) is not None else None


def _fold_gather(node: fx.Node, ctx: PassContext) -> fx.Node | None:
    """grouped_mm(embedding(table, idx), W, offs) -> grouped_mm(table, W, offs, rows, row_div)."""
    a = op_args(node)
    gather = a["x"]
    if a["rows"] is not None or not is_op(gather, aten.embedding.default) or len(gather.users) != 1:
        return None
    table, index = gather.args[0], gather.args[1]
    tv, iv = val(table), val(index)
    if not (isinstance(tv, torch.Tensor) and tv.dim() == 2 and isinstance(iv, torch.Tensor) and iv.dim() == 1):
        return None
    source = _row_source(index)
    if source is None:
        return None
    rows, row_div = source
    fused = new_node(node.graph.owning_module, GROUPED_MM, (table, a["weight"], a["offs"], rows, row_div, a["glu"]),
                     {}, ctx, node)
    node.replace_all_uses_with(fused)
    _erase_dead_from(node)
    return fused


def _swiglu_user(node: fx.Node) -> fx.Node | None:
    """The `silu(y[:, :H]) * y[:, H:]` node reading grouped_mm output y [T, 2H], when the two halves are all that
    reads y and each half has no other reader."""
    width = val(node).shape[-1]
    if not isinstance(width, int) or width % 2 or len(node.users) != 2:
        return None
    halves = {}
    for s in node.users:
        if not is_op(s, aten.slice.Tensor) or len(s.users) != 1:
            return None
        args = op_args(s)
        if args["dim"] not in (1, -1) or args["step"] != 1:
            return None
        end = width if args["end"] is None else min(args["end"], width)  # an open end slices to the last column
        halves[(args["start"] or 0, end)] = s
    gate, up = halves.get((0, width // 2)), halves.get((width // 2, width))
    if gate is None or up is None:
        return None
    silu = next(iter(gate.users))
    if not is_op(silu, aten.silu.default) or len(silu.users) != 1:
        return None
    mul = next(iter(silu.users))
    if not is_op(mul, aten.mul.Tensor) or set(mul.args[:2]) != {silu, up} or next(iter(up.users)) is not mul:
        return None
    return mul


def _fold_swiglu(node: fx.Node, ctx: PassContext) -> bool:
    """silu(y[:, :H]) * y[:, H:] of y = grouped_mm(...) -> grouped_mm(..., glu="swiglu")."""
    a = op_args(node)
    mul = _swiglu_user(node) if a["glu"] == "none" else None
    if mul is None or val(mul).dtype != val(node).dtype:
        return False
    fused = new_node(node.graph.owning_module, GROUPED_MM,
                     (a["x"], a["weight"], a["offs"], a["rows"], a["row_div"], "swiglu"), {}, ctx, mul)
    mul.replace_all_uses_with(fused)
    _erase_dead_from(mul)
    return True


def _merge_routing(sort: fx.Node, ctx: PassContext) -> bool:
    """moe_sort(ids) and moe_offsets(ids, E) -> views of one moe_route(ids, E) ([offsets | permutation |
    inverse], int64): one launch. Runs after the gather fold, which reads the permutation as select(moe_sort)."""
    ids = sort.args[0]
    offsets = [u for u in ids.users if is_op(u, torch.ops.braze.moe_offsets.default)]
    if len(offsets) != 1 or any(not is_op(u, GROUPED_MM, aten._to_copy.default) for u in offsets[0].users):
        return False  # (int64 offsets: the grouped matmul takes either width)
    (offs,) = offsets
    experts = int(offs.args[1])
    gm = sort.graph.owning_module
    first = sort if next(n for n in gm.graph.nodes if n in (sort, offs)) is sort else offs
    route = new_node(gm, torch.ops.braze.moe_route.default, (ids, experts), {}, ctx, first)
    ends = new_node(gm, aten.slice.Tensor, (route, 0, 0, experts), {}, ctx, first)
    pairs = new_node(gm, aten.reshape.default, (new_node(gm, aten.slice.Tensor, (route, 0, experts, None), {}, ctx,
                                                         first), [2, -1]), {}, ctx, first)
    sort.replace_all_uses_with(pairs)
    offs.replace_all_uses_with(ends)
    gm.graph.erase_node(sort)
    gm.graph.erase_node(offs)
    return True


def fuse_moe_experts(gm: fx.GraphModule, ctx: PassContext) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False) or not is_op(node, GROUPED_MM):
            continue
        gathered = _fold_gather(node, ctx)
        if gathered is not None:
            ctx.note(f"{node.name}: the experts' row gather read in place by the grouped matmul")
            node, count = gathered, count + 1
        if _fold_swiglu(node, ctx):
            ctx.note(f"{node.name}: SwiGLU in the grouped matmul's epilogue")
            count += 1
    for node in list(gm.graph.nodes):
        if is_op(node, torch.ops.braze.moe_sort.default) and _merge_routing(node, ctx):
            ctx.note(f"{node.name}: MoE routing's sort and offsets in one launch (braze::moe_route)")
            count += 1
    return count
