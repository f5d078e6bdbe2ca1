"""INT6 (FlexQ-style) weight quantization: per-row groups of 128 along K, symmetric, fp16 scales.

Quantization: ``scale = absmax / 31`` rounded to fp16, ``q = clamp(round(w / scale), -32, 31)`` where round
is round-half-to-even (``torch.round``) and the division uses the *stored* fp16 scale, so ``q * scale`` is
exactly what every consumer reconstructs. An all-zero group gets scale 0 and q 0 (no division by zero).

Packed layout (per output row, per group of G = group_size values, SUB = G // 4):
    word[j] = u(q[j]) | u(q[SUB + j]) << 6 | u(q[2*SUB + j]) << 12 | u(q[3*SUB + j]) << 18,  j < SUB
where u() is the 6-bit two's complement field. Each 24-bit word is stored as three byte planes: the group's
3*SUB bytes are ``[word & 0xff for all j] + [word >> 8 & 0xff ...] + [word >> 16 ...]``.
Why this layout rather than 4 consecutive values per 3 bytes: a kernel loads the three planes as three
contiguous [SUB]-byte vectors (coalesced, no gather), rebuilds the words with two shifts/ors, and each of the
four 6-bit fields is a *contiguous* K-slice of the group (k = p*SUB + j), so the unpacked tiles feed tl.dot
directly against contiguous activation slices — no interleave, reshape or permute in registers.
K that is not a multiple of G is zero-padded to K_pad = n_groups * G in the packed tensor (q = 0 there).

Activation quantization (for W6A8 / W6A6): dynamic, per token per group, symmetric,
``scale = absmax / qmax`` (fp32; qmax 127 for A8, 31 for A6), ``q = clamp(round(x / scale), qmin, qmax)``,
ranges [-127, 127] and [-32, 31]. The Triton kernel performs the same fp32 operations (IEEE division,
round-half-to-even), so its int8 values and scales match this reference bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHT_QMIN, WEIGHT_QMAX = -32, 31
# act_bits -> (qmin, qmax); the scale divisor is qmax.
ACT_RANGES: dict[int, tuple[int, int]] = {8: (-127, 127), 6: (-32, 31)}


def _n_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def _check_group_size(group_size: int) -> None:
    if group_size <= 0 or group_size % 4:
        raise ValueError(f"group_size must be a positive multiple of 4, got {group_size}")


def _grouped(t: Tensor, group_size: int) -> Tensor:
    """[..., K] -> [..., n_groups, group_size] in fp32, zero-padding the short last group."""
    k = t.shape[-1]
    pad = _n_groups(k, group_size) * group_size - k
    t = F.pad(t.float(), (0, pad))
    return t.reshape(*t.shape[:-1], -1, group_size)


def quantize_weight_groups(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """Return (q int8 [N, K], scales fp16 [N, n_groups]) for a 2-D weight (unpacked ints)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    _check_group_size(group_size)
    n, k = w.shape
    wg = _grouped(w, group_size)
    scales = (wg.abs().amax(dim=-1) / WEIGHT_QMAX).to(torch.float16)
    if not torch.isfinite(scales).all():
        raise ValueError("weight has non-finite values or a group scale that overflows fp16")
    s = scales.float().unsqueeze(-1)
    q = torch.round(wg / torch.where(s > 0, s, torch.ones_like(s))).clamp_(WEIGHT_QMIN, WEIGHT_QMAX)
    q = torch.where(s > 0, q, torch.zeros_like(q))  # scale underflowed to 0 -> the group reconstructs as 0
    return q.reshape(n, -1)[:, :k].to(torch.int8), scales


def pack_int6(q: Tensor, group_size: int = 128) -> Tensor:
    """Pack int8 values in [-32, 31] of shape [N, K] into uint8 [N, n_groups * group_size * 3 // 4]."""
    _check_group_size(group_size)
    if q.dim() != 2:
        raise ValueError("pack_int6 expects a 2-D [N, K] tensor")
    if q.numel() and (q.min() < WEIGHT_QMIN or q.max() > WEIGHT_QMAX):
        raise ValueError("values out of the int6 range [-32, 31]")
    n, k = q.shape
    sub = group_size // 4
    g = _n_groups(k, group_size)
    u = F.pad(q.to(torch.int32), (0, g * group_size - k)) & 0x3F  # 6-bit two's complement fields
    u = u.reshape(n, g, 4, sub)
    word = u[:, :, 0] | (u[:, :, 1] << 6) | (u[:, :, 2] << 12) | (u[:, :, 3] << 18)  # [N, G, SUB]
    planes = torch.stack([(word >> (8 * b)) & 0xFF for b in range(3)], dim=2)  # [N, G, 3, SUB]
    return planes.reshape(n, g * 3 * sub).to(torch.uint8)


def unpack_int6(packed: Tensor, K: int, group_size: int = 128) -> Tensor:
    """Inverse of `pack_int6`: uint8 [N, n_groups * group_size * 3 // 4] -> int8 [N, K] (exact)."""
    _check_group_size(group_size)
    n, nbytes = packed.shape
    sub = group_size // 4
    g = _n_groups(K, group_size)
    if nbytes != g * 3 * sub:
        raise ValueError(f"packed row has {nbytes} bytes, expected {g * 3 * sub} for K={K}")
    planes = packed.to(torch.int32).reshape(n, g, 3, sub)
    word = planes[:, :, 0] | (planes[:, :, 1] << 8) | (planes[:, :, 2] << 16)
    fields = torch.stack([(word >> (6 * p)) & 0x3F for p in range(4)], dim=2)  # [N, G, 4, SUB]
    q = torch.where(fields >= 32, fields - 64, fields)  # sign-extend the 6-bit field
    return q.reshape(n, g * group_size)[:, :K].to(torch.int8)


