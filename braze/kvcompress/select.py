"""Kept-set selection from scores and on-device compaction into the compressed cache.

Ranks come from a stable descending sort (ties: the earlier token first), so selection is deterministic and equal
to a top-k; counts are device tensors, so nothing here waits on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ranks(scores: Tensor) -> Tensor:
    """Rank of each entry along the last dim (0 = highest score; ties keep index order)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    pos = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


def keep_mask(scores: Tensor, kept: Tensor) -> Tensor:
    """The top-`kept[b, h]` tokens of each row and head; scores [B, H, P] -> bool [B, H, P]."""
    return ranks(scores) < kept[..., None]


def joint_keep_mask(scores: Tensor, total: Tensor, cap: Tensor, safe: Tensor) -> Tensor:
    """Ada-KV allocation: the top-`total[b]` tokens over all heads of row b jointly, so heads whose attention is
    concentrated give budget to heads whose attention is spread; each head keeps at least its top-`safe` (the
    safeguard: `safe`, a count or one per row [B, 1, 1]) and at most `cap` tokens (its slots in the static cache)."""
    b, h, p = scores.shape
    rank_h = ranks(scores)
    s = scores.masked_fill(rank_h < safe, float("inf")).masked_fill(rank_h >= cap, float("-inf"))
    joint = ranks(s.reshape(b, h * p)).reshape(b, h, p)
    return (joint < total.reshape(b, 1, 1)) & (rank_h < cap)


def compact(full: Tensor, keep: Tensor, dest: Tensor, end: Tensor) -> Tensor:
    """Copy the kept tokens of full[:, :, :P] (keep [B, H, P]) in their original order into dest slots
    [end - count, end) of each row and head, zeros elsewhere; returns the per-row, per-head start (int32 [B, H])
    that decode masks below, as it masks left padding."""
    b, h, p = keep.shape
    count = keep.sum(-1)
    start = end.reshape(1, 1) - count
    rank = keep.long().cumsum(-1).contiguous()  # 1-based ordinal of each kept token
    slots = torch.arange(dest.shape[2], device=dest.device)
    want = (slots[None, None] - start[..., None] + 1).contiguous()  # which ordinal goes into each slot
    src = torch.searchsorted(rank, want).clamp(max=p - 1)
    used = (slots[None, None] >= start[..., None]) & (slots[None, None] < end.reshape(1, 1, 1))
    gathered = full[:, :, :p].gather(2, src[..., None].expand(-1, -1, -1, full.shape[-1]))
    dest.copy_(torch.where(used[..., None], gathered, torch.zeros((), dtype=dest.dtype, device=dest.device)))
    return start.to(torch.int32)
