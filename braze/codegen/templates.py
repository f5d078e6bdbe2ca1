"""Lowerings of braze::* ops onto the template kernel families (matmul, attention).

Each lowering renders the family's Jinja2 template for the node's configuration and returns the kernel body plus
a plan Step naming the runtime launcher that computes sizes, strides and grid from the actual tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

import braze.ops  # noqa: F401  (registers braze::*)
from braze.codegen.matmul_template import MatmulSpec, render_matmul
from braze.codegen.quant_lowering import QUANT_LOWERINGS, quant_unsupported_reason
from braze.ops.schema import op_args
from braze.runtime.plan import Step

braze = torch.ops.braze
FLOAT_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _val(a: Any) -> Any:
    return a.meta["val"] if isinstance(a, fx.Node) else a


def _name(a: Any) -> str | None:
    return a.name if isinstance(a, fx.Node) else None


def template_unsupported_reason(node: fx.Node) -> str | None:
    """Why a braze op cannot use its template (it then runs its reference implementation eagerly)."""
    if node.target in QUANT_LOWERINGS:
        return quant_unsupported_reason(node)
    a = op_args(node)
    out = node.meta["val"]
    if out.dtype not in FLOAT_NAMES:
        return f"{node.target} output dtype {out.dtype} has no kernel"
    if node.target is braze.linear_glu.default and a["activation"] not in ("silu", "gelu_tanh"):
        return f"gated linear with activation {a['activation']!r} has no kernel"
    if node.target is braze.linear.default and a["activation"] not in ("none", "silu", "gelu", "gelu_tanh", "relu"):
        return f"linear activation {a['activation']!r} has no kernel"
    if node.target is braze.linear.default and a["residual"] is not None:
        if tuple(_val(a["residual"]).shape) != tuple(out.shape):
            return "residual epilogue needs the residual in the output's shape"
    if node.target is braze.attention.default:
        if a["attn_mask"] is not None:
            return "attention with an explicit mask (not causal) runs eagerly"
        q = _val(a["q"])
        if q.shape[-1] > 256:
            return f"head dim {q.shape[-1]} > 256"
    return None


def _precision(dtype: torch.dtype) -> str:
    # fp32 models get IEEE fp32 dots, as eager does; 16-bit inputs use the tensor cores natively anyway
    return "ieee" if dtype == torch.float32 else "tf32"


def lower_linear(node: fx.Node, name: str) -> tuple[str, Step]:
    a = op_args(node)
    glu = node.target is braze.linear_glu.default
    x = _val(a["x"])
    spec = MatmulSpec(
        name=name,
        rmsnorm_prologue=a["norm_weight"] is not None,
        dual=({"silu": "swiglu", "gelu_tanh": "geglu"}[a["activation"]] if glu else None),
        has_bias=(not glu) and a["bias"] is not None,
        activation=None if glu or a["activation"] == "none" else a["activation"],
        has_residual=(not glu) and a["residual"] is not None,
        input_precision=_precision(x.dtype),
        out_dtype=FLOAT_NAMES[node.meta["val"].dtype],
    )
    roles = {"x": a["x"], "w": a["gate_weight"] if glu else a["weight"], "w2": a["up_weight"] if glu else None,
             "bias": None if glu else a["bias"], "norm_weight": a["norm_weight"],
             "residual": None if glu else a["residual"]}
    present = {k: v for k, v in roles.items() if v is not None}
    step = Step(kind="template", launcher="matmul", outputs=[node.name],
                inputs=[_name(v) for v in present.values()],
                params={"roles": list(present), "eps": float(a["eps"] or 0.0)})
    return render_matmul(spec), step


def lower_attention(node: fx.Node, name: str) -> tuple[str, Step]:
    from braze.codegen.attention_template import AttentionSpec, render_attention

    a = op_args(node)
    q = _val(a["q"])
    spec = AttentionSpec(name=name, causal=bool(a["causal"]), rope=a["cos"] is not None, has_kv_start=False,
                         input_precision=_precision(q.dtype), out_dtype=FLOAT_NAMES[node.meta["val"].dtype])
    roles = {k: a[k] for k in ("q", "k", "v", "cos", "sin") if a[k] is not None}
    step = Step(kind="template", launcher="attention", outputs=[node.name],
                inputs=[_name(v) for v in roles.values()],
                params={"roles": list(roles), "scale": float(a["scale"]), "causal": bool(a["causal"])})
    return render_attention(spec), step


def lower_cached_attention(node: fx.Node, name: str) -> tuple[str, Step]:
    """RoPE + cache write kernel, then flash attention over the cache (prefill) or split-KV decode (S == 1)."""
    from braze.codegen.attention_template import (
        AttentionSpec,
        DecodeAttentionSpec,
        render_attention,
        render_decode_attention,
    )
    from braze.codegen.render import render_template

    a = op_args(node)
    q = _val(a["q"])
    decode = isinstance(q.shape[2], int) and q.shape[2] == 1
    out_dtype = FLOAT_NAMES[node.meta["val"].dtype]
    if decode:
        attn = render_decode_attention(DecodeAttentionSpec(name=name, has_kv_start=True,
                                                           input_precision=_precision(q.dtype), out_dtype=out_dtype))
    else:
        attn = render_attention(AttentionSpec(name=name, causal=True, rope=False, has_kv_start=True,
                                              input_precision=_precision(q.dtype), out_dtype=out_dtype))
    write = render_template("kv_cache.py.j2", header="", name=name)
    roles = ["q", "k", "v", "cos", "sin", "k_cache", "v_cache", "cache_len", "kv_start"]
    step = Step(kind="template", launcher="cached_attention", outputs=[node.name],
                inputs=[_name(a[r]) for r in roles],
                params={"roles": roles, "scale": float(a["scale"]), "decode": decode})
    return attn + "\n\n" + write, step


def lower_tree_cached_attention(node: fx.Node, name: str) -> tuple[str, Step]:
    """Tree verify: the RoPE + cache write kernel, then flash attention over the cache in tree-mask mode."""
    from braze.codegen.attention_template import AttentionSpec, render_attention
    from braze.codegen.render import render_template

    a = op_args(node)
    q = _val(a["q"])
    attn = render_attention(AttentionSpec(name=name, causal=True, rope=False, has_kv_start=True, tree_mask=True,
                                          input_precision=_precision(q.dtype),
                                          out_dtype=FLOAT_NAMES[node.meta["val"].dtype]))
    write = render_template("kv_cache.py.j2", header="", name=name)
    roles = ["q", "k", "v", "cos", "sin", "k_cache", "v_cache", "cache_len", "kv_start", "tree_mask"]
    step = Step(kind="template", launcher="tree_cached_attention", outputs=[node.name],
                inputs=[_name(a[r]) for r in roles], params={"roles": roles, "scale": float(a["scale"])})
    return attn + "\n\n" + write, step


TEMPLATE_LOWERINGS: dict[Any, Callable[[fx.Node, str], tuple[str, Step]]] = {
    braze.linear.default: lower_linear,
    braze.linear_glu.default: lower_linear,
    braze.attention.default: lower_attention,
    braze.cached_attention.default: lower_cached_attention,
    braze.tree_cached_attention.default: lower_tree_cached_attention,
}
TEMPLATE_LOWERINGS.update(QUANT_LOWERINGS)  # braze::df11_decode, braze::int6_linear
