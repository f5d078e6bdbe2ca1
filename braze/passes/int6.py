"""quantize_int6: linears become braze::int6_linear (FlexQ-style 6-bit weights, A16 / A8 / A6 activations).

Per linear (merged q/k/v and gate/up weights are quantized as one; per-row groups along K make that equal to
quantizing each part):
1. activation bits: `int6_act` (a16 | a8 | a6 | mixed) or a matching `int6_act_overrides` entry;
2. sensitivity (a6 / mixed, with calibration samples): A6 is kept only where the linear's relative output error
   on the calibration rows stays <= `int6_a6_tolerance`; elsewhere W6A8. A user's explicit A6 request that is
   rejected warns. Without samples, mixed falls back to FlexQ's LLaMA recipe (down_proj W6A8, the rest W6A6);
3. weight rounding: awq (activation-aware smoothing, braze/quant/smoothing.py, then round to nearest), rtn, or
   gptq (braze/quant/gptq.py). Smoothing multiplies the linear's input by 1/s, so it is used only where that
   multiply fuses into the kernel producing the input (an RMSNorm, or the SwiGLU product); elsewhere (o_proj
   after attention) the linear rounds to nearest;
4. W6A16: the linear's fused prologue (RMSNorm, then the smoothing scale) and epilogue (activation, GLU product,
   residual add) stay with it, in the int6 kernel. W6A8 / W6A6: they come back out as separate ops (braze::rms_norm
   before, ATen activation / GLU product / residual add after), so the activation quantization can fuse into the
   kernel that produces x.

Linears outside decoder layers (lm_head, embeddings) stay in the compute dtype, as FlexQ keeps them.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from braze.ops.quant_ops import A16
from braze.ops.schema import op_args
from braze.passes.context import PassContext
from braze.passes.fusion import prologue_norm, split_norm_prologue
from braze.passes.graph_utils import activate, aten, dce, is_op, new_node, val
from braze.passes.quantize import (
    LINEARS,
    WEIGHT_ARGS,
    _module_path,
    _weight_placeholder,
    expert_weights_kept,
    layer_index,
    routes_experts,
)
from braze.quant.calibration import Calibration
from braze.quant.int6 import Int6Weight
from braze.quant.int6 import quantize_int6 as quantize_int6_weight
from braze.quant.smoothing import Smoothing, search_smoothing
from braze.runtime.errors import ConfigError

braze = torch.ops.braze
GROUP = 128

class _StatsIndex:
    """Calibration tensors keyed by normalized weight name (model.layers.0.x.weight -> model_layers_0_x_weight),
    which a placeholder name (p_model_model_layers_0_x_weight) ends with."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = {re.sub(r"\W", "_", k): v for k, v in table.items()}

    def find(self, ph: fx.Node) -> torch.Tensor | None:
        """The tensor of a weight placeholder (of its first source, for a merged q/k/v weight), or None when any
        source is missing."""
        found = []
        for name in ph.meta.get("braze_sources", [ph.name]):
            parts = name.split("_")
            t = next((self.table[k] for k in ("_".join(parts[i:]) for i in range(len(parts))) if k in self.table),
                     None)
            if t is None:
                return None
            found.append(t)
        return found[0] if found else None


@dataclass
class _Plan:
    """What the pass decided for one linear."""

    act_bits: int
    method: str  # awq | rtn | gptq
    smoothing: Smoothing | None = None
    rejected_a6: float | None = None  # A6 error when the sensitivity pass rejected A6


def _calibration(config: Any) -> Calibration | None:
    c = getattr(config, "int6_calibration", None)
    if c is None:
        return None
    return Calibration(hessians=c) if isinstance(c, dict) else c


def _requested_bits(config: Any, names: list[str], path: str) -> tuple[int, bool]:
    """(activation bits asked for, whether the user asked for exactly this linear's A6 explicitly)."""
    for pattern, bits in (getattr(config, "int6_act_overrides", None) or {}).items():
        if pattern in path or any(pattern in n for n in names):
            return int(bits), True
    return {"a16": (A16, False), "a8": (8, False), "a6": (6, True), "mixed": (6, False)}[config.int6_act]


def _plan(config: Any, method: str, w: torch.Tensor, x: torch.Tensor | None, names: list[str], path: str,
          can_smooth: bool) -> _Plan:
    bits, explicit = _requested_bits(config, names, path)
    if x is None:
        if bits == 6 and config.int6_act == "mixed" and not explicit and "down_proj" in " ".join(names + [path]):
            bits = 8  # no calibration samples: FlexQ's LLaMA recipe
        return _Plan(bits, method)
    smooth = can_smooth and method == "awq"
    rejected = None
    shared: dict = {}  # X W^T and the fake-quantized weights, for both searches of this linear
    if bits == 6:
        sm6 = search_smoothing(w, x, 6, GROUP, smooth=smooth, shared=shared)
        if sm6.rel_error <= config.int6_a6_tolerance:
            return _Plan(6, method, sm6)
        rejected, bits = sm6.rel_error, 8
        if explicit:
            warnings.warn(f"int6: W6A6 requested for {path or names[0]} but its calibration output error with A6 is "
                          f"{100 * sm6.rel_error:.2f}% > int6_a6_tolerance {100 * config.int6_a6_tolerance:.2f}%; "
                          "keeping W6A8", stacklevel=2)
    if method == "gptq":
        return _Plan(bits, method, None, rejected)
    return _Plan(bits, method, search_smoothing(w, x, bits, GROUP, smooth=smooth, shared=shared), rejected)


