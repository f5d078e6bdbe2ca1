"""fuse_interleaved_rope: interleaved rotary (GPT-J's rotate_every_two, Cohere) applied by the attention kernel.

Interleaved RoPE rotates the pairs (2j, 2j + 1); the attention kernels rotate (j, j + D/2) (HF rotate_half). The two
are one permutation apart: with P = [0, 2, 4, ..., 1, 3, 5, ...] over the rotated dims,
interleaved(x, cos, sin)[P] == rotate_half_rope(x[P], cos[P], sin[P]) for any cos / sin (braze/ops/library.py:
interleaved_rope_reference; tests/test_passes.py checks the identity). q.k is unchanged when q and k are permuted
alike, so an attention over interleaved-roped q / k is the same attention over permuted q / k with the permuted
cos / sin fused into the kernel. Partial rotary (GPT-J: 64 of 256 dims) and the pass-through dims are laid out as
fuse_rope_into_attention lays them out ([rot_even, pass_lo, rot_odd, pass_hi], cos padded with 1 / sin with 0).

The pattern is matched on the ATen graph as HF writes it, in the [B, H, S, D] layout (cos unsqueezed at dim 1) or
GPT-J's [B, S, H, D] (cos [B, S, 1, D], heads transposed after the rotation). When the permutation can go into the
q / k projection weights (as for partial rotary) q and k cost nothing extra; otherwise they are permuted by strided
slices the fused kernels read. Anything else is left alone: the ATen rotation then runs as generated elementwise
kernels before the attention (the KV cache stores roped keys), which is correct, only more launches.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.passes.context import PassContext
from braze.passes.fusion import ROPE_ATTENTIONS, _permute_into_weights, _replace, rope_free_attention_args
from braze.passes.graph_utils import aten, graph_rewrite, is_op, new_node, val

braze = torch.ops.braze
_HEADS_SWAP = [0, 2, 1, 3]


def _strided(n, start: int):
    """slice(x, -1, start, end, 2) -> x."""
    if not is_op(n, aten.slice.Tensor) or len(n.args) < 5 or n.args[4] != 2 or n.args[2] != start:
        return None
    x = n.args[0]
    xv = val(x)
    if n.args[1] not in (-1, xv.dim() - 1) or not isinstance(xv.shape[-1], int) or \
            not (isinstance(n.args[3], int) and n.args[3] >= xv.shape[-1]):
        return None
    return x


def _rotate_every_two_of(rot):
    """reshape(cat([unsqueeze(-x[..., 1::2], -1), unsqueeze(x[..., ::2], -1)], -1), x.shape) -> x (or stack)."""
    if not is_op(rot, aten.reshape.default):
        return None
    st = rot.args[0]
    if is_op(st, aten.stack.default) and len(st.args[0]) == 2 and len(st.args) > 1 and st.args[1] in (-1, 4):
        neg, even = st.args[0]
    elif is_op(st, aten.cat.default) and len(st.args[0]) == 2 and val(st).dim() == 5 and \
            (st.args[1] if len(st.args) > 1 else 0) in (-1, 4):
        parts = st.args[0]
        if not all(is_op(p, aten.unsqueeze.default) and p.args[1] in (-1, 4) for p in parts):
            return None
        neg, even = parts[0].args[0], parts[1].args[0]
    else:
        return None
    if not is_op(neg, aten.neg.default):
        return None
    x = _strided(even, 0)
    if x is None or _strided(neg.args[0], 1) is not x or val(x).dim() != 4 or val(x).shape[-1] % 2:
        return None
    if [str(d) for d in val(rot).shape] != [str(d) for d in val(x).shape]:
        return None
    return x


def _cos3(c, x):
    """The [B, S, D] angle table behind a broadcast cos / sin, and whether x is [B, S, H, D] (GPT-J)."""
    cv, xv = val(c), val(x)
    if not isinstance(cv, torch.Tensor) or cv.dim() != 4 or str(cv.shape[-1]) != str(xv.shape[-1]):
        return None
    if is_op(c, aten.unsqueeze.default) and c.args[1] == 1 and val(c.args[0]).dim() == 3:
        return c.args[0], False
    if str(cv.shape[2]) == "1" and str(cv.shape[1]) != "1" and str(cv.shape[1]) == str(xv.shape[1]):
        return c, True
    return None


def _interleaved(add):
    """x * cos + rotate_every_two(x) * sin -> (x, cos, sin, heads_second) with cos / sin the broadcast nodes."""
    if not is_op(add, aten.add.Tensor) or not all(is_op(m, aten.mul.Tensor) for m in add.args[:2]):
        return None
    a, b = add.args[0], add.args[1]
    for m1, m2 in ((a, b), (b, a)):
        for x, c in ((m1.args[0], m1.args[1]), (m1.args[1], m1.args[0])):
            for rot, s in ((m2.args[0], m2.args[1]), (m2.args[1], m2.args[0])):
                if isinstance(x, fx.Node) and _rotate_every_two_of(rot) is x:
                    cc, ss = _cos3(c, x), _cos3(s, x)
                    if cc is not None and ss is not None and cc[1] == ss[1]:
                        return x, cc[0], ss[0], cc[1]
    return None


def _same_value(a, b, depth: int = 12) -> bool:
    """a and b compute the same thing (GPT-J repeats the cos / sin broadcast for q and for k)."""
    if a is b:
        return True
    if depth == 0 or not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a.op != "call_function" or \
            a.target != b.target or len(a.args) != len(b.args) or a.kwargs != b.kwargs:
        return False
    for x, y in zip(a.args, b.args):
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y) or not all(_same_value(p, q, depth - 1) if isinstance(p, fx.Node) else p == q
                                           for p, q in zip(x, y)):
                return False
        elif isinstance(x, fx.Node):
            if not _same_value(x, y, depth - 1):
                return False
        elif x != y:
            return False
    return True


def _match(t):
    """q or k of an attention -> (base, cos, sin, r, heads_second): the 4-D projection view `base` whose first r
    head dims are interleaved-roped (the rest passes through), in [B, H, S, D] or GPT-J's [B, S, H, D]."""
    swapped = is_op(t, aten.permute.default) and list(t.args[1]) == _HEADS_SWAP
    inner = t.args[0] if swapped else t
    if is_op(inner, aten.cat.default) and len(inner.args[0]) == 2 and \
            (inner.args[1] if len(inner.args) > 1 else 0) in (-1, 3):
        rot, rest = inner.args[0]
        m = _interleaved(rot)
        if m is None or not is_op(m[0], aten.slice.Tensor) or not is_op(rest, aten.slice.Tensor):
            return None
        lo = m[0]
        base = lo.args[0]
        r = lo.args[3] if len(lo.args) > 3 else None
        d = val(base).shape[-1]
        if rest.args[0] is not base or lo.args[1] not in (-1, 3) or lo.args[2] not in (0, None) or \
                rest.args[1] not in (-1, 3) or rest.args[2] != r or not isinstance(r, int) or not 0 < r < d or \
                (len(lo.args) > 4 and lo.args[4] != 1) or (len(rest.args) > 4 and rest.args[4] != 1) or (d - r) % 2:
            return None
    else:
        m = _interleaved(inner)
        if m is None:
            return None
        base, r = m[0], val(m[0]).shape[-1]
    _, cos, sin, heads_second = m
    if heads_second != swapped:
        return None
    return base, cos, sin, r, heads_second


