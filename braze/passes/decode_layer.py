"""fold_decode_layers: a decode layer in three launches.

    rms_norm + QKV linear                     -> unchanged: the matmul family's norm prologue (launch 1)
    [q / k RMSNorm ->] cached_attention [-> kv_record_query] -> head flatten -> o_proj linear (+ residual)
                                              -> braze::attention_block (launch 2: Qwen3's per-head q_norm / k_norm
                                                 or OLMo 2's over the whole projection, RoPE, cache write, split-KV
                                                 attention, the split merge, o_proj, residual; R-KV:
                                                 braze::attention_block_recording also writes the query ring)
    linear_glu (norm, gate/up, SwiGLU) -> down linear (+ residual)
                                              -> braze::mlp_block (launch 3)

Gemma 2 / 3 norm o_proj's and down's outputs before the residual add (residual + rms_norm(linear(...))): the
blocks take that post-norm too (their last projecting program normalizes the rows), and the attention block
Gemma 2's logit softcap and both's sliding window.

How the blocks reduce across programs: kernels/decode_layer.py. Under deterministic=True both blocks take
batch-invariant tiles (and LayerCast gate/up), and the verify's tree attention folds too, so speculation still
accepts bitwise decode's tokens; a deterministic decode layer is 3 launches as well.

The pass runs on the decode plan's graph after it is re-specialized to one token per row (compiler/generation.py),
and on the verify plan's graph, whose MLPs fold the same way (its flash tree attention keeps its kernels outside
deterministic mode); prefill keeps its kernels. A layer that does not match (a bias on o_proj, int6 / fused-df11
linears, attention outside the RoPE-causal cached kernel) keeps its unfused steps, and the pass notes why for the
first of each kind. Under tensor parallelism only rank 0's o_proj and down_proj carry the residual add, so only
rank 0 folds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx

from braze.kernels.decode_layer import DENSE_ACTIVATIONS
from braze.ops.library import qk_norm_form
from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.fusion import decomposed_rms_norm
from braze.passes.graph_utils import _erase_dead_from, is_op, new_node, single_user, val
from braze.passes.patterns import match_layer_norm

aten = torch.ops.aten
braze = torch.ops.braze

# ops between the attention output and o_proj that only re-view the heads (no arithmetic)
_HEAD_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
               aten.transpose.int, aten.clone.default, aten.alias.default, aten.unsqueeze.default,
               aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints)


def _concrete(shape: torch.Size) -> list[int]:
    """A shape with every symbolic dim (the batch) set to 2, for replaying a view chain on a small tensor."""
    out = []
    for d in shape:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            d = int(expr.subs({s: 2 for s in expr.free_symbols}))
        out.append(int(d))
    return out


def _heads_flattened_in_order(attn: fx.Node, chain: list[fx.Node]) -> bool:
    """Whether the view chain maps the attention output [B, Hq, 1, D] to [..., Hq * D] element for element as
    transpose(1, 2).reshape does (the column order o_proj's weight expects), replayed on an arange."""
    shape = _concrete(val(attn).shape)
    t = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    want = t.transpose(1, 2).reshape(-1)
    for n in chain:
        if n.target is aten.permute.default:
            t = t.permute(*n.args[1])
        elif n.target is aten.transpose.int:
            t = t.transpose(n.args[1], n.args[2])
        else:  # every other allowed op keeps the logical element order: reshape to its output shape
            t = t.reshape(_concrete(val(n).shape))
    return t.reshape(-1).equal(want)


class _HeadNorm(NamedTuple):
    src: fx.Node  # the norm's input
    perms: list  # the permutes from the norm's output to the attention's input, in order
    weight: fx.Node
    bias: fx.Node | None
    eps: float
    split: fx.Node | None  # the reshape splitting the heads after a norm over the whole projection
    layer: bool  # a LayerNorm (else an RMSNorm)


def _head_norm(x: fx.Node, whole: bool, layer: bool) -> _HeadNorm | None:
    """The norm behind the attention input `x` (seen through permutes that keep the head dim last), when nothing
    else reads its output: an RMSNorm over each head (Qwen3's q_norm / k_norm, decomposed; weight [D]), with
    `whole` one over all heads of a position before a reshape splits them (OLMo 2's, over the whole projection;
    weight [H * D]), with `layer` a LayerNorm over each head (Persimmon's, weight and bias [D]; Cohere's, a weight
    row per head [H, D]). The attention block can then normalize the norm's input itself."""
    perms, cur, split = [], x, None
    while is_op(cur, aten.permute.default) and list(cur.args[1])[-1] in (-1, val(cur).dim() - 1):
        perms.append(list(cur.args[1]))
        cur = cur.args[0]
    perms = perms[::-1]
    if whole and is_op(cur, aten.view.default, aten.reshape.default, aten._unsafe_view.default) \
            and single_user(cur) and _splits_heads(val(cur.args[0]).shape, val(cur).shape):
        split, cur = cur, cur.args[0]
    found = decomposed_rms_norm(cur)
    norm = None if found is None else _HeadNorm(found[0], perms, found[1], None, found[2], split, False)
    if norm is None and layer and split is None:
        found = _decomposed_layer_norm(cur)
        norm = None if found is None else _HeadNorm(found[0], perms, found[1], found[2], found[3], None, True)
    if norm is None or not single_user(cur):
        return None
    w, dtype = val(norm.weight), val(norm.src).dtype
    if dtype != val(cur).dtype or any(t is not None and val(t).dtype not in (dtype, torch.float32)
                                      for t in (norm.weight, norm.bias)):  # (fp32: Gemma 3's scale, one rounding)
        return None
    if w.dim() == 2:  # a row per head: the heads must be the dim the permutes carry to the attention's dim 1
        dims = list(range(val(cur).dim()))
        for p in perms:
            dims = [dims[i] for i in p]
        if dims[1] != val(cur).dim() - 2:
            return None
    elif w.dim() != 1 or w.shape[0] != val(cur).shape[-1]:
        return None
    return norm


def _decomposed_layer_norm(out: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, float] | None:
    """(x, weight, bias, eps) when `out` is a LayerNorm's output as HF writes it (patterns.match_layer_norm; its
    rsqrt lies a few nodes up), else None."""
    frontier = [out]
    for _ in range(5):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        for n in frontier:
            m = match_layer_norm(n, head_rows=True) if is_op(n, aten.rsqrt.default) else None
            if m is not None and m[4] is out:
                return m[:4]
    return None


def _splits_heads(flat: torch.Size, heads: torch.Size) -> bool:
    """Whether a reshape from `flat` [..., H * D] to `heads` [..., H, D] only splits the last dim."""
    return len(heads) == len(flat) + 1 and list(flat[:-1]) == list(heads[:-2]) \
        and flat[-1] == heads[-2] * heads[-1]


def _fold_attention(attn: fx.Node, order: dict[fx.Node, int], ctx: PassContext) -> str | None:
    """Replace attention -> views -> o_proj(+residual) by braze::attention_block (tree verify:
    braze::tree_attention_block); returns why not, or None."""
    a = op_args(attn)
    tree = is_op(attn, braze.tree_cached_attention.default)
    window, softcap, alibi = 0, 0.0, None
    if is_op(attn, braze.general_cached_attention.default):
        why = _plain_window_attention(a, ctx)
        if why is not None:
            return why
        window, softcap, alibi = int(a["window"] or 0), float(a["softcap"] or 0.0), a["alibi"]
    if not tree and val(a["q"]).shape[2] != 1:
        return "not a one-token decode"
    chain, cur, ring = [], attn, None
    record = next(iter(attn.users)) if single_user(attn) else None
    if is_op(record, braze.kv_record_query.default):  # R-KV decode: the block records the query itself
        r = op_args(record)
        if tree or r["attn_out"] is not attn or r["q"] is not a["q"] or r["cos"] is not a["cos"] \
                or r["sin"] is not a["sin"] or r["cache_len"] is not a["cache_len"]:
            return "the query recorded for R-KV is not the attention's own (or a verify's)"
        cur, ring = record, r["q_ring"]
    while single_user(cur) and is_op(next(iter(cur.users)), *_HEAD_VIEWS):
        cur = next(iter(cur.users))
        chain.append(cur)
    lin = next(iter(cur.users)) if single_user(cur) else None
    if not is_op(lin, braze.linear.default):
        return f"the attention output feeds {_what(lin)}, not one plain linear"
    la = op_args(lin)
    w, res, post, end = la["weight"], la["residual"], None, lin
    if res is None and la["x"] is cur and (post := _post_norm_add(lin)) is not None:
        res, end = post[2], post[3]  # Gemma 2/3: residual + post_attention_layernorm(o_proj(...))
    if la["x"] is not cur or res is None:
        return "o_proj has no residual add in its epilogue (e.g. a tensor-parallel all-reduce sits between)"
    if la["norm_weight"] is not None or la["activation"] != "none":
        return "o_proj has a norm or an activation"
    if val(w).dim() != 2:
        return "o_proj's weight is not a matrix"
    out, q, bias = val(end), val(a["q"]), la["bias"]
    if not (out.dtype == q.dtype == val(w).dtype == val(res).dtype) or tuple(val(res).shape) != tuple(out.shape) \
            or (bias is not None and (val(bias).dtype not in (out.dtype, torch.float32) or val(bias).dim() != 1)):
        return "o_proj's weight, bias, residual and attention dtypes differ"
    if not _heads_flattened_in_order(attn, chain):
        return "the heads reach o_proj in another order"
    # nothing between the attention and o_proj may read the caches the attention writes (or the query ring)
    span = range(order[attn] + 1, order[end])
    for buf in (a["k_cache"], a["v_cache"], *((ring,) if ring is not None else ())):
        if any(u is not attn and u is not record and order.get(u, -1) in span for u in buf.users):
            return "a cache is read between the attention and o_proj"
    names = ("q", "k", "v", "cos", "sin", "k_cache", "v_cache", "cache_len", "kv_start",
             *(("tree_mask",) if tree else ()), "scale")
    target = braze.tree_attention_block.default if tree else braze.attention_block.default
    # Qwen3's q_norm / k_norm (OLMo 2's over the whole projection, Cohere's / Persimmon's LayerNorms) into the
    # decode block (not under deterministic=True: the verify's rope_write kernel reads the normed q / k, and accepted
    # nodes must match decode bitwise)
    qk = None if tree or ring is not None or ctx.config.deterministic \
        else qk_head_norms(a, ctx, lin, whole=True, layer=True)
    if qk is not None:
        a = {**a, "q": qk[0], "k": qk[1]}
    args = (*(a[n] for n in names), w, res)
    kwargs = {**(qk[2] if qk else {}),
              **({"window": window} if window else {}), **({"softcap": softcap} if softcap else {}),
              **({"post_norm_weight": post[0], "post_norm_eps": post[1]} if post else {}),
              **({"o_bias": bias} if bias is not None else {}), **({"alibi": alibi} if alibi is not None else {})}
    if ring is not None:
        if kwargs:
            return "R-KV's query recording with q / k norms, a window, a softcap, ALiBi, a post-norm or an o_proj bias"
        target, args = braze.attention_block_recording.default, (*args, ring)
    block = new_node(attn.graph.owning_module, target, args, kwargs, ctx, before=end)
    _replace(end, block)
    return None


def _post_norm_add(lin: fx.Node) -> tuple[fx.Node, float, fx.Node, fx.Node] | None:
    """(norm weight, eps, residual, the add) when `lin`'s output feeds only `residual + rms_norm(lin)` (Gemma
    2/3's post-attention / post-feedforward norms, decomposed by decompose_unfused), else None."""
    seen, frontier, norm = {lin}, [lin], None
    while frontier:  # lin's users up to the norm's output (the decomposition is ~7 nodes)
        for u in frontier.pop().users:
            if u in seen:
                continue
            seen.add(u)
            if len(seen) > 12:
                return None
            got = decomposed_rms_norm(u)
            if got is not None and got[0] is lin:
                norm = u
            else:
                frontier.append(u)
    if norm is None:
        return None
    inside, stack = {norm}, [norm]  # every node reached must lie on the way to the norm's output
    while stack:
        for n in stack.pop().all_input_nodes:
            if n in seen and n not in inside:
                inside.add(n)
                stack.append(n)
    _, weight, eps = decomposed_rms_norm(norm)
    add = next(iter(norm.users)) if single_user(norm) else None
    if seen - inside - {lin} or not is_op(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs:
        return None
    residual = add.args[1] if add.args[0] is norm else add.args[0]
    out = val(lin)
    if not isinstance(residual, fx.Node) or residual is norm or val(weight).dim() != 1 \
            or val(weight).shape[0] != out.shape[-1] or val(weight).dtype not in (out.dtype, torch.float32) \
            or tuple(val(residual).shape) != tuple(out.shape) \
            or not (val(residual).dtype == val(add).dtype == out.dtype):
        return None
    return weight, eps, residual, add


def _plain_window_attention(a: dict, ctx: PassContext) -> str | None:
    """Why a braze::general_cached_attention cannot be the attention block's, or None: the block takes a sliding
    window (Mistral, Phi-3, Gemma 2/3), a logit softcap (Gemma 2) and ALiBi slopes (Bloom, MPT) over RoPE'd q / k
    (RoPE at angle 0 without rotary), not sinks, a static bias or a draft tree, and not under deterministic=True (the
    verify's general tree kernel and o_proj matmul then decide accepted tokens)."""
    if a["sinks"] is not None or a["attn_bias"] is not None or a["tree_mask"] is not None:
        return "the attention has sinks, a static bias or a draft tree"
    if not isinstance(a["softcap"] or 0.0, (int, float)):
        return "the attention's softcap is not a constant"
    if a["cos"] is None or a["sin"] is None or not isinstance(a["window"] or 0, int):
        return "the attention's q / k arrive rotated (no RoPE in the kernel) or its window is not a constant"
    if ctx.config.deterministic:
        return "a window / softcap / ALiBi attention under deterministic=True (the verify plan keeps its own kernels)"
    return None


def qk_head_norms(a: dict, ctx: PassContext, before: fx.Node, whole: bool = False,
                  layer: bool = False) -> tuple[fx.Node, fx.Node, dict] | None:
    """(q', k', the norm kwargs of braze::attention_block) when q and k are both norms of one kind with one eps
    (their two fused kernels then fold into the block): RMSNorms per head, with `whole` both over the whole
    projection (OLMo 2), with `layer` LayerNorms per head (Cohere, Persimmon); q' / k' the norms' inputs seen
    through the same head split and permutes, else None."""
    q_norm, k_norm = _head_norm(a["q"], whole, layer), _head_norm(a["k"], whole, layer)
    if not (q_norm and k_norm) or q_norm.eps != k_norm.eps or q_norm.layer != k_norm.layer \
            or (q_norm.split is None) != (k_norm.split is None) or (q_norm.bias is None) != (k_norm.bias is None) \
            or val(q_norm.weight).dim() != val(k_norm.weight).dim() \
            or not (single_user(a["q"]) and single_user(a["k"])):
        return None
    gm = before.graph.owning_module
    inputs = []
    for norm in (q_norm, k_norm):
        src = norm.src
        if norm.split is not None:
            src = new_node(gm, norm.split.target, (src, *norm.split.args[1:]), dict(norm.split.kwargs), ctx, before)
        for dims in norm.perms:
            src = new_node(gm, aten.permute.default, (src, dims), {}, ctx, before)
        inputs.append(src)
    kwargs = {"q_norm_weight": q_norm.weight, "k_norm_weight": k_norm.weight, "qk_norm_eps": float(q_norm.eps)}
    if q_norm.layer:
        kwargs["qk_layer_norm"] = True
        if q_norm.bias is not None:
            kwargs.update(q_norm_bias=q_norm.bias, k_norm_bias=k_norm.bias)
    return inputs[0], inputs[1], kwargs


def _fold_mlp(up: fx.Node, ctx: PassContext) -> str | None:
    """Replace linear_glu(norm) -> down linear(+residual) by braze::mlp_block, or a plain MLP's linear(norm,
    bias, activation) -> down linear(+bias, +residual) (GPT-2, OPT); returns why not, or None."""
    g = op_args(up)
    gated = up.target is braze.linear_glu.default
    kind = "gated MLP" if gated else "MLP"
    down = next(iter(up.users)) if single_user(up) else None
    if not is_op(down, braze.linear.default):
        return f"the {kind} feeds {_what(down)}, not one plain linear"
    d = op_args(down)
    residual, post, end = d["residual"], None, down
    if residual is None and (post := _post_norm_add(down)) is not None:
        residual, end = post[2], post[3]  # Gemma 2/3: residual + post_feedforward_layernorm(down(...))
    if d["x"] is not up or residual is None or d["norm_weight"] is not None or d["activation"] != "none":
        return "the down projection is not a plain linear with a residual add"
    if g["norm_weight"] is None and post is None:
        return f"the {kind} has no norm prologue and no post-norm"
    if not gated and g["residual"] is not None:
        return "the MLP's up projection adds a residual"
    weights = ((g["gate_weight"],) if gated else ()) + (g["up_weight" if gated else "weight"], d["weight"])
    if any(val(w).dim() != 2 for w in weights):  # a weight may be a tensor decoded in the plan (df11 scratch)
        return "an MLP weight is not a matrix"
    biases = tuple(b for b in ((None if gated else g["bias"]), d["bias"], g["norm_bias"]) if b is not None)
    dtypes = {val(n).dtype for n in (g["x"], residual, down, *weights)}
    # the norm's weight: the model's dtype, or fp32 (Gemma's scale: the kernel's prologue form); OLMo 2: none
    norm_dtype = val(g["norm_weight"]).dtype if g["norm_weight"] is not None else torch.float32
    if len(dtypes) != 1 or norm_dtype not in (*dtypes, torch.float32) \
            or any(val(b).dtype not in (*dtypes, torch.float32) or val(b).dim() != 1 for b in biases) \
            or tuple(val(residual).shape) != tuple(val(down).shape):
        return "the MLP's input, weights and residual dtypes differ"
    kwargs = {"post_norm_weight": post[0], "post_norm_eps": post[1]} if post else {}
    if g["layer_norm"]:
        kwargs.update(layer_norm=True, norm_bias=g["norm_bias"])
    if not gated and g["bias"] is not None:
        kwargs["up_bias"] = g["bias"]
    if d["bias"] is not None:
        kwargs["down_bias"] = d["bias"]
    gate = g["gate_weight"] if gated else None
    block = new_node(up.graph.owning_module, braze.mlp_block.default,
                     (g["x"], g["norm_weight"], gate, *weights[-2:], residual, float(g["eps"]), g["activation"]),
                     kwargs, ctx, before=end)
    _replace(end, block)
    return None


def _what(node: fx.Node | None) -> str:
    return "several nodes" if node is None else str(getattr(node.target, "__name__", node.target))


def _replace(old: fx.Node, new: fx.Node) -> None:
    """`new` was inserted before `old` by new_node, which gave it old's provenance."""
    old.replace_all_uses_with(new)
    _erase_dead_from(old)  # the linear, then the views and the attention / gate-up it alone used


def fold_decode_layers(gm: fx.GraphModule, ctx: PassContext) -> int:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # named before folding: under deterministic=True the tree attention it is told by folds away
    plan = "verify" if any(is_op(n, braze.tree_cached_attention.default) or (
        is_op(n, braze.general_cached_attention.default) and op_args(n)["tree_mask"] is not None) for n in order) \
        else "decode"
    folded = {"attention": 0, "mlp": 0}
    skipped: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):
            continue
        # the verify's tree attention folds under deterministic=True only: its tree decode kernel is then the same
        # as decode's, so the blocks keep accepted nodes bitwise equal to decode (default mode: flash tree mode)
        tree = ctx.config.deterministic and is_op(node, braze.tree_cached_attention.default)
        if is_op(node, braze.cached_attention.default, braze.general_cached_attention.default) or tree:
            kind, why = "attention", _fold_attention(node, order, ctx)
        elif is_op(node, braze.linear_glu.default) or (
                is_op(node, braze.linear.default) and op_args(node)["activation"] in DENSE_ACTIVATIONS):
            kind, why = "mlp", _fold_mlp(node, ctx)
        else:
            continue
        if why is None:
            folded[kind] += 1
        else:
            skipped.setdefault(kind, f"{node.name}: {why}")
    ctx.note(f"{plan} plan: {folded['attention']} attention blocks, {folded['mlp']} MLP blocks (one launch each)")
    blocks = [op_args(n) for n in gm.graph.nodes if is_op(n, braze.attention_block.default)]
    forms = [qk_norm_form(val(a["q_norm_weight"]).shape, val(a["q"]).shape[-1])
             for a in blocks if a["q_norm_weight"] is not None]
    if forms:
        normed, whole = len(forms), forms.count("whole")
        ctx.note(f"{plan} plan: {normed} attention blocks normalize q / k ({normed - whole} per head, {whole} over "
                 "the whole projection: q_norm / k_norm folded in)")
    post = {k: sum(is_op(n, *ops) and op_args(n)["post_norm_weight"] is not None for n in gm.graph.nodes)
            for k, ops in (("attention", (braze.attention_block.default, braze.tree_attention_block.default)),
                          ("MLP", (braze.mlp_block.default,)))}
    if any(post.values()):
        ctx.note(f"{plan} plan: {post['attention']} attention blocks, {post['MLP']} MLP blocks normalize their output "
                 "before the residual add (post-norms)")
    for kind, why in skipped.items():
        ctx.note(f"{kind} kept unfused, first case: {why}")
    return folded["attention"] + folded["mlp"]
