"""Pattern recognition: linear, RMSNorm, LayerNorm, RoPE, SwiGLU/GeGLU become braze::* ops.

Each rule starts at an anchor op and walks its inputs; on a match it returns the replacement node. The rules are
tables of (anchor op -> function), applied by one graph_rewrite, in the tinygrad PatternMatcher style.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.ops.library import scales_in_fp32
from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, dce, graph_rewrite, is_op, new_node, single_user, val

braze = torch.ops.braze


def _other(node: fx.Node, x: fx.Node):
    a, b = node.args[0], node.args[1]
    return b if a is x else a if b is x else None


# ---- linear ------------------------------------------------------------------------------------------------
def _linear(node: fx.Node, ctx: PassContext):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    return new_node(node.graph.owning_module, braze.linear.default, (x, w, b), {}, ctx, node)


def _transposed_weight(t):
    if is_op(t, aten.t.default) or (is_op(t, aten.permute.default) and list(t.args[1]) == [1, 0]):
        return t.args[0]
    return None


def _weight_t(w: fx.Node, ctx: PassContext):
    """A [K, N] weight read as x @ w (GPT-2's Conv1D) -> its [N, K] transpose as a new weight (made once)."""
    if w.op != "placeholder" or w.name not in ctx.weights or ctx.weights[w.name].dim() != 2:
        return None
    gm = w.graph.owning_module
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.meta.get("braze_transpose_of") == w.name:
            return n
    node = ctx.add_weight(gm, f"{w.name}_t", ctx.weights[w.name].t().contiguous())
    node.meta["braze_transpose_of"] = w.name
    return node


def _mm(node: fx.Node, ctx: PassContext):
    bias = None
    if node.target is aten.addmm.default:
        bias, x, wt = node.args[0], node.args[1], node.args[2]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or val(bias).dim() != 1:
            return None
    else:
        x, wt = node.args
    w = _transposed_weight(wt) or _weight_t(wt, ctx)
    if w is None:
        return None
    gm = node.graph.owning_module
    out = next(iter(node.users)) if len(node.users) == 1 else None
    if is_op(x, aten.reshape.default) and is_op(out, aten.reshape.default) and val(x.args[0]).dim() > 2:
        # reshape(x, [-1, K]) @ W -> reshape(.., [*lead, N]) (GPT-2's Conv1D): one linear over x, so an
        # activation or residual after it can still fuse into the matmul's epilogue
        src = x.args[0]
        if [str(d) for d in val(out).shape] == [str(d) for d in (*val(src).shape[:-1], val(node).shape[-1])]:
            rep = new_node(gm, braze.linear.default, (src, w, bias), {}, ctx, out)
            out.replace_all_uses_with(rep)
            return rep
    return new_node(gm, braze.linear.default, (x, w, bias), {}, ctx, node)


def _matmul(node: fx.Node, ctx: PassContext):
    """x @ W^T with W a 2-D weight (Falcon's `input @ self.weight.T`), or x @ W with W a [K, N] weight (read as
    its transpose, made once), any leading dims on x."""
    x, wt = node.args
    w = _transposed_weight(wt)
    if w is None and wt.op == "placeholder" and val(x).dim() >= 2:
        w = _weight_t(wt, ctx)
    if w is None or w.op != "placeholder" or w.name not in ctx.weights or val(x).dim() < 2:
        return None
    return new_node(node.graph.owning_module, braze.linear.default, (x, w, None), {}, ctx, node)


LINEAR_RULES = {aten.linear.default: _linear, aten.mm.default: _mm, aten.addmm.default: _mm,
                aten.matmul.default: _matmul}


def recognize_linear(gm: fx.GraphModule, ctx: PassContext) -> int:
    return graph_rewrite(gm, LINEAR_RULES, ctx)


# ---- matmuls between activations ------------------------------------------------------------------------------
MATMUL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _activation_matmul(node: fx.Node, ctx: PassContext):
    """torch.matmul / bmm / mm of two operands of one float dtype that no linear (a weight operand)
    or attention op took -> braze::bmm (kernels/bmm.py). Runs after attention substitution, which reads the
    matmul-softmax-matmul form."""
    a, b = node.args[0], node.args[1]
    va, vb = val(a), val(b)
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)) or min(va.dim(), vb.dim()) < 1:
        return None
    if va.dtype != vb.dtype or va.dtype not in MATMUL_FLOATS:
        return None
    return new_node(node.graph.owning_module, braze.bmm.default, (a, b), {}, ctx, node)


