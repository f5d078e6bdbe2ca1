"""What an attention mask computed inside the captured graph means, found by evaluating it.

HF builds a causal LM's mask inside the forward from the positions (causal, sliding window, packed sequences,
ALiBi-style biases...). The mask subgraph depends only on the input shapes, the positions and constant buffers, so
it can be run at compile time on a prompt of N tokens at the standard positions 0..N-1, and the [N, N] result
classified: plain causal (the kernels' causal flag), causal with a sliding window of W positions, causal with ALiBi
(a bias linear in the key position with one slope per head, Bloom / MPT: the kernels add slope_h * (j - i)), or
anything else ("dense": kept as an additive bias [H, N, N] indexed by (query, key) position). A mask that depends on
activations or token values cannot be evaluated ("dynamic").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from braze.passes.context import PassContext
from braze.passes.graph_utils import aten

POSITION_INPUTS = ("input_ids", "position_ids")
MAX_EVAL_SEQ = 2048  # masks are evaluated on at most this many positions (window detection sees windows below it)


@dataclass
class MaskInfo:
    kind: str  # "causal" | "window" | "alibi" | "dense" | "dynamic"
    window: int = 0  # "window", or "alibi" within a window
    bias: torch.Tensor | None = None  # "dense" and "alibi": float32 [H, N, N], -inf where masked
    seq: int = 0  # the N it was evaluated at
    slopes: torch.Tensor | None = None  # "alibi": float32 [H] (or [1]: one slope for every head)

    def describe(self) -> str:
        if self.kind == "window":
            return f"causal, sliding window {self.window}"
        if self.kind == "alibi":
            win = f", sliding window {self.window}" if self.window else ""
            return f"causal{win}, ALiBi ({self.slopes.numel()} slopes)"
        if self.kind == "dense":
            return f"static mask/bias [{', '.join(str(s) for s in self.bias.shape)}] by position"
        return self.kind


def _ancestors(node: fx.Node) -> list[fx.Node] | None:
    """The nodes `node` is computed from, in graph order; None if it depends on activations or token values."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    for n in seen:
        for inp in n.all_input_nodes:
            if inp.op == "placeholder" and inp.name == "input_ids" and n.target is not aten.sym_size.int:
                return None  # reads token values (an embedding): not a static mask
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def static_value(gm: fx.GraphModule, node: fx.Node, ctx: PassContext, seq: int) -> torch.Tensor | None:
    """node's value on a [1, seq] prompt at positions 0..seq-1, when it depends only on the input shapes, the
    positions and weights; else None."""
    nodes = _ancestors(node)
    if nodes is None:
        return None
    device = next((w.device for w in ctx.weights.values()), torch.device("cpu"))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    args = []
    for n in nodes:
        if n.op == "placeholder":
            if n.name in ctx.weights:
                args.append(ctx.weights[n.name])
            elif n.name == "input_ids":
                args.append(torch.zeros(1, seq, dtype=torch.int64, device=device))
            elif n.name == "position_ids":
                args.append(torch.arange(seq, device=device)[None])
            else:
                return None  # a runtime input (cache_len, ...) or another user input
        elif n.op != "call_function":
            return None
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[node])
    try:
        with torch.no_grad():
            return fx.GraphModule(gm, graph)(*args)
    except Exception:  # a shape the graph guards against, a data-dependent op...: treat as dynamic
        return None


def classify_mask(gm: fx.GraphModule, mask: fx.Node, ctx: PassContext) -> MaskInfo:
    """Evaluate `mask` (an SDPA-style attention mask, bool or additive) at N = min(max_seq, MAX_EVAL_SEQ) positions
    and say what it is. Results are cached on the node."""
    cached = mask.meta.get("braze_mask_info")
    if cached is not None:
        return cached
    seq = min(int(ctx.config.max_seq), MAX_EVAL_SEQ)
    value = static_value(gm, mask, ctx, seq)
    info = MaskInfo("dynamic", seq=seq)
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[-2:]) == (seq, seq):
        info = _classify(value.reshape(-1, seq, seq)[: value.shape[-3] if value.dim() >= 3 else 1], seq)
    mask.meta["braze_mask_info"] = info
    return info


