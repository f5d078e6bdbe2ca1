"""lower_complex: complex arithmetic as pairs of real tensors, so it runs in the generated kernels.

Llama 4 (and Meta's reference code) rotate q / k as complex numbers: view_as_complex(x.reshape(..., D / 2, 2)) *
polar(1, angle), then view_as_real. Triton has no complex dtype, so each of those ops ran eagerly inside the plan (13
eager steps in a 2-layer Llama 4). Here every complex value is carried as (real, imaginary) real tensors of the
same shape: view_as_complex selects the last dim's two halves, polar is abs * (cos, sin), a product is
(a c - b d, a d + b c), views apply to both parts, and view_as_real stacks them back. The ops are the ones torch's
complex kernels compute (one rounding per product and sum), so results agree to rounding.

A graph whose complex values reach any other op is left as it was (the eager steps stay, exact).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, dce, is_op, new_node, val

# ops that act on a complex tensor's shape only: applied to both parts with the same arguments
_SHAPE_OPS = (aten.unsqueeze.default, aten.reshape.default, aten.view.default, aten.expand.default,
              aten.slice.Tensor, aten.select.int, aten.permute.default, aten.transpose.int, aten.squeeze.dim,
              aten.clone.default, aten.alias.default)


def _is_complex(node: Any) -> bool:
    v = val(node) if isinstance(node, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.is_complex()


def _supported(node: fx.Node, ctx_weights: dict) -> bool:
    """Whether a complex-valued node is one this pass rewrites, and every reader of it is too (or view_as_real)."""
    if node.op == "placeholder":
        return node.name in ctx_weights
    if node.op != "call_function":
        return False
    if is_op(node, aten.view_as_complex.default, aten.polar.default):
        ok = True
    elif is_op(node, aten.mul.Tensor):
        ok = not any(isinstance(a, complex) for a in node.args)
    elif is_op(node, *_SHAPE_OPS):
        ok = not node.kwargs or is_op(node, aten.clone.default)
    else:
        ok = False
    return ok


def lower_complex(gm: fx.GraphModule, ctx: PassContext) -> int:
    nodes = [n for n in gm.graph.nodes if _is_complex(n)]
    if not nodes:
        return 0
    if not all(_supported(n, ctx.weights) for n in nodes) or any(
            not (_is_complex(u) or is_op(u, aten.view_as_real.default)) for n in nodes for u in n.users):
        ctx.note("complex values reach an op without a real-pair rule: they run eagerly")
        return 0
    parts: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    for n in nodes:
        parts[n] = _split(gm, n, parts, ctx)
    count = 0
    for n in nodes:
        for u in list(n.users):
            if is_op(u, aten.view_as_real.default):
                re, im = (new_node(gm, aten.unsqueeze.default, (p, -1), {}, ctx, u) for p in parts[n])
                u.replace_all_uses_with(new_node(gm, aten.cat.default, ([re, im], -1), {}, ctx, u))
                count += 1
    dce(gm)
    for n in nodes:  # complex weights now read as their two real halves
        if n.op == "placeholder" and not n.users:
            gm.graph.erase_node(n)
            ctx.weights.pop(n.name, None)
    ctx.note(f"{len(nodes)} complex values as real / imaginary pairs ({count} view_as_real)")
    return len(nodes)


def _split(gm: fx.GraphModule, n: fx.Node, parts: dict, ctx: PassContext) -> tuple[fx.Node, fx.Node]:
    def op(target, *args, **kwargs):
        return new_node(gm, target, args, kwargs, ctx, n)

    if n.op == "placeholder":  # a complex weight (a precomputed freqs_cis buffer): two real weights
        w = ctx.weights[n.name]
        return (ctx.add_weight(gm, f"{n.name}_real", w.real.contiguous()),
                ctx.add_weight(gm, f"{n.name}_imag", w.imag.contiguous()))
    if is_op(n, aten.view_as_complex.default):
        x = n.args[0]
        return op(aten.select.int, x, -1, 0), op(aten.select.int, x, -1, 1)
    if is_op(n, aten.polar.default):
        mag, angle = n.args
        cos, sin = op(aten.cos.default, angle), op(aten.sin.default, angle)
        if is_op(mag, aten.full_like.default) and mag.args[1] == 1:  # polar(ones_like(angle), angle): no scaling
            return cos, sin
        return op(aten.mul.Tensor, mag, cos), op(aten.mul.Tensor, mag, sin)
    if is_op(n, aten.mul.Tensor):
        a, b = n.args[:2]
        if _is_complex(a) and _is_complex(b):
            (ar, ai), (br, bi) = parts[a], parts[b]
            re = op(aten.sub.Tensor, op(aten.mul.Tensor, ar, br), op(aten.mul.Tensor, ai, bi))
            im = op(aten.add.Tensor, op(aten.mul.Tensor, ar, bi), op(aten.mul.Tensor, ai, br))
            return re, im
        z, s = (a, b) if _is_complex(a) else (b, a)  # a complex value times a real tensor or scalar
        return op(aten.mul.Tensor, parts[z][0], s), op(aten.mul.Tensor, parts[z][1], s)
    src, rest = n.args[0], n.args[1:]  # a shape op
    return tuple(new_node(gm, n.target, (p, *rest), dict(n.kwargs), ctx, n) for p in parts[src])
