"""normalize: drop asserts and no-op copies so later patterns see the computation, not its bookkeeping.

`view` becomes `reshape` (identical on contiguous inputs, and still valid eagerly once copies are gone),
then clones, aliases and same-dtype casts are removed: the graph is functional, so they carry no meaning.
Custom ops of other libraries with a braze equivalent (HF's MoE grouped matmul) become that braze op, and splits and
constant consecutive index lists become slices; a constant table indexed by integer ids becomes an embedding;
reductions over other dims than the last become last-dim reductions of a view. MoE routers' ops without a lowering
become ones with one: top-k (and max with indices) -> braze::topk_packed, gathers by indices proven in range ->
fused indirect loads, scatters of a value by such indices -> comparison masks (of a top-k's values -> comparison
selects), clamps by tensors -> min / max, a repeat of the tokens -> a broadcast view, bmm over expert weights
(Llama 4) -> braze::grouped_mm; index_select over a table's rows -> an embedding lookup.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.graph_utils import _erase_dead_from, aten, dce, is_op, new_node, val

ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}
# custom ops of other libraries that a model's export holds -> the braze op with the same semantics (a plan may
# only name aten / braze ops: a package runs without the library that defined them)
FOREIGN_OPS = {"transformers::grouped_mm_fallback": torch.ops.braze.grouped_mm.default}  # HF MoE experts


def _is_expert_grouped_mm(node: fx.Node) -> bool:
    """aten._grouped_mm in the form HF's MoE experts call it (torch's grouped_mm: rows [T, K] sorted by expert,
    experts [E, K, N], cumulative ends `offs`, no bias, the rows' dtype out) is braze::grouped_mm."""
    args = op_args(node)
    x, w = val(args["self"]), val(args["mat2"])
    return (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dim() == 2 and w.dim() == 3
            and isinstance(args["offs"], fx.Node) and args["bias"] is None
            and args["out_dtype"] in (None, x.dtype) and x.dtype == w.dtype)


def _split_to_slices(node: fx.Node) -> bool:
    """split / split_with_sizes whose pieces are read by getitem -> one slice per piece (free index remaps for the
    fused kernels, where the split itself had no lowering): fused QKV and gate/up projections, chunk(2)."""
    args = op_args(node)
    x = args["self"]
    xv = val(x)
    if not isinstance(xv, torch.Tensor):
        return False
    dim = args["dim"] % xv.dim()
    length = xv.shape[dim]
    if not isinstance(length, int):
        return False
    if node.target is aten.split.Tensor:
        size = args["split_size"]
        if not isinstance(size, int) or size <= 0:
            return False
        sizes = [min(size, length - s) for s in range(0, length, size)]
    else:
        sizes = list(args["split_sizes"])
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


def _index_select_rows(node: fx.Node) -> bool:
    """index_select(x, 0, ids) with 1-D ids (XGLM's sinusoidal table by position): x[ids]."""
    return node.target is aten.index_select.default and len(node.args) == 3 and node.args[1] in (0, -val(node).dim()) \
        and isinstance(node.args[2], fx.Node) and val(node.args[2]).dim() == 1


def _as_index(node: fx.Node, ctx: PassContext) -> fx.Node:
    """An index_select over rows as the equal x[ids] (aten.index), which the rewrites below take."""
    if node.target is aten.index.Tensor:
        return node
    x, _, ids = node.args
    index = new_node(node.graph.owning_module, aten.index.Tensor, (x, [ids]), {}, ctx, node)
    node.replace_all_uses_with(index)
    node.graph.erase_node(node)
    return index


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


# ops whose output holds only values of their first input (views, copies, sub-tensors): a bound carries over
_SAME_VALUES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.clone.default,
                aten.alias.default, aten.flatten.using_ints, aten.contiguous.default, aten.permute.default,
                aten.transpose.int, aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim,
                aten.squeeze.dims, aten.expand.default)


