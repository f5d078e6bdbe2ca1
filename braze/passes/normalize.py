"""normalize: drop asserts and no-op copies so later patterns see the computation, not its bookkeeping.

`view` becomes `reshape` (identical on contiguous inputs, and still valid eagerly once copies are gone),
then clones, aliases and same-dtype casts are removed: the graph is functional, so they carry no meaning.
Custom ops of other libraries with a braze equivalent (HF's MoE grouped matmul) become that braze op.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, dce, val

ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}
# custom ops of other libraries that a model's export holds -> the braze op with the same semantics (a plan may
# only name aten / braze ops: a package runs without the library that defined them)
FOREIGN_OPS = {"transformers::grouped_mm_fallback": torch.ops.braze.grouped_mm.default}  # HF MoE experts


def normalize(gm: fx.GraphModule, ctx: PassContext) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in ASSERTS or (
            isinstance(node.target, torch._ops.OpOverload) and node.target.name().startswith("aten::sym_constrain")
        ):
            gm.graph.erase_node(node)
            count += 1
        elif isinstance(node.target, torch._ops.OpOverload) and node.target.name() in FOREIGN_OPS:
            node.target = FOREIGN_OPS[node.target.name()]
            count += 1
        elif node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
        elif node.target in (aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default):
            node.replace_all_uses_with(node.args[0])
            count += 1
        elif node.target in (aten._to_copy.default, aten.to.dtype):
            src = val(node.args[0])
            out = val(node)
            if isinstance(src, torch.Tensor) and src.dtype == out.dtype and src.device == out.device:
                node.replace_all_uses_with(node.args[0])
                count += 1
    dce(gm)
    gm.recompile()
    return count
