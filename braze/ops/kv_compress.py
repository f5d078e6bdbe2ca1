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


def _roped(q: Tensor, cos: Tensor | None, sin: Tensor | None) -> Tensor:
    """RoPE in fp32, rounded once to q's dtype: what the kernels (kv_compress.py.j2, the decode attention block)
    compute, so 16-bit scores and rings match them rather than an op-by-op 16-bit rotation."""
    if cos is None:
        return q
    return rope_reference(q.float(), cos.float(), sin.float()).to(q.dtype)


def kv_compress_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_start: Tensor, ck_cache: Tensor,
                          cv_cache: Tensor, kv_keep: Tensor, start_out: Tensor, scale: float, policy: str,
                          window: int, cos: Tensor | None = None, sin: Tensor | None = None,
                          q_ring: Tensor | None = None) -> None:
    """Score the prompt's P = q.shape[2] cached tokens (written from slot 0), keep kv_keep[0] per row and head
    (mean, for adakv) with at most kv_keep[1] slots per head, and compact them into ck/cv_cache. q_ring (rkv):
    the window's queries go to ring slots (cache slot % window), the cache slots they hold after compaction."""
    p = q.shape[2]
    valid = torch.arange(p, device=q.device)[None] >= kv_start.reshape(-1, 1).long()
    w = min(window, p)
    q_win = None
    if policy in NEEDS_QUERIES:
        tail = slice(p - w, p)
        q_win = _roped(q[:, :, tail], None if cos is None else cos[:, tail], None if sin is None else sin[:, tail])
        q_win = q_win.to(torch.promote_types(q_win.dtype, k_cache.dtype))  # kv_dtype may be wider than q
    keep, end = kv_keep[0:1], kv_keep[1:2]
    mask = select_keep(policy, k_cache[:, :, :p], valid, keep, end, w, q_win, scale)
    compact(k_cache, mask, ck_cache, end)
    start_out.copy_(compact(v_cache, mask, cv_cache, end))
    if q_ring is not None and q_win is not None:
        ring = q_ring.shape[2]
        slots = (end - w + torch.arange(w, device=q.device)) % ring
        q_ring.index_copy_(2, slots, q_win[:, :, -ring:].to(q_ring.dtype))


def record_query_reference(q: Tensor, q_ring: Tensor, cache_len: Tensor, cos: Tensor | None = None,
                           sin: Tensor | None = None) -> None:
    """rkv: the step's queries (RoPE applied) into ring slots (cache_len + s) % window (the cache slots they write).
    cache_len is [1] (decode) or one per row [B] (the speculative verify: every draft node is recorded, and the
    runner keeps the accepted ones; S <= window, so a step's nodes never share a slot)."""
    b, h, s, d = q.shape
    slots = (cache_len.reshape(-1, 1) + torch.arange(s, device=q.device)) % q_ring.shape[2]  # [1 or B, S]
    q_ring.scatter_(2, slots[:, None, :, None].expand(b, h, s, d), _roped(q, cos, sin).to(q_ring.dtype))


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


# A separate op rather than an optional q_ring on kv_compress: torch 2.11's custom ops fail on a mutated optional
# argument left out (ADInplaceOrView indexes the call's arguments by the schema's position: IndexError).
@torch.library.custom_op("braze::kv_compress_recording", mutates_args=("ck_cache", "cv_cache", "start_out", "q_ring"))
def kv_compress_recording(attn_out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_start: Tensor,
                          ck_cache: Tensor, cv_cache: Tensor, kv_keep: Tensor, start_out: Tensor, q_ring: Tensor,
                          scale: float, policy: str, window: int, cos: Tensor | None = None,
                          sin: Tensor | None = None) -> Tensor:
    """rkv: kv_compress that also records the window's queries in q_ring (see kv_compress_reference)."""
    kv_compress_reference(q, k_cache, v_cache, kv_start, ck_cache, cv_cache, kv_keep, start_out, scale, policy,
                          window, cos, sin, q_ring)
    return attn_out.clone()


@kv_compress_recording.register_fake
def _kv_compress_recording_fake(attn_out, q, k_cache, v_cache, kv_start, ck_cache, cv_cache, kv_keep, start_out,
                                q_ring, scale, policy, window, cos=None, sin=None):
    return torch.empty_like(attn_out)


@torch.library.custom_op("braze::kv_record_query", mutates_args=("q_ring",))
def kv_record_query(attn_out: Tensor, q: Tensor, q_ring: Tensor, cache_len: Tensor, cos: Tensor | None = None,
                    sin: Tensor | None = None) -> Tensor:
    """rkv decode: record the step's query for the next re-compression (record_query_reference); returns a copy of
    attn_out so the step stays in the graph, after the attention."""
    record_query_reference(q, q_ring, cache_len, cos, sin)
    return attn_out.clone()


@kv_record_query.register_fake
def _kv_record_query_fake(attn_out, q, q_ring, cache_len, cos=None, sin=None):
    return torch.empty_like(attn_out)
