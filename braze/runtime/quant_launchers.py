"""Launchers for the compressed-weight kernels (DFloat11 decode, INT6 matmul).

Runtime code: a saved package launches these without the compiler, so nothing here imports codegen. Argument
orders match braze/templates/df11_decode.py.j2 and braze/templates/int6_matmul.py.j2 (documented in
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


def launch_int6_matmul(module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
                       params: dict[str, Any]) -> int:
    """y = fq(x) @ (q * scale)^T (+ bias): W6A16 in one launch; W6A8 / W6A6 quantize x first (two launches).
    Returns the launches."""
    x, packed, w_scales = tensors["x"], tensors["packed"], tensors["scales"]
    bias = tensors.get("bias")
    k, group, act_bits = int(params["in_features"]), int(params["group_size"]), int(params["act_bits"])
    n = packed.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, g = x2.shape[0], triton.cdiv(k, group)
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
    else:
        xq = torch.empty((m, g * group), device=x.device, dtype=torch.int8)
        xs = torch.empty((m, g), device=x.device, dtype=torch.float32)
        gpp = min(triton.next_power_of_2(g), max(1, 2048 // group))
        getattr(module, f"{name}_quantize_activations")[(m, triton.cdiv(g, gpp))](
            x2, xq, xs, k, g, x2.stride(0), xq.stride(0), xs.stride(0), GROUP=group, GROUPS_PER_PROG=gpp)
        getattr(module, name)[grid](
            xq, xs, packed, w_scales, *bias_args, acc, m, n, g,
            xq.stride(0), xs.stride(0), packed.stride(0), w_scales.stride(0), acc.stride(0),
            GROUP=group, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=sk, **opts)
    if acc is not o:
        o.copy_(acc)
    return 1 if act_bits == A16 else 2


QUANT_LAUNCHERS = {"df11_decode": launch_df11_decode, "int6_matmul": launch_int6_matmul}
