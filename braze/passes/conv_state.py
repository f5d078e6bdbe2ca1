"""Causal depthwise convolutions over the sequence -> braze::cached_conv1d over a conv cache (part of the "cache"
phase: passes/kv_cache.py calls it before refusing state across positions).

LFM2's short conv (and the causal conv of Mamba-style layers) is `conv1d(x, w, padding=K-1, groups=C)[..., :S]`,
or a conv without padding over `F.pad(x, (K - 1, 0))`. Each output reads the K - 1 inputs before it, so decoding
one token needs those inputs: the runtime keeps every position's input in a conv cache [B, 1, max_seq, C] indexed
by cache slot like the KV cache (ops/conv_state.py), and the generation plans decode such a model over it instead
of recomputing the prefix every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, is_op, new_node, val


@dataclass(frozen=True)
class CausalConv:
    output: fx.Node  # the node whose value the cached conv replaces (the slice, or the unpadded conv)
    conv: fx.Node
    x: fx.Node  # [B, C, S] before any padding
    taps: int


def _same_size(a: Any, b: Any) -> bool:
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return isinstance(a, int) and isinstance(b, int) and a == b


def _depthwise_taps(conv: fx.Node, padding: int | None) -> int | None:
    """K when `conv` is a stride-1, undilated depthwise conv1d of K >= 2 taps with `padding` (None: K - 1)."""
    if not is_op(conv, aten.convolution.default) or len(conv.args) < 9:
        return None
    x, w = val(conv.args[0]), val(conv.args[1])
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.dtype.is_floating_point or w.dim() != 3:
        return None
    stride, pad, dilation, transposed, _, groups = conv.args[3:9]
    taps = w.shape[2]
    if not isinstance(taps, int) or taps < 2 or w.shape[1] != 1 or transposed:
        return None
    if not (_same_size(groups, x.shape[1]) and _same_size(w.shape[0], x.shape[1])):
        return None
    want = taps - 1 if padding is None else padding
    return taps if list(stride) == [1] and list(dilation) == [1] and list(pad) == [want] else None


def causal_convs(gm: fx.GraphModule) -> list[CausalConv]:
    """The graph's causal depthwise conv1ds over the token axis (x [batch, C, S], S the input_ids' length, C
    static), in either form."""
    ids = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "input_ids"), None)
    if ids is None:
        return []
    batch, seq = val(ids).shape[:2]
    found = [c for c in _causal_convs(gm) if isinstance(val(c.x).shape[1], int)
             and _same_size(val(c.x).shape[2], seq) and _same_size(val(c.x).shape[0], batch)]
    return found


def _causal_convs(gm: fx.GraphModule) -> list[CausalConv]:
    found = []
    for n in gm.graph.nodes:
        if is_op(n, aten.slice.Tensor) and isinstance(n.args[0], fx.Node):  # conv(x, padding=K-1)[..., :S]
            conv = n.args[0]
            taps = _depthwise_taps(conv, None)
            dim = n.args[1] if len(n.args) > 1 else 0
            start = n.args[2] if len(n.args) > 2 else None
            step = n.args[4] if len(n.args) > 4 else 1
            if (taps and len(conv.users) == 1 and dim in (2, -1) and start in (None, 0) and step == 1
                    and _same_size(val(n).shape[2], val(conv.args[0]).shape[2])):
                found.append(CausalConv(n, conv, conv.args[0], taps))
        elif is_op(n, aten.convolution.default) and is_op(n.args[0], aten.constant_pad_nd.default):
            padded = n.args[0]  # conv(F.pad(x, (K - 1, 0)), padding=0)
            taps = _depthwise_taps(n, 0)
            value = padded.args[2] if len(padded.args) > 2 else 0
            if taps and list(padded.args[1]) == [taps - 1, 0] and value == 0:
                found.append(CausalConv(n, n, padded.args[0], taps))
    return found


def cache_causal_convs(gm: fx.GraphModule, convs: list[CausalConv], state: tuple[fx.Node, fx.Node],
                       add_input: Any, ctx: PassContext) -> int:
    """Each conv reads and writes a conv cache `conv_cache_<i>` [B, 1, max_seq, C] (the model's dtype: it holds
    the conv's inputs as they are, so decoding is exact)."""
    cache_len, kv_start = state
    gated = activated = 0
    for i, c in enumerate(convs):
        x = val(c.x)
        with ctx.fake_mode:
            cache = add_input(f"conv_cache_{i}", torch.empty((x.shape[0], 1, ctx.config.max_seq, x.shape[1]),
                                                             dtype=x.dtype, device=x.device))
        factors = _factors(c.x) if len(c.x.users) == 1 else None  # B * x: x and its gate
        x_node, gate_in = factors or (c.x, None)
        after = next(iter(c.output.users)) if len(c.output.users) == 1 else None
        activation, out = "none", c.output
        if is_op(after, aten.silu.default):  # silu(conv(...)) (Qwen3.5's causal conv): the kernel's epilogue
            activation, out, after = "silu", after, None
        factors = _factors(after) if after is not None else None  # C * conv(...): the other factor gates it
        gate_out = (factors[1] if factors[0] is c.output else factors[0]) if factors else None
        if gate_out is not None and _depends_on(gate_out, c.conv):  # conv * f(conv): the gate is not an input
            gate_out = None
        if gate_out is not None:
            out = after
        kwargs: dict[str, Any] = {k: g for k, g in (("gate_in", gate_in), ("gate_out", gate_out)) if g is not None}
        if activation != "none":
            kwargs["activation"] = activation
        rep = new_node(gm, torch.ops.braze.cached_conv1d.default,
                       (x_node, c.conv.args[1], c.conv.args[2], cache, cache_len, kv_start), kwargs, ctx, out)
        out.replace_all_uses_with(rep)
        gated += (gate_in is not None) + (gate_out is not None)
        activated += activation != "none"
    if convs:
        taps = sorted({c.taps for c in convs})
        ctx.note(f"{len(convs)} causal convolutions ({'/'.join(map(str, taps))} taps) read and write a conv cache "
                 f"of {ctx.config.max_seq} positions" + (f"; {gated} gating multiplies in their kernels" if gated
                                                        else "")
                 + (f"; {activated} activations in their kernels" if activated else ""))
    return len(convs)


def _factors(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when `node` is a * b of two tensors of its own shape and dtype (LFM2's gates: the kernel multiplies
    them elementwise and rounds to that dtype, as the separate multiply did)."""
    if not is_op(node, aten.mul.Tensor) or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    out = val(node)
    for t in node.args[:2]:
        v = val(t)
        if not (isinstance(v, torch.Tensor) and v.dtype == out.dtype and v.dim() == out.dim()
                and all(_same_size(p, q) for p, q in zip(v.shape, out.shape))):
            return None
    return node.args[0], node.args[1]


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False
