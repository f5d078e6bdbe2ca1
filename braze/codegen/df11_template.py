"""Triton decoder for DFloat11 units (see braze.quant.df11 for the encoder and the reference decoder).

Why a GPU decoder: DF11 weights are ~11 bits instead of 16, and decoding them into a BF16 buffer right
before use keeps the memory saving while matmuls still see plain BF16.

Layout the kernel reads (all produced by ``encode_df11``):

* ``encoded`` uint8: MSB-first canonical Huffman codes of the exponents, 8-byte window per thread, plus
  4 pad bytes; thread t loads bytes [8t, 8t + 12) as three big-endian words so a code starting at
  bit 63 (at most 32 bits long) can be finished.
* ``gaps`` uint8: 5-bit fields, MSB first; field t = bit offset of the first code starting in window t.
* ``output_positions`` int64: first output index of each block of ``threads_per_block`` windows.
* ``luts`` uint8 ``(n_tables, 256)``: entry < 240 is an exponent, 240..255 points to table ``256 - v``
  for the next code byte; ``code_lengths`` uint8[256] maps an exponent to its code length.
* ``sign_mantissa`` uint8, one per encoded weight, indexed by output position.

The kernel (one program per block of threads) counts codes per window, scans in-block from
``output_positions[block]``, decodes again and writes int16 weight bits
``((s & 0x80) << 8) | (e << 7) | (s & 0x7F)``; the caller views the buffer as BF16. No BF16 arithmetic
happens in the kernel. Writes are limited to ``[out_lo, out_hi)`` and shifted by ``out_base``, so one
tensor of a unit can be decoded alone by launching only the blocks that cover it.

The fused family (``df11_gemv.py.j2``, strategy "fused") reads the same tensors with the same two phases, but
instead of storing a weight it multiplies it with x in registers and reduces per row of W (decomposition in that
template's docstring): at small batch the BF16 weights never round-trip through memory.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from braze.codegen.render import render_template
from braze.quant.df11 import GAP_BITS, POINTER_BASE, WINDOW_BITS, WINDOW_BYTES, DF11Unit
from braze.runtime.kernel_loader import load_kernel
from braze.runtime.quant_launchers import run_df11_gemv

KERNEL_NAME = "df11_decode_kernel"
GEMV_KERNEL_NAME = "df11_gemv_kernel"
MAX_LUT_LEVELS = 4  # 32-bit codes -> root table + 3 levels


def _render(template: str, header: str, kernel_name: str) -> str:
    return render_template(
        template, header=header, kernel_name=kernel_name, max_levels=MAX_LUT_LEVELS,
        pointer_base=POINTER_BASE, window_bytes=WINDOW_BYTES, window_bits=WINDOW_BITS, gap_bits=GAP_BITS,
        gap_mask=(1 << GAP_BITS) - 1,
    )


def render_df11_decode(header: str = "", kernel_name: str = KERNEL_NAME) -> str:
    """Python source of the DF11 decode kernel (`header` is pasted verbatim at the top)."""
    return _render("df11_decode.py.j2", header, kernel_name)


def render_df11_gemv(header: str = "", kernel_name: str = GEMV_KERNEL_NAME) -> str:
    """Python source of the fused DF11 decode + GEMV kernel (strategy "fused"; decomposition in its docstring)."""
    return _render("df11_gemv.py.j2", header, kernel_name)


def df11_block_range(output_positions: torch.Tensor, lo: int, hi: int) -> tuple[int, int]:
    """(first block, block count) of the stream blocks holding outputs lo .. hi - 1; a compile-time table, so
    launches need no host read."""
    if hi <= lo:
        return 0, 0
    pos = output_positions.cpu()
    lo_hi = torch.tensor([lo, hi - 1], dtype=pos.dtype)
    first, last = (torch.searchsorted(pos[:-1], lo_hi, right=True) - 1).tolist()
    return int(first), int(last - first + 1)


def df11_gemv_params(unit: DF11Unit, start: int, out_features: int, in_features: int) -> dict[str, Any]:
    """Launch parameters of a fused GEMV over W = unit elements [start, start + out_features * in_features)."""
    first, count = df11_block_range(unit.output_positions, start, start + out_features * in_features)
    return {"start": start, "out_features": out_features, "in_features": in_features,
            "threads_per_block": unit.threads_per_block, "n_threads": unit.n_threads,
            "max_codes": unit.max_codes_per_window, "lut_levels": unit.lut_levels,
            "block_first": first, "block_count": count}


def df11_gemv_supported(max_codes: int, in_features: int) -> str | None:
    """Why the fused kernel cannot take W (None if it can): a decoder thread's weights must span <= 2 rows."""
    if max_codes > in_features:
        return f"in_features {in_features} < {max_codes} codes per window (a thread's weights would span > 2 rows)"
    return None