def _method(config: Any, stats: Calibration | None) -> str:
    method = config.int6_method
    if method == "auto":
        return "awq" if stats is not None and stats.samples else "rtn"
    if method == "gptq" and (stats is None or not stats.hessians):
        raise ConfigError(
            "int6_method='gptq' needs calibration statistics: braze.compile computes them for HF causal LMs with a "
            "tokenizer; for other models pass int6_calibration=braze.quant.calibration.collect(model, tokenizer)")
    if method == "awq" and (stats is None or not stats.samples):
        raise ConfigError(
            "int6_method='awq' needs calibration samples: braze.compile computes them for HF causal LMs with a "
            "tokenizer; for other models pass int6_calibration=braze.quant.calibration.collect(model, tokenizer)")
    return method


def _quantized_weight(w: torch.Tensor, plan: _Plan, hessian: torch.Tensor | None) -> Int6Weight:
    w = w.detach().float()
    if plan.smoothing is not None and not plan.smoothing.is_identity:
        w = w * plan.smoothing.scale
    if plan.method == "gptq" and hessian is not None:
        from braze.quant.gptq import gptq_int6

        return gptq_int6(w, hessian, GROUP)
    return quantize_int6_weight(w, GROUP)


def _describe(plan: _Plan) -> str:
    tag = "W6A16" if plan.act_bits == A16 else f"W6A{plan.act_bits}"
    tag += f", {plan.method}"
    if plan.smoothing is not None:
        if plan.method == "awq":
            tag += f" alpha={plan.smoothing.alpha:.1f}"
        tag += f", calib err {100 * plan.smoothing.rel_error:.2f}%"
    if plan.rejected_a6 is not None:
        tag += f" (A6 rejected: {100 * plan.rejected_a6:.2f}%)"
    return tag


