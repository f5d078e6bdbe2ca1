"""KV-cache compression in the generation plans (kv_compression=..., kv_budget=...).

The prefill graph gains, after each layer's cached attention, a braze::kv_compress step that scores the prompt's
cached tokens and compacts the kept ones into that layer's compressed cache (new inputs `kvc_cache_<i>_k/v`,
`kvc_start_<i>` and `kv_keep`); the full-size prefill cache is transient. The decode graph's caches are
re-declared at the compressed capacity, and for adakv (heads keep different counts) each layer's attention masks
with its own per-head start [B, Hkv] instead of the per-row kv_start. For rkv (re-compressed during decoding) both
graphs record each cache's latest `window` queries into a ring input `kvq_<i>` [B, Hq, window, D]: prefill the
prompt's last ones (in braze::kv_compress), decode each step's (braze::kv_record_query).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.kvcompress.policy import DURING_DECODE
from braze.ops.schema import op_args
from braze.runtime.errors import ConfigError

braze = torch.ops.braze


def _placeholder(gm: fx.GraphModule, name: str, fake: torch.Tensor) -> fx.Node:
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    node.meta["val"] = fake
    return node


def _layers(gm: fx.GraphModule, target: object = braze.cached_attention.default) -> list[tuple[int, fx.Node]]:
    """(cache index, attention node) for each cached attention (`target`: the verify graph's tree attention);
    refuses what compression cannot serve."""
    general = [n.name for n in gm.graph.nodes if n.target is braze.general_cached_attention.default]
    if general:
        raise ConfigError(f"kv_compression needs RoPE causal attention over the cache; {', '.join(general)} run "
                          "the general cached attention (positions differ from cache slots once compacted)")
    out = []
    for n in gm.graph.nodes:
        if n.target is target:
            out.append((int(op_args(n)["k_cache"].name.split("_")[2]), n))
    return out


def _cache_shape(fake: torch.Tensor, capacity: int) -> list:
    return [fake.shape[0], fake.shape[1], capacity, fake.shape[3]]


def _first_per_cache(layers: list[tuple[int, fx.Node]]) -> list[tuple[int, fx.Node]]:
    """The first attention over each cache (cross-layer KV sharing: one cache, handled once)."""
    seen: dict[int, fx.Node] = {}
    for i, node in layers:
        seen.setdefault(i, node)
    return list(seen.items())


def _insert_after(gm: fx.GraphModule, node: fx.Node, target: object, args: tuple, kwargs: dict) -> fx.Node:
    """A step right after the attention `node` that returns a copy of its output and takes over its users, so
    the step is ordered after the attention that wrote the cache and before anything reading the output."""
    with gm.graph.inserting_after(node):
        step = gm.graph.call_function(target, args, kwargs)
    with node.meta["val"].fake_mode:
        step.meta["val"] = torch.empty_like(node.meta["val"])
    for key in ("stack_trace", "nn_module_stack"):
        if key in node.meta:
            step.meta[key] = node.meta[key]
    node.replace_all_uses_with(step, delete_user_cb=lambda user: user is not step)
    return step


def _query_ring(gm: fx.GraphModule, i: int, node: fx.Node, window: int) -> fx.Node:
    """rkv: the placeholder kvq_<i> [B, Hq, window, D] (the cache's dtype) holding the latest queries."""
    a = op_args(node)
    q, kc = a["q"].meta["val"], a["k_cache"].meta["val"]
    with kc.fake_mode:
        return _placeholder(gm, f"kvq_{i}", torch.empty([kc.shape[0], q.shape[1], window, q.shape[3]],
                                                        dtype=kc.dtype, device=kc.device))


def insert_kv_compression(gm: fx.GraphModule, policy: str, capacity: int, window: int) -> int:
    """Prefill graph: one braze::kv_compress after the first attention writing each cache."""
    layers = _layers(gm)
    if not layers:
        return 0
    firsts = _first_per_cache(layers)
    keep = None
    for i, node in firsts:
        a = op_args(node)
        kc = a["k_cache"].meta["val"]
        mode = kc.fake_mode
        with mode:
            if keep is None:
                keep = _placeholder(gm, "kv_keep", torch.empty(2, dtype=torch.int64, device=kc.device))
            ck = _placeholder(gm, f"kvc_cache_{i}_k", torch.empty(_cache_shape(kc, capacity), dtype=kc.dtype,
                                                                    device=kc.device))
            cv = _placeholder(gm, f"kvc_cache_{i}_v", torch.empty(_cache_shape(kc, capacity),
                                                                    dtype=a["v_cache"].meta["val"].dtype,
                                                                    device=kc.device))
            start = _placeholder(gm, f"kvc_start_{i}", torch.empty([kc.shape[0], kc.shape[1]], dtype=torch.int32,
                                                                   device=kc.device))
        caches = (node, a["q"], a["k_cache"], a["v_cache"], a["kv_start"], ck, cv, keep, start)
        options = (float(a["scale"]), policy, int(window))
        if policy in DURING_DECODE:
            target, args = braze.kv_compress_recording.default, (*caches, _query_ring(gm, i, node, window), *options)
        else:
            target, args = braze.kv_compress.default, (*caches, *options)
        _insert_after(gm, node, target, args, {"cos": a["cos"], "sin": a["sin"]})
    gm.graph.lint()
    gm.recompile()
    return len(firsts)


def _record_queries(gm: fx.GraphModule, layers: list[tuple[int, fx.Node]], window: int) -> None:
    """rkv decode: after the first attention over each cache, braze::kv_record_query puts its query in the ring."""
    for i, node in _first_per_cache(layers):
        a = op_args(node)
        _insert_after(gm, node, braze.kv_record_query.default,
                      (node, a["q"], _query_ring(gm, i, node, window), a["cache_len"]),
                      {"cos": a["cos"], "sin": a["sin"]})


def declare_compressed_caches(gm: fx.GraphModule, capacity: int) -> None:
    """The graph's KV-cache inputs at the compressed capacity (decode, and verify for speculation: both read and
    write the compacted cache; RoPE takes positions from position_ids, not from cache slots)."""
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.name.startswith("kv_cache_"):
            fake = n.meta["val"]
            with fake.fake_mode:
                n.meta["val"] = torch.empty(_cache_shape(fake, capacity), dtype=fake.dtype, device=fake.device)


def compress_decode_graph(gm: fx.GraphModule, policy: str, capacity: int, window: int = 0) -> None:
    """Decode graph: caches at the compressed capacity; adakv layers mask with their per-head start; rkv records
    each step's queries."""
    layers = _layers(gm)
    declare_compressed_caches(gm, capacity)
    if policy in DURING_DECODE:
        _record_queries(gm, layers, window)
    elif policy == "adakv":
        _use_head_starts(gm, layers)
    gm.graph.lint()
    gm.recompile()


def compress_verify_graph(gm: fx.GraphModule, policy: str, capacity: int, window: int = 0) -> None:
    """Verify graph (speculation over a compressed cache): caches at the compressed capacity; adakv's tree
    attention masks each kv head with its own start, as decode does; rkv records every node's query (the runner
    keeps the accepted ones in the ring: runtime/speculate.py)."""
    declare_compressed_caches(gm, capacity)
    if policy in DURING_DECODE:
        _record_queries(gm, _layers(gm, braze.tree_cached_attention.default), window)
    elif policy == "adakv":
        _use_head_starts(gm, _layers(gm, braze.tree_cached_attention.default))
    gm.graph.lint()
    gm.recompile()


def _use_head_starts(gm: fx.GraphModule, layers: list[tuple[int, fx.Node]]) -> None:
    """adakv: each layer's attention masks with its cache's per-head start kvc_start_<i> [B, Hkv] (a new input)
    instead of the per-row kv_start; kv_start is argument 8 of cached_attention and tree_cached_attention."""
    starts: dict[int, fx.Node] = {}
    for i, node in layers:
        if i not in starts:
            kc = op_args(node)["k_cache"].meta["val"]
            with kc.fake_mode:
                starts[i] = _placeholder(gm, f"kvc_start_{i}", torch.empty([kc.shape[0], kc.shape[1]],
                                                                           dtype=torch.int32, device=kc.device))
        args = list(node.args)
        args[8] = starts[i]  # (q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, ...)
        node.args = tuple(args)
