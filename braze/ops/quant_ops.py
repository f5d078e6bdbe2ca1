"""braze::* ops for compressed weights (DFloat11, INT6), each with a plain-torch reference and a fake impl.

- ``braze::df11_decode``: decode one DFloat11 unit (a decoder block's linear weights, or the embedding / lm_head)
  into a flat buffer of the original weight dtype. The linears then read views of that buffer, so every matmul
  fusion (norm prologue, epilogues, merged QKV / gate-up) is untouched and the outputs are bit-identical to the
  uncompressed model's: decoding is lossless.
- ``braze::int6_linear``: y = fq(x) @ dequant(W)^T (+ bias) with W packed INT6 (FlexQ-style groups of 128
  along K, fp16 scales); fq(x) is the identity (W6A16) or dynamic per-token-group A8 / A6 quantization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braze.quant.df11 import DF11Unit, decode_df11_reference
from braze.quant.int6 import Int6Weight, int6_linear_reference

A16 = 16  # int6_linear act_bits value meaning "activations stay in the compute dtype"


def df11_unit_from_tensors(encoded: Tensor, sign_mantissa: Tensor, gaps: Tensor, output_positions: Tensor,
                           luts: Tensor, code_lengths: Tensor, threads_per_block: int) -> DF11Unit:
    """A one-tensor DF11Unit (flat, [numel]) over the stored stream tensors."""
    numel = int(sign_mantissa.numel())
    return DF11Unit(names=["flat"], shapes=[(numel,)], n_encoded=1, luts=luts, code_lengths=code_lengths,
                    encoded=encoded, sign_mantissa=sign_mantissa, gaps=gaps, output_positions=output_positions,
                    threads_per_block=threads_per_block)


@torch.library.custom_op("braze::df11_decode", mutates_args=())
def df11_decode(
    encoded: Tensor,
    sign_mantissa: Tensor,
    gaps: Tensor,
    output_positions: Tensor,
    luts: Tensor,
    code_lengths: Tensor,
    threads_per_block: int,
    max_codes: int,
    lut_levels: int,
    shape: list[int],
    dtype: torch.dtype,
) -> Tensor:
    """The unit's weights, concatenated flat (or in `shape`: a one-tensor unit is decoded in its own shape), as
    BF16 bits widened exactly or cast to `dtype`.

    max_codes (codes per 64-bit window) and lut_levels are the decode kernel's loop bounds, fixed by the codebook
    at compile time so the kernel launch needs no host read."""
    unit = df11_unit_from_tensors(encoded, sign_mantissa, gaps, output_positions, luts, code_lengths,
                                  threads_per_block)
    flat = decode_df11_reference(unit)["flat"].view(shape)
    return flat.to(dtype) if dtype != torch.bfloat16 else flat.clone()


@df11_decode.register_fake
def _df11_decode_fake(encoded, sign_mantissa, gaps, output_positions, luts, code_lengths, threads_per_block,
                      max_codes, lut_levels, shape, dtype):
    return sign_mantissa.new_empty(shape, dtype=dtype)


@torch.library.custom_op("braze::int6_linear", mutates_args=())
def int6_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    in_features: int = 0,
    group_size: int = 128,
    act_bits: int = A16,
) -> Tensor:
    """F.linear(fq(x), q * scale, bias) computed in fp32, returned in x's dtype (act_bits 16: fq(x) = x)."""
    qw = Int6Weight(packed=packed, scales=scales, shape=(packed.shape[0], in_features), group_size=group_size)
    y = int6_linear_reference(x, qw, None if act_bits == A16 else act_bits, bias)
    return y.to(x.dtype)


@int6_linear.register_fake
def _int6_linear_fake(x, packed, scales, bias=None, in_features=0, group_size=128, act_bits=A16):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


QUANT_OPS = {
    "df11_decode": torch.ops.braze.df11_decode.default,
    "int6_linear": torch.ops.braze.int6_linear.default,
}
