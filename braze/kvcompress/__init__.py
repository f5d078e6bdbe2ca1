"""KV-cache compression after prefill: per-policy token scores, kept-set selection, on-device compaction.

Plain torch, no host syncs (counts arrive as device tensors): the prefill plan runs it per layer through the
braze::kv_compress op (braze/ops/kv_compress.py), so the decode plan attends over a cache allocated at the
compressed capacity. Policies follow kvpress / the papers: keydiff, snapkv, adakv, chunkkv.
"""

from braze.kvcompress.policy import POLICIES, UNIFORM_POLICIES, Budget, select_keep
from braze.kvcompress.scores import chunk_scores, keydiff_scores, snapkv_scores
from braze.kvcompress.select import compact, joint_keep_mask, keep_mask

__all__ = ["POLICIES", "UNIFORM_POLICIES", "Budget", "chunk_scores", "compact", "joint_keep_mask", "keep_mask",
           "keydiff_scores", "select_keep", "snapkv_scores"]
