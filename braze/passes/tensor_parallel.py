"""Tensor parallelism (Megatron-style) as a graph rewrite: each rank keeps its shard of the weights.

A linear whose input can be traced back, through views, pointwise ops, RoPE, per-head norms and attention, to
linears over the replicated hidden state is *row-parallel* (o_proj, down_proj): those producers become
*column-parallel* (Q/K/V by heads, gate/up by intermediate columns), everything between them runs on the rank's
slice, and the row-parallel linear's partial product is summed by a braze::all_reduce. The region is found by
propagating a `Shard` (which dim is split, and which block of it this rank holds) backwards from the row-parallel
linear's input, so no module names or head counts are assumed: a layer whose region holds an op we cannot shard
stays replicated (correct, just not split). K/V heads are split when the ranks divide them; when there are fewer
K/V heads than ranks, each rank keeps the one K/V head its query heads read (GQA). The lm_head is vocab-parallel
(rows split, logits joined by braze::all_gather), and so are embeddings (each rank looks up the ids it holds,
an all-reduce joins the rows; a tied lm_head shares the embedding's shard); norms stay replicated.

Runs after substitute_attention (repeat_kv is gone, attention is one op with native GQA) and before the fusions,
which then merge and fuse the per-rank linears as usual. A residual add after the all-reduce is folded into rank 0's
partial product (its linear's residual epilogue, with the bias): the sum over ranks then is the new hidden state,
and the add disappears from the plan (vLLM fuses AllReduce + residual add for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from braze.compiler.config import tp_rank
from braze.ops.collectives import COLLECTIVE_OPS
from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, fake_value, is_op, new_node, val
from braze.runtime.errors import ConfigError

braze = torch.ops.braze
ALL_REDUCE, ALL_GATHER = COLLECTIVE_OPS["all_reduce"], COLLECTIVE_OPS["all_gather"]
ATTENTIONS = (braze.attention.default, braze.general_attention.default)
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
SAME_DIM = (aten.clone.default, aten.contiguous.default, aten._to_copy.default, aten.alias.default,
            aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
            aten.neg.default, aten.pow.Tensor_Scalar, aten.mul.Scalar, aten.div.Scalar, aten.add.Scalar)
BINARY = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)
COLLECTIVE_REASON = "a torch.distributed collective, run by the plan as its own step"


@dataclass(frozen=True)
class Shard:
    """Dim `dim` (global size `size`) of a tensor, of which this rank holds [start, start + local)."""

    dim: int
    size: int
    local: int
    start: int


class _NoShard(Exception):
    """The region cannot be sharded (the message says where); the layer stays replicated."""


def _expr(s) -> sympy.Expr:
    return sympy.Integer(s) if isinstance(s, int) else s.node.expr


def _inner(shape, i: int) -> sympy.Expr:
    return sympy.Mul(*[_expr(s) for s in shape[i + 1:]])


def _integer(e: sympy.Expr) -> int | None:
    e = sympy.simplify(e)
    return int(e) if e.is_Integer else None


def map_reshape(src, dst, shard: Shard) -> Shard:
    """The shard of `dst` that a reshape between `src` and `dst` (either direction) maps `shard` of `src` to: the
    outermost dst dim whose extent ends where the sharded src dim's does and that holds the block in whole rows."""
    inner = _inner(src, shard.dim)
    span = inner * shard.size
    for j, size in enumerate(dst):
        inner_j = _inner(dst, j)
        if sympy.simplify(inner_j * _expr(size) - span) != 0:
            continue
        lo, n = _integer(shard.start * inner / inner_j), _integer(shard.local * inner / inner_j)
        total = _integer(_expr(size))
        if lo is not None and n is not None and total is not None and n > 0:
            return Shard(j, total, n, lo)
    raise _NoShard(f"a reshape {list(src)} -> {list(dst)} splits the sharded dim {shard.dim}")