def recognize_batched_matmul(gm: fx.GraphModule, ctx: PassContext) -> int:
    return graph_rewrite(gm, {aten.matmul.default: _activation_matmul, aten.bmm.default: _activation_matmul,
                              aten.mm.default: _activation_matmul}, ctx)


# ---- RMSNorm -----------------------------------------------------------------------------------------------
def _rms_from_rsqrt(rsqrt: fx.Node, ctx: PassContext):
    add = rsqrt.args[0]
    if not is_op(add, aten.add.Tensor, aten.add.Scalar) or not isinstance(add.args[1], float):
        return None
    mean = add.args[0]
    if not is_op(mean, aten.mean.dim) or list(mean.args[1]) not in ([-1], [val(mean.args[0]).dim() - 1]):
        return None
    if not (len(mean.args) > 2 and mean.args[2]):
        return None
    pw = mean.args[0]
    if not is_op(pw, aten.pow.Tensor_Scalar) or pw.args[1] != 2:
        return None
    h = pw.args[0]
    if len(rsqrt.users) != 1:
        return None
    mul = next(iter(rsqrt.users))
    if not is_op(mul, aten.mul.Tensor) or _other(mul, rsqrt) is not h or len(mul.users) != 1:
        return None
    out = next(iter(mul.users))
    cast = None
    if is_op(out, aten._to_copy.default, aten.to.dtype):
        cast, out = out, (next(iter(out.users)) if len(out.users) == 1 else None)
    if not is_op(out, aten.mul.Tensor):
        return None
    weight = _other(out, cast or mul)
    hidden = val(h)
    if weight is None or not isinstance(val(weight), torch.Tensor) or val(weight).dim() != 1:
        return None
    src = h
    if is_op(h, aten._to_copy.default, aten.to.dtype) and val(h).dtype == torch.float32:
        src = h.args[0]
    if cast is not None and val(cast).dtype != val(src).dtype:
        return None
    if cast is not None and scales_in_fp32(val(src).dtype, val(weight).dtype):
        return None  # Llama's form with an fp32 weight on 16-bit input (an fp32 result): not braze::rms_norm's
    if cast is None and val(src).dtype != torch.float32:
        # Gemma's form on 16-bit input: (x.float() * rstd * w_fp32).type_as(x), the scale before the one rounding;
        # OLMo 2's (w * x.float() * rstd).to(dtype) with a 16-bit w is the same with w upcast (exactly)
        last = next(iter(out.users)) if len(out.users) == 1 else None
        if not (is_op(last, aten._to_copy.default, aten.to.dtype) and val(last).dtype == val(src).dtype
                and val(out).dtype == torch.float32):
            return None
        if val(weight).dtype != torch.float32:
            weight = _fp32_weight(weight, ctx, out)
        out = last
    if hidden.shape[-1] != val(weight).shape[0]:
        return None
    rep = new_node(out.graph.owning_module, braze.rms_norm.default, (src, weight, float(add.args[1])), {}, ctx, out)
    out.replace_all_uses_with(rep)
    return rep


def _fp32_weight(weight: fx.Node, ctx: PassContext, before: fx.Node) -> fx.Node:
    """An fp32 copy of a norm weight: a new weight when it is one (folded now), else a cast in the graph."""
    gm = before.graph.owning_module
    if weight.op == "placeholder" and weight.name in ctx.weights:
        return ctx.add_weight(gm, f"{weight.name}_fp32"[:60], ctx.weights[weight.name].float())
    return new_node(gm, aten._to_copy.default, (weight,), {"dtype": torch.float32}, ctx, before)


# ---- LayerNorm ----------------------------------------------------------------------------------------------
_LINEARS = (braze.linear.default, braze.linear_glu.default)


def _last_dim_mean(node: fx.Node, of: fx.Node | None = None) -> fx.Node | None:
    """The input of a keepdim mean over the last dim (mean.dim, or sum.dim_IntList / K), if `of` is None or it."""
    if is_op(node, aten.div.Tensor) and is_op(node.args[0], aten.sum.dim_IntList):
        src, k = node.args[0].args[0], node.args[1]
        if not isinstance(k, (int, float)) or k != val(src).shape[-1]:
            return None
        node = node.args[0]
    elif not is_op(node, aten.mean.dim):
        return None
    src = node.args[0]
    if list(node.args[1]) not in ([-1], [val(src).dim() - 1]) or not (len(node.args) > 2 and node.args[2]):
        return None
    return src if of is None or src is of else None


def _centred(node: fx.Node, h: fx.Node, mean: fx.Node) -> bool:
    return is_op(node, aten.sub.Tensor) and node.args[0] is h and node.args[1] is mean


