"""Attention substitution: SDPA and eager (matmul-softmax-matmul) attention become braze::attention.

GQA's repeat_kv (unsqueeze -> expand -> reshape) is stripped so the kernel reads the shared K/V heads directly.
For causal LMs the mask that HF builds from position ids is evaluated at compile time (braze/passes/masks.py) and,
when it is plain causal, replaced by the causal flag (the TRT-LLM AutoDeploy approach): the compiled forward
assumes standard positions, and padding is handled by the runtime. A sliding-window mask becomes the window
argument of braze::general_attention, as does logit softcapping (Gemma 2): no flash kernel has those, so that op
runs its reference eagerly and the report lists it. Any other mask is kept as the graph computes it.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, graph_rewrite, is_op, new_node, val
from braze.passes.masks import classify_mask

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
    if dropout:
        return None
    d = val(q).shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    return _make_attention(node, q, k, v, mask, bool(causal), float(scale), ctx)


def _make_attention(anchor, q, k, v, mask, causal, scale, ctx, softcap=0.0):
    k, v = strip_repeat_kv(k), strip_repeat_kv(v)
    if val(q).shape[1] % val(k).shape[1]:
        return None
    gm = anchor.graph.owning_module
    window = 0
    if mask is not None and ctx.causal_lm:
        info = classify_mask(gm, mask, ctx)
        if info.kind == "causal":
            ctx.note(f"{anchor.name}: HF mask replaced by the causal flag")
            mask, causal = None, True
        elif info.kind == "window":
            ctx.note(f"{anchor.name}: HF mask replaced by the causal flag and a sliding window of {info.window}")
            mask, causal, window = None, True, info.window
        else:
            ctx.note(f"{anchor.name}: HF mask kept ({info.describe()})")
    if softcap or window:  # no flash kernel has these: the general op (runs its reference eagerly)
        kwargs = {"softcap": float(softcap), "window": int(window)}
        if mask is not None:
            kwargs["attn_mask"] = mask
        what = ", ".join(x for x in (softcap and f"softcap {softcap:g}", window and f"sliding window {window}") if x)
        ctx.note(f"{anchor.name}: general attention ({what}) runs eagerly")
        return new_node(gm, braze.general_attention.default, (q, k, v, scale, causal), kwargs, ctx, anchor)
    kwargs = {"attn_mask": mask} if mask is not None else {}
    return new_node(gm, braze.attention.default, (q, k, v, scale, causal), kwargs, ctx, anchor)


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


def _transposed_keys(kt):
    """k^T as transpose(k, 2, 3) / transpose(-2, -1) / permute(0, 1, 3, 2)."""
    if is_op(kt, aten.transpose.int) and {kt.args[1] % 4, kt.args[2] % 4} == {2, 3}:
        return kt.args[0]
    if is_op(kt, aten.permute.default) and list(kt.args[1]) == [0, 1, 3, 2]:
        return kt.args[0]
    return None


def _eager_attention(out_mm: fx.Node, ctx: PassContext):
    """matmul(softmax([softcap](matmul(q, k^T) * scale) [+ mask]).to(dtype), v)."""
    if not is_op(out_mm, aten.matmul.default):
        return None
    probs, v = out_mm.args
    if is_op(probs, aten._to_copy.default, aten.to.dtype):
        probs = probs.args[0]
    if not is_op(probs, aten._softmax.default, aten.softmax.int) or probs.args[1] not in (-1, 3):
        return None
    scores = probs.args[0]
    if is_op(scores, aten._to_copy.default, aten.to.dtype):  # softmax(..., dtype=float32)
        scores = scores.args[0]
    mask = None
    if is_op(scores, aten.add.Tensor) and is_op(scores.args[0], aten.mul.Tensor, aten.div.Tensor, aten.matmul.default):
        scores, mask = scores.args[0], scores.args[1]
    scores, softcap = _softcap_of(scores)
    scale = 1.0
    if is_op(scores, aten.mul.Tensor) and isinstance(scores.args[1], float):
        scale, scores = scores.args[1], scores.args[0]
    elif is_op(scores, aten.div.Tensor) and isinstance(scores.args[1], (int, float)):
        scale, scores = 1.0 / scores.args[1], scores.args[0]
    if not is_op(scores, aten.matmul.default):
        return None
    q, kt = scores.args
    k = _transposed_keys(kt)
    if k is None or val(q).dim() != 4:
        return None
    return _make_attention(out_mm, q, k, v, mask, False, float(scale), ctx, softcap)


ATTENTION_RULES = {
    aten.scaled_dot_product_attention.default: _sdpa,
    aten.matmul.default: _eager_attention,
}


def substitute_attention(gm: fx.GraphModule, ctx: PassContext) -> int:
    return graph_rewrite(gm, ATTENTION_RULES, ctx)
