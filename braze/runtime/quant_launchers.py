"""Launchers for the compressed-weight kernels (DFloat11 decode, DFloat11 fused GEMV, INT6 matmul).

Runtime code: a saved package launches these without the compiler, so nothing here imports codegen. Argument
orders match braze/templates/df11_decode.py.j2, df11_gemv.py.j2 and int6_matmul.py.j2 (documented in
braze/codegen/df11_template.py and braze/codegen/int6_template.py).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton

A16 = 16  # int6 act_bits value: activations stay in the compute dtype (W6A16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_df11_decode(module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
                       params: dict[str, Any]) -> int:
    """Decode a whole DFloat11 unit into `out` (flat, the unit's weights in order) in one launch; a model whose
    compute dtype is not BF16 gets a second launch that widens the BF16 bits into `out`. Returns the launches."""
    numel = int(params["numel"])
    bf16_out = params["dtype"] == "bfloat16"
    bits = out.view(torch.int16) if bf16_out else torch.empty(numel, dtype=torch.int16, device=out.device)
    if params["n_threads"] > 0 and numel > 0:
        getattr(module, name)[(int(params["n_blocks"]),)](
            tensors["encoded"], tensors["sign_mantissa"], tensors["gaps"], tensors["output_positions"],
            tensors["luts"], tensors["code_lengths"], bits,
            int(params["n_threads"]), 0, 0, numel, 0, int(params["max_codes"]),
            THREADS=int(params["threads_per_block"]), N_LEVELS=int(params["lut_levels"]),
            **({} if _interpreting() else {"num_warps": 4}))
    if not bf16_out and numel > 0:
        block = 1 << 16 if _interpreting() else 1024
        getattr(module, f"{name}_widen")[(triton.cdiv(numel, block),)](bits, out, numel, BLOCK=block)
        return 2
    return 1


DF11_STREAM_ROLES = ("encoded", "sign_mantissa", "gaps", "output_positions", "luts", "code_lengths")


def df11_gemv_block_m(m: int) -> int:
    """Rows of x per program: all of a decode batch (<= 16) in one program, so each block decodes once."""
    return min(16, triton.next_power_of_2(max(1, m)))


def run_df11_gemv(kernel: Any, x2: torch.Tensor, stream: dict[str, torch.Tensor], acc: torch.Tensor,
                  params: dict[str, Any], w_out: torch.Tensor | None = None) -> None:
    """acc[M, N] += x2[M, K] @ W^T with W the DF11 range [start, start + N * K); acc is fp32 and pre-filled
    (bias or zeros). Only the blocks `block_first .. block_first + block_count - 1` (fixed at compile time)
    cover W, so the launch needs no host read."""
    m, k = x2.shape
    if m == 0 or int(params["block_count"]) == 0:
        return
    start = int(params["start"])
    bm = df11_gemv_block_m(m)
    grid = (int(params["block_count"]), triton.cdiv(m, bm))
    kernel[grid](
        x2, *(stream[r] for r in DF11_STREAM_ROLES), acc, acc if w_out is None else w_out,
        m, int(params["n_threads"]), int(params["block_first"]), start,
        start + int(params["out_features"]) * k, k, x2.stride(0), acc.stride(0), int(params["max_codes"]),
        THREADS=int(params["threads_per_block"]), N_LEVELS=int(params["lut_levels"]), BLOCK_M=bm,
        WRITE_W=w_out is not None, **({} if _interpreting() else {"num_warps": 8}))


def launch_df11_gemv(module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
                     params: dict[str, Any]) -> int:
    """y = x @ W^T (+ bias) with W decoded inside the GEMV (strategy "fused"); fp32 accumulation by atomics
    into `out` itself when it is fp32, else into a temporary that is cast into `out`. Returns the launches."""
    x, bias = tensors["x"], tensors.get("bias")
    k, n = int(params["in_features"]), int(params["out_features"])
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    o = out.view(-1, n)
    acc = o if o.dtype == torch.float32 else torch.empty(o.shape, dtype=torch.float32, device=o.device)
    if bias is None:
        acc.zero_()
    else:
        acc.copy_(bias.to(torch.float32).expand_as(acc))
    run_df11_gemv(getattr(module, name), x2, tensors, acc, params)
    if acc is not o:
        o.copy_(acc)
    return 1


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and not _interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 0


def int6_blocks(m: int, n: int, n_groups: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, SPLIT_K), the heuristics of braze.codegen.int6_template: decode (small M) splits K
    when the output tiles alone cannot fill the GPU's SMs."""
    bm = min(128, max(16, triton.next_power_of_2(m)))
    bn = 64 if m <= 64 else 128
    split_k = 1
    sms = _sm_count(device)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if sms and m <= 64 and tiles < sms:
        split_k = max(1, min(n_groups // 2, triton.cdiv(sms, tiles), 16))
    return bm, bn, max(1, min(split_k, n_groups))


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def launch_int6_matmul(module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
                       params: dict[str, Any]) -> int:
    """y = fq(x) @ (q * scale)^T (+ bias): W6A16 in one launch; W6A8 / W6A6 quantize x first (two launches),
    unless the step is braze::int6_linear_q, whose roles xq / xs are codes and scales already computed (by the
    fused kernel that produced x): then one launch. Returns the launches."""
    packed, w_scales = tensors["packed"], tensors["scales"]
    bias = tensors.get("bias")
    k, group, act_bits = int(params["in_features"]), int(params["group_size"]), int(params["act_bits"])
    n, g = packed.shape[0], triton.cdiv(k, group)
    prequantized = "xq" in tensors
    x = tensors["xq"] if prequantized else tensors["x"]
    x2 = _rows(x, g * group if prequantized else k)
    m = x2.shape[0]
    o = out.view(-1, n)
    if m == 0:
        return 0
    bm, bn, sk = int6_blocks(m, n, g, x.device)
    acc = o
    if sk > 1:  # split-K programs atomically add into a zeroed fp32 buffer
        acc = o if o.dtype == torch.float32 else torch.empty((m, n), dtype=torch.float32, device=o.device)
        acc.zero_()
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), sk)
    bias_args = (bias.contiguous(),) if bias is not None else ()
    opts = {} if _interpreting() else {"num_warps": 4 if bm * bn <= 64 * 64 else 8, "num_stages": 3}
    if act_bits == A16:
        precision = "tf32x3" if x2.dtype == torch.float32 else "tf32"
        getattr(module, name)[grid](
            x2, packed, w_scales, *bias_args, acc, m, n, k, g,
            x2.stride(0), packed.stride(0), w_scales.stride(0), acc.stride(0),
            GROUP=group, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=sk, DOT_PRECISION=precision, **opts)
    elif prequantized:
        xq, xs = x2, _rows(tensors["xs"], g)
    else:
        xq = torch.empty((m, g * group), device=x.device, dtype=torch.int8)
        xs = torch.empty((m, g), device=x.device, dtype=torch.float32)
        gpp = min(triton.next_power_of_2(g), max(1, 2048 // group))
        getattr(module, f"{name}_quantize_activations")[(m, triton.cdiv(g, gpp))](
            x2, xq, xs, k, g, x2.stride(0), xq.stride(0), xs.stride(0), GROUP=group, GROUPS_PER_PROG=gpp)
    if act_bits != A16:
        getattr(module, name)[grid](
            xq, xs, packed, w_scales, *bias_args, acc, m, n, g,
            xq.stride(0), xs.stride(0), packed.stride(0), w_scales.stride(0), acc.stride(0),
            GROUP=group, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=sk, **opts)
    if acc is not o:
        o.copy_(acc)
    return 1 if act_bits == A16 or prequantized else 2


QUANT_LAUNCHERS = {
    "df11_decode": launch_df11_decode,
    "df11_gemv": launch_df11_gemv,
    "int6_matmul": launch_int6_matmul,
}