def match_layer_norm(rsqrt: fx.Node, head_rows: bool = False) -> tuple[fx.Node, fx.Node, fx.Node | None, float,
                                                                       fx.Node] | None:
    """(x, weight, bias, eps, output) when `rsqrt` is the heart of (h - mean) * rsqrt(mean((h - mean)^2) + eps) * w
    (+ b) [-> cast back], h = x or x.float(): HF LayerNorm, as torch decomposes nn.LayerNorm and as Cohere writes
    its own. The weight (and bias) is [D], or with head_rows [H, D] (Cohere's per-head q / k norms)."""
    add = rsqrt.args[0]
    if not is_op(add, aten.add.Tensor, aten.add.Scalar) or not isinstance(add.args[1], float):
        return None
    sq = _last_dim_mean(add.args[0])
    if is_op(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2:
        d = sq.args[0]
    elif is_op(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1]:
        d = sq.args[0]
    else:
        return None
    if not is_op(d, aten.sub.Tensor):
        return None
    h, mean = d.args
    if not isinstance(h, fx.Node) or _last_dim_mean(mean, of=h) is None or len(rsqrt.users) != 1:
        return None
    norm = next(iter(rsqrt.users))
    if not is_op(norm, aten.mul.Tensor) or not single_user(norm):
        return None
    centred = _other(norm, rsqrt)
    if not (centred is d or (isinstance(centred, fx.Node) and _centred(centred, h, mean))):
        return None
    scale = next(iter(norm.users))
    weight = _other(scale, norm) if is_op(scale, aten.mul.Tensor) else None
    if not isinstance(weight, fx.Node) or not isinstance(val(weight), torch.Tensor) \
            or val(weight).dim() not in ((1, 2) if head_rows else (1,)) or val(weight).shape[-1] != val(h).shape[-1] \
            or (val(weight).dim() == 2 and (val(h).dim() < 2 or val(weight).shape[0] != val(h).shape[-2])):
        return None
    out, bias = scale, None
    nxt = next(iter(scale.users)) if single_user(scale) else None
    if is_op(nxt, aten.add.Tensor):
        b = _other(nxt, scale)
        if isinstance(b, fx.Node) and isinstance(val(b), torch.Tensor) \
                and tuple(val(b).shape) == tuple(val(weight).shape):
            out, bias = nxt, b
    src = h.args[0] if is_op(h, aten._to_copy.default, aten.to.dtype) and val(h).dtype == torch.float32 else h
    if val(src).dtype != torch.float32:
        last = next(iter(out.users)) if single_user(out) else None
        if not (is_op(last, aten._to_copy.default, aten.to.dtype) and val(last).dtype == val(src).dtype
                and val(out).dtype == torch.float32):
            return None
        out = last
    if val(out).dtype != val(src).dtype:
        return None
    return src, weight, bias, float(add.args[1]), out


def _layer_norm_from_rsqrt(rsqrt: fx.Node, ctx: PassContext):
    """match_layer_norm's LayerNorm as braze::layer_norm, only where linears read it all: a matmul prologue is where
    a LayerNorm op pays (elsewhere, per-head q / k LayerNorms among them, the decomposed form stays for the fused
    elementwise kernels, the rotary passes and the decode attention block that read it)."""
    m = match_layer_norm(rsqrt)
    if m is None:
        return None
    src, weight, bias, eps, out = m
    if not out.users or not all(is_op(u, *_LINEARS) and u.args[0] is out for u in out.users):
        return None
    rep = new_node(out.graph.owning_module, braze.layer_norm.default, (src, weight, bias, eps), {}, ctx, out)
    out.replace_all_uses_with(rep)
    return rep


def _norms_from_rsqrt(gm: fx.GraphModule, ctx: PassContext, rule) -> int:
    """Apply a norm rule at every rsqrt (graph_rewrite does not fit: the anchor is not the node replaced)."""
    count = 0
    for node in list(gm.graph.nodes):
        if not getattr(node, "_erased", False) and is_op(node, aten.rsqrt.default):
            if rule(node, ctx) is not None:
                count += 1
    dce(gm)
    return count


def recognize_layer_norm(gm: fx.GraphModule, ctx: PassContext) -> int:
    return _norms_from_rsqrt(gm, ctx, _layer_norm_from_rsqrt)


def recognize_rms_norm(gm: fx.GraphModule, ctx: PassContext) -> int:
    return _norms_from_rsqrt(gm, ctx, _rms_from_rsqrt)


# ---- RoPE --------------------------------------------------------------------------------------------------
def _unsqueezed_3d(t):
    if is_op(t, aten.unsqueeze.default) and t.args[1] == 1 and val(t.args[0]).dim() == 3:
        return t.args[0]
    return None


def _rotate_half_of(cat):
    if not is_op(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    neg, lo = cat.args[0]
    if not is_op(neg, aten.neg.default) or not is_op(lo, aten.slice.Tensor):
        return None
    hi = neg.args[0]
    if not is_op(hi, aten.slice.Tensor) or hi.args[0] is not lo.args[0]:
        return None
    x = lo.args[0]
    d = val(x).shape[-1]
    if not isinstance(d, int) or d % 2:
        return None
    half = d // 2
    lo_ok = lo.args[1] in (-1, 3) and lo.args[2] == 0 and lo.args[3] == half
    hi_ok = hi.args[1] in (-1, 3) and hi.args[2] == half
    return x if lo_ok and hi_ok else None


def _rope(add: fx.Node, ctx: PassContext):
    a, b = add.args[0], add.args[1]
    if not (is_op(a, aten.mul.Tensor) and is_op(b, aten.mul.Tensor)):
        return None
    for m1, m2 in ((a, b), (b, a)):
        for x_cand, cos_u in ((m1.args[0], m1.args[1]), (m1.args[1], m1.args[0])):
            for rot, sin_u in ((m2.args[0], m2.args[1]), (m2.args[1], m2.args[0])):
                if not isinstance(x_cand, fx.Node) or val(x_cand) is None or val(x_cand).dim() != 4:
                    continue
                if _rotate_half_of(rot) is not x_cand:
                    continue
                cos, sin = _unsqueezed_3d(cos_u), _unsqueezed_3d(sin_u)
                if cos is None or sin is None:
                    continue
                if scales_in_fp32(val(x_cand).dtype, val(cos).dtype):  # OLMo 2: an fp32 table on 16-bit q / k
                    last = next(iter(add.users)) if len(add.users) == 1 else None
                    if not (is_op(last, aten._to_copy.default, aten.to.dtype)
                            and val(last).dtype == val(x_cand).dtype and val(sin).dtype == torch.float32):
                        return None  # kept in fp32 after: not braze::rope's form (it rounds to x's dtype)
                    rep = new_node(add.graph.owning_module, braze.rope.default, (x_cand, cos, sin), {}, ctx, last)
                    last.replace_all_uses_with(rep)
                    return rep
                return new_node(add.graph.owning_module, braze.rope.default, (x_cand, cos, sin), {}, ctx, add)
    return None


def recognize_rope(gm: fx.GraphModule, ctx: PassContext) -> int:
    return graph_rewrite(gm, {aten.add.Tensor: _rope}, ctx)


# ---- GELU written out (gelu_new / gelu_pytorch_tanh in GPT-2, Phi, ...) -----------------------------------------
def _scalar_mul(n, c=None):
    """mul(x, c) / mul(c, x) with a Python scalar -> (x, c)."""
    if not is_op(n, aten.mul.Tensor):
        return None, None
    a, b = n.args[0], n.args[1]
    if isinstance(b, (int, float)) and isinstance(a, fx.Node):
        x, k = a, float(b)
    elif isinstance(a, (int, float)) and isinstance(b, fx.Node):
        x, k = b, float(a)
    else:
        return None, None
    if c is not None and abs(k - c) > 1e-6 * abs(c):
        return None, None
    return x, k


def _gelu_tanh(mul: fx.Node, ctx: PassContext):
    """0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))) -> gelu(x, approximate="tanh"); also Bloom's
    arrangement of the same function, tanh(0.79788456 * x * (1 + 0.044715 * x * x)) (its constant is sqrt(2 / pi)
    to 8 digits: the same fp32 value)."""
    for half, rest in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        x, _ = _scalar_mul(half, 0.5)
        if x is None or not is_op(rest, aten.add.Tensor) or rest.args[1] != 1.0 or \
                not is_op(rest.args[0], aten.tanh.default):
            continue
        arg = rest.args[0].args[0]
        if _bloom_gelu_argument(arg, x):
            return new_node(mul.graph.owning_module, aten.gelu.default, (x,), {"approximate": "tanh"}, ctx, mul)
        inner, _ = _scalar_mul(arg, 0.7978845608028654)
        if not is_op(inner, aten.add.Tensor) or x not in inner.args[:2]:
            continue
        cube, _ = _scalar_mul(_other(inner, x), 0.044715)
        if is_op(cube, aten.pow.Tensor_Scalar) and cube.args[0] is x and cube.args[1] == 3:
            return new_node(mul.graph.owning_module, aten.gelu.default, (x,), {"approximate": "tanh"}, ctx, mul)
    return None


def _bloom_gelu_argument(arg, x: fx.Node) -> bool:
    """arg == (x * sqrt(2 / pi)) * ((x * 0.044715) * x + 1), either operand order of each product."""
    if not is_op(arg, aten.mul.Tensor) or not all(isinstance(a, fx.Node) for a in arg.args[:2]):
        return False
    for scaled, poly in ((arg.args[0], arg.args[1]), (arg.args[1], arg.args[0])):
        if _scalar_mul(scaled, 0.7978845608028654)[0] is not x:
            continue
        if not is_op(poly, aten.add.Tensor) or poly.args[1] != 1 or not is_op(poly.args[0], aten.mul.Tensor):
            continue
        sq = poly.args[0]
        if x in sq.args[:2] and _scalar_mul(_other(sq, x), 0.044715)[0] is x:
            return True
    return False


def recognize_gelu_tanh(gm: fx.GraphModule, ctx: PassContext) -> int:
    return graph_rewrite(gm, {aten.mul.Tensor: _gelu_tanh}, ctx)


# ---- SwiGLU / GeGLU ----------------------------------------------------------------------------------------
def _plain_linear(n) -> bool:
    if not is_op(n, braze.linear.default) or len(n.args) > 2 and n.args[2] is not None:
        return False
    return not n.kwargs and single_user(n)


def _last_dim_slice(n):
    """slice(x, -1, a, b) -> (x, a, b)."""
    if not is_op(n, aten.slice.Tensor) or len(n.args) < 4 or not single_user(n):
        return None
    x = n.args[0]
    if n.args[1] not in (-1, val(x).dim() - 1) or (len(n.args) > 4 and n.args[4] != 1):
        return None
    return x, n.args[2], n.args[3]


def _fused_gate_up(gate, up, ctx: PassContext):
    """gate, up = gate_up_proj(x).chunk(2, -1) (Phi-3): two slices of one bias-free linear over a weight -> (x, the
    gate rows, the up rows) as new weights."""
    g, u = _last_dim_slice(gate), _last_dim_slice(up)
    if g is None or u is None or g[0] is not u[0]:
        return None
    lin = g[0]
    if not is_op(lin, braze.linear.default) or len(lin.users) != 2 or lin.kwargs or len(lin.args) > 3 or \
            (len(lin.args) > 2 and lin.args[2] is not None):
        return None
    w = lin.args[1]
    if w.op != "placeholder" or w.name not in ctx.weights:
        return None
    rows = ctx.weights[w.name].shape[0]
    (_, g0, g1), (_, u0, u1) = g, u
    if not all(isinstance(i, int) for i in (g0, g1, u0, u1)) or g1 - g0 != u1 - u0 or \
            sorted([(g0, g1), (u0, u1)]) != [(0, rows // 2), (rows // 2, rows)]:
        return None
    gm = lin.graph.owning_module
    weight = ctx.weights[w.name]
    wg = ctx.add_weight(gm, f"{w.name}_gate"[:60], weight[g0:g1].contiguous())
    wu = ctx.add_weight(gm, f"{w.name}_up"[:60], weight[u0:u1].contiguous())
    return lin.args[0], wg, wu


def _glu(mul: fx.Node, ctx: PassContext):
    for act, up in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        if is_op(act, aten.silu.default):
            kind = "silu"
        elif is_op(act, aten.gelu.default):
            kind = "gelu_tanh" if act.kwargs.get("approximate", "none") == "tanh" else "gelu"
        else:
            continue
        gate = act.args[0]
        fused = _fused_gate_up(gate, up, ctx)
        if fused is not None and single_user(act):
            x, wg, wu = fused
            return new_node(mul.graph.owning_module, braze.linear_glu.default, (x, wg, wu), {"activation": kind},
                            ctx, mul)
        if not (_plain_linear(gate) and _plain_linear(up) and single_user(act)):
            continue
        if gate.args[0] is not up.args[0]:
            continue
        return new_node(mul.graph.owning_module, braze.linear_glu.default,
                        (gate.args[0], gate.args[1], up.args[1]), {"activation": kind}, ctx, mul)
    return None


def recognize_glu(gm: fx.GraphModule, ctx: PassContext) -> int:
    return graph_rewrite(gm, {aten.mul.Tensor: _glu}, ctx)