def index_bound(node: Any) -> Any:
    """An exclusive upper bound (int or SymInt) of an integer tensor's values when they provably lie in [0, bound),
    else None: sort / topk indices along a dim of size n (n), sorted values (their input's bound), views, and a
    floor / trunc division by a positive int (MoE routing: `perm // top_k` indexes the tokens)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    t, args = node.target, node.args
    if t is operator.getitem and isinstance(args[0], fx.Node) and args[0].op == "call_function":
        src, which = args[0], args[1]
        if src.target is aten.sort.default:
            sort = op_args(src)
            return val(sort["self"]).shape[sort["dim"]] if which == 1 else index_bound(sort["self"])
        if src.target is aten.topk.default and which == 1:
            topk = op_args(src)
            return val(topk["self"]).shape[topk["dim"]]
        return None
    if t is aten.select.int and isinstance(args[0], fx.Node) and args[0].target is torch.ops.braze.moe_sort.default:
        return val(args[0].args[0]).shape[0]  # a permutation of the pairs, or its inverse
    if t is aten._to_copy.default and is_op(args[0], aten.select.int) and \
            is_op(args[0].args[0], torch.ops.braze.topk_packed.default) and tuple(args[0].args[1:]) == (0, 1):
        return val(args[0].args[0].args[0]).shape[-1]  # top-k indices, read back from the packed op
    if t in _SAME_VALUES:
        return index_bound(args[0])
    quotient = floor_div_by_int(node)
    if quotient is not None:
        bound = index_bound(quotient[0])
        return None if bound is None else (bound + quotient[1] - 1) // quotient[1]
    return None


def floor_div_by_int(node: Any) -> tuple[fx.Node, int] | None:
    """(x, d) when `node` is x // d (torch.div, floor or trunc rounding) by a positive int d: the same integer
    division for the non-negative indices index_bound covers."""
    if not is_op(node, aten.div.Tensor_mode, aten.div.Scalar_mode):
        return None
    args = op_args(node)
    divisor = args["other"]
    if args["rounding_mode"] not in ("floor", "trunc") or not isinstance(divisor, int) or \
            isinstance(divisor, bool) or divisor <= 0:
        return None
    return args["self"], divisor


def _router_softmax(x: fx.Node) -> fx.Node | None:
    """The logits when `x` is an fp32 softmax over the last dim read only by the top-k (an MoE router's
    `softmax(logits, dim=-1, dtype=float)`): the top-k kernel computes it over the row it holds anyway."""
    if not is_op(x, aten._softmax.default, aten.softmax.int) or len(x.users) != 1 or val(x).dtype != torch.float32:
        return None
    args = op_args(x)
    logits = args["self"]
    lv = val(logits)
    if not isinstance(lv, torch.Tensor) or not lv.is_floating_point() or args["dim"] not in (-1, lv.dim() - 1):
        return None
    if is_op(logits, aten._to_copy.default) and len(logits.users) == 1 and set(logits.kwargs) <= {"dtype"} and \
            isinstance(val(logits.args[0]), torch.Tensor) and val(logits.args[0]).is_floating_point():
        logits = logits.args[0]  # the upcast: the kernel computes in fp32 whatever it loads
    return logits


def _renormalized(values: fx.Node) -> fx.Node | None:
    """The `values / values.sum(-1, keepdim=True)` node when that is all that reads the top-k values (HF's
    norm_topk_prob): the top-k kernel divides them by their sum itself."""
    users = list(values.users)
    total = next((u for u in users if is_op(u, aten.sum.dim_IntList)), None)
    div = next((u for u in users if is_op(u, aten.div.Tensor)), None)
    if len(users) != 2 or total is None or div is None or list(total.users) != [div] or \
            tuple(div.args[:2]) != (values, total) or div.kwargs:
        return None
    args = op_args(total)
    if list(args["dim"] or []) not in ([-1], [val(values).dim() - 1]) or not args["keepdim"] or args["dtype"]:
        return None
    return div


def _topk_to_packed(node: fx.Node, ctx: PassContext) -> bool:
    """topk(x, k) over the last dim (largest, sorted) of a float tensor -> braze::topk_packed, its values and
    indices read back through casts (kernels/topk.py takes it; an MoE router's top-k was an eager step). The
    router's softmax before it and renormalization after it go into the same op (one launch for the router)."""
    from braze.kernels.topk import MAX_TOPK, MAX_TOPK_DIM

    args = op_args(node)
    x, k = args["self"], args["k"]
    xv = val(x)
    # sorted=False leaves the order to the implementation: the kernel's (descending) is one (DeepSeek-V3 / GLM-4.5
    # routers ask for it)
    if not isinstance(xv, torch.Tensor) or not xv.is_floating_point() or xv.dim() == 0 or \
            args["dim"] not in (-1, xv.dim() - 1) or not args["largest"] or \
            any(u.target is not operator.getitem for u in node.users):
        return False
    width = xv.shape[-1]
    if not (isinstance(width, int) and width <= MAX_TOPK_DIM and isinstance(k, int) and 1 <= k <= min(MAX_TOPK, width)):
        return False
    gm = node.graph.owning_module
    logits = _router_softmax(x)
    packed = new_node(gm, torch.ops.braze.topk_packed.default, (logits or x, k, logits is not None), {}, ctx, node)
    renorm = None
    for user in list(node.users):
        which = user.args[1]
        half = new_node(gm, aten.select.int, (packed, 0, which), {}, ctx, user)
        dtype = val(user).dtype
        if which == 0 and dtype == torch.float32:
            renorm = _renormalized(user)
        user.replace_all_uses_with(half if dtype == torch.float32 else
                                   new_node(gm, aten._to_copy.default, (half,), {"dtype": dtype}, ctx, user))
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if logits is not None:
        _erase_dead_from(x)
    if renorm is not None:
        packed.args = (*packed.args, True)
        values = renorm.args[0]
        renorm.replace_all_uses_with(values)
        _erase_dead_from(renorm)
    folded = [name for name, on in (("softmax", logits is not None), ("renormalization", renorm is not None)) if on]
    if folded:
        ctx.note(f"{node.name}: MoE router's {' and '.join(folded)} in the top-k kernel")
    return True


def _users(node: fx.Node, *targets: Any) -> list[fx.Node]:
    return [u for u in node.users if u.target in targets]


def _expert_offsets(values: fx.Node) -> list[tuple[fx.Node, int]]:
    """(cumsum node, E) for each `cumsum(histc(values[.to(...)], bins=E, min=0, max=E-1), 0)` over sorted ids."""
    found = []
    for cast in [values, *_users(values, aten._to_copy.default)]:
        for histc in _users(cast, aten.histc.default):
            args = op_args(histc)
            bins, lo, hi = args["bins"], args["min"], args["max"]
            if not (isinstance(bins, int) and lo == 0 and hi == bins - 1):
                continue
            for cumsum in _users(histc, aten.cumsum.default):
                cumsum_args = op_args(cumsum)
                if cumsum_args["dim"] in (0, -1) and cumsum_args["dtype"] in (torch.int32, torch.int64):
                    found.append((cumsum, bins))
    return found


def _is_inverse_of(index_put: fx.Node, perm: fx.Node) -> bool:
    """index_put(empty([S]), [perm], arange(S)): HF's `inv_perm[perm] = arange(S)`."""
    args = op_args(index_put)
    target, indices, values = args["self"], args["indices"], args["values"]
    if args["accumulate"] or list(indices) != [perm] or not isinstance(target, fx.Node) or \
            not isinstance(values, fx.Node):
        return False
    if target.target not in (aten.empty_permuted.default, aten.empty.memory_format) or len(target.users) != 1:
        return False
    if values.target not in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        return False
    arange = op_args(values)
    return arange.get("start", 0) == 0 and arange.get("step", 1) == 1


def _packed_topk_indices(ids: fx.Node, ctx: PassContext, before: fx.Node) -> fx.Node | None:
    """ids = reshape(int cast of the top-k indices' fp32 half of braze::topk_packed, [-1]): that half flattened,
    which the routing kernels read as it is (exact integers), so the cast is not materialized for them."""
    cast = ids.args[0] if is_op(ids, aten.reshape.default, aten.view.default) else None
    half = cast.args[0] if is_op(cast, aten._to_copy.default) else None
    if not (is_op(half, aten.select.int) and is_op(half.args[0], torch.ops.braze.topk_packed.default)
            and tuple(half.args[1:]) == (0, 1)):
        return None
    return new_node(ids.graph.owning_module, aten.reshape.default, (half, [-1]), {}, ctx, before)


def _moe_routing(node: fx.Node, ctx: PassContext) -> bool:
    """HF's grouped-experts routing (integrations/moe.py) -> braze::moe_sort + braze::moe_offsets (kernels:
    kernels/moe_routing.py): `sort(expert_ids)` becomes a stable sort permutation, the inverse permutation built
    with index_put a row of the same op, and `cumsum(histc(sorted ids))` the offsets op; the sorted values, where
    something else reads them, a gather of the ids by the permutation."""
    args = op_args(node)
    ids = args["self"]
    iv = val(ids)
    if not isinstance(iv, torch.Tensor) or iv.dim() != 1 or iv.dtype not in (torch.int32, torch.int64) or \
            args["dim"] not in (0, -1) or args["descending"] or \
            any(u.target is not operator.getitem for u in node.users):
        return False
    getters = {u.args[1]: u for u in node.users}
    values, perm = getters.get(0), getters.get(1)
    offsets = _expert_offsets(values) if values is not None else []
    inverses = [u for u in _users(perm, aten.index_put.default) if _is_inverse_of(u, perm)] if perm else []
    if not offsets and not inverses:
        return False
    gm = node.graph.owning_module
    ids_in = _packed_topk_indices(ids, ctx, node) or ids
    sorted_pairs = new_node(gm, torch.ops.braze.moe_sort.default, (ids_in,), {}, ctx, node)
    new_perm = new_node(gm, aten.select.int, (sorted_pairs, 0, 0), {}, ctx, node)
    for cumsum, experts in offsets:
        offs = new_node(gm, torch.ops.braze.moe_offsets.default, (ids_in, experts), {}, ctx, cumsum)
        if val(cumsum).dtype != torch.int32:
            offs = new_node(gm, aten._to_copy.default, (offs,), {"dtype": val(cumsum).dtype}, ctx, cumsum)
        cumsum.replace_all_uses_with(offs)
    for index_put in inverses:
        index_put.replace_all_uses_with(new_node(gm, aten.select.int, (sorted_pairs, 0, 1), {}, ctx, index_put))
    if perm is not None:
        perm.replace_all_uses_with(new_perm)
    for old, _ in offsets:  # the histc / cumsum chains and the index_puts with their empty / arange
        _erase_dead_from(old)
    for old in inverses:
        _erase_dead_from(old)
    if values is not None and values.users:  # e.g. a per-row expert bias gathered by the sorted ids
        table = new_node(gm, aten.reshape.default, (ids, [-1, 1]), {}, ctx, values)
        gathered = new_node(gm, aten.embedding.default, (table, new_perm), {}, ctx, values)
        values.replace_all_uses_with(new_node(gm, aten.reshape.default, (gathered, [-1]), {}, ctx, values))
    for old in (values, perm):
        if old is not None:
            _erase_dead_from(old)  # then the sort, once neither of its outputs is read
    _erase_dead_from(new_perm)  # (when nothing reads the permutation itself, only the offsets were wanted)
    ctx.note(f"{node.name}: MoE routing -> braze::moe_sort{' + braze::moe_offsets' if offsets else ''}")
    return True


def _in_bounds(index: fx.Node, size: Any) -> bool:
    """Whether index's values provably lie in [0, size) (index_bound)."""
    bound = index_bound(index)
    return bound is not None and statically_known_true(bound <= size)


def _bounded_gather_to_embedding(node: fx.Node, ctx: PassContext) -> bool:
    """x[idx] over dim 0 of a 1-D or 2-D tensor, idx provably within x's rows (index_bound) -> embedding(x, idx),
    a gather the fused kernels lower (the generated gathers do not bound-check, hence the proof). MoE routing's
    `hidden[perm // top_k]` and `weights[perm]` then fuse instead of running eagerly."""
    x, indices = node.args[0], node.args[1]
    if len(indices) != 1 or not isinstance(indices[0], fx.Node) or not isinstance(x, fx.Node):
        return False
    xv, iv = val(x), val(indices[0])
    if not isinstance(xv, torch.Tensor) or not isinstance(iv, torch.Tensor) or \
            iv.dtype not in (torch.int64, torch.int32) or xv.dim() not in (1, 2) or (xv.dim() == 1 and iv.dim() != 1):
        return False
    if not _in_bounds(indices[0], xv.shape[0]):
        return False
    gm = node.graph.owning_module
    table = x if xv.dim() == 2 else new_node(gm, aten.reshape.default, (x, [-1, 1]), {}, ctx, node)
    out = new_node(gm, aten.embedding.default, (table, indices[0]), {}, ctx, node)
    if xv.dim() == 1:
        out = new_node(gm, aten.reshape.default, (out, [-1]), {}, ctx, node)
    node.replace_all_uses_with(out)
    node.graph.erase_node(node)
    return True


def _constant_index_bound(node: Any, ctx: PassContext) -> int | None:
    """max + 1 of an integer weight (a constant buffer, e.g. BERT's position_ids) read through views, when its
    values are non-negative, else None."""
    while is_op(node, *_SAME_VALUES):
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "placeholder" or node.name not in ctx.weights:
        return None
    w = ctx.weights[node.name]
    if w.is_floating_point() or w.is_complex() or w.numel() == 0 or int(w.min()) < 0:
        return None
    return int(w.max()) + 1


def _mark_bounded_gather(node: fx.Node, ctx: PassContext) -> bool:
    """torch.gather(x, dim, index) with index provably in [0, x.shape[dim]) (a router's top-k indices, a constant
    index buffer): marked for the fused kernels' indirect load (codegen/fused.py), which does not bound-check."""
    args = op_args(node)
    xv = val(args["self"])
    if not isinstance(xv, torch.Tensor) or not isinstance(args["index"], fx.Node):
        return False
    size = xv.shape[args["dim"] % xv.dim()]
    constant = _constant_index_bound(args["index"], ctx)
    if not (_in_bounds(args["index"], size) or (constant is not None and isinstance(size, int) and constant <= size)):
        return False
    node.meta["braze_in_bounds"] = True
    return True


_CONSTANT_FILLS = (aten.full_like.default, aten.zeros_like.default, aten.full.default, aten.zeros.default)


def _scatter_value_to_mask(node: fx.Node, ctx: PassContext) -> bool:
    """x.scatter(-1, index, v) over a last dim of G with index provably in [0, G) -> where(amax_j(index[..., j]
    == g), v, x): a comparison, a reduction and a select the fused kernels lower (scatter has no lowering); into a
    constant fill c, c + (v - c) * that mask. DeepSeek-V3 / GLM-4.5 routers build their group mask this way,
    PhiMoE's sparsemixer masks out its first pick."""
    args = op_args(node)
    base, index, value = args["self"], args["index"], args["value"]
    bv, iv = val(base), val(index)
    if not (isinstance(bv, torch.Tensor) and isinstance(iv, torch.Tensor)
            and bv.dim() == iv.dim() >= 1 and args["dim"] % bv.dim() == bv.dim() - 1
            and isinstance(value, (int, float)) and not isinstance(value, bool)
            and tuple(iv.shape[:-1]) == tuple(bv.shape[:-1]) and _in_bounds(index, bv.shape[-1])):
        return False
    fill = op_args(base).get("fill_value", 0) if is_op(base, *_CONSTANT_FILLS) else None
    if isinstance(fill, bool) or not isinstance(fill, (int, float, type(None))):
        return False
    gm, width = node.graph.owning_module, bv.shape[-1]
    slots = new_node(gm, aten.arange.default, (width,), {"dtype": iv.dtype, "device": iv.device}, ctx, node)
    slots = new_node(gm, aten.unsqueeze.default, (slots, -1), {}, ctx, node)  # [G, 1]
    picks = new_node(gm, aten.unsqueeze.default, (index, -2), {}, ctx, node)  # [..., 1, k]
    hit = new_node(gm, aten.eq.Tensor, (picks, slots), {}, ctx, node)  # [..., G, k]
    hit = new_node(gm, aten._to_copy.default, (hit,), {"dtype": torch.float32}, ctx, node)
    mask = new_node(gm, aten.amax.default, (hit, [-1]), {}, ctx, node)  # [..., G]: 1 where some j picked g
    if fill is None:
        picked = new_node(gm, aten.gt.Scalar, (mask, 0.5), {}, ctx, node)
        out = new_node(gm, aten.masked_fill.Scalar, (base, picked, value), {}, ctx, node)
    else:
        out = new_node(gm, aten.mul.Tensor, (mask, float(value) - float(fill)), {}, ctx, node)
        out = new_node(gm, aten.add.Tensor, (out, float(fill)), {}, ctx, node)
        if bv.dtype != torch.float32:
            out = new_node(gm, aten._to_copy.default, (out,), {"dtype": bv.dtype}, ctx, node)
    node.replace_all_uses_with(out)
    _erase_dead_from(node)
    ctx.note(f"{node.name}: scatter of a constant -> a comparison mask (fused)")
    return True


def _distinct_indices(index: fx.Node) -> bool:
    """Whether index's values are distinct along its last dim: a top-k's indices (HF's topk or braze::topk_packed's
    index half read back)."""
    if is_op(index, operator.getitem) and is_op(index.args[0], aten.topk.default) and index.args[1] == 1:
        topk = op_args(index.args[0])
        return topk["dim"] % val(topk["self"]).dim() == val(topk["self"]).dim() - 1
    return is_op(index, aten._to_copy.default) and is_op(index.args[0], aten.select.int) \
        and is_op(index.args[0].args[0], torch.ops.braze.topk_packed.default) \
        and tuple(index.args[0].args[1:]) == (0, 1)


def _scatter_src_to_select(node: fx.Node, ctx: PassContext) -> bool:
    """base.scatter(-1, index, src) with a top-k's index (distinct, in [0, G)) -> for each slot g the src entry
    whose index is g, else base: sum_j where(index[..., j] == g, src[..., j], 0) (one term at most: exact) and a
    select by amax_j of the same comparisons. Llama 4's router scatters its top-k logits into a -inf fill this
    way."""
    args = op_args(node)
    base, index, src = args["self"], args["index"], args["src"]
    bv, iv = val(base), val(index)
    if not (isinstance(bv, torch.Tensor) and isinstance(iv, torch.Tensor) and isinstance(val(src), torch.Tensor)
            and bv.dim() == iv.dim() >= 1 and args["dim"] % bv.dim() == bv.dim() - 1
            and tuple(val(src).shape) == tuple(iv.shape) and val(src).dtype == bv.dtype
            and tuple(iv.shape[:-1]) == tuple(bv.shape[:-1]) and _in_bounds(index, bv.shape[-1])
            and _distinct_indices(index)):
        return False
    gm, width = node.graph.owning_module, bv.shape[-1]
    if not isinstance(width, int):
        return False

    def op(target, *a, **kw):
        return new_node(gm, target, a, kw, ctx, node)

    slots = op(aten.unsqueeze.default, op(aten.arange.default, width, dtype=iv.dtype, device=iv.device), -1)
    eq = op(aten.eq.Tensor, op(aten.unsqueeze.default, index, -2), slots)  # [..., G, k]
    zero = op(aten.scalar_tensor.default, 0, dtype=bv.dtype, device=bv.device)
    # the one src entry whose index is g (a select, not a product: exact for inf, nan and integers too)
    picked = op(aten.sum.dim_IntList, op(aten.where.self, eq, op(aten.unsqueeze.default, src, -2), zero), [-1])
    hit = op(aten._to_copy.default, eq, dtype=torch.float32)
    missed = op(aten.lt.Scalar, op(aten.amax.default, hit, [-1]), 0.5)  # [..., G]: no j picked g
    fill = op_args(base).get("fill_value", 0) if is_op(base, *_CONSTANT_FILLS) else None
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        out = op(aten.masked_fill.Scalar, picked, missed, fill)
    else:
        out = op(aten.where.self, missed, base, picked)
    node.replace_all_uses_with(out)
    _erase_dead_from(node)
    ctx.note(f"{node.name}: scatter of top-k values -> a comparison select (fused)")
    return True


def _repeat_as_broadcast(node: fx.Node, ctx: PassContext) -> bool:
    """x.repeat(r0, r1, ...) -> a new axis of size r_i before each repeated dim i, broadcast, merged back into dim i:
    a view the fused kernels read (repeat has no lowering). Llama 4 feeds every expert every token this way
    (repeat(E, 1)); DiffLlama doubles its value heads (repeat(1, 2, 1, 1)). Dynamic dims may be repeated (at most
    one: its merged size is the reshape's -1) or kept (their size read with sym_size)."""
    args = op_args(node)
    x, reps = args["self"], list(args["repeats"])
    xv = val(x)
    lead = len(reps) - (xv.dim() if isinstance(xv, torch.Tensor) else len(reps) + 1)
    if not isinstance(xv, torch.Tensor) or lead < 0 or any(not isinstance(r, int) or r < 1 for r in reps):
        return False
    sizes = [1] * lead + list(xv.shape)
    repeated = [i for i, r in enumerate(reps) if r != 1]
    if sum(not isinstance(sizes[i], int) for i in repeated) > 1:
        return False
    gm = node.graph.owning_module

    def op(target, *a):
        return new_node(gm, target, a, {}, ctx, node)

    out = x
    for _ in range(lead):
        out = op(aten.unsqueeze.default, out, 0)
    for i in reversed(repeated):
        out = op(aten.unsqueeze.default, out, i)
    out = op(aten.expand.default, out, [n for i, r in enumerate(reps) for n in ((r, -1) if r != 1 else (-1,))])
    final = [(r * s if isinstance(s, int) else -1) if r != 1 else (s if isinstance(s, int) else
             op(aten.sym_size.int, x, i - lead)) for i, (r, s) in enumerate(zip(reps, sizes))]
    out = op(aten.reshape.default, out, final)
    node.replace_all_uses_with(out)
    node.graph.erase_node(node)
    return True


def _copy_as_value(node: fx.Node, ctx: PassContext) -> bool:
    """copy(dst, src) (functionalized copy_: a new tensor of dst's shape and dtype holding src) with src already of
    dst's shape -> src (cast when the dtypes differ): nothing of dst is read."""
    dst, src = node.args[0], node.args[1]
    dv, sv = val(dst), val(src)
    if not (isinstance(dv, torch.Tensor) and isinstance(sv, torch.Tensor)) or dv.device != sv.device \
            or [str(d) for d in dv.shape] != [str(d) for d in sv.shape]:
        return False
    out = src if sv.dtype == dv.dtype else new_node(node.graph.owning_module, aten._to_copy.default, (src,),
                                                    {"dtype": dv.dtype}, ctx, node)
    node.replace_all_uses_with(out)
    return True


def _pieces_along(x: fx.Node, dim: int, lo: int, hi: int, ctx: PassContext, anchor: fx.Node) -> list[fx.Node]:
    """x[lo:hi] along dim as cat pieces: the pieces of a cat along dim when [lo, hi) covers whole ones, else one
    slice (none when empty)."""
    if lo >= hi:
        return []
    if is_op(x, aten.cat.default) and x.args[1] % val(x).dim() == dim:
        bounds, at = [], 0
        for p in x.args[0]:
            size = val(p).shape[dim]
            if not isinstance(size, int):
                break
            bounds.append((at, at + size, p))
            at += size
        else:
            inside = [p for a, b, p in bounds if lo <= a and b <= hi]
            if sum(val(p).shape[dim] for p in inside) == hi - lo:
                return inside
    return [new_node(x.graph.owning_module, aten.slice.Tensor, (x, dim, lo, hi), {}, ctx, anchor)]


def _slice_scatter_as_cat(node: fx.Node, ctx: PassContext) -> bool:
    """slice_scatter(base, src, dim, start, end) -> cat([base[:start], src, base[end:]], dim) (static bounds):
    what slice assignment into a fresh tensor becomes (DeepSeek / MiniCPM3's MLA keys: new_empty, then
    k[..., :nope].copy_(k_nope) and k[..., nope:].copy_(k_rot)). Chained, the pieces of the previous cat are
    reused, so the empty base is read by nothing."""
    args = op_args(node)
    base, src, dim, start, end, step = (args["self"], args["src"], args["dim"], args["start"], args["end"],
                                        args["step"])
    bv = val(base)
    dim = dim % bv.dim()
    length = bv.shape[dim]
    whole = start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2 ** 62))
    if step == 1 and whole and [str(d) for d in val(src).shape] == [str(d) for d in bv.shape]:
        node.replace_all_uses_with(src)  # x[:] = src along a dim (of any size): src
        return True
    if not isinstance(length, int) or step != 1 or not isinstance(start, (int, type(None))) \
            or not isinstance(end, (int, type(None))):
        return False
    start, end = (min(max(i + length if i < 0 else i, 0), length) for i in (start or 0, length if end is None else end))
    if val(src).shape[dim] != end - start:
        return False
    pieces = [*_pieces_along(base, dim, 0, start, ctx, node), src, *_pieces_along(base, dim, end, length, ctx, node)]
    out = pieces[0] if len(pieces) == 1 else new_node(node.graph.owning_module, aten.cat.default, (pieces, dim), {},
                                                      ctx, node)
    node.replace_all_uses_with(out)
    return True


