"""fold_constants: pointwise math on weights alone is done once, at compile time.

Gemma's RMSNorm scales by (1 + w), which the graph computes from the weight on every call (one more launch per
norm); casts of weights do the same in mixed precision, and rotary embeddings that build their frequencies in the
forward (PhiMoE: 1 / theta ** (arange(0, D, 2) / D), a pow with a scalar base) on every call. A pointwise node whose
tensor inputs are all weights or static aranges becomes a new weight holding its value (chains fold in graph
order). Views of weights are left alone: the linear and attention patterns read them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, dce

FOLDABLE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten._to_copy.default,
            aten.neg.default, aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.pow.Tensor_Scalar,
            aten.reciprocal.default, aten.add.Scalar, aten.mul.Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar}
# A static arange (int bounds, e.g. a rotary table's exponents) is an input of a fold, never folded by itself: a
# tensor made from nothing and only viewed stays in the graph (MPT's ALiBi positions: as weights, the fused kernels
# read them wrongly through a slice whose start is symbolic, sym_max(0, 128 - S); see the architecture notes in
# benchmarks/results/2026-11-29-architectures-cpu.md).
FACTORIES = {aten.arange.default, aten.arange.start, aten.arange.start_step}


def fold_constants(gm: fx.GraphModule, ctx: PassContext) -> int:
    count = 0
    made: dict[fx.Node, torch.Tensor] = {}  # static aranges' values, computed when a fold reads them
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in FOLDABLE:
            continue
        inputs = node.all_input_nodes
        if not inputs or any(_constant(n, ctx, made) is None for n in inputs):
            continue
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor) or not all(isinstance(s, int) for s in out.shape):
            continue
        if out.numel() > max(made[n].numel() for n in inputs):
            continue  # a broadcast would store a bigger tensor than it reads
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), made.__getitem__)
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        op = node.target._schema.name.split("::")[-1].strip("_")
        folded = ctx.add_weight(gm, f"{inputs[0].name}_{op}"[:60], value.contiguous())
        node.replace_all_uses_with(folded)
        gm.graph.erase_node(node)
        count += 1
    dce(gm)
    return count


def _constant(node: fx.Node, ctx: PassContext, made: dict[fx.Node, torch.Tensor]) -> torch.Tensor | None:
    """A weight's value, or a static arange's (no symbolic bound); None for anything computed at run time."""
    if node not in made:
        if node.op == "placeholder" and node.name in ctx.weights:
            made[node] = ctx.weights[node.name]
        elif node.op == "call_function" and node.target in FACTORIES and not node.all_input_nodes:
            with torch.no_grad():
                made[node] = node.target(*node.args, **node.kwargs)
    return made.get(node)
