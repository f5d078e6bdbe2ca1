"""Token scores [B, Hkv, P] of each compression policy (higher = keep); `valid` [B, P] marks real (unpadded) tokens.

Scores of padding tokens are meaningless here; the policy layer masks them to -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def keydiff_scores(keys: Tensor, valid: Tensor) -> Tensor:
    """KeyDiff: -cos(k_i, anchor), anchor = mean of the L2-normalized keys (of the real tokens): keys pointing away
    from the common direction are distinctive and kept. Attention-free (kvpress KeyDiffPress)."""
    k = keys.float()
    w = valid[:, None, :, None].to(k.dtype)
    anchor = (F.normalize(k, p=2, dim=-1) * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1)
    return -F.cosine_similarity(k, anchor, dim=-1)


def snapkv_scores(q_win: Tensor, keys: Tensor, valid: Tensor, scale: float, kernel: int = 5) -> Tensor:
    """SnapKV: the observation window's (last W queries', RoPE applied) causal softmax attention to each key,
    averaged over the window's real queries, max-pooled over `kernel` neighbouring keys (the paper's clustering;
    kvpress average-pools), averaged over each GQA group. q_win [B, Hq, W, D], keys [B, Hkv, P, D]."""
    b, hq, w, _ = q_win.shape
    hkv, p = keys.shape[1], keys.shape[2]
    group = hq // hkv
    k = keys.float().repeat_interleave(group, dim=1) if group > 1 else keys.float()
    logits = (q_win.float() @ k.transpose(-1, -2)) * scale  # [B, Hq, W, P]
    qpos = torch.arange(p - w, p, device=keys.device)[:, None]
    kpos = torch.arange(p, device=keys.device)[None, :]
    visible = (kpos <= qpos)[None, None] & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    qvalid = valid[:, p - w:].to(probs.dtype)  # padding queries (short rows) do not vote
    scores = (probs * qvalid[:, None, :, None]).sum(2) / qvalid.sum(-1).clamp(min=1)[:, None, None]
    if kernel > 1 and p > w:  # pooled over the keys before the window, as kvpress (the window is kept anyway)
        pooled = F.max_pool1d(scores[..., : p - w], kernel_size=kernel, stride=1, padding=kernel // 2)
        scores = torch.cat([pooled, scores[..., p - w:]], dim=-1)
    return scores.view(b, hkv, group, p).mean(2)


def chunk_scores(scores: Tensor, valid: Tensor, chunk: int) -> Tensor:
    """ChunkKV: each token gets its chunk's score, the sum over heads of the token scores averaged over the chunk's
    real tokens; chunks of `chunk` tokens start at each row's first real token. Same for every head: whole chunks
    are kept or dropped together across heads."""
    b, _, p = scores.shape
    start = (~valid).sum(-1, keepdim=True)  # left padding per row
    ids = ((torch.arange(p, device=scores.device)[None] - start).clamp(min=0) // chunk).where(valid, p)  # pad: bin p
    summed = scores.sum(1).masked_fill(~valid, 0.0)
    total = torch.zeros(b, p + 1, device=scores.device).scatter_add_(1, ids, summed)
    count = torch.zeros(b, p + 1, device=scores.device).scatter_add_(1, ids, valid.float())
    per_chunk = total / count.clamp(min=1)
    return per_chunk.gather(1, ids)[:, None].expand_as(scores)
