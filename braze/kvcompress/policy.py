"""Policies: names, the budget rule, and scoring + selection of the kept tokens for one layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from braze.kvcompress.scores import chunk_scores, keydiff_scores, rkv_scores, snapkv_scores
from braze.kvcompress.select import joint_keep_mask, keep_mask

POLICIES = ("keydiff", "snapkv", "adakv", "chunkkv", "rkv")
UNIFORM_POLICIES = ("keydiff", "snapkv", "chunkkv", "rkv")  # every head keeps the same count: one kv_start per row
NEEDS_QUERIES = ("snapkv", "adakv", "chunkkv", "rkv")
DURING_DECODE = ("rkv",)  # re-compressed whenever decode fills the cache, not only after prefill
CROSS_HEAD_POLICIES = ("adakv", "chunkkv")  # a head's kept set depends on the other heads' scores (not under tp > 1)
POOL_KERNEL = 5  # SnapKV's clustering kernel (kvpress default)
CHUNK = 20  # ChunkKV chunk length (kvpress default)
ADAKV_SAFEGUARD = 0.2  # Ada-KV: each head keeps at least this share of the mean per-head budget (kvpress alpha)
ADAKV_HEAD_SLOTS = 2  # Ada-KV: a head may hold up to this many times the mean budget (its static-cache slots)
RKV_KERNEL = 7  # R-KV's max-pool kernel over the importance (reference code default)
RKV_MIX = 0.1  # R-KV's lambda: importance * lambda - redundancy * (1 - lambda) (the paper's value)
RKV_BUFFER = 128  # R-KV's decode buffer: generated tokens between re-compressions (reference code default)


@dataclass(frozen=True)
class Budget:
    """kv_budget: the compressed cache's capacity per row and head, as a fraction of max_seq (0 < f <= 1) or a
    token count. After prefill the prompt is compressed to fit the capacity with room for max_new_tokens."""

    value: float | int

    def base(self, max_seq: int) -> int:
        return min(max_seq, self.value if isinstance(self.value, int) else math.ceil(self.value * max_seq))

    def capacity(self, max_seq: int, policy: str, window: int = 1) -> int:
        base = self.base(max_seq)
        if policy in DURING_DECODE:
            return base + self.interval(max_seq, window)
        slots = base * (ADAKV_HEAD_SLOTS if policy == "adakv" else 1)
        return max(1, min(max_seq, slots))

    def interval(self, max_seq: int, window: int) -> int:
        """R-KV: decode slots past the budget; when they are full the cache is compressed back to the budget. A
        multiple of the window, so the ring of recorded queries always holds the last `window` (0: the budget
        covers max_seq, nothing to re-compress)."""
        room = max_seq - self.base(max_seq)
        if room <= 0:
            return 0
        want = min(RKV_BUFFER, max(window, self.base(max_seq) // 2))
        return min(room, max(window, -(-want // window) * window))  # room: the cache never outgrows max_seq

    def keep(self, prompt_len: int, max_new_tokens: int, max_seq: int, policy: str = "") -> int:
        """Mean tokens of the prompt kept per row and head (R-KV: up to the budget; decode re-compresses)."""
        if policy in DURING_DECODE:
            return min(prompt_len, self.base(max_seq))
        return min(prompt_len, self.base(max_seq) - max_new_tokens)


def select_keep(policy: str, keys: Tensor, valid: Tensor, keep: Tensor, end: Tensor, window: int,
                q_win: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """bool [B, Hkv, P]: the tokens one layer keeps. keep ([1] int64, device) is the mean count per row and head
    (a row with fewer real tokens keeps them all); end ([1]) the slots a head may fill (adakv); the last `window`
    positions are always kept."""
    b, h, p, _ = keys.shape
    if policy == "keydiff":
        scores = keydiff_scores(keys, valid)
    elif policy == "rkv":
        scores = rkv_scores(q_win, keys, valid, scale, window, RKV_KERNEL, RKV_MIX)
    else:
        scores = snapkv_scores(q_win, keys, valid, scale, POOL_KERNEL)
        if policy == "chunkkv":
            scores = chunk_scores(scores, valid, CHUNK)
    recent = (torch.arange(p, device=keys.device) >= p - window)[None, None]
    scores = scores.masked_fill(recent, float("inf")).masked_fill(~valid[:, None], float("-inf"))
    kept = torch.minimum(valid.sum(-1), keep.reshape(()))  # [B]
    if policy != "adakv":
        return keep_mask(scores, kept[:, None].expand(b, h))
    return joint_keep_mask(scores, kept * h, end.reshape(()), adakv_safe(keep, valid, window))


def adakv_safe(keep: Tensor, valid: Tensor, window: int) -> Tensor:
    """Ada-KV's safeguard [B, 1, 1]: the top int(alpha * mean budget) of each head are safe (kvpress), and the window
    (scored above all) too, but never more than the row's real tokens: left padding is never safe, so a row shorter
    than the safeguard keeps what it keeps alone, however much padding its batch gives it."""
    safe = torch.clamp((keep.reshape(()) * ADAKV_SAFEGUARD).long(), min=window)
    return torch.minimum(safe, valid.sum(-1)).reshape(-1, 1, 1)


def check_options(policy: Any, budget: Any, window: Any, max_seq: Any) -> None:
    """CompileConfig validation of kv_compression / kv_budget / kv_window (one-line ConfigErrors)."""
    from braze.runtime.errors import ConfigError

    if policy is None:
        return
    if policy not in POLICIES:
        raise ConfigError(f"kv_compression={policy!r} is not valid; choose one of None, "
                          + ", ".join(repr(p) for p in POLICIES))
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"kv_budget must be a fraction of max_seq in (0, 1] or a token count, got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise ConfigError(f"kv_budget={budget!r}: a fraction must be in (0, 1] (or give a token count as an int)")
    if isinstance(budget, int) and not 1 <= budget <= max_seq:
        raise ConfigError(f"kv_budget={budget!r}: a token count must be in [1, max_seq={max_seq}]")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"kv_window must be a positive integer (recent tokens always kept), got {window!r}")
    if window > max_seq:
        raise ConfigError(f"kv_window={window} is more than max_seq={max_seq} (the recent tokens always kept)")
    if Budget(budget).base(max_seq) <= window:  # the kept recent tokens would fill the cache: no room to generate
        raise ConfigError(f"kv_compression={policy!r}: kv_budget={budget!r} leaves {Budget(budget).base(max_seq)} "
                          f"slots, not more than kv_window={window}; raise kv_budget or lower kv_window")