def _private(base: fx.Node, t: fx.Node) -> bool:
    """Every reader of `base` leads only to t (so the old rotation dies once the attention reads base)."""
    anc, stack = set(), [t]
    while stack:
        n = stack.pop()
        if n in anc or n is base:
            continue
        anc.add(n)
        stack.extend(a for a in n.all_input_nodes)
    seen, stack = set(), list(base.users)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n not in anc:
            return False
        seen.add(n)
        if n is not t:
            stack.extend(n.users)
    return len(t.users) == 1


def _fuse(node: fx.Node, ctx: PassContext, made: dict):
    a = rope_free_attention_args(node)
    if a is None:
        return None
    mq, mk = _match(a["q"]), _match(a["k"])
    if mq is None or mk is None:
        return None
    (bq, cos, sin, r, swapped), (bk, cos_k, sin_k, r_k, swapped_k) = mq, mk
    d = val(bq).shape[-1]
    if r != r_k or swapped != swapped_k or val(bk).shape[-1] != d or bq is bk or \
            not (_same_value(cos, cos_k) and _same_value(sin, sin_k)):
        return None
    gm = node.graph.owning_module
    h = (d - r) // 2
    perm = [*range(0, r, 2), *range(r, r + h), *range(1, r, 2), *range(r + h, d)]

    def op(target, *args):
        return new_node(gm, target, args, {}, ctx, node)

    def sl(t, lo, hi, step=1):
        return op(aten.slice.Tensor, t, -1, lo, hi, step)

    def angles(t, fill):  # [B, S, D] in the permuted layout; pass-through dims rotate by angle 0
        if swapped:
            t = op(aten.squeeze.dim, t, 2)
        parts = [sl(t, 0, r, 2), sl(t, 1, r, 2)]
        if h:
            pad = op(aten.mul.Tensor, sl(t, 0, 1), 0.0)
            if fill:
                pad = op(aten.add.Tensor, pad, fill)
            pad = op(aten.expand.default, pad, [-1, -1, h])
            parts = [parts[0], pad, parts[1], pad]
        return op(aten.cat.default, parts, -1)

    # one permuted cos / sin for every layer (GPT-J recomputes the broadcast per layer: compared by value)
    key = next((k for k in made if k[2:] == (r, d) and _same_value(k[0], cos) and _same_value(k[1], sin)), None)
    if key is None:
        key = (cos, sin, r, d)
        made[key] = (angles(cos, 1.0), angles(sin, 0.0))
    cos_p, sin_p = made[key]
    heads = (lambda t: op(aten.permute.default, t, _HEADS_SWAP)) if swapped else (lambda t: t)
    what = f"interleaved rotary ({r} of {d} dims) as half-split RoPE over permuted head dims"
    if _private(bq, a["q"]) and _private(bk, a["k"]) and _permute_into_weights([bq, bk], perm, ctx):
        ctx.note(f"{node.name}: {what}, permuted in the projection weights")
        # _permute_into_weights replaced the projection: bq / bk now read its permuted columns
        return _replace(node, ctx, q=heads(bq), k=heads(bk), cos=cos_p, sin=sin_p)
    ctx.note(f"{node.name}: {what} (strided slices)")

    def permuted(x):
        parts = [sl(x, 0, r, 2), sl(x, r, r + h), sl(x, 1, r, 2), sl(x, r + h, d)]
        return op(aten.cat.default, [p for p, n in zip(parts, (r, h, r, h)) if n], -1)

    return _replace(node, ctx, q=heads(permuted(bq)), k=heads(permuted(bk)), cos=cos_p, sin=sin_p)


def fuse_interleaved_rope(gm: fx.GraphModule, ctx: PassContext) -> int:
    made: dict = {}
    return graph_rewrite(gm, dict.fromkeys(ROPE_ATTENTIONS, lambda node, c: _fuse(node, c, made)), ctx)
