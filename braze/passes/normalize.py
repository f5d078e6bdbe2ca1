"""normalize: drop asserts and no-op copies so later patterns see the computation, not its bookkeeping.

`view` becomes `reshape` (identical on contiguous inputs, and still valid eagerly once copies are gone),
then clones, aliases and same-dtype casts are removed: the graph is functional, so they carry no meaning.
Custom ops of other libraries with a braze equivalent (HF's MoE grouped matmul) become that braze op, and splits and
constant consecutive index lists become slices; a constant table indexed by integer ids becomes an embedding;
reductions over other dims than the last become last-dim reductions of a view.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, dce, new_node, val

ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}
# custom ops of other libraries that a model's export holds -> the braze op with the same semantics (a plan may
# only name aten / braze ops: a package runs without the library that defined them)
FOREIGN_OPS = {"transformers::grouped_mm_fallback": torch.ops.braze.grouped_mm.default}  # HF MoE experts


def _is_expert_grouped_mm(node: fx.Node) -> bool:
    """aten._grouped_mm in the form HF's MoE experts call it (torch's grouped_mm: rows [T, K] sorted by expert,
    experts [E, K, N], cumulative ends `offs`, no bias, the rows' dtype out) is braze::grouped_mm."""
    args = dict(zip(("self", "mat2", "offs", "bias", "out_dtype"), node.args)) | dict(node.kwargs)
    x, w, offs = val(args["self"]), val(args["mat2"]), args.get("offs")
    return (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dim() == 2 and w.dim() == 3
            and isinstance(offs, fx.Node) and args.get("bias") is None
            and args.get("out_dtype") in (None, x.dtype) and x.dtype == w.dtype)


def _split_to_slices(node: fx.Node) -> bool:
    """split / split_with_sizes whose pieces are read by getitem -> one slice per piece (free index remaps for the
    fused kernels, where the split itself had no lowering): fused QKV and gate/up projections, chunk(2)."""
    x = node.args[0]
    xv = val(x)
    if not isinstance(xv, torch.Tensor):
        return False
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim % xv.dim()
    length = xv.shape[dim]
    if not isinstance(length, int):
        return False
    if node.target is aten.split.Tensor:
        size = node.args[1]
        if not isinstance(size, int) or size <= 0:
            return False
        sizes = [min(size, length - s) for s in range(0, length, size)]
    else:
        sizes = list(node.args[1])
    if not all(isinstance(s, int) for s in sizes) or not all(u.target is operator.getitem for u in node.users):
        return False
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for user in list(node.users):
        i = user.args[1]
        with node.graph.inserting_before(user):
            piece = node.graph.call_function(aten.slice.Tensor, (x, dim, starts[i], starts[i] + sizes[i]))
        piece.meta.update(user.meta)
        user.replace_all_uses_with(piece)
        node.graph.erase_node(user)
    node.graph.erase_node(node)
    return True


def _constant_index_to_slice(node: fx.Node, ctx: PassContext) -> bool:
    """x[..., [a, a+1, ..., b-1], ...] with a constant index list (Falcon's fused_qkv[..., [-2], :]) -> a slice."""
    x, indices = node.args[0], node.args[1]
    xv = val(x)
    present = [(d, i) for d, i in enumerate(indices) if i is not None]
    if not isinstance(xv, torch.Tensor) or len(present) != 1:
        return False
    dim, idx = present[0]
    if not (isinstance(idx, fx.Node) and idx.op == "placeholder" and idx.name in ctx.weights):
        return False
    const = ctx.weights[idx.name]
    length = xv.shape[dim]
    if const.dim() != 1 or const.numel() == 0 or const.dtype not in (torch.int64, torch.int32) or \
            not isinstance(length, int):
        return False
    values = [int(v) % length for v in const.tolist()]
    if values != list(range(values[0], values[0] + len(values))):
        return False
    piece = new_node(node.graph.owning_module, aten.slice.Tensor, (x, dim, values[0], values[0] + len(values)), {},
                     ctx, node)
    node.replace_all_uses_with(piece)
    node.graph.erase_node(node)
    return True


def _table_lookup_to_embedding(node: fx.Node, ctx: PassContext) -> bool:
    """table[ids] with a 2-D constant table and integer ids (GPT-J's sin/cos table indexed by position_ids) ->
    embedding(table, ids): the same rows, and a gather the fused kernels lower (aten.index has no lowering)."""
    x, indices = node.args[0], node.args[1]
    if len(indices) != 1 or not isinstance(indices[0], fx.Node) or not isinstance(x, fx.Node) or \
            x.op != "placeholder" or x.name not in ctx.weights or ctx.weights[x.name].dim() != 2:
        return False
    idx = val(indices[0])
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        return False
    emb = new_node(node.graph.owning_module, aten.embedding.default, (x, indices[0]), {}, ctx, node)
    node.replace_all_uses_with(emb)
    node.graph.erase_node(node)
    return True


