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
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from braze.codegen.render import render_template
from braze.quant.df11 import GAP_BITS, POINTER_BASE, WINDOW_BITS, WINDOW_BYTES, DF11Unit
from braze.runtime.kernel_loader import load_kernel

KERNEL_NAME = "df11_decode_kernel"
MAX_LUT_LEVELS = 4  # 32-bit codes -> root table + 3 levels


def render_df11_decode(header: str = "", kernel_name: str = KERNEL_NAME) -> str:
    """Python source of the DF11 decode kernel (`header` is pasted verbatim at the top)."""
    return render_template(
        "df11_decode.py.j2", header=header, kernel_name=kernel_name, max_levels=MAX_LUT_LEVELS,
        pointer_base=POINTER_BASE, window_bytes=WINDOW_BYTES, window_bits=WINDOW_BITS, gap_bits=GAP_BITS,
        gap_mask=(1 << GAP_BITS) - 1,
    )


@cache
def _kernel() -> Any:
    return load_kernel(render_df11_decode(), KERNEL_NAME)


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
