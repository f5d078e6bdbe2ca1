"""DFloat11 weight compression (lossless), and the helpers the INT6 pass (braze/passes/int6.py) shares.

The quant passes run after the template fusions (merge_sibling_linears, fuse_norm_prologue,
fuse_linear_epilogue), not before them, because those fusions pattern-match braze::linear nodes
whose weights are placeholders:

- quantize_df11 keeps every braze::linear / linear_glu exactly as the fusions left it and only swaps where its
  weights come from: one braze::df11_decode per unit (a decoder block's linear weights, or the embedding / lm_head
  on their own) writes the unit's weights into a flat scratch buffer, and each linear reads a view of it. The
  matmul kernels, their block sizes and their prologues/epilogues are those of the uncompressed compile, so the
  logits are bit-identical to it (decoding is lossless) and merged QKV / gate-up weights are compressed too.
  That is strategy (a), "scratch"; strategy (b), "fused", turns each linear of a unit into braze::df11_linear (the
  decode runs inside the GEMV) and splits its prologue / epilogue out like INT6 does; df11_strategy picks per plan
  (see the comment above DF11_FUSED_MAX_M).
- quantize_int6 lives in braze/passes/int6.py (and its activation-quantization split in braze/passes/int6_act.py).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

import braze.ops  # noqa: F401  (registers braze::*)
from braze.kernels.df11 import df11_block_range, df11_row_blocks
from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.fusion import prologue_norm
from braze.passes.graph_utils import ACTIVATION_NODES, activate, aten, dce, is_op, new_node, val
from braze.quant.df11 import POINTER_BASE, encode_df11
from braze.runtime.errors import ConfigError

braze = torch.ops.braze
LINEARS = (braze.linear.default, braze.linear_glu.default)
WEIGHT_ARGS = {braze.linear.default: ("weight",), braze.linear_glu.default: ("gate_weight", "up_weight")}
MIN_DF11_NUMEL = 1024  # smaller tensors (norm weights, biases) stay raw: a codebook costs more than they save
_LAYER = re.compile(r"(?:^|[._])(?:layers|layer|h|blocks|block)[._](\d+)(?:[._]|$)")


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]
    return paths[-1] if paths else ""


def layer_index(*names: str) -> int | None:
    """Decoder-layer index parsed from placeholder names (p_model_layers_3_...) or module paths (model.layers.3)."""
    for name in names:
        m = _LAYER.search(name or "")
        if m:
            return int(m.group(1))
    return None


def _weight_placeholder(a: Any, ctx: PassContext) -> fx.Node | None:
    if isinstance(a, fx.Node) and a.op == "placeholder" and a.name in ctx.weights:
        t = ctx.weights[a.name]
        if t.dim() == 2 and t.is_floating_point():
            return a
    return None


# ---- DFloat11 --------------------------------------------------------------------------------------------------
def _df11_candidates(gm: fx.GraphModule, ctx: PassContext) -> dict[fx.Node, list[fx.Node]]:
    """Weight placeholders read as linear weights or embedding tables -> the nodes that read them."""
    found: dict[fx.Node, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in WEIGHT_ARGS:
            a = op_args(n)
            phs = [_weight_placeholder(a[k], ctx) for k in WEIGHT_ARGS[n.target]]
        elif is_op(n, aten.embedding.default):
            phs = [_weight_placeholder(n.args[0], ctx)]
        else:
            continue
        for ph in phs:
            if ph is not None and ctx.weights[ph.name].numel() >= MIN_DF11_NUMEL:
                found.setdefault(ph, []).append(n)
    return found


_WEIGHT_VIEWS = (aten.permute.default, aten.transpose.int, aten.t.default, aten.view.default, aten.reshape.default,
                 aten.alias.default)


def expert_weights_kept(gm: fx.GraphModule, ctx: PassContext) -> str | None:
    """The report line for MoE expert weights (read by braze::grouped_mm), which quantization leaves as stored: the
    grouped expert kernel reads them as they are, and a user expects to hear that the bulk of an MoE model's
    weights was not compressed."""
    names: set[str] = set()
    for node in gm.graph.nodes:
        if is_op(node, braze.grouped_mm.default):
            w = node.args[1]
            while is_op(w, *_WEIGHT_VIEWS):
                w = w.args[0]
            if isinstance(w, fx.Node) and w.op == "placeholder" and w.name in ctx.weights:
                names.add(w.name)
    if not names:
        return None
    kept = sum(ctx.weights[n].numel() for n in names)
    total = sum(t.numel() for t in ctx.weights.values() if t.is_floating_point())
    dtypes = ", ".join(sorted({str(ctx.weights[n].dtype).removeprefix("torch.") for n in names}))
    return (f"MoE experts kept as stored ({dtypes}): {len(names)} tensors, {kept} weights, "
            f"{100 * kept / max(total, 1):.0f}% of the model's (the grouped expert kernel reads them uncompressed)")


def routes_experts(node: fx.Node, hops: int = 8) -> bool:
    """Whether a linear is an MoE router: its output reaches a top-k within a few pointwise / reduction steps."""
    seen: set[fx.Node] = set()
    frontier = set(node.users)
    for _ in range(hops):
        if any(is_op(u, aten.topk.default, braze.topk_packed.default) for u in frontier):
            return True
        seen |= frontier
        frontier = {v for u in frontier if u.op == "call_function" and u.target not in LINEARS for v in u.users} - seen
    return False


def quantize_df11(gm: fx.GraphModule, ctx: PassContext) -> int:
    candidates = _df11_candidates(gm, ctx)
    not_bf16 = sorted({str(ctx.weights[ph.name].dtype) for ph in candidates} - {str(torch.bfloat16)})
    if not_bf16 and not getattr(ctx.config, "cast_bf16", False):
        raise ConfigError(
            f"quant='df11' compresses BF16 weights losslessly, but this model's weights are {', '.join(not_bf16)}; "
            "load the model in torch.bfloat16, or pass cast_bf16=True to cast them to BF16 first (lossless only "
            "if they are BF16-representable)"
        )
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    units: dict[tuple[str, torch.dtype], list[fx.Node]] = {}
    for ph in sorted(candidates, key=lambda p: min(order[u] for u in candidates[p])):
        w = ctx.weights[ph.name]
        if bool(((w.detach().to(torch.bfloat16).view(torch.int16) & 0x7FFF) >= POINTER_BASE << 7).any()):
            ctx.note(f"{ph.name}: kept raw (an exponent >= {POINTER_BASE}: |w| >= 2**113, inf or nan)")
            continue
        idx = layer_index(ph.name, *(_module_path(u) for u in candidates[ph]))
        if any(is_op(u, aten.embedding.default) for u in ph.users):
            idx = None  # an embedding table is its own unit: the fused gather needs it as a whole buffer
        label = f"layer{idx}" if idx is not None else ph.name.removeprefix("p_")
        units.setdefault((label, w.dtype), []).append(ph)

    count = 0
    total_weights, total_bytes = 0, 0
    unit_notes: list[str] = []
    gathered: set[str] = set()
    for (label, dtype), phs in units.items():
        tensors = {}
        for ph in phs:
            w = ctx.weights[ph.name].detach()
            wb = w.to(torch.bfloat16)
            if dtype != torch.bfloat16:
                changed = int((wb.to(dtype) != w).sum())
                if changed:
                    ctx.note(f"{ph.name}: cast {dtype} -> bfloat16 rounded {changed} of {w.numel()} weights (lossy)")
            tensors[ph.name] = wb.contiguous()
        unit = encode_df11(tensors, warn=False)
        assert not unit.fallbacks  # unencodable tensors were filtered out above
        stored = {
            "encoded": unit.encoded,
            "sign_mantissa": unit.sign_mantissa,
            "gaps": unit.gaps,
            "output_positions": unit.output_positions,
            "luts": unit.luts,
            "code_lengths": unit.code_lengths,
        }
        nodes = {k: ctx.add_weight(gm, f"df11_{label}_{k}"[:80], v) for k, v in stored.items()}
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = min((u for ph in phs for u in ph.users), key=order.__getitem__)
        shape = list(ctx.weights[phs[0].name].shape) if len(phs) == 1 else [unit.num_weights]
        decoded = new_node(
            gm,
            braze.df11_decode.default,
            (
                nodes["encoded"],
                nodes["sign_mantissa"],
                nodes["gaps"],
                nodes["output_positions"],
                nodes["luts"],
                nodes["code_lengths"],
                unit.threads_per_block,
                unit.max_codes_per_window,
                unit.lut_levels,
                shape,
                dtype,
            ),
            {},
            ctx,
            first,
        )
        decoded.meta["df11_unit"] = label  # copied with the graph: the decode plan's notes name the unit
        if len(phs) == 1:
            phs[0].replace_all_uses_with(decoded)
            row_table = _gather_embedding_rows(gm, ctx, decoded, nodes, unit, label)
            if row_table is not None:  # stored with the stream: counted in the unit's bytes
                gathered.add(label)
                stored["row_blocks"] = ctx.weights[row_table.name]
        else:
            for ph, start in ((ph, unit.offsets[ph.name]) for ph in phs):
                w, here = ctx.weights[ph.name], min(ph.users, key=order.__getitem__)
                part = new_node(gm, aten.slice.Tensor, (decoded, 0, start, start + w.numel()), {}, ctx, here)
                ph.replace_all_uses_with(new_node(gm, aten.view.default, (part, list(w.shape)), {}, ctx, here))
        count += len(phs)
        n = unit.num_weights
        stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
        total_weights += n
        total_bytes += stored_bytes
        unit_notes.append(
            f"unit {label}: {len(phs)} tensors, {n} weights, {unit.bits_per_weight:.2f} bits/weight, "
            f"{2 * n - stored_bytes} bytes saved vs BF16 ({2 * n} -> {stored_bytes})"
        )
    if total_weights:  # the total first: the report prints a pass's first notes only
        ctx.note(
            f"total: {len(units)} units, {total_weights} weights, {8 * total_bytes / total_weights:.2f} "
            f"bits/weight, {2 * total_weights - total_bytes} bytes saved vs BF16"
        )
    experts = expert_weights_kept(gm, ctx)
    if experts:
        ctx.note(experts)
    dce(gm)  # a table read only by embeddings no longer needs its whole-unit decode
    strategies = _df11_unit_strategies(gm, ctx)
    for line in unit_notes:
        label = line.split()[1].rstrip(":")
        gather = "embedding rows decoded alone (df11_embedding)" if label in gathered else ""
        strategy = strategies.get(label, "" if gather else "scratch")
        ctx.note(f"{line}; strategy: {'; '.join(x for x in (strategy, gather) if x)}")
    if df11_strategy(ctx.config) == "fused":
        _fuse_df11_linears(gm, ctx)
    dce(gm)
    return count


def _gather_embedding_rows(gm: fx.GraphModule, ctx: PassContext, decoded: fx.Node, stream: dict[str, fx.Node],
                           unit: Any, label: str) -> fx.Node | None:
    """aten.embedding(df11_decode(table), ids) -> braze::df11_embedding(ids, stream): only the blocks holding the
    rows asked for are decoded (a decode step reads B rows of the vocabulary, not all of it). A tied table's
    decode stays for its linear (lm_head), which reads the stream itself in the fused decode plan. Returns the
    row table's placeholder (None: no embedding reads the table)."""
    embeddings = [u for u in decoded.users if is_op(u, aten.embedding.default) and u.args[0] is decoded]
    if not embeddings or val(decoded).dim() != 2:
        return None
    rows, dim = (int(x) for x in val(decoded).shape)
    row_blocks, per_row = df11_row_blocks(unit.output_positions, rows, dim)
    table = ctx.add_weight(gm, f"df11_{label}_row_blocks"[:80], row_blocks)
    for emb in embeddings:
        args = (emb.args[1], *(stream[k] for k in ("encoded", "sign_mantissa", "gaps", "output_positions", "luts",
                                                  "code_lengths")), table, *decoded.args[6:9], dim, per_row,
                decoded.args[10])
        emb.replace_all_uses_with(new_node(gm, braze.df11_embedding.default, args, {}, ctx, emb))
        gm.graph.erase_node(emb)
    return table


