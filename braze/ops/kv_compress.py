"""braze::kv_compress: after a prefill layer's cached attention, compress its cache into the decode cache.

It runs eagerly inside the prefill plan (reference: braze/kvcompress), reading the full prefill cache and writing
the compressed cache and the per-row, per-head start that decode masks below. It returns a copy of the attention
output so that the step stays in the graph, ordered after the attention that filled the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braze.kvcompress.policy import NEEDS_QUERIES, select_keep
from braze.kvcompress.select import compact
from braze.ops.library import rope_reference


def kv_compress_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_start: Tensor, ck_cache: Tensor,
                          cv_cache: Tensor, kv_keep: Tensor, start_out: Tensor, scale: float, policy: str,
                          window: int, cos: Tensor | None = None, sin: Tensor | None = None) -> None:
    """Score the prompt's P = q.shape[2] cached tokens (written from slot 0), keep kv_keep[0] per row and head
    (mean, for adakv) with at most kv_keep[1] slots per head, and compact them into ck/cv_cache."""
    p = q.shape[2]
    valid = torch.arange(p, device=q.device)[None] >= kv_start.reshape(-1, 1).long()
    w = min(window, p)
    q_win = None
    if policy in NEEDS_QUERIES:
        q_win = q[:, :, p - w:]
        if cos is not None:
            q_win = rope_reference(q_win, cos[:, p - w:], sin[:, p - w:])
        q_win = q_win.to(torch.promote_types(q_win.dtype, k_cache.dtype))  # kv_dtype may be wider than q
    keep, end = kv_keep[0:1], kv_keep[1:2]
    mask = select_keep(policy, k_cache[:, :, :p], valid, keep, end, w, q_win, scale)
    compact(k_cache, mask, ck_cache, end)
    start_out.copy_(compact(v_cache, mask, cv_cache, end))


@torch.library.custom_op("braze::kv_compress", mutates_args=("ck_cache", "cv_cache", "start_out"))
def kv_compress(attn_out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_start: Tensor, ck_cache: Tensor,
                cv_cache: Tensor, kv_keep: Tensor, start_out: Tensor, scale: float, policy: str, window: int,
                cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
    """Compress one layer's prefill cache (see kv_compress_reference); returns a copy of attn_out."""
    kv_compress_reference(q, k_cache, v_cache, kv_start, ck_cache, cv_cache, kv_keep, start_out, scale, policy,
                          window, cos, sin)
    return attn_out.clone()


@kv_compress.register_fake
def _kv_compress_fake(attn_out, q, k_cache, v_cache, kv_start, ck_cache, cv_cache, kv_keep, start_out, scale, policy,
                      window, cos=None, sin=None):
    return torch.empty_like(attn_out)
