"""Attention substitution: SDPA and eager (matmul-softmax-matmul) attention become braze::attention.

GQA's repeat_kv (unsqueeze -> expand -> reshape) is stripped so the kernel reads the shared K/V heads directly.
For causal LMs the mask that HF builds from position ids is evaluated at compile time (braze/passes/masks.py) and,
when it is plain causal, replaced by the causal flag (the TRT-LLM AutoDeploy approach): the compiled forward
assumes standard positions, and padding is handled by the runtime. A sliding-window mask becomes the window
argument of braze::general_attention, as does logit softcapping (Gemma 2): no flash kernel has those, so that op
runs its reference eagerly and the report lists it, and so do attention sinks (gpt-oss: one more softmax logit
per head). Any other mask is kept as the graph computes it.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, graph_rewrite, is_op, new_node, val
from braze.passes.masks import MaskInfo, classify_mask, is_no_op_mask

braze = torch.ops.braze


def strip_repeat_kv(t: fx.Node) -> fx.Node:
    """reshape(expand(unsqueeze(kv, 2), [B, Hkv, rep, S, D]), [B, Hkv*rep, S, D]) -> kv."""
    if not is_op(t, aten.reshape.default):
        return t
    e = t.args[0]
    if not is_op(e, aten.expand.default):
        return t
    u = e.args[0]
    if not is_op(u, aten.unsqueeze.default) or u.args[1] != 2 or val(u.args[0]).dim() != 4:
        return t
    return u.args[0]


def _sdpa(node: fx.Node, ctx: PassContext):
    args = list(node.args) + [None] * (4 - min(len(node.args), 4))
    q, k, v, mask = args[0], args[1], args[2], args[3]
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    scale = node.kwargs.get("scale") or (node.args[6] if len(node.args) > 6 else None)
    if dropout or any(val(t).dim() != 4 for t in (q, k, v)):  # [B, H, S, D] only: a 3-D call stays torch's
        return None
    if causal and str(val(q).shape[2]) != str(val(k).shape[2]):
        # torch aligns is_causal top-left (query i sees keys 0..i) when the lengths differ; braze's causal flag
        # is the KV cache's bottom-right alignment (the last query sees every key)
        node.meta["braze_eager_reason"] = ("SDPA with is_causal=True over a query length other than the key "
                                           "length (torch's top-left causal mask) runs eagerly")
        return None
    d = val(q).shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    return _make_attention(node, q, k, v, mask, bool(causal), float(scale), ctx)


def _make_attention(anchor, q, k, v, mask, causal, scale, ctx, softcap=0.0, sinks=None):
    k, v = strip_repeat_kv(k), strip_repeat_kv(v)
    if val(q).shape[1] % val(k).shape[1] or (sinks is not None and val(sinks).shape[0] != val(q).shape[1]):
        return None
    d_qk, d_v = val(q).shape[-1], val(v).shape[-1]
    if not (isinstance(d_qk, int) and isinstance(d_v, int)):
        return None
    d = max(d_qk, d_v)  # one head dim for the kernels: zero columns add nothing to q . k nor to p @ v
    q, k, v = (_zero_padded(t, d, anchor, ctx) for t in (q, k, v))
    attn = _attention_node(anchor, q, k, v, mask, causal, scale, ctx, softcap, sinks)
    if d_v == d_qk:
        return attn
    if d_v > d_qk:
        ctx.note(f"{anchor.name}: queries and keys of head dim {d_qk} padded with zeros to the values' {d_v}")
        return attn
    ctx.note(f"{anchor.name}: values of head dim {d_v} padded with zeros to the query's {d_qk} (MLA), the output "
             "sliced back")
    return new_node(anchor.graph.owning_module, aten.slice.Tensor, (attn, 3, 0, d_v), {}, ctx, anchor)


def _zero_padded(v: fx.Node, dim: int, anchor: fx.Node, ctx: PassContext) -> fx.Node:
    """v [B, H, S, D] -> cat([v, zeros], -1) of head dim `dim`: one tile width for q, k, v and the output in every
    attention kernel (their outputs' extra columns are sums of zeros). MLA's values are narrower than its keys."""
    shape = val(v).shape
    if shape[-1] == dim:
        return v
    gm = anchor.graph.owning_module

    def op(target, *a, **kw):
        return new_node(gm, target, a, kw, ctx, anchor)

    zero = op(aten.full.default, [], 0.0, dtype=val(v).dtype, device=val(v).device)
    sizes = [s if isinstance(s, int) else op(aten.sym_size.int, v, i) for i, s in enumerate(shape[:-1])]
    return op(aten.cat.default, [v, op(aten.expand.default, zero, [*sizes, dim - shape[-1]])], 3)


def _attention_node(anchor, q, k, v, mask, causal, scale, ctx, softcap=0.0, sinks=None):
    gm = anchor.graph.owning_module
    window, alibi = 0, None
    if mask is not None and is_no_op_mask(gm, mask, ctx):
        ctx.note(f"{anchor.name}: a mask that lets every query see every key dropped")
        mask = None
    if mask is not None and ctx.causal_lm:
        info = classify_mask(gm, mask, ctx)
        if info.kind == "causal":
            ctx.note(f"{anchor.name}: HF mask replaced by the causal flag")
            mask, causal = None, True
        elif info.kind == "window":
            ctx.note(f"{anchor.name}: HF mask replaced by the causal flag and a sliding window of {info.window}")
            mask, causal, window = None, True, info.window
        elif info.kind == "alibi" and (alibi := _alibi_weight(gm, mask, info, val(q).shape[1], ctx)) is not None:
            ctx.note(f"{anchor.name}: HF mask replaced by the causal flag and ALiBi slopes ({info.describe()}: the "
                     "bias is linear in the key position)")
            mask, causal, window = None, True, info.window
        else:
            ctx.note(f"{anchor.name}: HF mask kept ({info.describe()})")
    if softcap or window or sinks is not None or alibi is not None:  # the general op (its kernel takes these)
        kwargs = {"softcap": float(softcap), "window": int(window)}
        if mask is not None:
            kwargs["attn_mask"] = mask
        if sinks is not None:
            kwargs["sinks"] = sinks
        if alibi is not None:
            kwargs["alibi"] = alibi
        what = ", ".join(x for x in (softcap and f"softcap {softcap:g}", window and f"sliding window {window}",
                                     sinks is not None and "attention sinks", alibi is not None and "ALiBi") if x)
        ctx.note(f"{anchor.name}: general attention ({what})")
        return new_node(gm, braze.general_attention.default, (q, k, v, scale, causal), kwargs, ctx, anchor)
    kwargs = {"attn_mask": mask} if mask is not None else {}
    return new_node(gm, braze.attention.default, (q, k, v, scale, causal), kwargs, ctx, anchor)


def _alibi_weight(gm: fx.GraphModule, mask: fx.Node, info: MaskInfo, heads: int, ctx: PassContext) -> fx.Node | None:
    """The fitted ALiBi slopes as an fp32 [Hq] weight (one slope for every head repeated), made once per mask
    (the layers sharing it share the weight); None when the slopes do not match the query heads."""
    if info.slopes.numel() not in (1, heads):
        return None
    made = mask.meta.setdefault("braze_alibi_weights", {})
    if heads not in made:
        slopes = info.slopes.float().expand(heads).contiguous()
        made[heads] = ctx.add_weight(gm, f"alibi_slopes_{mask.name}"[:60], slopes)
    return made[heads]


def _softcap_of(scores):
    """tanh(x / c) * c (or tanh(x * (1/c)) * c) -> (x, c); anything else -> (scores, 0.0)."""
    if not (is_op(scores, aten.mul.Tensor) and isinstance(scores.args[1], (int, float))):
        return scores, 0.0
    th, cap = scores.args[0], float(scores.args[1])
    if not is_op(th, aten.tanh.default) or cap <= 0:
        return scores, 0.0
    inner = th.args[0]
    if is_op(inner, aten.div.Tensor) and isinstance(inner.args[1], (int, float)) and \
            abs(float(inner.args[1]) - cap) <= 1e-6 * cap:
        return inner.args[0], cap
    if is_op(inner, aten.mul.Tensor) and isinstance(inner.args[1], float) and abs(inner.args[1] * cap - 1) < 1e-6:
        return inner.args[0], cap
    return scores, 0.0


def _transposed_keys(kt, anchor: fx.Node, ctx: PassContext):
    """k^T as transpose(k, 2, 3) / transpose(-2, -1) / permute(0, 1, 3, 2), or permute(x, 0, 2, 3, 1) of x
    [B, S, H, D] (GPT-1's split_heads(k=True)): k = permute(x, 0, 2, 1, 3)."""
    if is_op(kt, aten.transpose.int) and {kt.args[1] % 4, kt.args[2] % 4} == {2, 3}:
        return kt.args[0]
    if is_op(kt, aten.permute.default) and list(kt.args[1]) == [0, 1, 3, 2]:
        return kt.args[0]
    if is_op(kt, aten.permute.default) and list(kt.args[1]) == [0, 2, 3, 1]:
        return new_node(anchor.graph.owning_module, aten.permute.default, (kt.args[0], [0, 2, 1, 3]), {}, ctx,
                        anchor)
    return None


def _gated_scores(scores, anchor: fx.Node, ctx: PassContext):
    """GPT-1: w * b + c * (1 - b), b a 0/1 mask, c <= -1e4 -> (w, b == 0), the positions masked_fill would fill:
    exp(c - max) is exactly 0 in fp32 once c - max < -104, so c acts as -inf for any row with a visible key."""
    if not is_op(scores, aten.add.Tensor) or not all(isinstance(a, fx.Node) for a in scores.args):
        return None
    for gated, fill in (scores.args, scores.args[::-1]):
        if not (is_op(gated, aten.mul.Tensor) and is_op(fill, aten.mul.Tensor)):
            continue
        one_minus, c = fill.args
        if not (isinstance(c, (int, float)) and c <= -1e4):
            continue
        if is_op(one_minus, aten.rsub.Scalar) and one_minus.args[1] == 1:
            b = one_minus.args[0]
        elif is_op(one_minus, aten.sub.Tensor) and one_minus.args[0] == 1:
            b = one_minus.args[1]
        else:
            continue
        if b in gated.args:
            w = gated.args[0] if gated.args[1] is b else gated.args[1]
            return w, new_node(anchor.graph.owning_module, aten.eq.Scalar, (b, 0), {}, ctx, anchor)
    return None


def _very_negative(t) -> bool:
    """A scalar tensor node holding -inf or a dtype's min (what masked positions are filled with)."""
    if is_op(t, aten.scalar_tensor.default):
        value = t.args[0]
    elif is_op(t, aten.full.default) and list(t.args[0]) == []:
        value = t.args[1]
    else:
        return False
    return isinstance(value, (int, float)) and value <= -1e30


def _masked_fill_as_bias(anchor: fx.Node, fill: fx.Node, bias, ctx: PassContext) -> fx.Node:
    """masked_fill(scores [+ bias], fill, min) as one additive mask: bias + fill * finfo.min."""
    gm = anchor.graph.owning_module
    f = new_node(gm, aten._to_copy.default, (fill,), {"dtype": torch.float32}, ctx, anchor)
    m = new_node(gm, aten.mul.Tensor, (f, torch.finfo(torch.float32).min), {}, ctx, anchor)
    return m if bias is None else new_node(gm, aten.add.Tensor, (bias, m), {}, ctx, anchor)


def _unshifted(scores):
    """x - max(x, -1, keepdim) -> x (MiMo-V2's layers subtract the row max before the softmax, which subtracts it
    anyway); anything else as it is."""
    if not is_op(scores, aten.sub.Tensor):
        return scores
    x, high = scores.args
    top = high.args[0] if is_op(high, operator.getitem) and high.args[1] == 0 else high
    if is_op(top, aten.max.dim) and top.args[0] is x and top.args[1:3] in ((-1, True), (3, True)):
        return x
    if is_op(top, aten.amax.default) and top.args[0] is x and _last_dim(top.args[1]) and _keepdim(top):
        return x
    return scores


def _sink_weight(sinks):
    """The [H] weight a sinks operand broadcasts (through expand / reshape / view), or None."""
    while is_op(sinks, aten.expand.default, aten.reshape.default, aten.view.default):
        sinks = sinks.args[0]
    return sinks if isinstance(sinks, fx.Node) and sinks.op == "placeholder" and val(sinks).dim() == 1 else None


def _with_sinks(probs: fx.Node):
    """gpt-oss: softmax(cat([scores, sinks], -1) [- its max])[..., :-1] -> (scores, the sinks weight [H]), where
    sinks reaches the cat as expand(reshape(w, [1, H, 1, 1])); anything else -> None. (Subtracting the max first
    changes nothing: softmax subtracts it anyway.)"""
    if not (is_op(probs, aten.slice.Tensor) and probs.args[1:4] in ((-1, 0, -1), (3, 0, -1))
            and (len(probs.args) < 5 or probs.args[4] == 1)):
        return None
    soft = probs.args[0]
    if not is_op(soft, aten._softmax.default, aten.softmax.int) or soft.args[1] not in (-1, 3):
        return None
    logits = soft.args[0]
    if is_op(logits, aten.sub.Tensor):
        cat, high = logits.args
        top = high.args[0] if high.target is operator.getitem else high
        if not (is_op(top, aten.max.dim, aten.amax.default) and top.args[0] is cat):
            return None
        logits = cat
    if not is_op(logits, aten.cat.default) or logits.args[1] not in (-1, 3) or len(logits.args[0]) != 2:
        return None
    scores, sinks = logits.args[0]
    weight = _sink_weight(sinks)
    return None if weight is None else (scores, weight)


def _last_dim(dims) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, 3)


def _keepdim(node: fx.Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _is_logsumexp(node, scores) -> bool:
    """logsumexp(scores, -1), whole or as torch decomposes it: log(sum(exp(scores - m), -1)) + squeeze(m), m the
    keepdim amax with infinite maxima replaced by 0."""
    node = _strip_cast(node)
    if is_op(node, aten.logsumexp.default):
        return _strip_cast(node.args[0]) is scores and _last_dim(node.args[1]) and not _keepdim(node)
    if not is_op(node, aten.add.Tensor):
        return False
    log, sq = node.args
    if not (is_op(log, aten.log.default) and is_op(sq, aten.squeeze.dims, aten.squeeze.dim)
            and sq.args[1] in (-1, 3, [-1], [3])):
        return False
    high = sq.args[0]
    total = log.args[0]
    if not (is_op(total, aten.sum.dim_IntList) and _last_dim(total.args[1]) and not _keepdim(total)
            and is_op(total.args[0], aten.exp.default)):
        return False
    diff = total.args[0].args[0]
    if not (is_op(diff, aten.sub.Tensor) and diff.args[1] is high and _strip_cast(diff.args[0]) is scores):
        return False
    if is_op(high, aten.where.self):  # where(|amax| == inf, 0, amax)
        high = high.args[2]
    return (is_op(high, aten.amax.default) and _strip_cast(high.args[0]) is scores and _last_dim(high.args[1])
            and _keepdim(high))


def _scaled_by_lse_sinks(out_mm: fx.Node, scores):
    """Granite-SWA: matmul(softmax(s), v) * sigmoid(logsumexp(s) - w.view(1, H, 1)).unsqueeze(-1), the same as a
    sink logit w per head in the softmax's denominator (sum e^s / (sum e^s + e^w) = sigmoid(lse(s) - w)) ->
    (that product, w); anything else -> None."""
    if len(out_mm.users) != 1:
        return None
    (prod,) = out_mm.users
    if not is_op(prod, aten.mul.Tensor):
        return None
    gate = _strip_cast(prod.args[1] if prod.args[0] is out_mm else prod.args[0])
    if not (is_op(gate, aten.unsqueeze.default) and gate.args[1] in (-1, 3)):
        return None
    sig = _strip_cast(gate.args[0])
    if not is_op(sig, aten.sigmoid.default):
        return None
    diff = _strip_cast(sig.args[0])
    if not is_op(diff, aten.sub.Tensor) or not _is_logsumexp(diff.args[0], _strip_cast(scores)):
        return None
    sinks = diff.args[1]
    shape = val(sinks).shape if isinstance(sinks, fx.Node) else ()
    if len(shape) != 3 or shape[0] != 1 or shape[2] != 1:
        return None
    weight = _sink_weight(sinks)
    return None if weight is None else (prod, weight)


def _eager_attention(out_mm: fx.Node, ctx: PassContext):
    """matmul(softmax([softcap](matmul(q, k^T) * scale) [+ mask]).to(dtype), v), and with sinks (_with_sinks)."""
    if not is_op(out_mm, aten.matmul.default):
        return None
    probs, v = out_mm.args
    if is_op(probs, aten._to_copy.default, aten.to.dtype):
        probs = probs.args[0]
    if is_op(probs, aten.clone.default):
        probs = probs.args[0]
    sinks = scaled = None
    if (found := _with_sinks(probs)) is not None:
        scores, sinks = found
    elif not is_op(probs, aten._softmax.default, aten.softmax.int) or probs.args[1] not in (-1, 3):
        return None
    else:
        scores = probs.args[0]
        if (found := _scaled_by_lse_sinks(out_mm, scores)) is not None:
            scaled, sinks = found
    if is_op(scores, aten._to_copy.default, aten.to.dtype):  # softmax(..., dtype=float32)
        scores = scores.args[0]
    scores = _unshifted(scores)
    fill = None
    if is_op(scores, aten.masked_fill.Scalar) and isinstance(scores.args[2], (int, float)) and scores.args[2] <= -1e30:
        scores, fill = scores.args[0], scores.args[1]  # MPT: masked_fill(scores + bias, mask, finfo.min)
    elif is_op(scores, aten.where.self) and _very_negative(scores.args[1]):  # the same, decomposed
        scores, fill = scores.args[2], scores.args[0]
    elif (gated := _gated_scores(scores, out_mm, ctx)) is not None:
        scores, fill = gated
    mask = None
    if is_op(scores, aten.add.Tensor) and is_op(scores.args[0], aten.mul.Tensor, aten.div.Tensor, aten.matmul.default):
        scores, mask = scores.args[0], scores.args[1]
    if fill is not None:
        mask = _masked_fill_as_bias(out_mm, fill, mask, ctx)
    scores, softcap = _softcap_of(scores)
    scale = 1.0
    if is_op(scores, aten.mul.Tensor) and isinstance(scores.args[1], float):
        scale, scores = scores.args[1], scores.args[0]
    elif is_op(scores, aten.div.Tensor) and isinstance(scores.args[1], (int, float)):
        scale, scores = 1.0 / scores.args[1], scores.args[0]
    if not is_op(scores, aten.matmul.default):
        return None
    q, kt = scores.args
    if val(q).dim() != 4:
        return None
    k = _transposed_keys(kt, out_mm, ctx)
    if k is None:
        return None
    attn = _make_attention(out_mm, q, k, v, mask, False, float(scale), ctx, softcap, sinks)
    if attn is not None and scaled is not None:
        scaled.replace_all_uses_with(attn)  # the sink scaling is the kernel's sink logit
    return attn


def _unmerge_heads(t3):
    """reshape(x [B, H, S, D], [B*H, S, D]) -> x."""
    if not is_op(t3, aten.reshape.default) or val(t3.args[0]).dim() != 4 or val(t3).dim() != 3:
        return None
    x = t3.args[0]
    return x if str(val(x).shape[-1]) == str(val(t3).shape[-1]) else None


def _strip_cast(n):
    return n.args[0] if is_op(n, aten._to_copy.default, aten.to.dtype) else n


def _bmm_attention(out: fx.Node, ctx: PassContext):
    """Bloom: bmm(softmax(reshape(bias + bmm(q, k^T) * scale, [B, H, S, S]) + mask), v) with heads merged into
    the batch ([B*H, S, D] views of the 4-D q / k / v); the bias (ALiBi) joins the mask. XGLM: the softmax runs
    over the [B*H, S, S] view of max(scores + mask, finfo.min), q arrives scaled. In 16 bits the baddbmm
    is captured in fp32 (casts around q, k^T, the bias and the sum): the attention op computes in fp32 anyway."""
    p3, v3 = out.args
    v = _unmerge_heads(v3)
    if v is None or not is_op(p3, aten.reshape.default) or len(out.users) != 1:
        return None
    (user,) = out.users
    probs = _strip_cast(p3.args[0])
    while is_op(probs, aten.reshape.default):  # XGLM: the softmax over [B*H, S, S], viewed back and forth
        probs = _strip_cast(probs.args[0])
    rank = val(probs).dim() if is_op(probs, aten._softmax.default) else 0
    if rank not in (3, 4) or probs.args[1] not in (-1, rank - 1):
        return None
    scores4, mask = _strip_cast(probs.args[0]), None
    if rank == 3:  # its scores: the [B, H, S, S] sum of scores and mask, viewed with heads merged
        if not is_op(scores4, aten.reshape.default) or val(scores4.args[0]).dim() != 4:
            return None
        scores4 = _strip_cast(scores4.args[0])
    if is_op(scores4, aten.maximum.default) and _very_negative(scores4.args[1]):
        scores4 = scores4.args[0]  # XGLM clamps the masked scores at finfo.min: the same softmax
    if is_op(scores4, aten.add.Tensor) and is_op(scores4.args[0], aten.reshape.default):
        scores4, mask = scores4.args[0], scores4.args[1]
    if not is_op(scores4, aten.reshape.default):
        return None
    # 16-bit models: baddbmm runs in fp32 (its operands and the bias upcast, the sum cast back)
    s3, bias = _strip_cast(scores4.args[0]), None
    if is_op(s3, aten.add.Tensor):
        a, b = s3.args[0], s3.args[1]
        s3, bias = (b, a) if is_op(b, aten.mul.Tensor, aten.bmm.default) else (a, b)
        bias = _strip_cast(bias)
    scale = 1.0
    if is_op(s3, aten.mul.Tensor) and isinstance(s3.args[1], float):
        scale, s3 = s3.args[1], s3.args[0]
    if not is_op(s3, aten.bmm.default):
        return None
    q3, kt3 = _strip_cast(s3.args[0]), _strip_cast(s3.args[1])
    if not is_op(kt3, aten.permute.default) or list(kt3.args[1]) != [0, 2, 1]:
        return None
    q, k = _unmerge_heads(q3), _unmerge_heads(kt3.args[0])
    shape4 = list(scores4.args[1]) if len(scores4.args) > 1 else None
    if q is None or k is None or shape4 is None or len(shape4) != 4:
        return None
    gm = out.graph.owning_module
    if bias is not None:
        bv = val(bias)
        if not isinstance(bv, torch.Tensor) or bv.dim() != 3 or not isinstance(bv.shape[1], int):
            return None
        bias = new_node(gm, aten.reshape.default, (bias, [shape4[0], shape4[1], bv.shape[1], -1]), {}, ctx, out)
        mask = bias if mask is None else new_node(gm, aten.add.Tensor, (bias, mask), {}, ctx, out)
    if not is_op(user, aten.reshape.default) or [str(d) for d in val(user).shape] != [str(d) for d in val(q).shape]:
        return None
    attn = _make_attention(out, q, k, v, mask, False, float(scale), ctx)
    if attn is not None:
        user.replace_all_uses_with(attn)  # the [B, H, S, D] view of the bmm is the attention's output
    return attn


ATTENTION_RULES = {
    aten.scaled_dot_product_attention.default: _sdpa,
    aten.matmul.default: _eager_attention,
    aten.bmm.default: _bmm_attention,
}


def substitute_attention(gm: fx.GraphModule, ctx: PassContext) -> int:
    return graph_rewrite(gm, ATTENTION_RULES, ctx)