# DFloat11 strategies: "scratch" = (a) one braze::df11_decode per unit into a scratch buffer, then the unchanged
# matmuls; "fused" = (b) braze::df11_linear, decode inside the GEMV (braze/templates/df11_gemv.py.j2), for every
# plan; "auto" = scratch for forward / prefill / verify (large M: decoding once per unit amortizes), fused for the
# decode plan (M = batch <= max_batch). The pass runs once on the forward graph that all plans are built from, so
# it cannot see the phase: it emits scratch, and compiler/generation.py calls fuse_df11_decode_plan on the decode
# copy. auto keeps scratch when max_batch > DF11_FUSED_MAX_M (the GEMV re-decodes W per 16 rows of x) or under
# deterministic=True (the fused kernel reduces rows across programs with fp32 atomics).
DF11_FUSED_MAX_M = 16


def df11_strategy(config: Any) -> str:
    return getattr(config, "df11_strategy", "auto")


def _df11_auto_fuses_decode(config: Any) -> bool:
    return int(getattr(config, "max_batch", 1)) <= DF11_FUSED_MAX_M and not getattr(config, "deterministic", False)


def _df11_label(decoded: fx.Node) -> str:
    return decoded.meta.get("df11_unit") or decoded.args[0].name.removeprefix("df11_").removesuffix("_encoded")


