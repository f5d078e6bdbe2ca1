"""Split W6A8 / W6A6 linears so their activation quantization can fuse into the kernel that produces x.

``braze::int6_linear(x, ..., act_bits in {8, 6})`` quantizes x inside its own template launch (a standalone
quantizer kernel, then the int8 matmul). This pass rewrites it as

    s = braze::int6_act_scales(x, group, act_bits)        # fp32 [..., n_groups]
    q = braze::int6_act_codes(x, s, group, act_bits)      # int8 [..., n_groups * group], zero tail
    y = braze::int6_linear_q(q, s, packed, scales, bias, K, group, act_bits, dtype)

Why ops rather than a flag on int6_linear: the two quantization ops belong to the generic fused family (a
per-group absmax is a last-dim reduction over a [rows, n_groups, group] view of x), so the scheduler merges
them into the region that computes x — the decomposed RMSNorm before q/k/v and gate/up, the SwiGLU
``silu(gate) * up`` before down_proj, and any pointwise op in between (e.g. a smoothing ``x * inv_s``). When x
comes from a template (attention output before o_proj) they still form one kernel of their own, the same
single launch as the old standalone quantizer. Every new op has a torch reference, so the graph stays runnable.
Linears reading the same x with the same (group, act_bits) share one (s, q) pair.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import braze.ops  # noqa: F401  (registers braze::*)
from braze.ops.quant_ops import A16
from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.graph_utils import dce, new_node, val

braze = torch.ops.braze
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _splittable(node: fx.Node) -> bool:
    """Only what the int8 matmul kernel supports (groups of 128k, float x): the rest keeps int6_linear."""
    a = op_args(node)
    if int(a["act_bits"]) == A16 or int(a["group_size"]) % 128:
        return False
    group = int(a["group_size"])
    return val(a["x"]).dtype in KERNEL_DTYPES and group & (group - 1) == 0  # the fused reshape needs 2**n


def _quantized(gm: fx.GraphModule, x: fx.Node, group: int, bits: int, ctx: PassContext, before: fx.Node,
               cache: dict[tuple[fx.Node, int, int], tuple[fx.Node, fx.Node]]) -> tuple[fx.Node, fx.Node]:
    key = (x, group, bits)
    if key not in cache:
        s = new_node(gm, braze.int6_act_scales.default, (x, group, bits), {}, ctx, before)
        q = new_node(gm, braze.int6_act_codes.default, (x, s, group, bits), {}, ctx, before)
        cache[key] = (q, s)
    return cache[key]


def split_int6_act_quant(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Rewrite each W6A8 / W6A6 int6_linear into quantize-activations ops + int6_linear_q."""
    cache: dict[tuple[fx.Node, int, int], tuple[fx.Node, fx.Node]] = {}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not braze.int6_linear.default or not _splittable(node):
            continue
        a = op_args(node)
        group, bits = int(a["group_size"]), int(a["act_bits"])
        q, s = _quantized(gm, a["x"], group, bits, ctx, node, cache)
        args = (q, s, a["packed"], a["scales"], a["bias"], int(a["in_features"]), group, bits, val(node).dtype)
        y = new_node(gm, braze.int6_linear_q.default, args, {}, ctx, node)
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        count += 1
    if count:
        ctx.note(f"{count} W6A8/W6A6 linears read pre-quantized activations ({len(cache)} quantizations)")
    dce(gm)
    return count
