"""Convolutions too wide to unroll -> braze::conv (an implicit-GEMM kernel, kernels/conv.py).

A convolution of at most CONV_UNROLL_LIMIT products per output stays aten.convolution: the fused kernels unroll it
with its neighbours and passes/conv_state.py reads it there (LFM2's causal short convs). Wider ones (a ResNet 3x3
over 64 channels, a pointwise 1x1 over 128, a conv1d over 256 channels) ran as torch's op, an eager step; here a
non-transposed conv1d / conv2d with a static weight becomes braze::conv. Its weight is handed over as a view of a
copy laid out [*taps, C / groups, C_out] (made once per weight), so the kernel's weight tile, BLOCK_K input
channels by BLOCK_N output channels of one tap, reads contiguous output channels. (In a causal LM a wide conv
over the sequence is state across positions: passes/kv_cache.py: _sequence_mixing finds braze::conv too.)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.codegen.fused import CONV_UNROLL_LIMIT
from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, graph_rewrite, new_node, val

braze = torch.ops.braze
CONV_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _int_list(v: object, spatial: int) -> list[int] | None:
    """A conv's stride / padding / dilation as `spatial` ints (one value repeated), None when not static."""
    values = list(v) if isinstance(v, (list, tuple)) else [v]
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in values) or len(values) not in (1, spatial):
        return None
    return values * spatial if len(values) == 1 else values


def _gemm_weight(weight: fx.Node, ctx: PassContext, before: fx.Node) -> fx.Node:
    """`weight` [C_out, C / groups, *taps] as a view of a copy stored [*taps, C / groups, C_out]: the same values
    and shape (the op's semantics are torch's), output channels contiguous. One copy per weight; the original is
    dropped once nothing else reads it (compiler/pipeline.py: drop_unused_weights)."""
    gm = weight.graph.owning_module
    w = ctx.weights[weight.name]
    store = (*range(2, w.dim()), 1, 0)  # the copy's dims, in the weight's order
    back = [store.index(d) for d in range(w.dim())]  # the view that reads the copy as the weight
    copy = next((n for n in gm.graph.nodes
                 if n.op == "placeholder" and n.meta.get("braze_conv_layout_of") == weight.name), None)
    if copy is None:
        copy = ctx.add_weight(gm, f"{weight.name}_gemm", w.permute(store).contiguous())
        copy.meta["braze_conv_layout_of"] = weight.name
    return new_node(gm, aten.permute.default, (copy, back), {}, ctx, before)


def _wide_conv(node: fx.Node, ctx: PassContext) -> fx.Node | None:
    if len(node.args) < 9:
        return None
    x, weight, bias, stride, padding, dilation, transposed, _, groups = node.args[:9]
    vx, vw, vb = val(x), val(weight), val(bias)
    if transposed or not isinstance(vx, torch.Tensor) or not isinstance(vw, torch.Tensor):
        return None
    if weight.op != "placeholder" or weight.name not in ctx.weights:  # a static weight (folded constants included)
        return None
    spatial = vw.dim() - 2
    if spatial not in (1, 2) or vx.dim() != vw.dim() or not isinstance(groups, int) or groups < 1:
        return None
    if vx.dtype not in CONV_FLOATS or vw.dtype != vx.dtype or (vb is not None and vb.dtype != vx.dtype):
        return None
    taps = tuple(vw.shape[2:])
    products = vw.shape[1]
    for k in taps:
        products *= k
    if products <= CONV_UNROLL_LIMIT:  # the fused kernels' (and passes/conv_state.py's)
        return None
    stride, padding, dilation = (_int_list(v, spatial) for v in (stride, padding, dilation))
    if stride is None or padding is None or dilation is None:
        return None
    gm = node.graph.owning_module
    w = _gemm_weight(weight, ctx, node)
    return new_node(gm, braze.conv.default, (x, w, bias, stride, padding, dilation, groups), {}, ctx, node)


def recognize_convolution(gm: fx.GraphModule, ctx: PassContext) -> int:
    """aten.convolution with more than CONV_UNROLL_LIMIT products per output -> braze::conv."""
    return graph_rewrite(gm, {aten.convolution.default: _wide_conv}, ctx)

