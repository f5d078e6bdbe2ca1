"""braze::* ops for compressed weights (DFloat11, INT6), each with a plain-torch reference and a fake impl.

- ``braze::df11_decode``: decode one DFloat11 unit (a decoder block's linear weights, or the embedding / lm_head)
  into a flat buffer of the original weight dtype. The linears then read views of that buffer, so every matmul
  fusion (norm prologue, epilogues, merged QKV / gate-up) is untouched and the outputs are bit-identical to the
  uncompressed model's: decoding is lossless.
- ``braze::df11_embedding``: embedding rows of a DFloat11 table, decoded alone (only the stream blocks holding
  the requested rows run): a decode step gathers B rows instead of decoding the whole vocabulary.
- ``braze::df11_linear``: y = x @ W^T (+ bias) with W a slice of a DF11 unit decoded inside the GEMV (strategy
  "fused", see braze/templates/df11_gemv.py.j2): at small batch the BF16 weights never round-trip through memory.
- ``braze::int6_linear``: y = fq(x) @ dequant(W)^T (+ bias) with W packed INT6 (FlexQ-style groups of 128
  along K, fp16 scales); fq(x) is the identity (W6A16) or dynamic per-token-group A8 / A6 quantization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braze.ops.library import apply_activation, rms_norm_dtype, rms_norm_reference
from braze.quant.df11 import DF11Unit, decode_df11_reference
from braze.quant.int6 import (
    Int6Weight,
    _n_groups,
    activation_codes,
    int6_linear_reference,
    quantize_activations_reference,
)

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


@torch.library.custom_op("braze::df11_embedding", mutates_args=())
def df11_embedding(
    ids: Tensor,
    encoded: Tensor,
    sign_mantissa: Tensor,
    gaps: Tensor,
    output_positions: Tensor,
    luts: Tensor,
    code_lengths: Tensor,
    row_blocks: Tensor,
    threads_per_block: int,
    max_codes: int,
    lut_levels: int,
    dim: int,
    blocks_per_row: int,
    dtype: torch.dtype,
) -> Tensor:
    """F.embedding(ids, table) with table [rows, dim] the one-tensor unit, as BF16 bits widened exactly or cast to
    `dtype`. row_blocks[r] (int32) is the first stream block holding row r and blocks_per_row the most blocks any
    row spans: compile-time tables, so the kernel decodes only the blocks of the requested rows."""
    unit = df11_unit_from_tensors(encoded, sign_mantissa, gaps, output_positions, luts, code_lengths,
                                  threads_per_block)
    table = decode_df11_reference(unit)["flat"].view(-1, dim)
    out = torch.nn.functional.embedding(ids, table)
    return out.to(dtype) if dtype != torch.bfloat16 else out


@df11_embedding.register_fake
def _df11_embedding_fake(ids, encoded, sign_mantissa, gaps, output_positions, luts, code_lengths, row_blocks,
                         threads_per_block, max_codes, lut_levels, dim, blocks_per_row, dtype):
    return sign_mantissa.new_empty([*ids.shape, dim], dtype=dtype)


@torch.library.custom_op("braze::df11_linear", mutates_args=())
def df11_linear(
    x: Tensor,
    encoded: Tensor,
    sign_mantissa: Tensor,
    gaps: Tensor,
    output_positions: Tensor,
    luts: Tensor,
    code_lengths: Tensor,
    bias: Tensor | None,
    start: int,
    out_features: int,
    in_features: int,
    threads_per_block: int,
    max_codes: int,
    lut_levels: int,
    block_first: int,
    block_count: int,
) -> Tensor:
    """F.linear(x, W, bias) in fp32, returned in x's dtype, with W [out_features, in_features] the unit's weights
    [start, start + out_features * in_features) (strategy "fused": the kernel decodes W inside the GEMV).

    block_first / block_count (the stream blocks covering W), max_codes and lut_levels are compile-time launch
    constants; the reference decodes the whole unit and slices it."""
    unit = df11_unit_from_tensors(encoded, sign_mantissa, gaps, output_positions, luts, code_lengths,
                                  threads_per_block)
    flat = decode_df11_reference(unit)["flat"]
    w = flat[start: start + out_features * in_features].view(out_features, in_features).to(torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    return torch.nn.functional.linear(x.to(torch.float32), w, b).to(x.dtype)


@df11_linear.register_fake
def _df11_linear_fake(x, encoded, sign_mantissa, gaps, output_positions, luts, code_lengths, bias, start,
                      out_features, in_features, threads_per_block, max_codes, lut_levels, block_first,
                      block_count):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("braze::int6_linear", mutates_args=())
def int6_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    in_features: int = 0,
    group_size: int = 128,
    act_bits: int = A16,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
    smooth: Tensor | None = None,
    activation: str = "none",
    glu: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """residual + epilogue(F.linear(fq(prologue(x)), q * scale, bias)), the linear itself in fp32 (act_bits 16:
    fq(x) = x). prologue: RMSNorm (norm_weight, eps), then a per-channel smoothing scale; epilogue: the
    activation, or with glu the packed rows are [gate; up] and the output is act(gate) * up. Each step rounds to
    its dtype as the unfused ops would (braze/passes/int6.py builds this op from them); the kernel rounds once."""
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps)
    if smooth is not None:
        x = x * smooth
    qw = Int6Weight(packed=packed, scales=scales, shape=(packed.shape[0], in_features), group_size=group_size)
    y = int6_linear_reference(x, qw, None if act_bits == A16 else act_bits, bias).to(x.dtype)
    if glu:
        half = y.shape[-1] // 2
        y = apply_activation(y[..., :half], activation) * y[..., half:]
    else:
        y = apply_activation(y, activation)
    return y if residual is None else residual + y


@int6_linear.register_fake
def _int6_linear_fake(x, packed, scales, bias=None, in_features=0, group_size=128, act_bits=A16, norm_weight=None,
                      eps=0.0, smooth=None, activation="none", glu=False, residual=None):
    dtype = rms_norm_dtype(x.dtype, None if norm_weight is None else norm_weight.dtype)
    if smooth is not None:
        dtype = torch.promote_types(dtype, smooth.dtype)
    out = x.new_empty(*x.shape[:-1], packed.shape[0] // (2 if glu else 1), dtype=dtype)
    if residual is not None:
        out = torch.empty_like(torch.broadcast_tensors(out, residual)[0],
                               dtype=torch.promote_types(dtype, residual.dtype))
    return out


@torch.library.custom_op("braze::int6_act_scales", mutates_args=())
def int6_act_scales(x: Tensor, group_size: int = 128, act_bits: int = 8) -> Tensor:
    """fp32 [..., n_groups]: per token per group absmax / qmax (braze.quant.int6.quantize_activations_reference)."""
    return quantize_activations_reference(x, act_bits, group_size)[1]


@int6_act_scales.register_fake
def _int6_act_scales_fake(x, group_size=128, act_bits=8):
    return x.new_empty(*x.shape[:-1], _n_groups(x.shape[-1], group_size), dtype=torch.float32)


@torch.library.custom_op("braze::int6_act_codes", mutates_args=())
def int6_act_codes(x: Tensor, scales: Tensor, group_size: int = 128, act_bits: int = 8) -> Tensor:
    """int8 [..., n_groups * group_size]: clamp(round_half_even(x / scale)) per group, zero tail past K.

    `scales` must be int6_act_scales(x) (braze/passes/int6_act.py builds it so): taking it as an input orders
    the codes after the scales in the graph, which is what lets the fused scheduler put both in one kernel."""
    return activation_codes(x, scales, act_bits, group_size)


@int6_act_codes.register_fake
def _int6_act_codes_fake(x, scales, group_size=128, act_bits=8):
    return x.new_empty(*x.shape[:-1], scales.shape[-1] * group_size, dtype=torch.int8)


@torch.library.custom_op("braze::int6_linear_q", mutates_args=())
def int6_linear_q(
    xq: Tensor,
    xs: Tensor,
    packed: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    in_features: int = 0,
    group_size: int = 128,
    act_bits: int = 8,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """int6_linear on pre-quantized activations (codes xq, scales xs): F.linear(xq * xs, q * scale, bias) in
    fp32, cast to out_dtype; bit-identical to int6_linear(x, ..., act_bits) when (xq, xs) quantize x."""
    g = xs.shape[-1]
    lead = xq.shape[:-1]
    xf = (xq.float().reshape(*lead, g, group_size) * xs.unsqueeze(-1)).reshape(*lead, g * group_size)
    qw = Int6Weight(packed=packed, scales=scales, shape=(packed.shape[0], in_features), group_size=group_size)
    return int6_linear_reference(xf[..., :in_features], qw, None, bias).to(out_dtype)


@int6_linear_q.register_fake
def _int6_linear_q_fake(xq, xs, packed, scales, bias=None, in_features=0, group_size=128, act_bits=8,
                        out_dtype=torch.float32):
    return xq.new_empty(*xq.shape[:-1], packed.shape[0], dtype=out_dtype)


QUANT_OPS = {
    "df11_decode": torch.ops.braze.df11_decode.default,
    "df11_linear": torch.ops.braze.df11_linear.default,
    "int6_linear": torch.ops.braze.int6_linear.default,
    "int6_act_scales": torch.ops.braze.int6_act_scales.default,
    "int6_act_codes": torch.ops.braze.int6_act_codes.default,
    "int6_linear_q": torch.ops.braze.int6_linear_q.default,
}