def _bmm_by_expert_weights(node: fx.Node, ctx: PassContext) -> bool:
    """bmm(x [E, T, K], w [E, K, N]) with w a weight (Llama 4's experts, every token through every expert) ->
    braze::grouped_mm over x's E * T rows, expert e taking rows [e * T, (e + 1) * T): the grouped matmul kernel."""
    x, w = node.args[0], node.args[1]
    xv, wv = val(x), val(w)
    if not (isinstance(w, fx.Node) and w.op == "placeholder" and w.name in ctx.weights and wv.dim() == 3
            and isinstance(xv, torch.Tensor) and xv.dim() == 3 and xv.dtype == wv.dtype
            and isinstance(xv.shape[0], int) and xv.shape[0] == wv.shape[0]
            and isinstance(xv.shape[2], int) and isinstance(wv.shape[2], int)):
        return False
    gm = node.graph.owning_module

    def op(target, *a, **kw):
        return new_node(gm, target, a, kw, ctx, node)

    experts, k = xv.shape[0], xv.shape[2]
    rows = op(aten.sym_size.int, x, 1) if not isinstance(xv.shape[1], int) else xv.shape[1]
    ends = op(aten.mul.Tensor, op(aten.arange.start, 1, experts + 1, dtype=torch.int32, device=xv.device), rows)
    flat = op(aten.reshape.default, x, [-1, k])
    out = op(aten.reshape.default, op(torch.ops.braze.grouped_mm.default, flat, w, ends), [experts, -1, wv.shape[2]])
    node.replace_all_uses_with(out)
    node.graph.erase_node(node)
    ctx.note(f"{node.name}: bmm over expert weights -> braze::grouped_mm (MoE experts)")
    return True


