"""Lower a rewritten FX graph to a Plan: kernels (fused family + templates), free views, eager fallbacks.

This is the one place that decides what runs as what; the report is built from what it records.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from braze.codegen import schedule
from braze.codegen.fused import BufferInfo, KernelBuilder, meta
from braze.codegen.memory import plan_memory
from braze.codegen.symbolic import contiguous_strides, pexpr, shape_of, strides_of, to_sympy
from braze.kernels import family_for_op, launch_count
from braze.kernels.fused import LIGHT_LOADS
from braze.runtime.plan import BufferSpec, InputSpec, Plan, Step, SymbolSpec

DTYPE_NAMES = {v: str(v).removeprefix("torch.") for v in (
    torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.float64)}


@dataclass
class LoweringRecord:
    """What lowering decided, for the compile report."""

    fused_kernels: list[tuple[str, list[str]]] = field(default_factory=list)
    template_kernels: list[tuple[str, list[str]]] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    planned_peak_bytes: int = 0
    eager_peak_bytes: int = 0
    no_reuse_bytes: int = 0


def embedding_rows(placeholder: fx.Node) -> int | None:
    """The rows of the embedding table `placeholder` indexes (the smallest if several; meta "embedding_rows" when a
    pass split the table), or None. The generated gathers do not bound-check their ids (eager PyTorch raises; a
    kernel would read outside the table), so the runtime checks such inputs at the API (check_index_inputs)."""
    rows = [placeholder.meta["embedding_rows"]] if "embedding_rows" in placeholder.meta else []
    for user in placeholder.users:
        if user.target is torch.ops.aten.embedding.default and user.args[1] is placeholder:
            table = user.args[0]
        elif user.target is torch.ops.braze.df11_embedding.default and user.args[0] is placeholder:
            table = user.args[7]  # row_blocks: one entry per table row
        else:
            continue
        size = table.meta["val"].shape[0] if isinstance(table, fx.Node) else None
        if isinstance(size, int):
            rows.append(size)
    return min(rows) if rows else None


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


IN_PLACE_ALL_REDUCE = "braze.ops.collectives.all_reduce_in_place"


def target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return f"{target.__module__}.{target.__qualname__}"


def node_origin(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) else ""
            where = lines[i].split(",")
            return f"{where[0][5:].strip(chr(34)).split('/')[-1]}:{where[1].strip().removeprefix('line ')}  {code}"
    return ""


def encode_arg(a: Any) -> Any:
    """Encode an FX argument as JSON-able data for the runtime."""
    if isinstance(a, fx.Node):
        val = a.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int)) and not isinstance(val, torch.Tensor):
            return {"sym": pexpr(to_sympy(val))}
        return {"ref": a.name}
    if isinstance(a, (list, tuple)):
        return [encode_arg(x) for x in a]
    if isinstance(a, torch.dtype):
        return {"dtype": dtype_name(a)}
    if isinstance(a, torch.device):
        return {"device": True}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.SymInt):
        return {"sym": pexpr(to_sympy(a))}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise TypeError(f"cannot encode argument {a!r}")


def _header(kind: str, uses: list[list[fx.Node]]) -> str:
    lines = [f"# braze generated kernel ({kind}); covers {len(uses)} region(s):"]
    for nodes in uses[:8]:
        lines.append("#   " + ", ".join(n.name for n in nodes))
        for n in nodes:
            origin = node_origin(n)
            if origin:
                lines.append(f"#     {n.name}: {origin}")
    if len(uses) > 8:
        lines.append(f"#   ... and {len(uses) - 8} more")
    return "\n".join(lines)


SIZE_OUTPUT = "="  # a plan output starting with it is a size expression over the plan's symbols, not a buffer


def _output_ref(a: Any) -> str | None:
    """A plan output: the buffer a node writes, or for a size the model returns (`x.shape[0]`) its expression."""
    if isinstance(a, fx.Node):
        v = a.meta.get("val")
        return SIZE_OUTPUT + pexpr(to_sympy(v)) if isinstance(v, (int, torch.SymInt)) else a.name
    return SIZE_OUTPUT + str(a) if isinstance(a, int) and not isinstance(a, bool) else None


class Lowering:
    def __init__(self, gm: fx.GraphModule, name: str, symbol_specs: list[SymbolSpec], weights: set[str],
                 deterministic: bool = False):
        self.gm = gm
        # deterministic: every Step records it; its family launches the batch-invariant configuration
        self.deterministic = deterministic
        self.name = name
        self.symbol_specs = symbol_specs
        self.weights = weights
        self.record = LoweringRecord()
        self.fusable, self.template, self.eager = schedule.classify(gm, family_for_op)
        for n in list(self.template):
            reason = family_for_op(n.target).supports(n)
            if reason:
                self.template.discard(n)
                self.eager.add(n)
                self.record.fallbacks.append((n.name, reason))
        for n in gm.graph.nodes:  # in graph order, so the report reads like the model
            if n in self.eager and not any(n.name == f for f, _ in self.record.fallbacks) \
                    and n.target is not operator.getitem:
                reason = n.meta.get("braze_eager_reason") or f"no lowering for {target_name(n.target)}"
                self.record.fallbacks.append((n.name, reason))
        self.realized, self.runtime_views = schedule.realize(gm, self.fusable)

    # buffers a fused kernel may load
    def buffer_info(self, node: fx.Node, members: set[fx.Node]) -> BufferInfo | None:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        if node.op == "placeholder":
            return BufferInfo(node.name, shape_of(val), strides_of(val), val.dtype)
        if node in self.fusable:
            if node in self.realized and node not in members:
                return BufferInfo(node.name, shape_of(val), contiguous_strides(shape_of(val)), val.dtype)
            return None
        if node in self.template:
            return BufferInfo(node.name, shape_of(val), strides_of(val), val.dtype)
        return BufferInfo(node.name, shape_of(val), contiguous_strides(shape_of(val)), val.dtype)

    def _builder(self, group: schedule.Group, name: str = "kernel") -> KernelBuilder:
        members = set(group.members)
        return KernelBuilder(name, group.space, group.reduction, group.members,
                             lambda n: self.buffer_info(n, members))

    def _try(self, group: schedule.Group) -> None:
        b = self._builder(group)
        for m in group.members:
            b.store(m, m.name)

    def needs_store(self, node: fx.Node, members: set[fx.Node]) -> bool:
        for u in node.users:
            if u.op == "output" or u not in self.fusable:
                return True
            if u in members:
                continue
            # a fusable consumer outside the group reads us unless it is inlined into this group only
            if u in self.realized or u in self.runtime_views or self._read_outside(u, members):
                return True
        return False

    def _read_outside(self, node: fx.Node, members: set[fx.Node]) -> bool:
        # an inlined node is read wherever its consumers are
        for u in node.users:
            if u.op == "output" or u not in self.fusable or (u in self.realized and u not in members):
                return True
            if u in self.runtime_views:
                return True
            if u not in self.realized and self._read_outside(u, members):
                return True
        return False

    def run(self) -> Plan:
        groups = schedule.build_groups(self.gm, self.fusable, self.realized, self._try)
        kernels: dict[str, tuple[str, list[list[fx.Node]], str]] = {}  # key -> (body, uses, kind)
        step_of: dict[str, int] = {}
        steps: list[tuple[int, Step]] = []
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        buffers: dict[str, BufferSpec] = {}

        def add_kernel(body: str, nodes: list[fx.Node], kind: str, placeholder: str) -> str:
            digest = hashlib.sha256(body.encode()).hexdigest()[:10]
            kname = f"{kind}_{digest}"
            if kname not in kernels:
                kernels[kname] = (body.replace(placeholder, kname), [], kind)
            kernels[kname][1].append(nodes)
            return kname

        for g in groups:
            members = set(g.members)
            b = self._builder(g, "KERNEL_NAME")
            for m in g.members:
                if self.needs_store(m, members):
                    b.store(m, m.name)
            fk = b.render(header="")
            kname = add_kernel(fk.source, g.members, "fused", "KERNEL_NAME")
            step = Step(
                kind="fused", launcher="fused", kernel=kname, inputs=fk.inputs, outputs=[n for n, _ in fk.outputs],
                params={"xnumel": pexpr(fk.xnumel), "rnumel": pexpr(fk.rnumel), "reduction": fk.reduction,
                        "symbols": fk.symbols, **({"deterministic": True} if self.deterministic else {}),
                        **_load_heavy(fk.source)},
                nodes=[m.name for m in g.members],
            )
            for bname, node in fk.outputs:
                val = meta(node)
                buffers[bname] = BufferSpec(bname, [pexpr(s) for s in shape_of(val)], dtype_name(val.dtype))
            steps.append((min(order[m] for m in g.members), step))
            self.record.fused_kernels.append((kname, [m.name for m in g.members]))

        # graph order, not set order: a kernel's header (the regions it covers) and so its cross-compile cache key
        # must not change from process to process (fx.Node hashes by id)
        for n in sorted(self.template, key=order.__getitem__):
            family = family_for_op(n.target)
            lower = family.lower_deterministic if self.deterministic else family.lower
            body, step = lower(n, "KERNEL_NAME")
            if family.abi > 1:
                step.params["abi"] = family.abi
            kname = add_kernel(body, [n], step.launcher, "KERNEL_NAME")
            step.kernel = kname
            step.nodes = [n.name]
            val = meta(n)
            buffers[n.name] = BufferSpec(n.name, [pexpr(s) for s in shape_of(val)], dtype_name(val.dtype),
                                         strides=[pexpr(s) for s in strides_of(val)])
            steps.append((order[n], step))
            self.record.template_kernels.append((kname, [n.name]))

        for n in sorted(self.eager | self.runtime_views, key=order.__getitem__):
            kind = "view" if n in self.runtime_views else "eager"
            in_place = self._reduces_in_place(n)
            params: dict[str, Any] = {"in_place": True} if in_place else {}
            binds = _unbacked_dims(n)
            if binds:
                params["binds"] = binds
            steps.append((order[n], Step(
                kind=kind, target=IN_PLACE_ALL_REDUCE if in_place else target_name(n.target), outputs=[n.name],
                params=params,
                inputs=[a.name for a in n.all_input_nodes
                        if not isinstance(a.meta.get("val"), (torch.SymInt, torch.SymFloat, int, float))],
                args=encode_arg(list(n.args)), kwargs={k: encode_arg(v) for k, v in n.kwargs.items()},
                nodes=[n.name],
            )))

        ordered = self._topo(steps)
        for i, s in enumerate(ordered):
            for o in s.outputs:
                step_of[o] = i

        out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        outputs = [_output_ref(a) for a in _flatten(out_node.args[0])]
        inputs = []
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                val = n.meta["val"]
                user = n.name not in self.weights
                inputs.append(InputSpec(n.name, [pexpr(s) for s in shape_of(val)], dtype_name(val.dtype),
                                        "user" if user else "weight", embedding_rows(n) if user else None))
        plan = Plan(name=self.name, inputs=inputs, symbols=self.symbol_specs, buffers=list(buffers.values()),
                    steps=ordered, outputs=outputs, kernels={})
        for kname, (body, uses, kind) in kernels.items():
            plan.kernels[kname] = _header(kind, uses) + "\n" + body.lstrip("\n")
        plan.launches = launch_count(plan)
        layout = plan_memory(plan, self.gm, self.symbol_specs)
        layout.apply(plan)
        self.record.planned_peak_bytes = layout.planned_peak_bytes
        self.record.no_reuse_bytes = layout.no_reuse_bytes
        self.record.eager_peak_bytes = layout.eager_peak_bytes
        return plan

    def _reduces_in_place(self, n: fx.Node) -> bool:
        """A tensor-parallel all-reduce whose input is a kernel's own output buffer read by nothing else: the
        step sums into that buffer instead of a copy (one device copy less per collective)."""
        if n.target is not torch.ops.braze.all_reduce.default:
            return False
        x = n.args[0]
        return (isinstance(x, fx.Node) and len(x.users) == 1 and (x in self.template or x in self.realized)
                and x not in self.runtime_views)

    def _topo(self, steps: list[tuple[int, Step]]) -> list[Step]:
        graph = nx.DiGraph()
        producer: dict[str, int] = {}
        for i, (_, s) in enumerate(steps):
            graph.add_node(i)
            for o in s.outputs:
                producer[o] = i
        for i, (_, s) in enumerate(steps):
            for inp in s.inputs:
                if inp in producer and producer[inp] != i:
                    graph.add_edge(producer[inp], i)
        key = {i: pos for i, (pos, _) in enumerate(steps)}
        return [steps[i][1] for i in nx.lexicographical_topological_sort(graph, key=key.__getitem__)]


def _unbacked_dims(n: fx.Node) -> list[list[Any]]:
    """[dim, symbol] of each dim of n's tensor that is a bare data-dependent size (an unbacked symbol, e.g. the
    tokens routed to an MoE expert), or [-1, symbol] for a scalar n reads from a tensor: the executor binds it from
    the eager result, so later steps can use it."""
    val = n.meta.get("val")
    if isinstance(val, torch.SymInt):  # a scalar read from a tensor: dim -1 binds the value itself
        return [[-1, str(val.node.expr)]] if isinstance(val.node.expr, sympy.Symbol) else []
    if not isinstance(val, torch.Tensor):
        return []
    out = []
    for i, s in enumerate(val.shape):
        if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol) and free_unbacked_symbols(s):
            out.append([i, str(s.node.expr)])
    return out


def _flatten(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        out = []
        for y in x:
            out.extend(_flatten(y))
        return out
    return [x]


def lower_graph(gm: fx.GraphModule, name: str, symbol_specs: list[SymbolSpec], weights: set[str],
                deterministic: bool = False) -> tuple[Plan, LoweringRecord]:
    low = Lowering(gm, name, symbol_specs, weights, deterministic)
    plan = low.run()
    return plan, low.record


def sympy_symbols(specs: list[SymbolSpec]) -> dict[str, sympy.Symbol]:
    return {s.name: sympy.Symbol(s.name, integer=True, positive=True) for s in specs}



def _load_heavy(source: str) -> dict[str, int]:
    """{"loads": n} for a kernel reading more than LIGHT_LOADS tensors an element (an unrolled conv): its launch
    gives each thread fewer elements (kernels/fused.py: fused_blocks), as each holds that many values in
    registers."""
    loads = source.count("tl.load(")
    return {"loads": loads} if loads > LIGHT_LOADS else {}

