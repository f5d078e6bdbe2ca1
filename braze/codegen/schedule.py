"""Decide what gets a buffer and which fusable nodes share a kernel.

Realized nodes (stored to memory): reductions, fusable nodes read by a non-fusable consumer (a template kernel,
an eager fallback, the graph output), and values read by several consumers that would each reload two or more
full-size inputs to recompute them (Inductor's reuse rule: a residual stream between quantized linears, which have
no residual epilogue, would otherwise be recomputed from every earlier layer's output by every later norm).
Everything else fusable is recomputed inline where it is read. Kernels
start one per realized node and are merged greedily along data edges when their iteration spaces agree and the
merge creates no cycle in the region graph (networkx) — the same rule Inductor's scheduler applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from braze.codegen.fused import (
    POOLS,
    IllegalFusion,
    Index,
    Unsupported,
    _same,
    is_fusable,
    is_reduction,
    meta,
    same_up_to_unit_dims,
)
from braze.codegen.pointwise_ops import VIEW_OPS
from braze.codegen.symbolic import shape_of

aten = torch.ops.aten
# ops that read a tensor's metadata, never its elements: the plan evaluates them from the dims (lower.encode_arg),
# so they neither realize their input nor order kernels (reduce_over_last_dim's sym_size of a view kept an MoE
# layer's weighted unsort apart from its sum over the top-k)
SHAPE_ONLY = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default}


def reads_elements(node: fx.Node) -> bool:
    """False for a shape query the plan evaluates from the dims (one of an unbacked size runs eagerly, on the
    tensor itself)."""
    if node.op != "call_function":
        return False
    return node.target not in SHAPE_ONLY or bool(free_unbacked_symbols(node.meta.get("val")))


@dataclass
class Group:
    gid: int
    members: list[fx.Node]
    space: Index
    reduction: bool
    deps: set[int] = field(default_factory=set)  # ids of groups whose realized nodes it reads


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def classify(gm: fx.GraphModule, family_for_op: Callable[[Any], Any]
             ) -> tuple[set[fx.Node], set[fx.Node], set[fx.Node]]:
    """Split call_function nodes into fusable, template (a kernel family lowers the op) and eager sets."""
    fusable, template, eager = set(), set(), set()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.SymInt) and free_unbacked_symbols(val):
            eager.add(n)  # a value read from a tensor (.tolist() of MoE expert counts): run, and bound from then on
            continue
        if not isinstance(val, torch.Tensor) and not isinstance(val, (tuple, list)):
            continue  # symbolic ints (sym_size) are evaluated from the dims
        if free_unbacked_symbols(val):  # a data-dependent size (MoE token routing): no plan can size it ahead
            eager.add(n)
        elif family_for_op(n.target) is not None:
            template.add(n)
        elif is_fusable(n):
            fusable.add(n)
        else:
            eager.add(n)
    return fusable, template, eager


def realize(gm: fx.GraphModule, fusable: set[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """Return (realized fusable nodes, runtime view nodes)."""
    realized: set[fx.Node] = {n for n in fusable if is_reduction(n)}
    runtime_views: set[fx.Node] = set()

    def need(a: fx.Node) -> None:
        if a not in fusable:
            return
        if a.target in VIEW_OPS:
            if a not in runtime_views:
                runtime_views.add(a)
                need(a.args[0])
        else:
            realized.add(a)

    for n in gm.graph.nodes:
        if n.op == "output":
            for a in n.all_input_nodes:
                need(a)
        elif reads_elements(n) and n not in fusable:
            for a in n.all_input_nodes:
                need(a)
        elif n in fusable and n.target in (aten.convolution.default, *POOLS):
            need(n.args[0])  # read at every tap of every output: recomputed inline, a conv stack grows as a product
    for n in gm.graph.nodes:  # graph order: a value realized here is one read for everything after it
        if n in fusable and n not in realized and n.target not in VIEW_OPS and _worth_reusing(n, realized, fusable):
            realized.add(n)
    return realized, runtime_views


def _readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read `node`'s elements, looking through views."""
    out: list[fx.Node] = []
    for u in node.users:
        if u.target in VIEW_OPS:
            out.extend(_readers(u))
        elif u.op != "call_function" or reads_elements(u):
            out.append(u)
    return out


def _worth_reusing(node: fx.Node, realized: set[fx.Node], fusable: set[fx.Node]) -> bool:
    """Several readers, each of which would reload >= 2 full-size tensors to recompute `node` inline: one store and
    one load per reader is cheaper. Broadcast operands (a norm weight, a scalar) cost nothing and do not count."""
    if len(_readers(node)) < 2:
        return False
    row = shape_of(meta(node))[-1:] or (sympy.Integer(1),)
    full = 0
    for a in realized_reads(node, realized, fusable):
        v = a.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        numel = sympy.Integer(1)
        for d in shape_of(v):
            numel *= d
        if not (numel == 1 or (numel.is_number and row[0].is_number and bool(numel <= row[0]))):
            full += 1
    return full >= 2


