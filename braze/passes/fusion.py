"""Template-level fusions: rewrite braze ops into richer braze ops whose kernels do more per launch.

- merge_sibling_linears: linears reading the same input (Q/K/V) become one matmul over concatenated weights.
- fuse_norm_prologue: RMSNorm or LayerNorm feeding a linear moves into the matmul's prologue.
- fuse_linear_epilogue: activation (squared ReLU included) and residual add after a linear move into its epilogue
  (a scale by a power of two into its weights);
  a parallel layer's (attention + MLP) + x is summed as MLP + (attention + x), so both adds are epilogues.
- fuse_rope_into_attention: RoPE on q and k is applied by the attention kernel as it loads them.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from braze.codegen import pointwise_ops as P
from braze.ops.library import scales_in_fp32
from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, dce, graph_rewrite, is_op, new_node, single_user, val
from braze.passes.normalize import REDUCTIONS, reduce_over_last_dim

braze = torch.ops.braze
LINEARS = (braze.linear.default, braze.linear_glu.default)


def _replace(node: fx.Node, ctx: PassContext, before: fx.Node | None = None, **changes) -> fx.Node:
    """node's op with some arguments changed, inserted before `before` (default: node itself)."""
    a = op_args(node)
    a.update(changes)
    names = [arg.name for arg in node.target._schema.arguments]
    new = new_node(node.graph.owning_module, node.target, tuple(a[n] for n in names), {}, ctx, before or node)
    for key in ("stack_trace", "nn_module_stack"):  # the linear's provenance, wherever it is inserted
        if key in node.meta:
            new.meta[key] = node.meta[key]
    return new