def _clamp_by_tensors(node: fx.Node, ctx: PassContext) -> bool:
    """clamp(x, min=t, max=u) with tensor bounds -> minimum(maximum(x, t), u): elementwise ops the fused kernels
    lower (PhiMoE's sparsemixer clamps by the row maximum)."""
    args = op_args(node)
    out, gm = args["self"], node.graph.owning_module
    for bound, op in ((args["min"], aten.maximum.default), (args["max"], aten.minimum.default)):
        if bound is not None:
            out = new_node(gm, op, (out, bound), {}, ctx, node)
    if val(out).dtype != val(node).dtype or tuple(val(out).shape) != tuple(val(node).shape):
        _erase_dead_from(out)
        return False
    node.replace_all_uses_with(out)
    _erase_dead_from(node)
    return True


def _max_dim_to_topk(node: fx.Node, ctx: PassContext) -> bool:
    """max(x, dim=-1) whose indices are read -> braze::topk_packed(x, 1) (its kernel; the first maximal index, as
    torch returns), values and indices read back as topk's are; only the values read: amax, a fused reduction."""
    from braze.kernels.topk import MAX_TOPK_DIM

    args = op_args(node)
    x, keepdim = args["self"], args["keepdim"]
    xv = val(x)
    if not (isinstance(xv, torch.Tensor) and xv.is_floating_point() and xv.dim() >= 1
            and args["dim"] in (-1, xv.dim() - 1) and isinstance(xv.shape[-1], int)
            and xv.shape[-1] <= MAX_TOPK_DIM and all(u.target is operator.getitem for u in node.users)):
        return False
    gm = node.graph.owning_module
    wants_indices = any(u.args[1] == 1 for u in node.users)
    packed = new_node(gm, torch.ops.braze.topk_packed.default, (x, 1), {}, ctx, node) if wants_indices else None
    for user in list(node.users):
        which = user.args[1]
        if packed is None:
            out = new_node(gm, aten.amax.default, (x, [-1], keepdim), {}, ctx, user)
        else:
            out = new_node(gm, aten.select.int, (packed, 0, which), {}, ctx, user)
            dtype = val(user).dtype
            if dtype != torch.float32:
                out = new_node(gm, aten._to_copy.default, (out,), {"dtype": dtype}, ctx, user)
            if not keepdim:
                out = new_node(gm, aten.squeeze.dim, (out, -1), {}, ctx, user)
        user.replace_all_uses_with(out)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return True