def quantize_int6(gm: fx.GraphModule, ctx: PassContext) -> int:
    config = ctx.config
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEARS]
    layered = any(layer_index(_module_path(n)) is not None for n in linears)
    stats = _calibration(config)
    method = _method(config, stats)
    hessians = _StatsIndex(stats.hessians) if stats is not None else None
    samples = _StatsIndex(stats.samples) if stats is not None and stats.samples else None
    count, kept, bits, notes, plans, routers = 0, [], {}, [], [], []
    missing: list[str] = []
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
        if routes_experts(node):
            routers.append(names[0])  # a rounded router logit can send a token to other experts
            continue
        k_in = int(ctx.weights[names[0]].shape[1])
        groups = -(-k_in // GROUP)
        if groups * (96 + 2) * 8 / k_in >= 16:  # packed 6-bit groups of 128 + fp16 scales vs 16 bits/weight
            kept.append(names[0])  # K far below one group: INT6 would be bigger than BF16
            continue
        w = torch.cat([ctx.weights[n] for n in names], 0) if glu else ctx.weights[names[0]]
        x_rows = _found(samples, phs)
        hessian = _found(hessians, phs) if method == "gptq" else None
        if (samples is not None and x_rows is None) or (method == "gptq" and hessian is None):
            missing.append(names[0])
        node = split_norm_prologue(gm, node, ctx)  # a LayerNorm prologue: its own kernel (int6 takes RMSNorm)
        a = op_args(node)
        x = a["x"]
        # 1/s fuses into the norm, the SwiGLU product, or the GLU epilogue of a W6A16 gate/up kernel
        can_smooth = (a["norm_weight"] is not None or is_op(x, aten.mul.Tensor)
                      or (is_op(x, braze.int6_linear.default) and bool(op_args(x)["glu"])))
        plan = _plan(config, method if (method != "gptq" or hessian is not None) else "rtn", w, x_rows, names, path,
                     can_smooth)
        plans.append(plan)
        qw = _quantized_weight(w, plan, hessian)
        stem = ("_".join(names)[:60] + "_glu") if glu else names[0]
        stem = stem.removeprefix("p_")
        packed = ctx.add_weight(gm, f"int6_{stem}_packed"[:80], qw.packed)
        scales = ctx.add_weight(gm, f"int6_{stem}_scales"[:80], qw.scales)
        bits[packed.name] = (w.numel(), qw.bits_per_weight)
        inv = None
        if plan.smoothing is not None and not plan.smoothing.is_identity:
            x_dtype = val(x).dtype if a["norm_weight"] is None else torch.promote_types(val(x).dtype,
                                                                                       val(a["norm_weight"]).dtype)
            inv = ctx.add_weight(gm, f"int6_{stem}_inv_smooth"[:80], (1.0 / plan.smoothing.scale).to(x_dtype))
        bias = None if glu else a["bias"]
        if plan.act_bits == A16:  # the W6A16 kernel takes the norm, smoothing and epilogue: one launch
            out = y = new_node(gm, braze.int6_linear.default, (x, packed, scales, bias, int(w.shape[1]), GROUP, A16,
                                                           a["norm_weight"], a["eps"], inv, a["activation"], glu,
                                                           None if glu else a["residual"]), {}, ctx, node)
        else:  # W6A8 / W6A6: the norm and smoothing stay in the kernel that quantizes x (braze/passes/int6_act.py)
            out, y = _unfused(gm, node, ctx, a, inv, (packed, scales, bias, int(w.shape[1]), GROUP, plan.act_bits),
                           glu, names)
        if val(out).dtype != val(node).dtype:
            out = new_node(gm, aten._to_copy.default, (out,), {"dtype": val(node).dtype}, ctx, node)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        count += 1
        notes.append(f"{y.name}: {_describe(plan)}, {'+'.join(names)}, N={w.shape[0]} K={w.shape[1]}, "
                     f"{qw.bits_per_weight:.3f} bits/weight")
    _summarize(ctx, bits, plans, stats, missing, kept)
    if routers:
        ctx.note(f"MoE routers kept in the compute dtype (a rounded router logit can change a token's experts): "
                 f"{', '.join(routers)}")
    experts = expert_weights_kept(gm, ctx)
    if experts:
        ctx.note(experts)
    for line in notes:
        ctx.note(line)
    dce(gm)
    return count


def _unfused(gm: fx.GraphModule, node: fx.Node, ctx: PassContext, a: dict, inv: fx.Node | None,
             linear_args: tuple, glu: bool, names: list[str]) -> tuple[fx.Node, fx.Node]:
    """The linear's prologue and epilogue as separate ops around a plain int6_linear: braze::rms_norm before,
    ATen activation / GLU product / residual add after (picked up by the generated fused kernels).
    Returns (the output, the int6_linear node)."""
    h = prologue_norm(gm, node, ctx)
    if inv is not None:
        h = new_node(gm, aten.mul.Tensor, (h, inv), {}, ctx, node)
    y = new_node(gm, braze.int6_linear.default, (h, *linear_args), {}, ctx, node)
    if glu:
        inter = ctx.weights[names[0]].shape[0]
        gate = new_node(gm, aten.slice.Tensor, (y, -1, 0, inter), {}, ctx, node)
        up = new_node(gm, aten.slice.Tensor, (y, -1, inter, 2 * inter), {}, ctx, node)
        return new_node(gm, aten.mul.Tensor, (activate(gm, gate, a["activation"], ctx, node), up), {}, ctx, node), y
    out = activate(gm, y, a["activation"], ctx, node)
    if a["residual"] is not None:
        out = new_node(gm, aten.add.Tensor, (a["residual"], out), {}, ctx, node)
    return out, y


def _found(index: _StatsIndex | None, phs: list[fx.Node]) -> torch.Tensor | None:
    if index is None:
        return None
    found = [index.find(ph) for ph in phs]
    return found[0] if all(t is not None for t in found) else None


def _summarize(ctx: PassContext, bits: dict, plans: list[_Plan], stats: Calibration | None, missing: list[str],
               kept: list[str]) -> None:
    """The totals first: the report prints a pass's first notes only."""
    if bits:
        n = sum(k for k, _ in bits.values())
        stored = sum(k * b for k, b in bits.values()) / 8
        ctx.note(f"total: {n} weights, {8 * stored / n:.3f} bits/weight, {int(2 * n - stored)} bytes saved vs BF16")
    if plans:
        by_bits = {b: sum(1 for p in plans if p.act_bits == b) for b in (A16, 8, 6)}
        methods = sorted({p.method for p in plans})
        source = "no calibration data"
        if stats is not None:
            source = f"calibration: {stats.tokens} tokens" if stats.tokens else "calibration: given by the caller"
        ctx.note(f"linears: {by_bits[6]} W6A6, {by_bits[8]} W6A8, {by_bits[A16]} W6A16; weights: "
                 f"{', '.join(methods)}; {source}")
        rejected = sum(1 for p in plans if p.rejected_a6 is not None)
        if rejected:
            ctx.note(f"sensitivity: {rejected} linears kept A8 (A6 output error > int6_a6_tolerance "
                     f"{100 * ctx.config.int6_a6_tolerance:.2f}%)")
    if missing:
        ctx.note(f"no calibration statistics, rounded to nearest: {', '.join(missing)}")
    if kept:
        ctx.note(f"kept in the compute dtype (outside decoder layers, or K too small to gain): {', '.join(kept)}")
