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


def rkv_scores(q_win: Tensor, keys: Tensor, valid: Tensor, scale: float, window: int, kernel: int = 7,
               mix: float = 0.1, threshold: float = 0.5) -> Tensor:
    """R-KV: importance * mix - redundancy * (1 - mix) for the keys before the last `window` real ones (those are
    kept anyway; their scores here are meaningless). Importance: the observation window's (last W queries', RoPE
    applied) logits averaged over each GQA group, softmax over the older keys, mean over the queries, max-pooled
    over `kernel` keys. Redundancy: each key's mean cosine similarity to the other keys, where every key's most
    recent near-duplicate (similarity > threshold; else its first key) does not count, softmaxed over the keys.
    Computed over each row's real keys only (`valid` [B, P], left padding), as the reference would on the
    unpadded row. q_win [B, Hq, W, D], keys [B, Hkv, P, D]."""
    b, hq, w, d = q_win.shape
    hkv, p = keys.shape[1], keys.shape[2]
    k = keys.float()
    first = (~valid).sum(-1)  # [B]: each row's first real slot
    pos = torch.arange(p, device=keys.device)
    older = valid & (pos[None] < p - window)  # the keys R-KV scores
    logits = (q_win.float().view(b, hkv, hq // hkv, w, d) @ k[:, :, None].transpose(-1, -2)).mean(2) * scale
    probs = torch.softmax(logits.masked_fill(~older[:, None, None], float("-inf")), dim=-1).nan_to_num(0.0)
    importance = F.max_pool1d(probs.mean(2), kernel_size=kernel, stride=1, padding=kernel // 2)
    unit = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)  # [B, Hkv, P, P]
    pair = valid[:, None, :, None] & valid[:, None, None, :]
    sim = sim.masked_fill(~pair | torch.eye(p, dtype=torch.bool, device=keys.device), 0.0)
    similar_at = torch.where(sim > threshold, pos.view(1, 1, 1, p), first.view(b, 1, 1, 1))
    # a row with no real token (first == p) has nothing to leave out: clamp its index into range
    sim = sim.scatter(-1, similar_at.max(-1, keepdim=True).values.clamp(max=p - 1), 0.0)
    mean_sim = sim.sum(-2) / valid.sum(-1).clamp(min=1).view(b, 1, 1)
    redundancy = torch.softmax(mean_sim.masked_fill(~valid[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return importance * mix - redundancy * (1 - mix)