def _max_pool_values(node: fx.Node, ctx: PassContext) -> bool:
    """max_pool2d_with_indices whose indices nobody reads (nn.MaxPool2d in eval: export's form of max_pool2d) ->
    aten.max_pool2d, the values alone, which the fused kernels take (codegen/fused.py: _pool)."""
    if not all(u.target is operator.getitem and u.args[1] == 0 for u in node.users):
        return False
    gm = node.graph.owning_module
    args = op_args(node)
    values = new_node(gm, aten.max_pool2d.default, (args["self"], args["kernel_size"], args["stride"],
                                                   args["padding"], args["dilation"], args["ceil_mode"]), {}, ctx,
                      node)
    for user in list(node.users):
        user.replace_all_uses_with(values)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return True


def _trivial_slice_or_cat(node: fx.Node) -> bool:
    """x[..., 0:len] -> x; cat([..., empty, ...]) drops the empty pieces (Phi-3's partial-rotary code at factor 1.0
    slices the whole head and concatenates an empty pass-through part)."""
    args = op_args(node)
    if node.target is aten.slice.Tensor:
        x, dim, start, end, step = args["self"], args["dim"], args["start"], args["end"], args["step"]
        xv = val(x)
        if not isinstance(xv, torch.Tensor) or step != 1 or start not in (None, 0):
            return False
        length = xv.shape[dim % xv.dim()]
        if end is None or (isinstance(length, int) and isinstance(end, int) and end >= length):
            node.replace_all_uses_with(x)
            return True
        return False
    pieces, dim = args["tensors"], args["dim"]
    kept = [p for p in pieces if not (isinstance(val(p), torch.Tensor) and val(p).dim() > 0
                                      and statically_known_true(val(p).shape[dim % val(p).dim()] == 0))]
    if len(kept) == len(pieces) or not kept:
        return False
    if len(kept) == 1:
        node.replace_all_uses_with(kept[0])
    else:
        node.args, node.kwargs = (kept, dim), {}
    return True


