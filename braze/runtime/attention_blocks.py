"""Tile and split choosers for the attention kernels (runtime side: packages launch without the compiler).

tl.dot needs every dimension >= 16; a head dim that is not a power of two is padded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import triton

_NUM_SMS = 132  # H100 SXM; only used to size the decode split count




@dataclass(frozen=True)
class AttentionBlocks:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DecodeBlocks:
    block_g: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def _block_d(head_dim: int) -> int:
    if head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def attention_blocks(head_dim: int, rope: bool = False) -> AttentionBlocks:
    """H100 tile sizes for the forward kernel (fp16/bf16); the q tile and acc live in registers."""
    block_d = _block_d(head_dim)
    # rope keeps cos/sin/rotated-K tiles live too: a narrower key tile avoids register spills.
    block_n = 32 if rope else 64
    if block_d <= 64:
        return AttentionBlocks(128, block_n, block_d, num_warps=4, num_stages=3)
    if block_d <= 128:
        return AttentionBlocks(128, block_n, block_d, num_warps=8, num_stages=3)
    return AttentionBlocks(64, 32, block_d, num_warps=8, num_stages=2)


def decode_blocks(group: int, head_dim: int) -> DecodeBlocks:
    """Tile sizes for the decode partial kernel: all GROUP query heads in one (padded) tile."""
    if group < 1:
        raise ValueError(f"group must be positive, got {group}")
    block_d = _block_d(head_dim)
    block_g = max(16, triton.next_power_of_2(group))
    block_n = 64 if block_d <= 128 else 32
    return DecodeBlocks(block_g, block_n, block_d, num_warps=4, num_stages=2)


def decode_splits(batch: int, heads_kv: int, s_max: int) -> int:
    """Split count for decode: about two waves of programs, but at least ~256 cache slots per split.

    Few (batch, kv head) pairs and a long cache need many splits to occupy the GPU; a large batch
    already fills it and extra splits would only add combine traffic.
    """
    if batch < 1 or heads_kv < 1 or s_max < 1:
        raise ValueError(f"batch, heads_kv and s_max must be positive, got {batch}, {heads_kv}, {s_max}")
    wanted = math.ceil(2 * _NUM_SMS / (batch * heads_kv))
    by_length = max(1, s_max // 256)
    return max(1, min(wanted, by_length, 64))
