"""Launchers: compute sizes, strides, blocks and grids from real tensors for each kernel family.

They live in the runtime (not codegen) because a saved package launches kernels without the compiler.
The argument order of each launcher matches its template's kernel signature exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_interpreter_ready() -> None:
    """Triton decides at its own import whether its library functions are interpreted; fail clearly if it was
    imported (e.g. by transformers) before TRITON_INTERPRET was set, instead of deep inside a kernel."""
    if not interpreting():
        return
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(getattr(standard, "sigmoid", None), InterpretedFunction):
        from braze.runtime.errors import BrazeError

        raise BrazeError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run under "
                         "the CPU interpreter: import braze before transformers/triton, or export TRITON_INTERPRET=1")


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def matmul_blocks(M: int, N: int, K: int, interpret: bool, *, dual: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): the interpreter pays per program, so it gets the biggest tiles; on a GPU
    decode (small M) is bandwidth bound and wants enough programs to cover the SMs."""
    if interpret:
        return _pow2_clamp(M, 16, 64), _pow2_clamp(N, 16, 128), _pow2_clamp(K, 16, 128)
    block_m = _pow2_clamp(M, 16, 128)
    block_n = _pow2_clamp(N, 16, 64 if dual else 128)
    block_k = _pow2_clamp(K, 16, 64 if block_m >= 64 else 128)
    while block_n > 32 and triton.cdiv(M, block_m) * triton.cdiv(N, block_n) < 128:
        block_n //= 2
    return block_m, block_n, block_k