REDUCTIONS = (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default)


def reduce_over_last_dim(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> bool:
    """A sum / mean / amax / amin over several dims, over all of them, or over one that is not the last becomes one
    last-dim reduction of a view (kept dims first, the reduced ones merged last): the fused family lowers last-dim
    reductions, and views are free index remaps there (pooling means over H and W, x.sum() of a check, softmax
    statistics over a channel dim ran eagerly before)."""
    args = op_args(node)
    x = args["self"]
    xv = val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() == 0 or any(s == 0 for s in xv.shape):
        return False
    rank = xv.dim()
    dims, keepdim = args["dim"], args["keepdim"]
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


def _arg_reduce_over_last_dim(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> bool:
    """argmax / argmin over a dim that is not the last, or over the flattened tensor (dim=None), becomes one over
    the last dim of a view (the dim moved last, or the tensor flattened): an index along a dim does not change when
    the dim moves, and the fused family lowers last-dim arg-reductions."""
    args = op_args(node)
    x, dim, keepdim = args["self"], args["dim"], args["keepdim"]
    xv = val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() <= 1 or any(s == 0 for s in xv.shape):
        return False
    rank = xv.dim()
    if dim is not None and dim % rank == rank - 1:
        return False
    if dim is None:
        src = new_node(gm, aten.reshape.default, (x, [-1]), None, ctx, node)
    else:
        order = [d for d in range(rank) if d != dim % rank] + [dim % rank]
        src = new_node(gm, aten.permute.default, (x, order), None, ctx, node)
    out = new_node(gm, node.target, (src, -1, False), None, ctx, node)
    if keepdim:
        shape = [1] * rank if dim is None else [1 if d == dim % rank else val(node).shape[d] for d in range(rank)]
        out = new_node(gm, aten.reshape.default, (out, shape), None, ctx, node)
    node.replace_all_uses_with(out)
    return True


def _tensor_slot(op: torch._ops.OpOverload, i: int) -> bool:
    args = op._schema.arguments
    kind = args[i].type if i < len(args) else None
    if isinstance(kind, torch.OptionalType):
        kind = kind.getElementType()
    return isinstance(kind, torch.TensorType)


def _item_as_tensor_operand(node: fx.Node, ctx: PassContext) -> bool:
    """`x * t.item()` -> `x * t` for a 0-d tensor t in a Tensor slot of its users (torch.compile hands a Python
    float argument over as a 0-d tensor read with .item()): the scalar becomes an operand the fused kernel loads,
    not an unbacked symbol no kernel can take. t is cast to fp32 / int64 first, the precision torch computes a
    Python scalar in, and a 0-d operand never changes the result dtype of a dimensioned one."""
    t = node.args[0]
    tv = val(t)
    if not isinstance(tv, torch.Tensor) or tv.dim() != 0:
        return False
    slots = []
    for u in list(node.users):
        if u.op != "call_function" or not isinstance(u.target, torch._ops.OpOverload):
            continue
        places = [i for i, a in enumerate(u.args) if a is node]
        target = u.target
        if not all(_tensor_slot(target, i) for i in places):  # gt.Scalar -> gt.Tensor, clamp -> clamp.Tensor
            tensor_form = getattr(target.overloadpacket, "Tensor", None)
            if tensor_form is None or not all(_tensor_slot(tensor_form, i) for i in places):
                continue
            u.target = tensor_form
        slots += [(u, i) for i in places]
    if not slots:
        return False
    dtype = torch.float32 if tv.dtype.is_floating_point else torch.bool if tv.dtype == torch.bool else torch.int64
    first = min((u for u, _ in slots), key=lambda u: list(node.graph.nodes).index(u))
    operand = t if tv.dtype == dtype else new_node(node.graph.owning_module, aten._to_copy.default, (t,),
                                                     {"dtype": dtype}, ctx, first)
    for u, i in slots:
        u.update_arg(i, operand)
    return True


def normalize(gm: fx.GraphModule, ctx: PassContext) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node, "_erased", False):
            continue
        if node.target is aten.sort.default:
            count += _moe_routing(node, ctx)
        elif node.target is aten.topk.default:
            count += _topk_to_packed(node, ctx)
        elif node.target in (aten.split.Tensor, aten.split_with_sizes.default):
            count += _split_to_slices(node)
        elif node.target is aten.index.Tensor or _index_select_rows(node):
            node = _as_index(node, ctx)
            count += (_constant_index_to_slice(node, ctx) or _table_lookup_to_embedding(node, ctx)
                      or _bounded_gather_to_embedding(node, ctx))
        elif node.target is aten.gather.default:
            _mark_bounded_gather(node, ctx)
        elif node.target in (aten._local_scalar_dense.default, aten.item.default):
            count += _item_as_tensor_operand(node, ctx)
        elif node.target is aten.scatter.value:
            count += _scatter_value_to_mask(node, ctx)
        elif node.target is aten.scatter.src:
            count += _scatter_src_to_select(node, ctx)
        elif node.target is aten.repeat.default:
            count += _repeat_as_broadcast(node, ctx)
        elif node.target is aten.bmm.default:
            count += _bmm_by_expert_weights(node, ctx)
        elif node.target is aten.copy.default:
            count += _copy_as_value(node, ctx)
        elif node.target is aten.slice_scatter.default:
            count += _slice_scatter_as_cat(node, ctx)
        elif node.target is aten.clamp.Tensor:
            count += _clamp_by_tensors(node, ctx)
        elif node.target is aten.max.dim:
            count += _max_dim_to_topk(node, ctx)
        elif node.target is aten.max_pool2d_with_indices.default:
            count += _max_pool_values(node, ctx)
        elif node.target in (aten.slice.Tensor, aten.cat.default):
            count += _trivial_slice_or_cat(node)
        elif node.target in REDUCTIONS:
            count += reduce_over_last_dim(gm, node, ctx)
        elif node.target in (aten.argmax.default, aten.argmin.default):
            count += _arg_reduce_over_last_dim(gm, node, ctx)
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
            args = op_args(node)
            node.target, node.args, node.kwargs = (torch.ops.braze.grouped_mm.default,
                                                   (args["self"], args["mat2"], args["offs"]), {})
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