def _df11_weight_sources(gm: fx.GraphModule) -> dict[fx.Node, list[tuple[fx.Node, int]]]:
    """df11_decode node -> [(node feeding a weight, element start)]: the decode itself (one-tensor unit) or the
    view of its slice."""
    found: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
    for d in gm.graph.find_nodes(op="call_function", target=braze.df11_decode.default):
        uses: list[tuple[fx.Node, int]] = []
        for u in d.users:
            if is_op(u, aten.slice.Tensor) and all(is_op(v, aten.view.default) for v in u.users):
                uses += [(v, int(u.args[2])) for v in u.users]
            else:
                uses.append((d, 0))
        found[d] = uses
    return found


def _df11_fusable(d: fx.Node, uses: list[tuple[fx.Node, int]], sources: set[fx.Node]) -> str | None:
    """Why unit `d` keeps the scratch strategy (None: every use is a linear weight the fused GEMV can take)."""
    max_codes = int(d.args[7])
    for w, _ in uses:
        for lin in w.users:
            if lin.target not in WEIGHT_ARGS:
                return f"{lin.name} ({lin.target}) reads it, not a linear"
            a = op_args(lin)
            if a["x"] is w or not all(a[k] in sources for k in WEIGHT_ARGS[lin.target]):
                return f"{lin.name} mixes it with an uncompressed weight"
            if val(a["x"]).dtype not in (torch.float32, torch.float16, torch.bfloat16):
                return f"{lin.name} input dtype {val(a['x']).dtype}"
            if a["activation"] not in ("none", *ACTIVATION_NODES):
                return f"{lin.name} activation {a['activation']!r}"
        if max_codes > int(val(w).shape[-1]):
            return f"in_features {val(w).shape[-1]} < {max_codes} codes per window"
    return None


