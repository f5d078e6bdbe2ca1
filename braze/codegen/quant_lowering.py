"""Lowerings of the compressed-weight ops (braze::df11_decode / df11_linear, braze::int6_linear) onto their kernels.

- df11_decode: the DFloat11 decode kernel (braze/templates/df11_decode.py.j2) writes the unit's BF16 bits; for a
  model whose compute dtype is not BF16 a second small kernel widens them (fp32 = bf16 bits << 16, exact; fp16
  via fp32). The matmuls that read the decoded weights are the unchanged braze::linear templates.
- df11_linear (strategy "fused"): the fused decode + GEMV kernel (braze/templates/df11_gemv.py.j2), one launch
  per linear; the launcher pre-fills the fp32 output with the bias (or zeros) and the programs add into it.
- int6_linear: the INT6 matmul family (braze/templates/int6_matmul.py.j2), W6A16 or W6A8 / W6A6 with its
  activation quantizer kernel in the same module.
- int6_linear_q: the same module's int8 matmul kernel alone; its int8 codes / fp32 scales are produced by the
  fused family (braze::int6_act_codes / int6_act_scales, see braze/codegen/fused.py), usually inside the kernel
  that computes x.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

import braze.ops  # noqa: F401  (registers braze::*)
from braze.codegen.df11_template import df11_gemv_supported, render_df11_decode, render_df11_gemv
from braze.codegen.int6_template import Int6MatmulSpec, render_int6_matmul
from braze.ops.quant_ops import A16
from braze.ops.schema import op_args
from braze.runtime.plan import Step
from braze.runtime.quant_launchers import DF11_STREAM_ROLES

braze = torch.ops.braze
FLOAT_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# Widen BF16 bits to the compute dtype without BF16 arithmetic (the interpreter gets that wrong): the BF16 bit
# pattern shifted left by 16 *is* the fp32 value.
_WIDEN = """

@triton.jit
def {name}_widen(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    bits = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
    value = (bits << 16).to(tl.float32, bitcast=True)
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=mask)
"""


def _weight_value(node: fx.Node) -> torch.Tensor:
    """Fake (static-shaped) value of a placeholder weight."""
    return node.meta["val"]


def lower_df11_decode(node: fx.Node, name: str) -> tuple[str, Step]:
    a = op_args(node)
    dtype = a["dtype"]
    roles = ["encoded", "sign_mantissa", "gaps", "output_positions", "luts", "code_lengths"]
    encoded = _weight_value(a["encoded"])
    positions = _weight_value(a["output_positions"])
    numel = int(_weight_value(a["sign_mantissa"]).shape[0])  # the output holds numel weights in any shape
    source = render_df11_decode(kernel_name=name)
    if dtype != torch.bfloat16:
        source += _WIDEN.format(name=name)
    step = Step(
        kind="template",
        launcher="df11_decode",
        outputs=[node.name],
        inputs=[a[r].name for r in roles],
        params={
            "roles": roles,
            "numel": numel,
            "threads_per_block": int(a["threads_per_block"]),
            "n_threads": (int(encoded.shape[0]) - 4) // 8,
            "n_blocks": int(positions.shape[0]) - 1,
            "max_codes": int(a["max_codes"]),
            "lut_levels": int(a["lut_levels"]),
            "dtype": FLOAT_NAMES[dtype],
        },
    )
    return source, step


def lower_df11_linear(node: fx.Node, name: str) -> tuple[str, Step]:
    """Strategy "fused": one launch decodes W's stream blocks and multiplies them with x (df11_gemv.py.j2)."""
    a = op_args(node)
    roles = [r for r in ("x", *DF11_STREAM_ROLES, "bias") if a[r] is not None]
    encoded = _weight_value(a["encoded"])
    keys = ("start", "out_features", "in_features", "threads_per_block", "max_codes", "lut_levels",
            "block_first", "block_count")
    step = Step(
        kind="template",
        launcher="df11_gemv",
        outputs=[node.name],
        inputs=[a[r].name for r in roles],
        params={"roles": roles, "n_threads": (int(encoded.shape[0]) - 4) // 8, **{k: int(a[k]) for k in keys}},
    )
    return render_df11_gemv(kernel_name=name), step


def lower_int6_linear(node: fx.Node, name: str) -> tuple[str, Step]:
    a = op_args(node)
    act_bits = int(a["act_bits"])
    spec = Int6MatmulSpec(
        name=name,
        act_bits=None if act_bits == A16 else act_bits,
        has_bias=a["bias"] is not None,
        out_dtype=FLOAT_NAMES[node.meta["val"].dtype],
    )
    roles = {k: a[k] for k in ("x", "packed", "scales", "bias") if a[k] is not None}
    step = Step(
        kind="template",
        launcher="int6_matmul",
        outputs=[node.name],
        inputs=[v.name for v in roles.values()],
        params={
            "roles": list(roles),
            "in_features": int(a["in_features"]),
            "group_size": int(a["group_size"]),
            "act_bits": act_bits,
        },
    )
    return render_int6_matmul(spec), step


def lower_int6_linear_q(node: fx.Node, name: str) -> tuple[str, Step]:
    """W6A8 / W6A6 on pre-quantized activations (braze/passes/int6_act.py): the int8 matmul kernel only, one
    launch; the codes and scales come from the fused kernel that produced x (or a fused quantizer kernel)."""
    a = op_args(node)
    spec = Int6MatmulSpec(name=name, act_bits=int(a["act_bits"]), has_bias=a["bias"] is not None,
                          out_dtype=FLOAT_NAMES[node.meta["val"].dtype])
    roles = {k: a[k] for k in ("xq", "xs", "packed", "scales", "bias") if a[k] is not None}
    step = Step(
        kind="template",
        launcher="int6_matmul",
        outputs=[node.name],
        inputs=[v.name for v in roles.values()],
        params={"roles": list(roles), "in_features": int(a["in_features"]), "group_size": int(a["group_size"]),
                "act_bits": int(a["act_bits"])},
    )
    return render_int6_matmul(spec), step


def quant_unsupported_reason(node: fx.Node) -> str | None:
    """Why a compressed-weight op cannot use its kernel (it then runs its reference implementation)."""
    if node.target is braze.df11_linear.default:
        a = op_args(node)
        if a["x"].meta["val"].dtype not in FLOAT_NAMES:
            return f"df11_linear input dtype {a['x'].meta['val'].dtype} has no kernel"
        return df11_gemv_supported(int(a["max_codes"]), int(a["in_features"]))
    if node.target is braze.int6_linear_q.default:
        a = op_args(node)
        if node.meta["val"].dtype not in FLOAT_NAMES or int(a["group_size"]) % 128:
            return "int6_linear_q needs a float output and groups of 128k"
    if node.target is braze.int6_linear.default:
        a = op_args(node)
        x = a["x"].meta["val"]
        if x.dtype not in FLOAT_NAMES:
            return f"int6_linear input dtype {x.dtype} has no kernel"
        if int(a["group_size"]) % (64 if int(a["act_bits"]) == A16 else 128):
            return f"int6 group size {a['group_size']} has no kernel"
    return None


QUANT_LOWERINGS: dict[Any, Callable[[fx.Node, str], tuple[str, Step]]] = {
    braze.df11_decode.default: lower_df11_decode,
    braze.df11_linear.default: lower_df11_linear,
    braze.int6_linear.default: lower_int6_linear,
    braze.int6_linear_q.default: lower_int6_linear_q,
}