def group_space(node: fx.Node) -> tuple[Index, bool]:
    if is_reduction(node):
        return shape_of(meta(node.args[0])), True
    return shape_of(meta(node)), False


def realized_reads(node: fx.Node, realized: set[fx.Node], fusable: set[fx.Node]) -> set[fx.Node]:
    """Realized (or non-fusable) nodes that computing `node` inline reads."""
    out: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    seen: set[fx.Node] = set()
    while stack:
        a = stack.pop()
        if a in seen:
            continue
        seen.add(a)
        if a in realized or a not in fusable:
            out.add(a)
        else:
            stack.extend(a.all_input_nodes)
    return out


def merged_space(a: Group, b: Group) -> tuple[Index, bool] | None:
    """The iteration space of a kernel holding both groups, or None if they cannot share one."""
    if _same(a.space, b.space):
        return a.space, a.reduction or b.reduction
    if not (a.reduction or b.reduction) and same_up_to_unit_dims(a.space, b.space):
        return a.space, False
    for red, other in ((a, b), (b, a)):
        if red.reduction and not other.reduction and same_up_to_unit_dims(other.space, red.space[:-1]):
            return red.space, True
    return None


def build_groups(
    gm: fx.GraphModule,
    fusable: set[fx.Node],
    realized: set[fx.Node],
    try_codegen,
) -> list[Group]:
    """Greedy producer-consumer merging of per-node kernels; `try_codegen(group)` raises if illegal."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(realized, key=order.__getitem__)
    group_of: dict[fx.Node, Group] = {}
    groups: dict[int, Group] = {}
    graph = nx.DiGraph()
    for i, n in enumerate(nodes):
        space, red = group_space(n)
        g = Group(i, [n], space, red)
        groups[i] = g
        group_of[n] = g
        graph.add_node(i)
    for n in nodes:
        for r in realized_reads(n, realized, fusable):
            if r in group_of and group_of[r] is not group_of[n]:
                graph.add_edge(group_of[r].gid, group_of[n].gid)
    # non-fusable nodes also order groups (template between two kernels)
    for n in gm.graph.nodes:
        if reads_elements(n) and n not in fusable:
            graph.add_node(("op", n.name))
            for r in realized_reads(n, realized, fusable) | set(n.all_input_nodes):
                src = _producer_key(r, group_of, fusable, realized)
                if src is not None:
                    graph.add_edge(src, ("op", n.name))
            for u in n.users:
                for consumer in _consumers_of(u, group_of, fusable, realized):
                    graph.add_edge(("op", n.name), consumer)

    for n in nodes:
        g = group_of[n]
        producers = sorted(
            {group_of[r].gid for r in realized_reads(n, realized, fusable) if r in group_of} - {g.gid}
        )
        for pid in producers:
            p = groups.get(pid)
            g = group_of[n]
            if p is None or p is g:
                continue
            space = merged_space(p, g)
            if space is None or _creates_cycle(graph, p.gid, g.gid):
                continue
            trial = Group(p.gid, p.members + g.members, space[0], space[1])
            try:
                try_codegen(trial)
            except (IllegalFusion, Unsupported):
                continue
            # merge g into p
            for m in g.members:
                group_of[m] = trial
            groups[p.gid] = trial
            for m in p.members:
                group_of[m] = trial
            del groups[g.gid]
            nx.contracted_nodes(graph, p.gid, g.gid, self_loops=False, copy=False)  # in place: a copy per merge was
            # most of the scheduling time of a 30-layer model
    return [groups[k] for k in sorted(groups, key=lambda k: min(order[m] for m in groups[k].members))]


def _producer_key(r, group_of, fusable, realized):
    if r in group_of:
        return group_of[r].gid
    if reads_elements(r) and r not in fusable:
        return ("op", r.name)
    return None


def _consumers_of(u, group_of, fusable, realized):
    if u in group_of:
        return [group_of[u].gid]
    if reads_elements(u) and u not in fusable:
        return [("op", u.name)]
    if u in fusable:  # inlined node: its realized consumers depend on us
        out = []
        for w in u.users:
            out.extend(_consumers_of(w, group_of, fusable, realized))
        return out
    return []


def _creates_cycle(graph: nx.DiGraph, a, b) -> bool:
    """Merging a and b is illegal if some path between them passes through a third node."""
    for src, dst in ((a, b), (b, a)):
        if src not in graph or dst not in graph:
            continue
        for succ in graph.successors(src):
            if succ != dst and nx.has_path(graph, succ, dst):
                return True
    return False
