"""Weight quantization passes: DFloat11 (lossless) and INT6 (FlexQ-style).

Both run after the template fusions (merge_sibling_linears, fuse_norm_prologue, fuse_linear_epilogue), not before
them as DESIGN §3 lists, because those fusions pattern-match braze::linear nodes whose weights are placeholders:

- quantize_df11 keeps every braze::linear / linear_glu exactly as the fusions left it and only swaps where its
  weights come from: one braze::df11_decode per unit (a decoder block's linear weights, or the embedding / lm_head
  on their own) writes the unit's weights into a flat scratch buffer, and each linear reads a view of it. The
  matmul kernels, their block sizes and their prologues/epilogues are those of the uncompressed compile, so the
  logits are bit-identical to it (decoding is lossless) and merged QKV / gate-up weights are compressed too.
- quantize_int6 quantizes the merged weights (per-row groups along K, so quantizing a concatenation equals
  concatenating the quantized rows) and splits the fused prologue / epilogue back out of the linear: a
  braze::rms_norm before (decompose_unfused turns it into a fused reduction kernel) and ATen activation / GLU
  product / residual add after (picked up by the fused pointwise family).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

import braze.ops  # noqa: F401  (registers braze::*)
from braze.ops.quant_ops import A16
from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.graph_utils import aten, dce, is_op, new_node, val
from braze.quant.df11 import POINTER_BASE, encode_df11
from braze.quant.int6 import quantize_int6 as quantize_int6_weight
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
        if len(phs) == 1:
            phs[0].replace_all_uses_with(decoded)
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
    for line in unit_notes:
        ctx.note(line)
    dce(gm)
    gm.recompile()
    return count


# ---- INT6 ------------------------------------------------------------------------------------------------------
def _act_bits(config: Any, weight_name: str, module_path: str) -> int:
    mode = getattr(config, "int6_act", "a16")
    if mode == "a16":
        return A16
    if mode == "a8":
        return 8
    # FlexQ's LLaMA recipe: down_proj is the sensitive one (W6A8), every other linear W6A6
    return 8 if "down_proj" in weight_name or "down_proj" in module_path else 6


_ACT_NODES = {
    "silu": (aten.silu.default, {}),
    "relu": (aten.relu.default, {}),
    "gelu": (aten.gelu.default, {}),
    "gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}),
}


def _activate(gm: fx.GraphModule, y: fx.Node, kind: str, ctx: PassContext, before: fx.Node) -> fx.Node:
    if kind == "none":
        return y
    target, kwargs = _ACT_NODES[kind]
    return new_node(gm, target, (y,), dict(kwargs), ctx, before)


def _calibration_index(config: Any) -> dict[str, torch.Tensor] | None:
    """int6_method="gptq": the calibration Hessians keyed by normalized name (model.layers.0.x.weight ->
    model_layers_0_x_weight), which a placeholder name (p_model_model_layers_0_x_weight) ends with."""
    if getattr(config, "int6_method", "rtn") != "gptq":
        return None
    hessians = getattr(config, "int6_calibration", None)
    if not hessians:
        raise ConfigError(
            "int6_method='gptq' needs calibration statistics: braze.compile computes them for HF causal LMs; "
            "for other models pass int6_calibration=braze.quant.gptq.calibrate(model, tokenizer) (a dict "
            "{weight name: Hessian})"
        )
    return {re.sub(r"\W", "_", k): v for k, v in hessians.items()}


def _hessian(index: dict[str, torch.Tensor], ph: fx.Node) -> torch.Tensor | None:
    """The input Hessian of a weight placeholder (of its sources, for a merged q/k/v weight), or None."""
    found = []
    for name in ph.meta.get("braze_sources", [ph.name]):
        parts = name.split("_")
        h = next((index[k] for k in ("_".join(parts[i:]) for i in range(len(parts))) if k in index), None)
        if h is None:
            return None
        found.append(h)
    return found[0] if found else None


def _int6_weight(
    gm: fx.GraphModule, ctx: PassContext, name: str, w: torch.Tensor, cache: dict[str, tuple[fx.Node, fx.Node, float]],
    hessian: torch.Tensor | None = None,
) -> tuple[fx.Node, fx.Node, float]:
    if name not in cache:
        if hessian is not None:
            from braze.quant.gptq import gptq_int6

            qw = gptq_int6(w.detach().float(), hessian)
        else:
            qw = quantize_int6_weight(w.detach().float())
        packed = ctx.add_weight(gm, f"int6_{name.removeprefix('p_')}_packed"[:80], qw.packed)
        scales = ctx.add_weight(gm, f"int6_{name.removeprefix('p_')}_scales"[:80], qw.scales)
        cache[name] = (packed, scales, qw.bits_per_weight)
    return cache[name]


def quantize_int6(gm: fx.GraphModule, ctx: PassContext) -> int:
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEARS]
    layered = any(layer_index(_module_path(n)) is not None for n in linears)
    cache: dict[str, tuple[fx.Node, fx.Node, float]] = {}
    count, kept, bits, notes = 0, [], {}, []
    index = _calibration_index(ctx.config)
    rtn_fallback: list[str] = []
    for node in linears:
        a = op_args(node)
        glu = node.target is braze.linear_glu.default
        phs = [_weight_placeholder(a[k], ctx) for k in WEIGHT_ARGS[node.target]]
        if any(ph is None for ph in phs):
            continue
        path = _module_path(node)
        names = [ph.name for ph in phs]
        if layered and layer_index(*names, path) is None:
            kept.append(names[0])  # lm_head & co. stay in the compute dtype, as FlexQ keeps them
            continue
        k_in = int(ctx.weights[names[0]].shape[1])
        groups = -(-k_in // 128)
        if groups * (96 + 2) * 8 / k_in >= 16:  # packed 6-bit groups of 128 + fp16 scales vs 16 bits/weight
            kept.append(names[0])  # K far below one group: INT6 would be bigger than BF16
            continue
        act_bits = _act_bits(ctx.config, " ".join(names), path)
        x = a["x"]
        hessian = None
        if index is not None:
            found = [_hessian(index, ph) for ph in phs]
            hessian = found[0] if all(h is not None for h in found) else None
            if hessian is None:
                rtn_fallback.append(names[0])
        if glu:
            w = torch.cat([ctx.weights[n] for n in names], 0)
            packed, scales, bpw = _int6_weight(gm, ctx, "_".join(names)[:60] + "_glu", w, cache, hessian)
        else:
            w = ctx.weights[names[0]]
            packed, scales, bpw = _int6_weight(gm, ctx, names[0], w, cache, hessian)
        bits[packed.name] = (w.numel(), bpw)
        h = x
        if a["norm_weight"] is not None:
            h = new_node(gm, braze.rms_norm.default, (x, a["norm_weight"], a["eps"]), {}, ctx, node)
        bias = None if glu else a["bias"]
        y = new_node(
            gm, braze.int6_linear.default, (h, packed, scales, bias, int(w.shape[1]), 128, act_bits), {}, ctx, node
        )
        if glu:
            inter = ctx.weights[names[0]].shape[0]
            gate = new_node(gm, aten.slice.Tensor, (y, -1, 0, inter), {}, ctx, node)
            up = new_node(gm, aten.slice.Tensor, (y, -1, inter, 2 * inter), {}, ctx, node)
            out = new_node(gm, aten.mul.Tensor, (_activate(gm, gate, a["activation"], ctx, node), up), {}, ctx, node)
        else:
            out = _activate(gm, y, a["activation"], ctx, node)
            if a["residual"] is not None:
                out = new_node(gm, aten.add.Tensor, (a["residual"], out), {}, ctx, node)
        if val(out).dtype != val(node).dtype:
            out = new_node(gm, aten._to_copy.default, (out,), {"dtype": val(node).dtype}, ctx, node)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        count += 1
        tag = ("W6A16" if act_bits == A16 else f"W6A{act_bits}") + (", gptq" if hessian is not None else "")
        notes.append(f"{y.name}: {tag}, {'+'.join(names)}, N={w.shape[0]} K={w.shape[1]}, {bpw:.3f} bits/weight")
    if bits:  # the total first: the report prints a pass's first notes only
        n = sum(k for k, _ in bits.values())
        stored = sum(k * b for k, b in bits.values()) / 8
        ctx.note(f"total: {n} weights, {8 * stored / n:.3f} bits/weight, {int(2 * n - stored)} bytes saved vs BF16")
    if rtn_fallback:
        ctx.note(f"int6_method='gptq': no calibration Hessian, rounded to nearest: {', '.join(rtn_fallback)}")
    if kept:
        ctx.note(f"kept in the compute dtype (outside decoder layers, or K too small to gain): {', '.join(kept)}")
    for line in notes:
        ctx.note(line)
    dce(gm)
    gm.recompile()
    return count
