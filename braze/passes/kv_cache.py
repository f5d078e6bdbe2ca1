"""insert_kv_cache: causal attention becomes attention over a static KV cache owned by the runtime.

The captured graph has no cache; this pass (run on a copy of the rewritten forward graph) adds the runtime's state
as graph inputs — `cache_len` (int64 [1], where this call's tokens go), `kv_start` (int32 [B], left-padding per row)
and one K and one V cache per layer [B, Hkv, max_seq, D] — and rewrites each RoPE-fused causal braze::attention
into braze::cached_attention, which writes K/V and attends over the cache. The same graph serves prefill
(S tokens) and, re-specialized to S = 1, decode.

Every other attention (RoPE not fused: q / k rotated by the graph, or no rotary; softcap; sliding window; sinks;
ALiBi slopes; any other static mask, kept as a [H, N, N] bias weight by position) becomes
braze::general_cached_attention, whose reference writes the same cache and attends with the window / softcap /
sinks / ALiBi / bias. Without RoPE to fuse it gets RoPE at angle 0 (the identity), so its kernel family
(kernels/attention.py) runs softcap, windows, sinks and ALiBi; a dense bias runs the reference eagerly, and the
report says which layer and why. Generation never refuses an attention whose mask
depends only on positions.

Causal depthwise convolutions over the sequence (LFM2's short convs) get a conv cache of their own
(passes/conv_state.py: braze::cached_conv1d), gated DeltaNet layers a recurrent-state cache
(passes/recurrent_state.py); state across positions that no cache carries (another scan, a non-causal conv, other
linear attention's matmuls) keeps the model from the KV-cache plans (`_sequence_mixing`).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from braze.compiler.config import kv_cache_dtype
from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.conv_state import cache_causal_convs, causal_convs
from braze.passes.graph_utils import aten, dce, is_op, new_node, val
from braze.passes.masks import MaskInfo, classify_mask
from braze.passes.recurrent_state import cache_gated_delta_rules, gated_delta_rules
from braze.runtime.errors import KVCacheUnsupportedError

braze = torch.ops.braze
STATE_INPUTS = ("cache_len", "kv_start")


def _general_reasons(a: dict, general: bool, info: MaskInfo | None) -> list[str]:
    reasons = []
    if general and a.get("softcap"):
        reasons.append(f"softcap {a['softcap']:g}")
    if general and a.get("window"):
        reasons.append(f"sliding window {a['window']}")
    if general and a.get("sinks") is not None:
        reasons.append("attention sinks")
    if general and a.get("alibi") is not None:
        reasons.append("ALiBi")
    if info is not None:
        reasons.append(f"mask: {info.describe()}")
    elif not a.get("causal"):
        reasons.append("not causal")
    return reasons


def _unrecognized_attention(gm: fx.GraphModule) -> list[str]:
    """Softmaxes over [.., S, S]-like scores (3-D or more, over a dim that grows with the sequence) that no
    attention op took: attention braze did not recognize (Bloom's baddbmm form...). A KV cache would leave those
    layers without their past. (A softmax over a fixed size, DeepSeek V4's 4 x 4 hyper-connection mixing, is not
    attention.)"""
    return [n.meta["braze_softmax_of"] for n in gm.graph.nodes
            if "braze_softmax_of" in n.meta and isinstance(val(n), torch.Tensor) and val(n).dim() >= 3
            and not isinstance(val(n).shape[n.meta.get("braze_softmax_dim", -1)], int)]


_SCANS = {aten.cumsum.default, aten.cumprod.default, aten.cummax.default, aten.cummin.default,
          aten.logcumsumexp.default}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.prod.dim_int,
               aten.var.correction, aten._softmax.default, aten._log_softmax.default}
_MATMULS = {aten.mm.default, aten.bmm.default, braze.bmm.default}


def _sequence_mixing(gm: fx.GraphModule, cached: frozenset[fx.Node] = frozenset()) -> list[str]:
    """Ops other than attention whose output at one position reads other positions of a float activation: a
    convolution over the sequence (the short convs of LFM2 / Mamba-style hybrids), a scan, a reduction or a
    matmul contracting over it (linear attention). The KV-cache plans carry past tokens only through attention's
    cache and the conv cache of causal depthwise convs (`cached`), so such a model would decode without that
    state: silently wrong tokens."""
    ids = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "input_ids"), None)
    seq = val(ids).shape[1] if ids is not None else None
    if not isinstance(seq, torch.SymInt):
        return []
    symbols = seq.node.expr.free_symbols

    def over_seq(size: object) -> bool:
        return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols & symbols)

    found = []
    for n in gm.graph.nodes:
        x = val(n.args[0]) if n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node) else None
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            continue
        if n.target in (aten.convolution.default, braze.conv.default):  # (braze::conv: the wide ones)
            if n in cached:
                continue
            w, stride, padding = val(n.args[1]), n.args[3], n.args[4]
            if all(k == 1 for k in w.shape[2:]) and all(s == 1 for s in stride) and not any(padding):
                continue  # a 1-tap conv reads its own position only: a per-position linear map
            dims = range(2, x.dim())
            what = "a convolution over the sequence"
        elif n.target in _SCANS or n.target in _REDUCTIONS:
            dims = n.args[1] if len(n.args) > 1 and n.args[1] is not None else range(x.dim())
            dims = [dims] if isinstance(dims, int) else dims
            what = "a scan over the sequence" if n.target in _SCANS else "a reduction over the sequence"
        elif n.target in _MATMULS:
            dims = [x.dim() - 1]  # the contracted dim of the left operand
            what = "a matmul contracting over the sequence"
        else:
            continue
        if any(over_seq(x.shape[d % x.dim()]) for d in dims):
            found.append(f"{n.name} ({what})")
    return found


def insert_kv_cache(gm: fx.GraphModule, ctx: PassContext) -> int:
    missed = _unrecognized_attention(gm)
    if missed:
        raise KVCacheUnsupportedError(
            f"{', '.join(missed)}: softmax over attention scores that braze did not recognize as attention; generation "
            "over a KV cache would drop those layers' past tokens, so braze does not build it (the forward plan is "
            "exact)")
    convs = causal_convs(gm)
    mixing = _sequence_mixing(gm, frozenset(c.conv for c in convs))
    if mixing:
        more = f" (+{len(mixing) - 2} more)" if len(mixing) > 2 else ""
        raise KVCacheUnsupportedError(
            f"{', '.join(mixing[:2])}{more}: state across positions outside attention, which a KV cache does not "
            "carry; generation over one would lose it, so braze does not build it (the forward plan is exact)")
    attn = [n for n in gm.graph.nodes if is_op(n, braze.attention.default, braze.general_attention.default)]
    rules = gated_delta_rules(gm)
    if not attn and not convs and not rules:
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

    device = val(ids).device  # the model's: generation inputs and caches live beside its weights
    with ctx.fake_mode:
        cache_len = add_input("cache_len", torch.empty(1, dtype=torch.int64, device=device))
        kv_start = add_input("kv_start", torch.empty(batch, dtype=torch.int32, device=device))
    cache_causal_convs(gm, convs, (cache_len, kv_start), add_input, ctx)
    cache_gated_delta_rules(gm, rules, (cache_len, kv_start), add_input, ctx)
    count = 0
    biases: dict[fx.Node, fx.Node] = {}
    identity: dict[tuple, tuple[fx.Node, fx.Node]] = {}
    caches: dict[tuple, tuple[fx.Node, fx.Node]] = {}
    for node in attn:
        a = op_args(node)
        general = node.target is braze.general_attention.default
        k = val(a["k"])
        # layers attending over the same k / v (cross-layer KV sharing) share one cache: they write the same values
        key = (a["k"], a["v"], a.get("cos"), a.get("sin"))
        if key not in caches:
            i = len(caches)
            with ctx.fake_mode:
                shape = (batch, k.shape[1], max_seq, k.shape[3])
                # kv_dtype (fp32 under deterministic=True; the model's dtype by default)
                kd, vd = kv_cache_dtype(ctx.config, k.dtype), kv_cache_dtype(ctx.config, val(a["v"]).dtype)
                caches[key] = (add_input(f"kv_cache_{i}_k", torch.empty(shape, dtype=kd, device=device)),
                               add_input(f"kv_cache_{i}_v", torch.empty(shape, dtype=vd, device=device)))
        k_cache, v_cache = caches[key]
        plain = not general and a.get("causal") and a.get("attn_mask") is None
        if plain and a.get("cos") is None:  # learned / no positions: the kernel's RoPE at angle 0 is the identity
            a["cos"], a["sin"] = _identity_rope(gm, node, val(a["q"]), identity, ctx)
        if plain:
            rep = new_node(gm, braze.cached_attention.default,
                           (a["q"], a["k"], a["v"], a["cos"], a["sin"], k_cache, v_cache, cache_len, kv_start,
                            float(a["scale"])), {}, ctx, node)
        else:
            if a.get("cos") is None:  # q / k as the graph computes them (ALiBi, learned positions): RoPE at angle 0
                a["cos"], a["sin"] = _identity_rope(gm, node, val(a["q"]), identity, ctx)
            rep = _general(gm, node, a, general, (k_cache, v_cache, cache_len, kv_start), biases, ctx)
        node.replace_all_uses_with(rep)
        count += 1
    dce(gm)
    if count:
        dtypes = sorted({str(val(kc).dtype).removeprefix("torch.") for kc, _ in caches.values()})
        ctx.note(f"{count} layers read and write a static KV cache of {max_seq} positions ({'/'.join(dtypes)})")
    return count + len(convs) + len(rules)


def _identity_rope(gm: fx.GraphModule, anchor: fx.Node, q: torch.Tensor, made: dict, ctx: PassContext):
    """cos = 1, sin = 0 [B, S, D] (computed once per head dim and dtype, from position_ids' shape), so attention
    without RoPE (learned or absolute positions: GPT-2, OPT) runs the cached-attention kernel."""
    key = (q.shape[-1], q.dtype)
    if key not in made:
        pos = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "position_ids")
        first = next(n for n in gm.graph.nodes if n.op == "call_function")
        p = new_node(gm, aten.unsqueeze.default, (pos, -1), {}, ctx, first)
        p = new_node(gm, aten.expand.default, (p, [-1, -1, q.shape[-1]]), {}, ctx, first)
        p = new_node(gm, aten._to_copy.default, (p,), {"dtype": q.dtype}, ctx, first)
        zero = new_node(gm, aten.mul.Tensor, (p, 0.0), {}, ctx, first)
        one = new_node(gm, aten.add.Tensor, (zero, 1.0), {}, ctx, first)
        made[key] = (one, zero)
        ctx.note(f"{anchor.name}: no RoPE in the graph: the cached-attention kernel applies RoPE at angle 0")
    return made[key]


def _general(gm: fx.GraphModule, node: fx.Node, a: dict, general: bool, state: tuple, biases: dict,
             ctx: PassContext) -> fx.Node:
    """braze::general_cached_attention for an attention the cached-attention kernel does not cover."""
    softcap = float(a.get("softcap") or 0.0) if general else 0.0
    window = int(a.get("window") or 0) if general else 0
    mask, info, bias = a.get("attn_mask"), None, None
    if mask is not None:
        info = classify_mask(gm, mask, ctx)
        if info.kind == "window":
            window = window or info.window
        elif info.kind in ("dense", "alibi"):  # ("alibi": slopes the attention could not take, as a bias)
            if info.seq < ctx.config.max_seq:
                raise KVCacheUnsupportedError(
                    f"{node.name}: its mask ({info.describe()}) was evaluated on {info.seq} positions, fewer than "
                    f"max_seq={ctx.config.max_seq}; compile with a smaller max_seq")
            if mask not in biases:
                biases[mask] = ctx.add_weight(gm, f"attn_bias_{mask.name}", info.bias)
            bias = biases[mask]
        elif info.kind == "dynamic":
            raise KVCacheUnsupportedError(
                f"{node.name}: generation needs an attention mask computed from positions only; this one depends on "
                "activations or token values")
    elif not a.get("causal"):  # full attention over whatever is cached: an all-zero bias (no causal limit)
        if None not in biases:
            n = ctx.config.max_seq
            biases[None] = ctx.add_weight(gm, "attn_bias_full", torch.zeros(1, n, n))
        bias = biases[None]
    reasons = _general_reasons(a, general, info)
    ctx.note(f"{node.name}: general cached attention ({'; '.join(reasons)})")
    cache = state
    kwargs = {"softcap": softcap, "window": window, "cos": a.get("cos"), "sin": a.get("sin"), "attn_bias": bias,
              "sinks": a.get("sinks") if general else None, "alibi": a.get("alibi") if general else None}
    rep = new_node(gm, braze.general_cached_attention.default,
                   (a["q"], a["k"], a["v"], *cache, float(a["scale"])), kwargs, ctx, node)
    rep.meta["braze_eager_reason"] = "; ".join(reasons)
    return rep


def insert_tree_verify(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Verify-graph insertion: cached attention gains a `tree_mask` input [B, S, S] so one forward scores a
    whole draft tree per row (each draft token sees the cache, the pending token and its ancestors; positions =
    base + depth; cached convolutions read their taps along the same ancestors), and `cache_len` becomes per row
    [B]: the rows of a batched verify step accept different numbers of drafts, so they hold different cache
    lengths."""
    nodes = [n for n in gm.graph.nodes
             if is_op(n, braze.cached_attention.default, braze.general_cached_attention.default)]
    convs = [n for n in gm.graph.nodes if is_op(n, braze.cached_conv1d.default)]
    if not nodes and not convs:
        return 0
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    batch, seq = val(placeholders["input_ids"]).shape[:2]
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        mask = gm.graph.placeholder("tree_mask")
    device = val(placeholders["input_ids"]).device
    with ctx.fake_mode:
        mask.meta["val"] = torch.empty((batch, seq, seq), dtype=torch.bool, device=device)
        placeholders["cache_len"].meta["val"] = torch.empty(batch, dtype=torch.int64, device=device)
    for node in nodes:
        a = op_args(node)
        if node.target is braze.general_cached_attention.default:
            kwargs = {k: a.get(k) for k in ("softcap", "window", "cos", "sin", "attn_bias", "sinks", "alibi")}
            args = tuple(a[n] for n in ("q", "k", "v", "k_cache", "v_cache", "cache_len", "kv_start", "scale"))
            rep = new_node(gm, node.target, args, {**kwargs, "tree_mask": mask}, ctx, node)
        else:
            args = tuple(a[n] for n in ("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "cache_len", "kv_start"))
            rep = new_node(gm, braze.tree_cached_attention.default, (*args, mask, float(a["scale"])), {}, ctx, node)
        node.replace_all_uses_with(rep)
    for node in convs:  # each node's taps follow its ancestors
        rep = new_node(gm, node.target, node.args[:6], {**node.kwargs, "tree_mask": mask}, ctx, node)
        node.replace_all_uses_with(rep)
    dce(gm)
    ctx.note(f"{len(nodes) + len(convs)} layers verify draft trees (tree_mask input)")
    return len(nodes) + len(convs)