def kv_shard(q_heads: int, kv_heads: int, rank: int, world: int, where: str) -> Shard:
    """This rank's K/V heads: a block of them, or the one its query heads share when there are fewer than ranks."""
    if kv_heads % world == 0:
        return Shard(1, kv_heads, kv_heads // world, rank * kv_heads // world)
    if world % kv_heads == 0:
        return Shard(1, kv_heads, 1, rank * kv_heads // world)
    raise ConfigError(f"tp={world} neither divides nor is a multiple of the {kv_heads} key/value heads of {where}")


class _Region:
    """Backward shard propagation from one row-parallel linear's input."""

    def __init__(self, linear: fx.Node, ctx: PassContext, rank: int, world: int):
        self.ctx, self.rank, self.world = ctx, rank, world
        self.linear = linear
        self.specs: dict[fx.Node, Shard] = {}
        self.roots: list[fx.Node] = []
        self.found_columns = False  # reached attention or a column-parallel candidate (worth a note if it fails)

    def run(self) -> _Region:
        linear, world, rank = self.linear, self.world, self.rank
        x = op_args(linear)["x"]
        k = val(x).shape[-1]
        if not isinstance(k, int) or k % world:
            raise _NoShard(f"{world} ranks do not divide the {k} input features of {linear.name}")
        self.visit(x, Shard(val(x).dim() - 1, k, k // world, rank * k // world))
        self.check_users()
        return self

    def weight(self, node) -> bool:
        return node is None or (node.op == "placeholder" and node.name in self.ctx.weights)

    def visit(self, node: fx.Node, shard: Shard) -> None:
        if not isinstance(node, fx.Node):
            raise _NoShard(f"a constant reaches a sharded value ({shard})")
        if node in self.specs:
            if self.specs[node] != shard:
                raise _NoShard(f"{node.name} is read with two different shardings")
            return
        self.specs[node] = shard
        v = val(node)
        last = v.dim() - 1
        if is_op(node, braze.linear.default, braze.linear_glu.default):
            a = op_args(node)
            ws = [a["weight"], a["bias"]] if "weight" in a else [a["gate_weight"], a["up_weight"]]
            self.found_columns = True
            if shard.dim != last or a.get("residual") is not None or not all(self.weight(w) for w in ws):
                raise _NoShard(f"{node.name} cannot be column-parallel")
            self.roots.append(node)
        elif is_op(node, *RESHAPES):
            if isinstance(node.args[1][shard.dim], fx.Node):
                raise _NoShard(f"{node.name}'s sharded size is symbolic")
            self.visit(node.args[0], map_reshape(v.shape, val(node.args[0]).shape, shard))
        elif is_op(node, aten.permute.default):
            dims = [d % v.dim() for d in node.args[1]]
            self.visit(node.args[0], Shard(dims[shard.dim], shard.size, shard.local, shard.start))
        elif is_op(node, aten.transpose.int):
            a, b = (d % v.dim() for d in node.args[1:3])
            d = b if shard.dim == a else a if shard.dim == b else shard.dim
            self.visit(node.args[0], Shard(d, shard.size, shard.local, shard.start))
        elif is_op(node, aten.unsqueeze.default):
            u = node.args[1] % v.dim()
            if u == shard.dim:
                raise _NoShard(f"{node.name} unsqueezes the sharded dim")
            self.visit(node.args[0], Shard(shard.dim - (shard.dim > u), shard.size, shard.local, shard.start))
        elif is_op(node, *SAME_DIM):
            self.visit(node.args[0], shard)
        elif is_op(node, aten.slice.Tensor, aten.cat.default):  # along another dim (partial rotary's head dims)
            axis = (node.args[1] if len(node.args) > 1 else 0) % v.dim()
            if axis == shard.dim:
                raise _NoShard(f"{node.name} slices or concatenates along the sharded dim")
            for src in (node.args[0] if is_op(node, aten.cat.default) else [node.args[0]]):
                self.visit(src, shard)
        elif is_op(node, *BINARY):
            for arg in node.args[:2]:
                self.operand(node, arg, shard)
        elif is_op(node, braze.rope.default, braze.rms_norm.default):
            if shard.dim == last:
                raise _NoShard(f"{node.name} reduces or rotates over the sharded dim")
            self.visit(node.args[0], shard)
        elif is_op(node, *ATTENTIONS):
            self.attention(node, shard)
        else:
            raise _NoShard(f"{node.name} ({node.target}) has no sharding rule")

    def operand(self, node: fx.Node, arg, shard: Shard) -> None:
        """A pointwise op's operand: sharded like the output, or broadcast along the sharded dim (replicated)."""
        av = val(arg)
        if not isinstance(av, torch.Tensor):
            return
        d = shard.dim - (val(node).dim() - av.dim())
        if d < 0 or av.shape[d] == 1:
            return
        self.visit(arg, Shard(d, shard.size, shard.local, shard.start))

    def attention(self, node: fx.Node, shard: Shard) -> None:
        self.found_columns = True
        a = op_args(node)
        q_heads, kv_heads = val(a["q"]).shape[1], val(a["k"]).shape[1]
        if q_heads % self.world:
            raise ConfigError(f"tp={self.world} does not divide the {q_heads} attention heads of {node.name}")
        q = Shard(1, q_heads, q_heads // self.world, self.rank * q_heads // self.world)
        if shard != q:
            raise _NoShard(f"{node.name}'s output is not read by heads")
        if a.get("sinks") is not None or a.get("alibi") is not None:
            raise _NoShard(f"{node.name}'s attention sinks / ALiBi slopes differ per head")
        for name, t in a.items():  # masks and biases must not differ per head (ALiBi's do)
            tv = val(t)
            if name not in ("q", "k", "v") and isinstance(tv, torch.Tensor) and tv.dim() == 4 and tv.shape[1] != 1:
                raise _NoShard(f"{node.name}'s {name} differs per head")
        kv = kv_shard(q_heads, kv_heads, self.rank, self.world, node.name)
        self.visit(a["q"], q)
        self.visit(a["k"], kv)
        self.visit(a["v"], kv)

    def check_users(self) -> None:
        for node, shard in self.specs.items():
            for u in node.users:
                if u in self.specs or u is self.linear:
                    continue
                if is_op(u, aten.sym_size.int) and u.args[1] % val(node).dim() != shard.dim:
                    continue
                raise _NoShard(f"{node.name} is also read by {u.name}, outside the sharded region")


def _slice(ctx: PassContext, gm: fx.GraphModule, w: fx.Node, dim: int, start: int, n: int) -> fx.Node:
    """This rank's block of weight `w` as a new weight; one per block (a tied embedding / lm_head shares it)."""
    key = (w.name, dim, start, n)
    for p in gm.graph.nodes:
        if p.op == "placeholder" and p.meta.get("braze_tp_slice") == key:
            return p
    shard = ctx.weights[w.name].narrow(dim, start, n).contiguous()
    node = ctx.add_weight(gm, f"{w.name}_tp"[:60], shard)
    node.meta["braze_tp_slice"] = key
    return node


def _vocab_parallel_embedding(gm: fx.GraphModule, ctx: PassContext, rank: int, world: int) -> int:
    """Embeddings split by vocabulary rows: each rank looks up the ids it holds, zeros the others, and an
    all-reduce sums the rows (exact: one non-zero term per element)."""
    count = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.embedding.default):
            continue
        w, ids = node.args[0], node.args[1]
        if w.op != "placeholder" or w.name not in ctx.weights or ctx.weights[w.name].dim() != 2:
            continue
        if not (isinstance(ids, fx.Node) and ids.op == "placeholder" and ids.name == "input_ids"):
            continue  # token embeddings only: a position table is small, not worth a collective
        rows = ctx.weights[w.name].shape[0]
        if rows % world:
            continue
        n = rows // world
        ids.meta["embedding_rows"] = rows  # the whole table's: the runtime checks ids against it (lower.py)
        local = _slice(ctx, gm, w, 0, rank * n, n)
        after = node.next

        def add(target, *args):
            return new_node(gm, target, args, {}, ctx, after)

        shifted = add(aten.sub.Scalar, ids, rank * n)
        outside = add(aten.logical_or.default, add(aten.lt.Scalar, shifted, 0), add(aten.ge.Scalar, shifted, n))
        looked = add(aten.embedding.default, local, add(aten.masked_fill.Scalar, shifted, outside, 0))
        zeroed = add(aten.masked_fill.Scalar, looked, add(aten.unsqueeze.default, outside, -1), 0.0)
        reduced = add(ALL_REDUCE, zeroed)
        reduced.meta["braze_eager_reason"] = COLLECTIVE_REASON
        node.replace_all_uses_with(reduced)
        gm.graph.erase_node(node)
        ctx.note(f"{looked.name}: vocab-parallel embedding ({n} of {rows} rows), rows all-reduced")
        count += 1
    return count


def _rewrite(region: _Region, gm: fx.GraphModule, ctx: PassContext) -> None:
    """Slice the roots' rows and the linear's columns, shrink hard-coded sharded sizes, all-reduce the output."""
    for root in region.roots:
        s = region.specs[root]
        for key in ("weight", "bias", "gate_weight", "up_weight"):
            w = op_args(root).get(key)
            if w is not None:
                _set_arg(root, key, _slice(ctx, gm, w, 0, s.start, s.local))
    for node, s in region.specs.items():
        if is_op(node, *RESHAPES):
            shape = list(node.args[1])
            if shape[s.dim] == s.size:  # -1 stays -1
                shape[s.dim] = s.local
                node.update_arg(1, shape)
    lin = region.linear
    a = op_args(lin)
    x = region.specs[a["x"]]
    lin.update_arg(1, _slice(ctx, gm, a["weight"], 1, x.start, x.local))
    bias = a["bias"]
    if bias is not None:  # added once, after the sum
        lin.update_arg(2, None)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted([*region.specs, lin], key=order.__getitem__):
        node.meta["val"] = fake_value(node.target, node.args, node.kwargs, ctx)
    after = lin.next
    reduced = new_node(gm, ALL_REDUCE, (lin,), {}, ctx, after)
    reduced.meta["braze_eager_reason"] = COLLECTIVE_REASON
    out = reduced if bias is None else new_node(gm, aten.add.Tensor, (reduced, bias), {}, ctx, after)
    lin.replace_all_uses_with(out, delete_user_cb=lambda u: u is not reduced)
    _fold_residual(gm, ctx, lin, reduced, out, bias, region.rank)


def _set_arg(node: fx.Node, name: str, value: object) -> None:
    """Set an op's argument by its schema name, positional or keyword, wherever the node holds it."""
    idx = [arg.name for arg in node.target._schema.arguments].index(name)
    if idx < len(node.args):
        node.update_arg(idx, value)
    else:
        node.update_kwarg(name, value)


def _fold_residual(gm: fx.GraphModule, ctx: PassContext, lin: fx.Node, reduced: fx.Node, out: fx.Node,
                   bias: fx.Node | None, rank: int) -> None:
    """add(all_reduce(linear) [+ bias], residual) -> all_reduce(linear) where rank 0's linear adds bias and
    residual in its epilogue: the ranks' partial products then sum to the new hidden state, so no add runs after
    the collective. Skipped when the residual is not a same-shape tensor computed before the linear and used
    elsewhere too."""
    users = list(out.users)
    if len(users) != 1 or not is_op(users[0], aten.add.Tensor) or users[0].kwargs:
        return
    add = users[0]
    residual = add.args[1] if add.args[0] is out else add.args[0]
    if not isinstance(residual, fx.Node) or residual is out or len(residual.users) < 2:
        # the residual must stay live on every rank: were the add its only user, ranks other than 0 would drop
        # whatever computes it, a collective included (Phi's parallel block: attention's all-reduced output)
        return
    if val(residual).shape != val(lin).shape or val(residual).dtype != val(lin).dtype:
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    if order[residual] > order[lin]:
        return
    if rank == 0:
        _set_arg(lin, "bias", bias)
        _set_arg(lin, "residual", residual)
        lin.meta["val"] = fake_value(lin.target, lin.args, lin.kwargs, ctx)
    add.replace_all_uses_with(reduced)
    gm.graph.erase_node(add)
    if out is not reduced:
        gm.graph.erase_node(out)


def _vocab_parallel(gm: fx.GraphModule, ctx: PassContext, rank: int, world: int) -> int:
    """Linears whose output is a graph output (the lm_head): rows split across ranks, logits all-gathered."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    count = 0
    for lin in list(out_node.all_input_nodes):
        if not is_op(lin, braze.linear.default):
            continue
        a = op_args(lin)
        rows = val(a["weight"]).shape[0]
        if a["residual"] is not None or rows % world or not all(w is None or (w.op == "placeholder" and w.name in
                                                                            ctx.weights) for w in (a["weight"],
                                                                                                   a["bias"])):
            continue
        n = rows // world
        lin.update_arg(1, _slice(ctx, gm, a["weight"], 0, rank * n, n))
        if a["bias"] is not None:
            lin.update_arg(2, _slice(ctx, gm, a["bias"], 0, rank * n, n))
        lin.meta["val"] = fake_value(lin.target, lin.args, lin.kwargs, ctx)
        gathered = new_node(gm, ALL_GATHER, (lin, world), {}, ctx, out_node)
        gathered.meta["braze_eager_reason"] = COLLECTIVE_REASON
        lin.replace_all_uses_with(gathered, delete_user_cb=lambda u: u is not gathered)
        ctx.note(f"{lin.name}: vocab-parallel ({n} of {rows} rows), logits all-gathered")
        count += 1
    return count


def check_divisible(gm: fx.GraphModule, world: int) -> None:
    """tp must split every attention's query heads (and its K/V heads, or be a multiple of them) and every gated
    MLP's intermediate size: a model that cannot be split evenly is refused, not silently left replicated."""
    for node in gm.graph.nodes:
        if is_op(node, *ATTENTIONS):
            a = op_args(node)
            q_heads, kv_heads = val(a["q"]).shape[1], val(a["k"]).shape[1]
            if q_heads % world:
                raise ConfigError(f"tp={world} does not divide the {q_heads} attention heads of {node.name}")
            kv_shard(q_heads, kv_heads, 0, world, node.name)
        elif is_op(node, braze.linear_glu.default):
            size = val(node).shape[-1]
            if size % world:
                raise ConfigError(f"tp={world} does not divide the intermediate size {size} of {node.name}")


def shard_tensor_parallel(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Rewrite the graph into rank `dist.get_rank()`'s shard of a tp-way split; returns the collectives added."""
    rank, world = tp_rank(ctx.config)
    check_divisible(gm, world)
    count = 0
    for lin in list(gm.graph.nodes):
        if not is_op(lin, braze.linear.default) or getattr(lin, "_erased", False):
            continue
        a = op_args(lin)
        if a["residual"] is not None or a["norm_weight"] is not None or not all(
                w is None or (w.op == "placeholder" and w.name in ctx.weights) for w in (a["weight"], a["bias"])):
            continue
        region = _Region(lin, ctx, rank, world)
        try:
            region.run()
        except _NoShard as why:
            if region.found_columns:
                ctx.note(f"{lin.name} stays replicated: {why}")
            continue
        _rewrite(region, gm, ctx)
        cols = ", ".join(r.name for r in region.roots)
        ctx.note(f"{lin.name}: row-parallel + all_reduce; column-parallel {cols}")
        count += 1
    count += _vocab_parallel(gm, ctx, rank, world)
    count += _vocab_parallel_embedding(gm, ctx, rank, world)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    ctx.note(f"rank {rank} of {world}: {sum(1 for n in gm.graph.nodes if is_op(n, ALL_REDUCE))} "
             f"all-reduces per forward")
    return count