def merge_sibling_linears(gm: fx.GraphModule, ctx: PassContext) -> int:
    groups: dict[tuple, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if not is_op(n, braze.linear.default):
            continue
        a = op_args(n)
        w = a["weight"]
        if a["residual"] is not None or w.op != "placeholder" or w.name not in ctx.weights:
            continue
        if a["bias"] is not None and (a["bias"].op != "placeholder" or a["bias"].name not in ctx.weights):
            continue
        key = (a["x"], a["norm_weight"], a["eps"], a["activation"], a["bias"] is not None, val(w).dtype)
        groups.setdefault(key, []).append(n)
    count = 0
    for (x, norm_w, eps, act, has_bias, _), nodes in groups.items():
        if len(nodes) < 2:
            continue
        weights = [ctx.weights[op_args(n)["weight"].name] for n in nodes]
        name = "merged_" + "_".join(op_args(n)["weight"].name.removeprefix("p_").split("_")[-2] for n in nodes)
        w_node = ctx.add_weight(gm, name[:60], torch.cat(weights, 0))
        w_node.meta["braze_sources"] = [op_args(n)["weight"].name for n in nodes]  # for per-source statistics
        b_node = None
        if has_bias:
            b_node = ctx.add_weight(gm, name[:56] + "_bias", torch.cat([ctx.weights[op_args(n)["bias"].name]
                                                                        for n in nodes], 0))
        first = min(nodes, key=lambda n: list(gm.graph.nodes).index(n))
        merged = new_node(gm, braze.linear.default, (x, w_node, b_node, norm_w, eps, act, None), {}, ctx, first)
        start = 0
        parts = []
        for w in weights:
            parts.append(new_node(gm, aten.slice.Tensor, (merged, -1, start, start + w.shape[0]), {}, ctx, first))
            start += w.shape[0]
        for n, part in zip(nodes, parts):
            n.replace_all_uses_with(part)
            gm.graph.erase_node(n)
        ctx.note(f"merged {', '.join(n.name for n in nodes)} -> {merged.name} (N={start})")
        count += 1
    dce(gm)
    return count


def _norm_prologue(node: fx.Node, ctx: PassContext):
    a = op_args(node)
    x = a["x"]
    if a["norm_weight"] is not None:
        return None
    if is_op(x, braze.rms_norm.default):
        src, w, eps = x.args[0], x.args[1], x.args[2]
        return _replace(node, ctx, x=src, norm_weight=w, eps=eps)
    if is_op(x, braze.layer_norm.default):
        src, w, b, eps = x.args
        return _replace(node, ctx, x=src, norm_weight=w, eps=eps, layer_norm=True, norm_bias=b)
    return None


def prologue_norm(gm: fx.GraphModule, lin: fx.Node, ctx: PassContext) -> fx.Node:
    """The norm a fused linear applies to its input, as its own op (braze::rms_norm or braze::layer_norm) inserted
    before the linear; the bare input when it has none. One place for every lowering that cannot fuse it."""
    a = op_args(lin)
    if a["norm_weight"] is None:
        return a["x"]
    if a.get("layer_norm"):
        return new_node(gm, braze.layer_norm.default, (a["x"], a["norm_weight"], a["norm_bias"], a["eps"]), {}, ctx,
                        lin)
    return new_node(gm, braze.rms_norm.default, (a["x"], a["norm_weight"], a["eps"]), {}, ctx, lin)


def split_norm_prologue(gm: fx.GraphModule, lin: fx.Node, ctx: PassContext) -> fx.Node:
    """A linear whose prologue is a LayerNorm -> braze::layer_norm -> the linear without it: for kernels that only
    take an RMSNorm prologue (int6, DFloat11); decompose_unfused lowers the norm to a fused reduction kernel."""
    a = op_args(lin)
    if not a.get("layer_norm"):
        return lin
    new = _replace(lin, ctx, x=prologue_norm(gm, lin, ctx), norm_weight=None, eps=0.0, layer_norm=False, norm_bias=None)
    lin.replace_all_uses_with(new)
    gm.graph.erase_node(lin)
    return new


def fuse_norm_prologue(gm: fx.GraphModule, ctx: PassContext) -> int:
    return graph_rewrite(gm, {t: _norm_prologue for t in LINEARS}, ctx)


ACTIVATION_OPS = {aten.silu.default: "silu", aten.relu.default: "relu"}


def _activation(node: fx.Node, ctx: PassContext):
    lin = node.args[0]
    if not is_op(lin, braze.linear.default) or not single_user(lin):
        return None
    a = op_args(lin)
    if a["activation"] != "none" or a["residual"] is not None:
        return None
    if node.target is aten.gelu.default:
        kind = "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    else:
        kind = ACTIVATION_OPS[node.target]
    return _replace(lin, ctx, activation=kind)


def _squared_relu(node: fx.Node, ctx: PassContext):
    """relu(linear)^2 (HF's relu2: torch.square after relu) -> the linear with a relu2 epilogue."""
    lin = node.args[0]
    if node.target is aten.pow.Tensor_Scalar and node.args[1] != 2:
        return None
    if node.target is aten.mul.Tensor and node.args[1] is not lin:
        return None
    if not is_op(lin, braze.linear.default) or len(lin.users) != 1:
        return None
    a = op_args(lin)
    if a["activation"] != "relu" or a["residual"] is not None:
        return None
    return _replace(lin, ctx, activation="relu2")


def _power_of_two_scale(node: fx.Node, ctx: PassContext):
    """linear(x, W, b) * c with c a power of two (OPT's query scaling, 1 / sqrt(head_dim) for head dims 64 and 256)
    -> linear(x, W * c, b * c): scaling by a power of two is exact in every float format, so the folded weights
    give the same bits and the multiply leaves the plan."""
    lin, c = node.args[0], node.args[1]
    if not isinstance(c, float) or c == 0.0 or math.frexp(c)[0] != 0.5 or not is_op(lin, braze.linear.default) \
            or not single_user(lin):
        return None
    a = op_args(lin)
    if a["activation"] != "none" or a["residual"] is not None or a["norm_weight"] is not None:
        return None
    gm = node.graph.owning_module
    scaled = {}
    for key in ("weight", "bias"):
        t = a[key]
        if t is None:
            continue
        if t.op != "placeholder" or t.name not in ctx.weights:
            return None
        w = ctx.weights[t.name]
        folded = w * c
        if not torch.isfinite(folded).all() or ((w != 0) & (folded == 0)).any():
            return None  # out of range for its dtype: not exact
        scaled[key] = (t.name, folded)
    if "weight" not in scaled or val(node).dtype != val(lin).dtype:
        return None
    changes = {key: ctx.add_weight(gm, f"{name}_x{c:g}".replace(".", "_").replace("-", "m")[:60], value)
               for key, (name, value) in scaled.items()}
    return _replace(lin, ctx, before=node, **changes)


def _residual(node: fx.Node, ctx: PassContext):
    if node.kwargs.get("alpha", 1) != 1:
        return None
    for lin, res in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not is_op(lin, braze.linear.default) or not single_user(lin) or not isinstance(res, fx.Node):
            continue
        a = op_args(lin)
        rv, ov = val(res), val(node)
        if a["residual"] is not None or not isinstance(rv, torch.Tensor):
            continue
        if tuple(rv.shape) != tuple(ov.shape) or rv.dtype != ov.dtype or val(lin).dtype != ov.dtype:
            continue
        # at the add, not at the linear: the residual may be computed after the linear (parallel attention + MLP)
        return _replace(lin, ctx, before=node, residual=res)
    return None


def _parallel_residual(node: fx.Node, ctx: PassContext, order: dict[fx.Node, int]):
    """(outer(...) + inner(...)) + x, the first add already outer's residual epilogue, -> outer(...) + (inner(...) +
    x): both adds in epilogues. A parallel attention + MLP layer (GPT-NeoX, Phi, Falcon, GPT-J: x + attn(ln(x)) +
    mlp(ln(x)), summed the other way round) then chains its halves as a sequential layer does, and each half folds
    into its decode block. Exact in real arithmetic; in floating point each order rounds as often (fp32 epilogues, one
    rounding a linear), so the sum is within a rounding of eager's."""
    if node.kwargs.get("alpha", 1) != 1:
        return None
    for outer, x in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not is_op(outer, braze.linear.default) or not single_user(outer) or not isinstance(x, fx.Node):
            continue
        inner = op_args(outer)["residual"]
        if not is_op(inner, braze.linear.default) or not single_user(inner) or op_args(inner)["residual"] is not None:
            continue
        xv, ov = val(x), val(node)
        if not isinstance(xv, torch.Tensor) or tuple(xv.shape) != tuple(ov.shape) \
                or not xv.dtype == ov.dtype == val(inner).dtype == val(outer).dtype:
            continue
        if x not in order or inner not in order:  # nodes an earlier rewrite made: number the graph again
            order.clear()
            order.update((n, i) for i, n in enumerate(node.graph.nodes))
        if order[x] >= order[inner]:  # x must exist where inner is computed
            continue
        new_inner = _replace(inner, ctx, residual=x)
        inner.replace_all_uses_with(new_inner)
        inner.graph.erase_node(inner)
        if not ctx.notes.get(ctx.current_pass):
            ctx.note(f"{node.name}: parallel residual (attention + MLP) + x summed as MLP + (attention + x), both "
                     "adds in linear epilogues")
        return _replace(outer, ctx, before=node, residual=new_inner)
    return None


def fuse_linear_epilogue(gm: fx.GraphModule, ctx: PassContext) -> int:
    n = graph_rewrite(gm, {aten.silu.default: _activation, aten.relu.default: _activation,
                           aten.gelu.default: _activation}, ctx)
    n += graph_rewrite(gm, {aten.pow.Tensor_Scalar: _squared_relu,
                            aten.mul.Tensor: lambda node, c: _squared_relu(node, c) or _power_of_two_scale(node, c)},
                       ctx)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return n + graph_rewrite(
        gm, {aten.add.Tensor: lambda node, c: _residual(node, c) or _parallel_residual(node, c, order)}, ctx)


def _rope_attention(node: fx.Node, ctx: PassContext):
    a = op_args(node)
    q, k = a["q"], a["k"]
    if a["cos"] is not None or not (is_op(q, braze.rope.default) and is_op(k, braze.rope.default)):
        return None
    if q.args[1] is not k.args[1] or q.args[2] is not k.args[2]:
        return None
    if not (single_user(q) and single_user(k)):
        return None
    if val(q).dtype != val(q.args[0]).dtype or val(k).dtype != val(k.args[0]).dtype:
        return None
    return _replace(node, ctx, q=q.args[0], k=k.args[0], cos=q.args[1], sin=q.args[2])


def _partial_rope(t):
    """cat([rope(x[..., :r], cos, sin), x[..., r:]], -1) (partial rotary: GPT-NeoX, Phi, StableLM) -> (x, cos, sin,
    r, rope node)."""
    if not is_op(t, aten.cat.default) or len(t.args[0]) != 2 or (t.args[1] if len(t.args) > 1 else 0) not in (-1, 3):
        return None
    rot, rest = t.args[0]
    if not is_op(rot, braze.rope.default) or not is_op(rest, aten.slice.Tensor) or not single_user(rot):
        return None
    lo = rot.args[0]
    if not is_op(lo, aten.slice.Tensor) or lo.args[0] is not rest.args[0]:
        return None
    x = lo.args[0]
    xv = val(x)
    if xv is None or xv.dim() != 4 or not isinstance(xv.shape[-1], int) or val(rot).dtype != xv.dtype:
        return None
    d = xv.shape[-1]
    r = lo.args[3] if len(lo.args) > 3 else None
    if lo.args[1] not in (-1, 3) or lo.args[2] not in (0, None) or not isinstance(r, int) or not 0 < r < d:
        return None
    end = rest.args[3] if len(rest.args) > 3 else None
    if rest.args[1] not in (-1, 3) or rest.args[2] != r or not (end is None or (isinstance(end, int) and end >= d)):
        return None
    if r % 2 or (d - r) % 2:
        return None
    return x, rot.args[1], rot.args[2], r, set(x.users) == {lo, rest}


# views through which a projection's output columns reach q / k (B = S = 1 when they are evaluated on indices)
COLUMN_VIEWS = (aten.reshape.default, aten.permute.default, aten.slice.Tensor, aten.transpose.int,
                aten.unsqueeze.default, aten.squeeze.dim, aten.select.int)
_BAIL = object()


def _concrete(a):
    """A view op's argument with the symbolic batch / sequence sizes at 1 (_BAIL: something else symbolic)."""
    if isinstance(a, fx.Node):
        return 1 if is_op(a, aten.sym_size.int) else _BAIL
    if isinstance(a, (list, tuple)):
        vals = [_concrete(b) for b in a]
        return _BAIL if any(v is _BAIL for v in vals) else type(a)(vals)
    if isinstance(a, torch.SymInt):
        return _BAIL
    return a


def _head_dim_equivariant(node: fx.Node, d: int) -> bool:
    """Whether `node` commutes with a permutation of the last dim (of size d) of its inputs and constants: an
    elementwise op or a cast over operands whose last dim is d or 1, or a keepdim mean / sum over the last dim."""
    v = val(node)
    if node.op != "call_function" or not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[-1] not in (d, 1):
        return False
    if is_op(node, aten.mean.dim, aten.sum.dim_IntList):
        src = val(node.args[0])
        return len(node.args) > 2 and bool(node.args[2]) and node.args[1] is not None \
            and list(node.args[1]) in ([-1], [src.dim() - 1]) \
            and not node.kwargs.get("dtype")
    if node.target not in P.ELEMENTWISE and node.target not in P.COPY_OPS:
        return False
    return all(val(a).dim() == 0 or val(a).shape[-1] in (d, 1) for a in node.all_input_nodes
               if isinstance(val(a), torch.Tensor))


def _head_norm_region(end: fx.Node, ctx: PassContext) -> tuple[fx.Node, set[fx.Node], list[fx.Node]] | None:
    """When `end` is, through permutes that keep the last dim last, a computation of one input x that commutes
    with a permutation of the head dim (a per-head LayerNorm / RMSNorm, decomposed: Cohere's and Persimmon's q / k
    norms), (x, the region's nodes, its constant weights): x permuted and the weights' last dims permuted alike
    give the output permuted. Else None."""
    out = end
    while is_op(out, aten.permute.default) and list(out.args[1])[-1] in (-1, val(out).dim() - 1):
        out = out.args[0]
        if len(out.users) != 1:
            return None
    v = val(out)
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or not isinstance(v.shape[-1], int) or v.shape[-1] < 2:
        return None
    d = v.shape[-1]
    region: set[fx.Node] = set()
    consts: list[fx.Node] = []
    leaves: set[fx.Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in region or n in leaves or n in consts:
            continue
        if n.op == "placeholder" and n.name in ctx.weights:
            consts.append(n)
        elif _head_dim_equivariant(n, d):
            region.add(n)
            stack.extend(n.all_input_nodes)
        else:
            leaves.add(n)
        if len(region) > 24:
            return None
    if len(leaves) != 1 or out not in region:
        return None
    x = leaves.pop()
    if not isinstance(val(x), torch.Tensor) or val(x).shape[-1] != d:
        return None
    # nothing else may read x or a value inside the region: it would see permuted columns
    if any(u not in region for u in x.users) or any(u not in region for n in region - {out} for u in n.users):
        return None
    return x, region, consts


def _permute_constants(region: set[fx.Node], consts: list[fx.Node], perm: list[int], ctx: PassContext) -> None:
    """The region's constant weights with their last dim permuted (new weights, read by the region only)."""
    d, gm = len(perm), next(iter(region)).graph.owning_module
    for c in consts:
        w = ctx.weights[c.name]
        if w.dim() == 0 or w.shape[-1] != d:
            continue
        new = ctx.add_weight(gm, f"{c.name}_rope_perm"[:60], w[..., perm].contiguous())
        for n in region:
            n.replace_input_with(c, new)


def _permute_into_weights(ends: list[fx.Node], perm: list[int], ctx: PassContext) -> bool:
    """Apply the head-dim permutation `perm` to q / k (`ends`) by permuting the rows of the projection weights
    they are views of: no copy of q / k per call. False (graph untouched) unless every end is a view chain of a
    bias-or-not braze::linear over weights (or a per-head norm of one, whose weights are then permuted too), and no
    other reader of that linear sees a permuted column."""
    sources: dict[fx.Node, list[fx.Node]] = {}
    norms = []
    for x in ends:
        n = x
        while is_op(n, *COLUMN_VIEWS):
            n = n.args[0]
        if not is_op(n, braze.linear.default) and (norm := _head_norm_region(x, ctx)) is not None:
            x, n = norm[0], norm[0]
            norms.append(norm[1:])
            while is_op(n, *COLUMN_VIEWS):
                n = n.args[0]
        a = op_args(n) if is_op(n, braze.linear.default) else None
        if a is None or a["residual"] is not None or a["weight"].op != "placeholder" or \
                a["weight"].name not in ctx.weights or ctx.weights[a["weight"].name].dim() != 2 or \
                (a["bias"] is not None and (a["bias"].op != "placeholder" or a["bias"].name not in ctx.weights)):
            return False
        sources.setdefault(n, []).append(x)
    d = len(perm)
    plans = []
    for lin, xs in sources.items():
        out = val(lin)
        n_cols = out.shape[-1]
        shape = [s if isinstance(s, int) else 1 for s in out.shape]
        idx = {lin: torch.arange(n_cols).expand(shape).contiguous()}
        readers, stack = [], [lin]
        while stack:  # every view of lin, and what each other reader reads
            node = stack.pop()
            for u in node.users:
                if is_op(u, *COLUMN_VIEWS) and u.args[0] is node:
                    args = _concrete(list(u.args[1:]))
                    if args is _BAIL:
                        return False
                    idx[u] = u.target(idx[node], *args)
                    if u not in xs:
                        stack.append(u)
                else:
                    readers.append(idx[node])
        cols = torch.arange(n_cols)
        permuted = set()
        for x in xs:
            rows = idx[x].reshape(-1, d)
            cols[rows] = rows[:, perm]
            permuted.update(rows.flatten().tolist())
        if len(permuted) != sum(idx[x].numel() for x in xs):
            return False  # q and k overlap
        if any(permuted & set(r.flatten().tolist()) for r in readers):
            return False
        plans.append((lin, cols))
    for lin, cols in plans:
        a = op_args(lin)
        gm = lin.graph.owning_module
        w = ctx.add_weight(gm, f"{a['weight'].name}_rope_perm"[:60], ctx.weights[a["weight"].name][cols].contiguous())
        if "braze_sources" in a["weight"].meta:
            w.meta["braze_sources"] = a["weight"].meta["braze_sources"]
        b = a["bias"]
        if b is not None:
            b = ctx.add_weight(gm, f"{b.name}_rope_perm"[:60], ctx.weights[b.name][cols].contiguous())
        lin.replace_all_uses_with(_replace(lin, ctx, weight=w, bias=b))
    for region, consts in norms:
        _permute_constants(region, consts, perm, ctx)
    return True


def _full_width_rope(node: fx.Node, q, k, ctx: PassContext, made: dict):
    """Partial rotary as full-width RoPE: permute the head dims of q and k alike (q.k is unchanged) so the rotated
    pairs (i, i + r/2) become (j, j + D/2), and pad cos with 1 / sin with 0 over the pass-through pairs. The
    attention and cached-attention kernels then apply it as they load q and k."""
    gm = node.graph.owning_module
    (xq, cos, sin, r, q_alone), (xk, cos_k, sin_k, r_k, k_alone) = q, k
    if cos is not cos_k or sin is not sin_k or r != r_k or val(xq).shape[-1] != val(xk).shape[-1]:
        return None
    d = val(xq).shape[-1]
    half, h = r // 2, (d - r) // 2
    perm = [*range(half), *range(r, r + h), *range(half, r), *range(r + h, d)]

    def sl(t, a, b):
        return new_node(gm, aten.slice.Tensor, (t, -1, a, b), {}, ctx, node)

    def cat(parts):
        return new_node(gm, aten.cat.default, (parts, -1), {}, ctx, node)

    def permuted(x):  # [rot_lo, pass_lo, rot_hi, pass_hi]
        return cat([sl(x, 0, half), sl(x, r, r + h), sl(x, half, r), sl(x, r + h, d)])

    def padded(t, fill):
        one = new_node(gm, aten.mul.Tensor, (sl(t, 0, 1), 0.0), {}, ctx, node)
        if fill:
            one = new_node(gm, aten.add.Tensor, (one, fill), {}, ctx, node)
        pad = new_node(gm, aten.expand.default, (one, [-1, -1, h]), {}, ctx, node)
        return cat([sl(t, 0, half), pad, sl(t, half, r), pad])

    if (cos, sin, r, d) not in made:  # one padded cos / sin for every layer
        made[(cos, sin, r, d)] = (padded(cos, 1.0), padded(sin, 0.0))
    cos_full, sin_full = made[(cos, sin, r, d)]
    if q_alone and k_alone and xq is not xk and _permute_into_weights([xq, xk], perm, ctx):
        ctx.note(f"{node.name}: partial rotary ({r} of {d} dims) as full-width RoPE; head dims permuted in the "
                 "projection weights")
        return _replace(node, ctx, q=xq, k=xk, cos=cos_full, sin=sin_full)
    ctx.note(f"{node.name}: partial rotary ({r} of {d} dims) as full-width RoPE over permuted head dims")
    return _replace(node, ctx, q=permuted(xq), k=permuted(xk), cos=cos_full, sin=sin_full)


def rope_free_attention_args(node: fx.Node) -> dict | None:
    """braze::attention's arguments when a rotary embedding could still be folded into it (no cos/sin in the op
    yet, no explicit mask); None otherwise. Shared by the partial- and interleaved-rotary fusions."""
    a = op_args(node)
    return None if a["cos"] is not None or a.get("attn_mask") is not None else a


def _partial_rope_attention(node: fx.Node, ctx: PassContext, made: dict):
    a = rope_free_attention_args(node)
    if a is None:
        return None
    q, k = _partial_rope(a["q"]), _partial_rope(a["k"])
    if q is None or k is None:
        return None
    return _full_width_rope(node, q, k, ctx, made)


# the ops whose kernels apply RoPE as they load q and k (general: softcap / window / sinks, kernels/attention.py)
ROPE_ATTENTIONS = (braze.attention.default, braze.general_attention.default)


def fuse_rope_into_attention(gm: fx.GraphModule, ctx: PassContext) -> int:
    n = graph_rewrite(gm, dict.fromkeys(ROPE_ATTENTIONS, _rope_attention), ctx)
    made: dict = {}
    partial = dict.fromkeys(ROPE_ATTENTIONS, lambda node, c: _partial_rope_attention(node, c, made))
    return n + graph_rewrite(gm, partial, ctx)


# ---- leftovers: braze ops without a template go back to ATen, where the fused family picks them up ----------
def _decompose_rms_norm(node: fx.Node, ctx: PassContext):
    gm = node.graph.owning_module
    x, w, eps = node.args
    h = x if val(x).dtype == torch.float32 else new_node(gm, aten._to_copy.default, (x,), {"dtype": torch.float32},
                                                         ctx, node)
    sq = new_node(gm, aten.pow.Tensor_Scalar, (h, 2), {}, ctx, node)
    mean = new_node(gm, aten.mean.dim, (sq, [-1], True), {}, ctx, node)
    var = new_node(gm, aten.add.Tensor, (mean, eps), {}, ctx, node)
    r = new_node(gm, aten.rsqrt.default, (var,), {}, ctx, node)
    y = new_node(gm, aten.mul.Tensor, (h, r), {}, ctx, node)
    if scales_in_fp32(val(x).dtype, val(w).dtype):  # Gemma's form: the fp32 scale, then one rounding
        out = new_node(gm, aten._to_copy.default, (new_node(gm, aten.mul.Tensor, (w, y), {}, ctx, node),),
                       {"dtype": val(x).dtype}, ctx, node)
    else:
        if val(x).dtype != torch.float32:
            y = new_node(gm, aten._to_copy.default, (y,), {"dtype": val(x).dtype}, ctx, node)
        out = new_node(gm, aten.mul.Tensor, (w, y), {}, ctx, node)
    out.meta["braze_rms_norm_eps"] = eps  # decode_layer.py folds a per-head q / k norm into the attention block
    return out


def _decompose_layer_norm(node: fx.Node, ctx: PassContext):
    """braze::layer_norm back to ATen as torch decomposes nn.LayerNorm: fp32 mean, centred variance, one rounding."""
    gm = node.graph.owning_module
    x, w, b, eps = node.args

    def op(target, *args, **kwargs):
        return new_node(gm, target, args, kwargs, ctx, node)

    h = x if val(x).dtype == torch.float32 else op(aten._to_copy.default, x, dtype=torch.float32)
    centred = op(aten.sub.Tensor, h, op(aten.mean.dim, h, [-1], True))
    var = op(aten.mean.dim, op(aten.mul.Tensor, centred, centred), [-1], True)
    out = op(aten.mul.Tensor, op(aten.mul.Tensor, centred, op(aten.rsqrt.default, op(aten.add.Tensor, var, eps))), w)
    if b is not None:
        out = op(aten.add.Tensor, out, b)
    return out if val(out).dtype == val(node).dtype else op(aten._to_copy.default, out, dtype=val(node).dtype)


def decomposed_rms_norm(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """(x, weight, eps) of the output node of a braze::rms_norm that _decompose_rms_norm wrote, else None."""
    eps = node.meta.get("braze_rms_norm_eps") if is_op(node, aten.mul.Tensor, aten._to_copy.default) else None
    if eps is None:
        return None
    if is_op(node, aten._to_copy.default):  # Gemma's form: cast(w * (h * rstd))
        node = node.args[0]
    w, y = node.args
    y = y.args[0] if is_op(y, aten._to_copy.default) else y
    h = y.args[0] if is_op(y, aten.mul.Tensor) else None
    x = h.args[0] if is_op(h, aten._to_copy.default) else h
    return (x, w, float(eps)) if isinstance(x, fx.Node) else None


def _decompose_rope(node: fx.Node, ctx: PassContext):
    gm = node.graph.owning_module
    x, cos, sin = node.args
    half = val(x).shape[-1] // 2
    c = new_node(gm, aten.unsqueeze.default, (cos, 1), {}, ctx, node)
    s = new_node(gm, aten.unsqueeze.default, (sin, 1), {}, ctx, node)
    lo = new_node(gm, aten.slice.Tensor, (x, -1, 0, half), {}, ctx, node)
    hi = new_node(gm, aten.slice.Tensor, (x, -1, half, 2 * half), {}, ctx, node)
    neg = new_node(gm, aten.neg.default, (hi,), {}, ctx, node)
    rot = new_node(gm, aten.cat.default, ([neg, lo], -1), {}, ctx, node)
    a = new_node(gm, aten.mul.Tensor, (x, c), {}, ctx, node)
    b = new_node(gm, aten.mul.Tensor, (rot, s), {}, ctx, node)
    out = new_node(gm, aten.add.Tensor, (a, b), {}, ctx, node)
    if val(out).dtype != val(node).dtype:  # an fp32 table on 16-bit x: one rounding (rope_reference)
        out = new_node(gm, aten._to_copy.default, (out,), {"dtype": val(node).dtype}, ctx, node)
    return out


def _decompose_softmax(node: fx.Node, ctx: PassContext):
    gm = node.graph.owning_module
    x, dim = node.args[0], node.args[1]
    if val(x).dtype != torch.float32:
        x = new_node(gm, aten._to_copy.default, (x,), {"dtype": torch.float32}, ctx, node)
    m = new_node(gm, aten.amax.default, (x, [dim], True), {}, ctx, node)
    e = new_node(gm, aten.exp.default, (new_node(gm, aten.sub.Tensor, (x, m), {}, ctx, node),), {}, ctx, node)
    s = new_node(gm, aten.sum.dim_IntList, (e, [dim], True), {}, ctx, node)
    out = new_node(gm, aten.div.Tensor, (e, s), {}, ctx, node)
    out.meta["braze_softmax_of"] = node.name  # insert_kv_cache looks for attention it would not cache
    out.meta["braze_softmax_dim"] = dim
    if val(node).dtype != torch.float32:
        out = new_node(gm, aten._to_copy.default, (out,), {"dtype": val(node).dtype}, ctx, node)
    return out


def decompose_unfused(gm: fx.GraphModule, ctx: PassContext) -> int:
    count = graph_rewrite(gm, {braze.rms_norm.default: _decompose_rms_norm,
                               braze.layer_norm.default: _decompose_layer_norm, braze.rope.default: _decompose_rope,
                               aten._softmax.default: _decompose_softmax}, ctx)
    for node in list(gm.graph.nodes):  # a softmax over another dim than the last: its statistics as well
        if node.op == "call_function" and node.target in REDUCTIONS and reduce_over_last_dim(gm, node, ctx):
            gm.graph.erase_node(node)
    return count
