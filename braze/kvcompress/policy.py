"""Policies: names, the budget rule, and scoring + selection of the kept tokens for one layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from braze.kvcompress.scores import chunk_scores, keydiff_scores, snapkv_scores
from braze.kvcompress.select import joint_keep_mask, keep_mask

POLICIES = ("keydiff", "snapkv", "adakv", "chunkkv")
UNIFORM_POLICIES = ("keydiff", "snapkv", "chunkkv")  # every head keeps the same count: one kv_start per row
NEEDS_QUERIES = ("snapkv", "adakv", "chunkkv")
POOL_KERNEL = 5  # SnapKV's clustering kernel (kvpress default)
CHUNK = 20  # ChunkKV chunk length (kvpress default)
ADAKV_SAFEGUARD = 0.2  # Ada-KV: each head keeps at least this share of the mean per-head budget (kvpress alpha)
ADAKV_HEAD_SLOTS = 2  # Ada-KV: a head may hold up to this many times the mean budget (its static-cache slots)


@dataclass(frozen=True)
class Budget:
    """kv_budget: the compressed cache's capacity per row and head, as a fraction of max_seq (0 < f <= 1) or a
    token count. After prefill the prompt is compressed to fit the capacity with room for max_new_tokens."""

    value: float | int

    def capacity(self, max_seq: int, policy: str) -> int:
        base = self.value if isinstance(self.value, int) else math.ceil(self.value * max_seq)
        slots = base * (ADAKV_HEAD_SLOTS if policy == "adakv" else 1)
        return max(1, min(max_seq, slots))

    def keep(self, prompt_len: int, max_new_tokens: int, max_seq: int) -> int:
        """Mean tokens of the prompt kept per row and head."""
        base = self.value if isinstance(self.value, int) else math.ceil(self.value * max_seq)
        return min(prompt_len, min(base, max_seq) - max_new_tokens)


def select_keep(policy: str, keys: Tensor, valid: Tensor, keep: Tensor, end: Tensor, window: int,
                q_win: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """bool [B, Hkv, P]: the tokens one layer keeps. keep ([1] int64, device) is the mean count per row and head
    (a row with fewer real tokens keeps them all); end ([1]) the slots a head may fill (adakv); the last `window`
    positions are always kept."""
    b, h, p, _ = keys.shape
    if policy == "keydiff":
        scores = keydiff_scores(keys, valid)
    else:
        scores = snapkv_scores(q_win, keys, valid, scale, POOL_KERNEL)
        if policy == "chunkkv":
            scores = chunk_scores(scores, valid, CHUNK)
    recent = (torch.arange(p, device=keys.device) >= p - window)[None, None]
    scores = scores.masked_fill(recent, float("inf")).masked_fill(~valid[:, None], float("-inf"))
    kept = torch.minimum(valid.sum(-1), keep.reshape(()))  # [B]
    if policy != "adakv":
        return keep_mask(scores, kept[:, None].expand(b, h))
    # kvpress: the top int(alpha * mean budget) of each head are safe, and the window (scored above all) too
    safe = torch.clamp((keep.reshape(()) * ADAKV_SAFEGUARD).long(), min=window)
    return joint_keep_mask(scores, kept * h, end.reshape(()), safe)


def check_options(policy: Any, budget: Any, window: Any, max_seq: Any, speculate: Any) -> None:
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
    if speculate is not None:
        raise ConfigError("kv_compression does not work with speculate yet (verify runs over the full cache)")
