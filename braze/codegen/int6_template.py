"""Render, load and launch the INT6 matmul kernels (braze/templates/int6_matmul.py.j2).

Packed weight layout and quantization rules: see braze/quant/int6.py.

Rendered module for spec ``Int6MatmulSpec(name, act_bits, has_bias, out_dtype)``:

* ``act_bits is None`` (W6A16, decode path) defines ``<name>``::

      <name>[grid](x, packed_w, w_scales, [bias,] out, M, N, K, n_groups,
                   stride_xm, stride_wn, stride_wsn, stride_om,
                   GROUP=, BLOCK_M=, BLOCK_N=, SPLIT_K=, DOT_PRECISION=)

  x [M, K] fp16/bf16/fp32 with unit stride along K. DOT_PRECISION is ignored for 16-bit x (x * q is exact
  in the fp32 accumulator); for fp32 x the launcher passes "tf32x3": q is exact in tf32, so only x's
  hi/lo split rounds (~2**-22 per product), keeping fp32-level accuracy on tensor cores ("ieee" compiles to
  an FMA loop that spills heavily on sm_90).

* ``act_bits in (8, 6)`` (W6A8 / W6A6) defines two kernels::

      <name>_quantize_activations[(M, cdiv(n_groups, GROUPS_PER_PROG))](
          x, xq, x_scales, K, n_groups, stride_xm, stride_qm, stride_sm, GROUP=, GROUPS_PER_PROG=)
      <name>[grid](xq, x_scales, packed_w, w_scales, [bias,] out, M, N, n_groups,
                   stride_xqm, stride_xsm, stride_wn, stride_wsn, stride_om,
                   GROUP=, BLOCK_M=, BLOCK_N=, SPLIT_K=)

  xq int8 [M, n_groups * GROUP] (zero tail), x_scales fp32 [M, n_groups]. The quantizer is a separate
  kernel so it can move into the producer of x: in compiled plans braze/passes/int6_act.py splits the linear
  and the fused family computes xq / x_scales inside the kernel that produces x (braze/codegen/fused.py, same
  fp32 ops, bit-identical); the plan then launches only ``<name>`` (braze::int6_linear_q). The quantizer
  kernel here serves int6_linear steps the pass leaves alone and int6_linear_triton.

Matmul grid: ``(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K)``. Weight scales are indexed
``ws[n * stride_wsn + g]``. With SPLIT_K == 1 the kernel stores ``out`` in ``spec.out_dtype``; with
SPLIT_K > 1 each program owns a contiguous run of K-groups and atomically adds into a zeroed fp32 ``out``
(bias added by split 0), which the caller casts — this keeps decode (M of 1..16) from launching only
N / BLOCK_N programs on a 132-SM GPU. GROUP must be a multiple of 128 for the int8 path (tl.dot int8 needs
K >= 32 per sub-dot) and of 64 for the 16-bit path.

GPU design (checked by compiling for sm_90 with Triton's runtime divisibility specialisation; not timed):
each group loads 3 contiguous byte planes per row (0.75 B/weight) with 16-byte cp.async, software-pipelined;
rebuilds 24-bit words with two shifts/ors, extracts four contiguous K-slices with two shifts each, and issues
four tensor-core dots of K = GROUP / 4 against contiguous activation slices. Decode tiles (16 x 64, 4 warps)
use ~80 registers; 128 x 128 prefill tiles (8 warps, wgmma) ~220-250; no spills.
W6A16 applies the weight scale to the group's fp32 partial rather than to the unpacked weights: q is exact in
fp16/bf16 while q * scale is not (so the result stays within fp32 rounding of F.linear(x, fq(W))), and
BLOCK_M x BLOCK_N rescale FMAs are fewer than GROUP x BLOCK_N whenever BLOCK_M < GROUP (always in decode).
The W6A8 path needs the same structure anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import triton

from braze.codegen.render import render_template
from braze.quant.int6 import ACT_RANGES, Int6Weight
from braze.runtime.kernel_loader import load_kernel_module

_TL_DTYPES = {"float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16"}
_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Int6MatmulSpec:
    """What a rendered INT6 matmul module is specialised on; shapes stay runtime arguments."""

    name: str
    act_bits: int | None = None  # None: W6A16; 8 / 6: dynamic per-token-group activation quantization
    has_bias: bool = False
    out_dtype: str = "float16"

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"kernel name must be a Python identifier, got {self.name!r}")
        if self.act_bits is not None and self.act_bits not in ACT_RANGES:
            raise ValueError(f"act_bits must be None, 8 or 6, got {self.act_bits}")
        if self.out_dtype not in _TL_DTYPES:
            raise ValueError(f"out_dtype must be one of {sorted(_TL_DTYPES)}, got {self.out_dtype!r}")


def _comment_block(text: str) -> str:
    lines = text.splitlines() or [""]
    return "\n".join(line if line.startswith("#") else f"# {line}".rstrip() for line in lines)


def render_int6_matmul(spec: Int6MatmulSpec, header: str = "") -> str:
    """Python source of the kernel module for `spec`, starting with `header` as a comment block."""
    qmin, qmax = ACT_RANGES[spec.act_bits] if spec.act_bits is not None else (0, 0)
    lines = [f"braze int6 matmul: {spec}"] + ([header] if header else [])
    return render_template(
        "int6_matmul.py.j2",
        header=_comment_block("\n".join(lines)),
        name=spec.name,
        act_bits=spec.act_bits,
        has_bias=spec.has_bias,
        out_tl_dtype=_TL_DTYPES[spec.out_dtype],
        qmin=qmin,
        qmax=qmax,
    )


@cache
def _module(spec: Int6MatmulSpec) -> Any:
    return load_kernel_module(render_int6_matmul(spec))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 0


def _launch_config(
    m: int,
    n: int,
    n_groups: int,
    device: torch.device,
    block_m: int | None,
    block_n: int | None,
    split_k: int | None,
) -> tuple[int, int, int]:
    bm = block_m or min(128, max(16, triton.next_power_of_2(m)))
    bn = block_n or (64 if m <= 64 else 128)
    if split_k is None:
        split_k = 1
        sms = _sm_count(device)
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        if sms and m <= 64 and tiles < sms:  # decode: too few output tiles to fill the GPU
            split_k = max(1, min(n_groups // 2, triton.cdiv(sms, tiles), 16))
    return bm, bn, max(1, min(split_k, n_groups))


def int6_linear_triton(
    x: torch.Tensor,
    qw: Int6Weight,
    act_bits: int | None = None,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x @ dequant(qw)^T (+ bias) with the rendered Triton kernels; x [..., K] -> [..., N].

    act_bits None: W6A16; 8 or 6: activations quantized per token per group by the companion kernel.
    out_dtype defaults to x.dtype. Block sizes and split_k default to the heuristics above.
    """
    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]}, weight expects K={k}")
    if x.dtype not in _TORCH_DTYPES:
        raise ValueError(f"unsupported activation dtype {x.dtype}")
    group = qw.group_size
    if group % (128 if act_bits else 64):
        raise ValueError(f"group_size {group} unsupported by the kernels")
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, g = x2.shape[0], qw.n_groups
    spec = Int6MatmulSpec(
        name=f"int6_mm_a{act_bits or 16}",
        act_bits=act_bits,
        has_bias=bias is not None,
        out_dtype=_TORCH_DTYPES[out_dtype],
    )
    mod = _module(spec)
    bm, bn, sk = _launch_config(m, n, g, x.device, block_m, block_n, split_k)
    out = (
        torch.zeros((m, n), device=x.device, dtype=torch.float32)
        if sk > 1
        else torch.empty((m, n), device=x.device, dtype=out_dtype)
    )
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), sk)
    bias_args = (bias.contiguous(),) if bias is not None else ()
    packed, w_scales = qw.packed, qw.scales
    if act_bits is None:
        precision = "tf32x3" if x.dtype == torch.float32 else "tf32"
        getattr(mod, spec.name)[grid](
            x2,
            packed,
            w_scales,
            *bias_args,
            out,
            m,
            n,
            k,
            g,
            x2.stride(0),
            packed.stride(0),
            w_scales.stride(0),
            out.stride(0),
            GROUP=group,
            BLOCK_M=bm,
            BLOCK_N=bn,
            SPLIT_K=sk,
            DOT_PRECISION=precision,
            num_warps=4 if bm * bn <= 64 * 64 else 8,
            num_stages=3,
        )
    else:
        xq, xs = quantize_activations_triton(x2, act_bits, group, module=mod, name=spec.name)
        getattr(mod, spec.name)[grid](
            xq,
            xs,
            packed,
            w_scales,
            *bias_args,
            out,
            m,
            n,
            g,
            xq.stride(0),
            xs.stride(0),
            packed.stride(0),
            w_scales.stride(0),
            out.stride(0),
            GROUP=group,
            BLOCK_M=bm,
            BLOCK_N=bn,
            SPLIT_K=sk,
            num_warps=4 if bm * bn <= 64 * 64 else 8,
            num_stages=3,
        )
    return out.to(out_dtype).reshape(*lead, n)


def quantize_activations_triton(
    x: torch.Tensor, act_bits: int, group_size: int = 128, *, module: Any = None, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the per-token-group activation quantizer: x [M, K] -> (int8 [M, K_pad], fp32 scales [M, G])."""
    if module is None:
        name = f"int6_mm_a{act_bits}"
        module = _module(Int6MatmulSpec(name=name, act_bits=act_bits))
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    g = triton.cdiv(k, group_size)
    xq = torch.empty((m, g * group_size), device=x.device, dtype=torch.int8)
    xs = torch.empty((m, g), device=x.device, dtype=torch.float32)
    gpp = min(triton.next_power_of_2(g), max(1, 2048 // group_size))
    getattr(module, f"{name}_quantize_activations")[(m, triton.cdiv(g, gpp))](
        x, xq, xs, k, g, x.stride(0), xq.stride(0), xs.stride(0), GROUP=group_size, GROUPS_PER_PROG=gpp
    )
    return xq, xs
