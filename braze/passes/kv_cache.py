"""insert_kv_cache: causal attention becomes attention over a static KV cache owned by the runtime.

The captured graph has no cache; this pass (run on a copy of the rewritten forward graph) adds the runtime's state
as graph inputs — `cache_len` (int64 [1], where this call's tokens go), `kv_start` (int32 [B], left-padding per row)
and one K and one V cache per layer [B, Hkv, max_seq, D] — and rewrites each RoPE-fused causal braze::attention
into braze::cached_attention, which writes K/V and attends over the cache. The same graph serves prefill
(S tokens) and, re-specialized to S = 1, decode.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.graph_utils import dce, is_op, new_node, val
from braze.runtime.errors import CaptureError

braze = torch.ops.braze
STATE_INPUTS = ("cache_len", "kv_start")


def insert_kv_cache(gm: fx.GraphModule, ctx: PassContext) -> int:
    attn = [n for n in gm.graph.nodes if is_op(n, braze.attention.default)]
    if not attn:
        return 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ids = next(n for n in placeholders if n.name == "input_ids")
    batch = val(ids).shape[0]
    max_seq = ctx.config.max_seq

    def add_input(name: str, fake: torch.Tensor) -> fx.Node:
        last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        with gm.graph.inserting_after(last):
            node = gm.graph.placeholder(name)
        node.meta["val"] = fake
        return node

    with ctx.fake_mode:
        cache_len = add_input("cache_len", torch.empty(1, dtype=torch.int64))
        kv_start = add_input("kv_start", torch.empty(batch, dtype=torch.int32))
    count = 0
    for i, node in enumerate(attn):
        a = op_args(node)
        if not a.get("causal") or a.get("cos") is None or a.get("attn_mask") is not None:
            raise CaptureError(f"{node.name}: generation needs causal attention with RoPE fused into it")
        k = val(a["k"])
        with ctx.fake_mode:
            shape = (batch, k.shape[1], max_seq, k.shape[3])
            k_cache = add_input(f"kv_cache_{i}_k", torch.empty(shape, dtype=k.dtype))
            v_cache = add_input(f"kv_cache_{i}_v", torch.empty(shape, dtype=val(a["v"]).dtype))
        rep = new_node(gm, braze.cached_attention.default,
                       (a["q"], a["k"], a["v"], a["cos"], a["sin"], k_cache, v_cache, cache_len, kv_start,
                        float(a["scale"])), {}, ctx, node)
        node.replace_all_uses_with(rep)
        count += 1
    dce(gm)
    gm.recompile()
    ctx.note(f"{count} layers read and write a static KV cache of {max_seq} positions")
    return count


def insert_tree_verify(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Verify-graph insertion: cached attention gains a `tree_mask` input [B, S, S] so one forward scores a
    whole draft tree per row (each draft token sees the cache, the pending token and its ancestors; positions =
    base + depth), and `cache_len` becomes per row [B]: the rows of a batched verify step accept different
    numbers of drafts, so they hold different cache lengths."""
    nodes = [n for n in gm.graph.nodes if is_op(n, braze.cached_attention.default)]
    if not nodes:
        return 0
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    batch, seq = val(placeholders["input_ids"]).shape[:2]
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        mask = gm.graph.placeholder("tree_mask")
    with ctx.fake_mode:
        mask.meta["val"] = torch.empty((batch, seq, seq), dtype=torch.bool)
        placeholders["cache_len"].meta["val"] = torch.empty(batch, dtype=torch.int64)
    for node in nodes:
        a = op_args(node)
        args = tuple(a[n] for n in ("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "cache_len", "kv_start"))
        rep = new_node(gm, braze.tree_cached_attention.default, (*args, mask, float(a["scale"])), {}, ctx, node)
        node.replace_all_uses_with(rep)
    dce(gm)
    gm.recompile()
    ctx.note(f"{len(nodes)} layers verify draft trees (tree_mask input)")
    return len(nodes)