def _classify(m: torch.Tensor, seq: int) -> MaskInfo:
    if m.dtype == torch.bool:
        allowed, bias = m, torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    else:
        allowed = m > torch.finfo(m.dtype).min / 2
        bias = torch.where(allowed, m, torch.zeros((), dtype=m.dtype, device=m.device)).float()
    i = torch.arange(seq, device=m.device)[:, None]
    j = torch.arange(seq, device=m.device)[None, :]
    causal = j <= i
    window = 0
    if bool((allowed == allowed[:1]).all()):
        a = allowed[0]
        if torch.equal(a, causal):
            window = -1
        elif int(a[-1].sum()) > 0 and torch.equal(a, causal & (i - j < int(a[-1].sum()))):
            window = int(a[-1].sum())
    if window and not bool(bias.any()):
        return MaskInfo("window", window=window, seq=seq) if window > 0 else MaskInfo("causal", seq=seq)
    dense = bias.masked_fill(~allowed, -torch.inf)
    slopes = _alibi_slopes(bias, allowed[0], m.dtype) if window else None
    if slopes is not None:  # (the dense form too, for an attention that cannot take the slopes)
        return MaskInfo("alibi", window=max(window, 0), bias=dense, seq=seq, slopes=slopes)
    return MaskInfo("dense", bias=dense, seq=seq)


def _alibi_slopes(bias: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The per-head slopes s_h when bias[h, i, j] = s_h * j + c[h, i] wherever the key is visible (ALiBi: Bloom adds
    s_h * j, MPT s_h * (j - N + 1); a constant per query row leaves the softmax unchanged), else None. Each slope is
    the least-squares fit over the last row's visible keys, then checked on every visible entry of its head, each to
    the rounding of its own magnitude in the dtype the model computed the bias in (Bloom rounds it to the model's
    dtype; MPT keeps fp32). One head at a time: [N, N] temporaries, not [H, N, N]."""
    n = bias.shape[-1]
    keys = torch.nonzero(allowed[-1]).flatten()
    if keys.numel() < 2:
        return None
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    cols = torch.arange(n, device=bias.device, dtype=torch.float64)
    dist = cols[None, :] - cols[:, None]  # key - query position
    j = keys.double() - keys.double().mean()
    slopes = []
    for head in bias:
        b = head.double()
        slope = float((j * b[-1, keys]).sum() / (j * j).sum())
        rel = b - b.diagonal()[:, None]  # each row relative to its own position: the row constant drops
        want = slope * dist
        tol = 4 * eps * (b.abs() + b.diagonal().abs()[:, None] + want.abs()) + 1e-6
        if bool(((rel - want).abs() > tol)[allowed].any()):
            return None
        slopes.append(slope)
    out = torch.tensor(slopes, dtype=torch.float32)
    return out if bool(out.ne(0).any()) else None


SHAPE_ONLY = (aten.expand.default, aten.unsqueeze.default, aten.reshape.default, aten.view.default,
              aten.permute.default, aten.slice.Tensor, aten.alias.default, aten.clone.default)


def is_no_op_mask(gm: fx.GraphModule, mask: fx.Node, ctx: PassContext) -> bool:
    """Whether an attention mask lets every query see every key: all True (bool) or all 0 (additive), computed
    from constants only (an encoder's mask built without a padding mask: transformers' `arange >= 0` expanded
    over the batch). Views that only broadcast or reshape it are looked through, so the batch size it is
    expanded to does not have to be known."""
    core = mask
    while core.op == "call_function" and core.target in SHAPE_ONLY:
        core = core.args[0]
    if not isinstance(core, fx.Node) or core.op != "call_function":
        return False
    nodes = _ancestors(core)
    if nodes is None or any(n.op == "placeholder" and n.name not in ctx.weights for n in nodes):
        return False  # it depends on an input (its sizes or positions: a causal mask at one size proves nothing)
    value = static_value(gm, core, ctx, seq=1)
    if not isinstance(value, torch.Tensor):
        return False
    return bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())
