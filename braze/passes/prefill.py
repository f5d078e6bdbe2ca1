"""Rewrites of the prefill graph alone (after the decode and verify graphs were copied from the cache graph).

fold_prefill_qk_norm: Qwen3's and Gemma 3's q_norm / k_norm (an RMSNorm over each head of q and of k, two fused
kernels per layer) move into the cached attention's cache-write kernel, which rotates each (position, head) row
anyway: the prefill plan saves two launches a layer. The decode plan folds the same norms into its attention block
(passes/decode_layer.py); the verify plan keeps them apart, so its accepted nodes stay bitwise decode's under
deterministic=True.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.decode_layer import qk_head_norms
from braze.passes.graph_utils import dce, is_op, new_node

braze = torch.ops.braze


def fold_prefill_qk_norm(gm: fx.GraphModule, ctx: PassContext) -> int:
    if ctx.config.kv_compression:  # its scoring reads the attention's q: the norms stay where it finds them
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, braze.cached_attention.default, braze.general_cached_attention.default):
            continue
        a = op_args(node)
        if a.get("q_norm_weight") is not None or a.get("tree_mask") is not None or a.get("cos") is None:
            continue
        qk = qk_head_norms(a, ctx, node)
        if qk is None:
            continue
        # both ops take q and k first (insert_kv_cache builds them so): the norms' inputs replace them
        rep = new_node(gm, node.target, (qk[0], qk[1], *node.args[2:]), {**node.kwargs, **qk[2]}, ctx, node)
        node.replace_all_uses_with(rep)
        gm.graph.erase_node(node)
        count += 1
    if count:
        dce(gm)
        ctx.note(f"{count} layers: q / k norms inside the cache-write kernel")
    return count