def matmul_gpu_options(block_m: int, block_n: int, block_k: int, elem_size: int, dual: bool) -> dict[str, int]:
    """num_warps by accumulator size; num_stages as deep as ~200 KB of shared memory allows (H100: 227 KB)."""
    n_weights = 2 if dual else 1
    big = block_m * block_n * n_weights >= 128 * 128
    stage_bytes = (block_m * block_k + n_weights * block_k * block_n) * elem_size
    return {"num_warps": 8 if big else 4, "num_stages": max(2, min(4, (200 * 1024) // stage_bytes))}


def launch_matmul(module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
                  params: dict[str, Any]) -> None:
    kernel = getattr(module, name)
    x = tensors["x"]
    w = tensors["w"]
    K = x.shape[-1]
    a = x.reshape(-1, K)
    N = w.shape[0]
    M = a.shape[0]
    o = out.view(-1, N)
    w2 = tensors.get("w2")
    res = tensors.get("residual")
    if res is not None:
        res = res.reshape(-1, N)
    args: list[Any] = [a, w]
    args += [t for t in (w2, tensors.get("bias"), tensors.get("norm_weight"), res) if t is not None]
    args += [o, M, N, K, a.stride(0), a.stride(1), w.stride(0), w.stride(1)]
    if w2 is not None:
        args += [w2.stride(0), w2.stride(1)]
    if res is not None:
        args += [res.stride(0), res.stride(1)]
    args += [o.stride(0), o.stride(1)]
    if "norm_weight" in tensors:
        args.append(float(params["eps"]))
    interpret = interpreting()
    bm, bn, bk = matmul_blocks(M, N, K, interpret, dual=w2 is not None)
    opts = {} if interpret else matmul_gpu_options(bm, bn, bk, max(a.element_size(), w.element_size()), w2 is not None)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **opts)


def launch_attention(module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
                     params: dict[str, Any]) -> None:
    kernel = getattr(module, name)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    args: list[Any] = [q, k, v, out]
    cos = tensors.get("cos")
    if cos is not None:
        sin = tensors["sin"]
        if cos.stride() != sin.stride():
            sin = sin.contiguous()
            cos = cos.contiguous()
        args += [cos, sin]
    args += [Sq, Skv, Hq, Hq // Hkv, D]
    for t in (q, k, v, out):
        args += list(t.stride())
    if cos is not None:
        args += list(cos.stride())
    args.append(float(params["scale"]))
    interpret = interpreting()
    block_d = triton.next_power_of_2(D)
    if interpret:
        bm, bn = _pow2_clamp(Sq, 16, 64), _pow2_clamp(Skv, 16, 64)
        opts: dict[str, int] = {}
    else:
        bm, bn = _pow2_clamp(Sq, 16, 64), 64 if block_d <= 64 else 32
        opts = {"num_warps": 4, "num_stages": 2}
    grid = (triton.cdiv(Sq, bm), B * Hq)
    kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **opts)


def _row_stride(t: torch.Tensor) -> int:
    """Batch stride of a per-row argument given as one value for the batch ([1], stride 0) or one per row."""
    return 0 if t.numel() == 1 else t.stride(0)


def _flash(kernel: Any, q, k, v, out, kv_start, causal: bool, scale: float, tree_mask=None, past=None) -> None:
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    args: list[Any] = [q, k, v, out, kv_start]
    if tree_mask is not None:  # the template's tree mode: tree [(B,) Sq, Sq] and past lengths after kv_start_ptr
        if tree_mask.dtype == torch.bool:
            tree_mask = tree_mask.view(torch.uint8)  # same bytes; avoids int1 pointers
        strides = tree_mask.stride() if tree_mask.dim() == 3 else (0, *tree_mask.stride())
        args += [tree_mask, *strides, past, _row_stride(past)]
    args += [Sq, Skv, Hq, Hq // Hkv, D]
    for t in (q, k, v, out):
        args += list(t.stride())
    args.append(scale)
    block_d = triton.next_power_of_2(D)
    if interpreting():
        bm, bn, opts = _pow2_clamp(Sq, 16, 64), _pow2_clamp(Skv, 16, 64), {}
    else:
        bm, bn, opts = _pow2_clamp(Sq, 16, 64), (64 if block_d <= 64 else 32), {"num_warps": 4, "num_stages": 2}
    kernel[(triton.cdiv(Sq, bm), B * Hq)](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **opts)


def _rope_write(module: Any, name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One launch of `<name>_rope_write`: returns roped q [B, Hq, S, D]; roped k and v go into the caches at
    cache_len + s (k rotated by cos/sin row s, i.e. at the position its position_ids gave it)."""
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    cos, sin = tensors["cos"], tensors["sin"]
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    kc, vc, cache_len = tensors["k_cache"], tensors["v_cache"], tensors["cache_len"]
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    qo = torch.empty((B, Hq, S, D), dtype=q.dtype, device=q.device)
    block_d = triton.next_power_of_2(D)
    rows = S * max(Hq, Hkv)
    block_r = _pow2_clamp(rows, 1, 1024 if interpreting() else 32)
    kernel = getattr(module, f"{name}_rope_write")
    # kernels packaged before per-row cache offsets take no stride_cl (one offset for the batch)
    per_row = [_row_stride(cache_len)] if "stride_cl" in getattr(kernel, "arg_names", ["stride_cl"]) else []
    args: list[Any] = [q, k, v, cos, sin, qo, kc, vc, cache_len, *per_row, S, Hq, Hkv, D]
    for t in (q, k, v, cos, qo, kc, vc):
        args += list(t.stride())
    kernel[(B * triton.cdiv(rows, block_r), 2)](*args, BLOCK_R=block_r, BLOCK_D=block_d)
    return qo


def launch_cached_attention(module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
                            params: dict[str, Any]) -> int:
    """RoPE q/k, write k/v at cache_len (one kernel), then attend over the cache: flash (prefill) or split-KV."""
    from braze.runtime.attention_blocks import decode_blocks, decode_splits

    qo = _rope_write(module, name, tensors)
    kc, vc, cache_len, kv_start = tensors["k_cache"], tensors["v_cache"], tensors["cache_len"], tensors["kv_start"]
    B, Hq, S, D = qo.shape
    Hkv = kc.shape[1]
    scale = float(params["scale"])
    if not params["decode"]:
        total = int(cache_len.reshape(-1)[0])  + S  # prefill is not graph-captured: a host read is fine
        _flash(getattr(module, name), qo, kc[:, :, :total], vc[:, :, :total], out, kv_start, True, scale)
        return 2
    s_max = kc.shape[2]
    group = Hq // Hkv
    splits = decode_splits(B, Hkv, s_max) if not interpreting() else 1
    blocks = decode_blocks(group, D)
    seq_lens = (cache_len.to(torch.int32) + 1).expand(B).contiguous()
    mid_o = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=qo.device)
    mid_lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=qo.device)
    q1 = qo[:, :, 0, :]
    o1 = out[:, :, 0, :]
    # one split: its normalised partial output is the answer, written straight into `out` (no combine launch)
    direct = splits == 1 and o1.is_contiguous()
    args = [q1, kc, vc, o1 if direct else mid_o, mid_lse, seq_lens, kv_start, Hkv, group, D, splits]
    args += list(q1.stride()) + list(kc.stride()) + list(vc.stride()) + [scale]
    opts = {} if interpreting() else {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
    getattr(module, f"{name}_partial")[(B * Hkv, splits)](
        *args, BLOCK_G=blocks.block_g, BLOCK_N=blocks.block_n, BLOCK_D=blocks.block_d, **opts)
    if direct:
        return 2
    getattr(module, f"{name}_combine")[(B * Hq,)](
        mid_o, mid_lse, o1, Hq, D, splits, *o1.stride(),
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=blocks.block_d)
    return 3


def launch_tree_cached_attention(module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
                                 params: dict[str, Any]) -> int:
    """Tree verify: rope/cache-write kernel, then flash attention over the cache in tree-mask mode (the cache
    prefix is visible to every draft token, the S new tokens by tree_mask [B, S, S]). cache_len is per row [B]:
    the kernel reads each row's length on device, so no host read (the verify step can be graph-captured)."""
    qo = _rope_write(module, name, tensors)
    kc, vc, cache_len = tensors["k_cache"], tensors["v_cache"], tensors["cache_len"]
    _flash(getattr(module, name), qo, kc, vc, out, tensors["kv_start"], True, float(params["scale"]),
           tree_mask=tensors["tree_mask"], past=cache_len)
    return 2


# launchers return how many kernels they launched; LAUNCH_COUNTS is for those that return None
LAUNCH_COUNTS: dict[str, Callable[[dict[str, Any]], int]] = {}

LAUNCHERS: dict[str, Callable[..., Any]] = {
    "matmul": launch_matmul,
    "attention": launch_attention,
    "cached_attention": launch_cached_attention,
    "tree_cached_attention": launch_tree_cached_attention,
}



def fused_blocks(xnumel: int, rnumel: int, reduction: bool, interpret: bool) -> tuple[int, int]:
    """(XBLOCK, RBLOCK) for the fused family."""
    if reduction:
        rblock = triton.next_power_of_2(max(1, rnumel))
        budget = 16384 if interpret else 4096
        xblock = max(1, min(budget // rblock, triton.next_power_of_2(max(1, xnumel)), 64 if not interpret else 1024))
        return xblock, rblock
    xblock = min(triton.next_power_of_2(max(1, xnumel)), 16384 if interpret else 1024)
    return max(xblock, 16), 1


from braze.runtime.quant_launchers import QUANT_LAUNCHERS  # noqa: E402

LAUNCHERS.update(QUANT_LAUNCHERS)
