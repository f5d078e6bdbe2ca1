"""fold_constants: pointwise math on weights alone is done once, at compile time.

Gemma's RMSNorm scales by (1 + w), which the graph computes from the weight on every call (one more launch per
norm); casts of weights do the same in mixed precision. A pointwise node whose tensor inputs are all weights
becomes a new weight holding its value (chains fold in graph order). Views of weights are left alone: the linear
and attention patterns read them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, dce

FOLDABLE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten._to_copy.default,
            aten.neg.default, aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.pow.Tensor_Scalar,
            aten.reciprocal.default, aten.add.Scalar, aten.mul.Scalar, aten.pow.Tensor_Tensor}
# Not folded: tensors made from nothing (arange / full of a static shape, e.g. MPT's ALiBi slopes). As weights,
# the fused kernels read them wrongly through a slice whose start is symbolic (sym_max(0, 128 - S)): see the
# architecture notes in benchmarks/results/2026-11-29-architectures-cpu.md.


def fold_constants(gm: fx.GraphModule, ctx: PassContext) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in FOLDABLE:
            continue
        inputs = node.all_input_nodes
        if not inputs or any(n.op != "placeholder" or n.name not in ctx.weights for n in inputs):
            continue
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor) or not all(isinstance(s, int) for s in out.shape):
            continue
        if out.numel() > max(ctx.weights[n.name].numel() for n in inputs):
            continue  # a broadcast would store a bigger tensor than it reads
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: ctx.weights[n.name])
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        op = node.target._schema.name.split("::")[-1].strip("_")
        folded = ctx.add_weight(gm, f"{inputs[0].name}_{op}"[:60], value.contiguous())
        node.replace_all_uses_with(folded)
        gm.graph.erase_node(node)
        count += 1
    dce(gm)
    return count