@dataclass
class Int6Weight:
    """A packed INT6 weight [N, K]: `packed` uint8 [N, K_pad*6/8], `scales` fp16 [N, n_groups]."""

    packed: Tensor
    scales: Tensor
    shape: tuple[int, int]
    group_size: int = 128

    @property
    def n_groups(self) -> int:
        return _n_groups(self.shape[1], self.group_size)

    @property
    def k_padded(self) -> int:
        return self.n_groups * self.group_size

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (packed bytes + fp16 scales, padding included) per logical weight."""
        tensors = (self.packed, self.scales)
        stored = sum(t.numel() * t.element_size() for t in tensors)
        return 8.0 * stored / (self.shape[0] * self.shape[1])

    def int_values(self) -> Tensor:
        """The quantized integers, int8 [N, K]."""
        return unpack_int6(self.packed, self.shape[1], self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """q * scale computed in fp32 (exact: 6-bit int times fp16 scale fits fp32), then cast."""
        n, k = self.shape
        q = F.pad(self.int_values().float(), (0, self.k_padded - k))
        q = q.reshape(n, self.n_groups, self.group_size)
        w = (q * self.scales.float().unsqueeze(-1)).reshape(n, self.k_padded)[:, :k]
        return w.to(dtype)

    def to_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Tensors only (safetensors-friendly); shape and group size travel as int64 tensors."""
        return {
            f"{prefix}packed": self.packed,
            f"{prefix}scales": self.scales,
            f"{prefix}shape": torch.tensor(self.shape, dtype=torch.int64),
            f"{prefix}group_size": torch.tensor(self.group_size, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], prefix: str = "") -> Int6Weight:
        n, k = (int(v) for v in state[f"{prefix}shape"].tolist())
        group_size = int(state[f"{prefix}group_size"])
        packed, scales = state[f"{prefix}packed"], state[f"{prefix}scales"]
        g = _n_groups(k, group_size)
        if tuple(packed.shape) != (n, g * group_size * 3 // 4) or tuple(scales.shape) != (n, g):
            raise ValueError("state dict tensors do not match the recorded shape / group size")
        return cls(
            packed=packed.to(torch.uint8),
            scales=scales.to(torch.float16),
            shape=(n, k),
            group_size=group_size,
        )


def quantize_int6(w: Tensor, group_size: int = 128) -> Int6Weight:
    """Quantize a weight [N, K] (nn.Linear layout) to packed INT6 with per-row groups along K."""
    q, scales = quantize_weight_groups(w, group_size)
    return Int6Weight(
        packed=pack_int6(q, group_size), scales=scales, shape=(w.shape[0], w.shape[1]), group_size=group_size
    )


def fake_quant_weight(w: Tensor, group_size: int = 128) -> Tensor:
    """Quantize-dequantize a weight [N, K] in fp32 (the values the kernels multiply by)."""
    n, k = w.shape
    q, scales = quantize_weight_groups(w, group_size)
    qg = _grouped(q, group_size)
    return (qg * scales.float().unsqueeze(-1)).reshape(n, -1)[:, :k]


def quantize_activations_reference(x: Tensor, bits: int, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """Reference for the `quantize_activations` kernel: x [..., K] -> (q int8 [..., K_pad], scales fp32
    [..., n_groups]); the padding tail of q is 0 and an all-zero group has scale 0."""
    if bits not in ACT_RANGES:
        raise ValueError(f"activation bits must be one of {sorted(ACT_RANGES)}, got {bits}")
    _check_group_size(group_size)
    scales = _grouped(x, group_size).abs().amax(dim=-1) / ACT_RANGES[bits][1]
    return activation_codes(x, scales, bits, group_size), scales


def activation_codes(x: Tensor, scales: Tensor, bits: int, group_size: int = 128) -> Tensor:
    """int8 codes [..., K_pad] of x [..., K] for given per-group scales [..., n_groups]: clamp(round_half_even(
    x / scale)), 0 for a zero scale and in the padding tail."""
    qmin, qmax = ACT_RANGES[bits]
    s = scales.unsqueeze(-1)
    q = torch.round(_grouped(x, group_size) / torch.where(s > 0, s, torch.ones_like(s))).clamp_(qmin, qmax)
    return q.reshape(*x.shape[:-1], -1).to(torch.int8)


def fake_quant_activation(x: Tensor, bits: int, group_size: int = 128) -> Tensor:
    """Quantize-dequantize activations [..., K] per token per group, in fp32."""
    q, scales = quantize_activations_reference(x, bits, group_size)
    k = x.shape[-1]
    xg = q.float().reshape(*q.shape[:-1], -1, group_size) * scales.unsqueeze(-1)
    return xg.reshape(*x.shape[:-1], -1)[..., :k]


def int6_linear_reference(
    x: Tensor, qw: Int6Weight, act_bits: int | None = None, bias: Tensor | None = None
) -> Tensor:
    """The oracle: F.linear(fq(x), fq(W)) + bias in fp32 (fq(x) = x when act_bits is None)."""
    if x.shape[-1] != qw.shape[1]:
        raise ValueError(f"x has K={x.shape[-1]}, weight expects K={qw.shape[1]}")
    xf = x.float() if act_bits is None else fake_quant_activation(x, act_bits, qw.group_size)
    return F.linear(xf, qw.dequantize(torch.float32), None if bias is None else bias.float())