def _df11_unit_strategies(gm: fx.GraphModule, ctx: PassContext) -> dict[str, str]:
    """Unit label -> the strategy it gets, for the report."""
    strategy = df11_strategy(ctx.config)
    graph_sources = _df11_weight_sources(gm)
    sources = {w for uses in graph_sources.values() for w, _ in uses}
    out = {}
    for d, uses in graph_sources.items():
        why = _df11_fusable(d, uses, sources)
        if strategy == "scratch":
            out[_df11_label(d)] = "scratch (df11_strategy='scratch')"
        elif why:
            out[_df11_label(d)] = f"scratch ({why})"
        elif strategy == "fused":
            racy = " (fp32 atomics: not bitwise run-to-run deterministic on a GPU)" if ctx.config.deterministic else ""
            out[_df11_label(d)] = "fused GEMV in every plan" + racy
        elif _df11_auto_fuses_decode(ctx.config):
            out[_df11_label(d)] = "auto: fused GEMV in the decode plan, scratch in forward / prefill / verify"
        else:
            out[_df11_label(d)] = "auto: scratch (max_batch > 16 or deterministic)"
    return out


def _df11_replace_linear(gm: fx.GraphModule, ctx: PassContext, lin: fx.Node,
                         where: dict[fx.Node, tuple[fx.Node, int]]) -> None:
    """braze::linear / linear_glu reading DF11 weights -> its norm? -> braze::df11_linear(s) -> ATen epilogue."""
    a = op_args(lin)
    x = prologue_norm(gm, lin, ctx)

    def gemv(w: fx.Node, bias: Any) -> fx.Node:
        d, start = where[w]
        n, k = (int(s) for s in val(w).shape)
        first, count = df11_block_range(ctx.weights[d.args[3].name], start, start + n * k)
        args = (x, *d.args[:6], bias, start, n, k, *d.args[6:9], first, count)
        return new_node(gm, braze.df11_linear.default, args, {}, ctx, lin)

    if lin.target is braze.linear.default:
        y = activate(gm, gemv(a["weight"], a["bias"]), a["activation"], ctx, lin)
        if a["residual"] is not None:
            y = new_node(gm, aten.add.Tensor, (a["residual"], y), {}, ctx, lin)
    else:
        gate = activate(gm, gemv(a["gate_weight"], None), a["activation"], ctx, lin)
        y = new_node(gm, aten.mul.Tensor, (gate, gemv(a["up_weight"], None)), {}, ctx, lin)
    lin.replace_all_uses_with(y)
    gm.graph.erase_node(lin)


