"""braze::gated_delta_rule -> braze::cached_gated_delta_rule over a recurrent-state cache (part of the "cache"
phase: passes/kv_cache.py calls it beside the conv cache).

A gated DeltaNet (or Mamba2 SSD) layer's past is one state S [H, Dk, Dv] per row, not a cache of positions: each
layer gets a state cache `scan_state_<i>` [B, H, Dk, Dv] (fp32, as HF keeps its recurrent state) that prefill fills
and decode reads and writes one token at a time (ops/recurrent_state.py has the rules). Speculative verify would
advance the state past rejected drafts, so a model with such a layer decodes without speculation
(runtime/generate.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.graph_utils import is_op, new_node, val

STATE_PREFIX = "scan_state_"


def gated_delta_rules(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_op(n, torch.ops.braze.gated_delta_rule.default)]


def cache_gated_delta_rules(gm: fx.GraphModule, rules: list[fx.Node], state: tuple[fx.Node, fx.Node],
                            add_input: Any, ctx: PassContext) -> int:
    """Each rule reads and writes its layer's state cache."""
    cache_len, kv_start = state
    delta = sum(op_args(n)["beta"] is not None for n in rules)  # gated delta rules; the others are SSD scans
    for i, node in enumerate(rules):
        a = op_args(node)
        k, v = val(a["k"]), val(a["v"])
        with ctx.fake_mode:
            cache = add_input(f"{STATE_PREFIX}{i}", torch.empty((v.shape[0], v.shape[2], k.shape[3], v.shape[3]),
                                                                  dtype=torch.float32, device=v.device))
        rep = new_node(gm, torch.ops.braze.cached_gated_delta_rule.default,
                       (a["q"], a["k"], a["v"], a["g"], a["beta"], cache, cache_len, kv_start, a["scale"],
                        a["l2norm"], a["decay_weight"]), {}, ctx, node)
        node.replace_all_uses_with(rep)
        gm.graph.erase_node(node)
    if rules:
        kinds = [f"{count} {kind}" for count, kind in ((delta, "gated delta"), (len(rules) - delta, "SSD scan"))
                 if count]
        ctx.note(f"{len(rules)} recurrent layers ({', '.join(kinds)}) read and write a state cache (fp32)")
    return len(rules)