def _trivial_slice_or_cat(node: fx.Node) -> bool:
    """x[..., 0:len] -> x; cat([..., empty, ...]) drops the empty pieces (Phi-3's partial-rotary code at factor 1.0
    slices the whole head and concatenates an empty pass-through part)."""
    if node.target is aten.slice.Tensor:
        x = node.args[0]
        xv = val(x)
        dim, start = node.args[1] if len(node.args) > 1 else 0, node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        if not isinstance(xv, torch.Tensor) or step != 1 or start not in (None, 0):
            return False
        length = xv.shape[dim % xv.dim()]
        if end is None or (isinstance(length, int) and isinstance(end, int) and end >= length):
            node.replace_all_uses_with(x)
            return True
        return False
    pieces, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    kept = [p for p in pieces if not (isinstance(val(p), torch.Tensor) and val(p).dim() > 0
                                      and statically_known_true(val(p).shape[dim % val(p).dim()] == 0))]
    if len(kept) == len(pieces) or not kept:
        return False
    if len(kept) == 1:
        node.replace_all_uses_with(kept[0])
    else:
        node.args = (kept, *node.args[1:])
    return True


REDUCTIONS = (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default)


def reduce_over_last_dim(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> bool:
    """A sum / mean / amax / amin over several dims, over all of them, or over one that is not the last becomes one
    last-dim reduction of a view (kept dims first, the reduced ones merged last): the fused family lowers last-dim
    reductions, and views are free index remaps there (pooling means over H and W, x.sum() of a check, softmax
    statistics over a channel dim ran eagerly before)."""
    x = node.args[0]
    xv = val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() == 0 or any(s == 0 for s in xv.shape):
        return False
    rank = xv.dim()
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    reduced = sorted({d % rank for d in dims}) if dims else list(range(rank))
    if reduced == [rank - 1]:
        return False
    kept = [d for d in range(rank) if d not in reduced]

    def size(d: int) -> object:
        s = xv.shape[d]
        return s if isinstance(s, int) else new_node(gm, aten.sym_size.int, (x, d), None, ctx, node)

    src = x
    if kept + reduced != list(range(rank)):
        src = new_node(gm, aten.permute.default, (src, kept + reduced), None, ctx, node)
    src = new_node(gm, aten.reshape.default, (src, [size(d) for d in kept] + [-1]), None, ctx, node)
    kwargs = {k: v for k, v in node.kwargs.items() if k == "dtype"}
    out = new_node(gm, node.target, (src, [-1], False), kwargs, ctx, node)
    if keepdim:
        out = new_node(gm, aten.reshape.default, (out, [1 if d in reduced else size(d) for d in range(rank)]),
                       None, ctx, node)
    node.replace_all_uses_with(out)
    return True


def normalize(gm: fx.GraphModule, ctx: PassContext) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.split.Tensor, aten.split_with_sizes.default):
            count += _split_to_slices(node)
        elif node.target is aten.index.Tensor:
            count += _constant_index_to_slice(node, ctx) or _table_lookup_to_embedding(node, ctx)
        elif node.target in (aten.slice.Tensor, aten.cat.default):
            count += _trivial_slice_or_cat(node)
        elif node.target in REDUCTIONS:
            count += reduce_over_last_dim(gm, node, ctx)
        elif node.target in ASSERTS or (
            isinstance(node.target, torch._ops.OpOverload) and node.target.name().startswith("aten::sym_constrain")
        ):
            gm.graph.erase_node(node)
            count += 1
        elif isinstance(node.target, torch._ops.OpOverload) and node.target.name() in FOREIGN_OPS:
            ctx.note(f"{node.name}: {node.target.name()} -> {FOREIGN_OPS[node.target.name()]} (MoE experts)")
            node.target = FOREIGN_OPS[node.target.name()]
            count += 1
        elif node.target is aten._grouped_mm.default and _is_expert_grouped_mm(node):
            ctx.note(f"{node.name}: aten._grouped_mm -> braze::grouped_mm (MoE experts)")
            node.target, node.args, node.kwargs = torch.ops.braze.grouped_mm.default, tuple(node.args[:3]), {}
            count += 1
        elif node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
        elif node.target in (aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default):
            node.replace_all_uses_with(node.args[0])
            count += 1
        elif node.target in (aten._to_copy.default, aten.to.dtype):
            src = val(node.args[0])
            out = val(node)
            if isinstance(src, torch.Tensor) and src.dtype == out.dtype and src.device == out.device:
                node.replace_all_uses_with(node.args[0])
                count += 1
    dce(gm)
    return count