def _fuse_df11_linears(gm: fx.GraphModule, ctx: PassContext) -> tuple[int, list[str]]:
    """Strategy (b) on this graph: every linear of a fusable unit becomes braze::df11_linear. Returns
    (linears rewritten, per-unit notes)."""
    graph_sources = _df11_weight_sources(gm)
    sources = {w for uses in graph_sources.values() for w, _ in uses}
    where: dict[fx.Node, tuple[fx.Node, int]] = {}
    notes, count = [], 0
    for d, uses in graph_sources.items():
        why = _df11_fusable(d, uses, sources)
        if why:
            notes.append(f"unit {_df11_label(d)}: scratch ({why})")
            continue
        where.update({w: (d, start) for w, start in uses})
        linears = list(dict.fromkeys(lin for w, _ in uses for lin in w.users))
        notes.append(f"unit {_df11_label(d)}: fused GEMV ({len(linears)} linears)")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    linears = sorted({lin for w in where for lin in w.users}, key=order.__getitem__)
    for lin in linears:
        _df11_replace_linear(gm, ctx, lin, where)
        count += 1
    dce(gm)
    return count, notes


def fuse_df11_decode_plan(gm: fx.GraphModule, weights: dict[str, torch.Tensor], config: Any,
                          report: Any) -> int:
    """df11_strategy="auto": switch the decode plan's graph (a copy, re-specialized to S = 1) to the fused GEMV.

    Called by compiler/generation.py between re-specialization and lowering; records a "df11_fuse_decode" entry
    in the compile report with one note per unit."""
    from braze.compiler.report import PassResult
    from braze.passes.fusion import decompose_unfused

    if config.quant != "df11" or df11_strategy(config) != "auto":
        return 0
    if not _df11_auto_fuses_decode(config):
        notes = [f"every unit: scratch (max_batch {config.max_batch} > {DF11_FUSED_MAX_M} or deterministic)"]
        report.passes.append(PassResult("df11_fuse_decode", "decode", 0, notes))
        return 0
    fake = next(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder" and n.name not in weights)
    ctx = PassContext(config=config, weights=weights, fake_mode=fake.fake_mode, current_pass="df11_fuse_decode")
    count, notes = _fuse_df11_linears(gm, ctx)
    decompose_unfused(gm, ctx)  # the split-out rms_norm prologues become fused reduction kernels
    gm.recompile()  # called outside run_passes, which recompiles once after its passes
    report.passes.append(PassResult("df11_fuse_decode", "decode", count, notes))
    return count