@cache
def _kernel() -> Any:
    return load_kernel(render_df11_decode(), KERNEL_NAME)


@cache
def _gemv_kernel() -> Any:
    return load_kernel(render_df11_gemv(), GEMV_KERNEL_NAME)


def _as_int16(out: torch.Tensor, numel: int) -> torch.Tensor:
    if out.dtype not in (torch.int16, torch.bfloat16):
        raise TypeError(f"DF11 output buffer must be int16 or bfloat16, got {out.dtype}")
    if not out.is_contiguous() or out.numel() != numel:
        raise ValueError(
            f"DF11 output buffer must be contiguous with {numel} elements, got {tuple(out.shape)}"
        )
    return out.view(torch.int16)


def _launch(
    unit: DF11Unit, out16: torch.Tensor, out_lo: int, out_hi: int, out_base: int, num_warps: int
) -> None:
    if out_hi <= out_lo:
        return
    pos = unit.output_positions
    # blocks holding the codes of outputs out_lo .. out_hi - 1
    lo_hi = torch.tensor([out_lo, out_hi - 1], dtype=pos.dtype, device=pos.device)
    first, last = (torch.searchsorted(pos[:-1], lo_hi, right=True) - 1).tolist()
    _kernel()[(last - first + 1,)](
        unit.encoded, unit.sign_mantissa, unit.gaps, pos, unit.luts, unit.code_lengths, out16,
        unit.n_threads, first, out_lo, out_hi, out_base, unit.max_codes_per_window,
        THREADS=unit.threads_per_block, N_LEVELS=unit.lut_levels, num_warps=num_warps,
    )


def decode_df11_triton(unit: DF11Unit, out: torch.Tensor | None = None, num_warps: int = 4) -> torch.Tensor:
    """Decode the whole unit into one flat BF16 (or int16) buffer laid out as ``unit.offsets``."""
    if out is None:
        out = torch.empty(unit.num_weights, dtype=torch.bfloat16, device=unit.encoded.device)
    out16 = _as_int16(out, unit.num_weights)
    _launch(unit, out16, 0, unit.n_encoded_weights, 0, num_warps)
    offsets = unit.offsets
    for f in unit.fallbacks:
        out16[offsets[f.name]: offsets[f.name] + f.tensor.numel()] = f.tensor.reshape(-1).view(torch.int16)
    return out


def decode_df11_tensor_triton(
    unit: DF11Unit, name: str, out: torch.Tensor | None = None, num_warps: int = 4
) -> torch.Tensor:
    """Decode one tensor of the unit alone (only the blocks covering it run); returns it in its shape."""
    index = unit.names.index(name)
    shape, numel, offset = unit.shapes[index], unit.numels[index], unit.offsets[name]
    if out is None:
        out = torch.empty(shape, dtype=torch.bfloat16, device=unit.encoded.device)
    out16 = _as_int16(out, numel)
    if index >= unit.n_encoded:
        raw = unit.fallbacks[index - unit.n_encoded].tensor
        out16.copy_(raw.reshape(-1).view(torch.int16).view(out16.shape))
    else:
        _launch(unit, out16, offset, offset + numel, offset, num_warps)
    return out


def df11_linear_triton(
    unit: DF11Unit, name: str, x: torch.Tensor, bias: torch.Tensor | None = None,
    w_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W^T (+ bias) in fp32 with W = tensor `name` of the unit [N, K] decoded inside the GEMV.

    A raw-BF16 fallback tensor has no stream: it is multiplied as stored (widened exactly to fp32).
    `w_out` (fp32, N * K) is a test hook that receives the decoded weights exactly as they enter the products.
    """
    index = unit.names.index(name)
    n, k = unit.shapes[index]
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    acc = torch.zeros((x2.shape[0], n), dtype=torch.float32, device=x.device)
    if bias is not None:
        acc += bias.to(torch.float32)
    if index >= unit.n_encoded:
        w = unit.fallbacks[index - unit.n_encoded].tensor.to(torch.float32)
        if w_out is not None:
            w_out.copy_(w.reshape(-1))
        return (acc + x2 @ w.T).view(*x.shape[:-1], n)
    reason = df11_gemv_supported(unit.max_codes_per_window, k)
    if reason:
        raise ValueError(f"DF11 fused GEMV cannot take {name!r}: {reason}")
    params = df11_gemv_params(unit, unit.offsets[name], n, k)
    stream = {"encoded": unit.encoded, "sign_mantissa": unit.sign_mantissa, "gaps": unit.gaps,
              "output_positions": unit.output_positions, "luts": unit.luts, "code_lengths": unit.code_lengths}
    run_df11_gemv(_gemv_kernel(), x2, stream, acc, params, w_out=w_out)
    return acc.view(*x.shape[:-1], n)
