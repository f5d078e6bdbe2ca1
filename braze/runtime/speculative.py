"""Lossless acceptance of draft tokens (path or tree drafts) against target-model logits.

Drafts are trees given as ``parents`` (topologically ordered, -1 = child of the last context token);
``target_logits[0]`` is the target's distribution after the context and ``target_logits[i + 1]`` the one after
draft node i. Model-free drafters (suffix trees, prompt lookup) have no proposal distribution, so sampling
uses the one-hot-q case of speculative sampling: accept x with probability p(x); on rejection zero p(x),
renormalise, then try the next sibling or sample the bonus token from what is left. Trying siblings in turn
with removal (recursive rejection sampling) keeps every emitted token distributed exactly as p:
P(emit sibling_j) = prod_{i<j} (1 - p'_i(x_i)) * p'_j(x_j) = p(x_j), and the residual gets the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "compact_accepted",
    "draft_positions",
    "greedy_accept",
    "greedy_accept_batched",
    "greedy_accept_paths",
    "node_depths",
    "sample_accept",
    "sample_accept_paths",
    "target_probs",
    "tree_attention_mask",
]

Parents = Sequence[int] | Tensor


def _as_list(x: Sequence[int] | Tensor) -> list[int]:
    return x.tolist() if isinstance(x, Tensor) else [int(v) for v in x]


def _parents_list(parents: Parents, k: int | None = None) -> list[int]:
    ps = _as_list(parents)
    if k is not None and len(ps) != k:
        raise ValueError(f"expected {k} parents, got {len(ps)}")
    for i, p in enumerate(ps):
        if not -1 <= p < i:
            raise ValueError(f"parents must be topologically ordered (-1 <= parent < i); node {i}: {p}")
    return ps


def node_depths(parents: Parents) -> list[int]:
    """Depth of each draft node; children of the last context token have depth 0."""
    ps = _parents_list(parents)
    depth: list[int] = []
    for p in ps:
        depth.append(0 if p < 0 else depth[p] + 1)
    return depth


def tree_attention_mask(parents: Parents, device: torch.device | str | None = None) -> Tensor:
    """Bool [k, k]: node i attends to itself and its ancestors (the context is attended separately)."""
    ps = _parents_list(parents)
    k = len(ps)
    rows, cols = [], []
    for i in range(k):
        j = i
        while j >= 0:
            rows.append(i)
            cols.append(j)
            j = ps[j]
    mask = torch.zeros(k, k, dtype=torch.bool)
    if k:
        mask[torch.tensor(rows), torch.tensor(cols)] = True
    return mask.to(device) if device is not None else mask


def draft_positions(parents: Parents, base: int | Tensor, device: torch.device | str | None = None) -> Tensor:
    """Position ids of draft nodes: base + depth, where base is the context length (the position the first
    draft token takes) and siblings share a position."""
    pos = torch.tensor(node_depths(parents), dtype=torch.long, device=device)
    return pos + base


# ------------------------------------------------------------------------------------------- greedy


def _accepted_path(best: int, parents: list[int]) -> list[int]:
    path = []
    while best >= 0:
        path.append(best)
        best = parents[best]
    return path[::-1]


def greedy_accept(
    draft_tokens: Sequence[int] | Tensor, parents: Parents, target_logits: Tensor
) -> tuple[list[int], int]:
    """Deepest root-to-node path whose tokens each equal the target argmax at their parent, plus the bonus
    argmax after it. Returns (accepted node indices root-first, bonus token). One host sync."""
    draft = _as_list(draft_tokens)
    k = len(draft)
    ps = _parents_list(parents, k)
    if target_logits.shape[0] != k + 1:
        raise ValueError(f"target_logits needs {k + 1} rows, got {target_logits.shape[0]}")
    argmax = target_logits.argmax(-1).tolist()
    depth = [0] * k  # 0 = rejected, else accepted depth (1-based)
    best = -1
    for i in range(k):
        p = ps[i]
        if draft[i] == argmax[p + 1] and (p < 0 or depth[p]):
            depth[i] = depth[p] + 1 if p >= 0 else 1
            if best < 0 or depth[i] > depth[best]:
                best = i
    return _accepted_path(best, ps), argmax[best + 1]


def greedy_accept_paths(draft_tokens: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Batched greedy acceptance of path drafts, no host sync: draft [B, k], logits [B, k+1, V] ->
    (num_accepted [B], bonus [B])."""
    argmax = target_logits.argmax(-1)
    k = draft_tokens.shape[1]
    match = draft_tokens.to(argmax.device) == argmax[:, :k]
    n = match.long().cumprod(-1).sum(-1)
    return n, argmax.gather(1, n[:, None]).squeeze(1)


def greedy_accept_batched(draft_tokens: Tensor, parents: Tensor, lengths: Tensor, target_logits: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Batched greedy acceptance of padded draft trees, all on device (no host sync): draft/parents [B, K] where
    only the first lengths[b] nodes of row b are real (padding nodes are never accepted), logits [B, K+1, V] ->
    (num_accepted [B], path [B, K] (accepted node indices root-first; entries from num_accepted on are
    meaningless), bonus [B]). Same rule as ``greedy_accept``: the deepest matching path, the first on ties."""
    argmax = target_logits.argmax(-1)
    bsz, k = draft_tokens.shape
    device = argmax.device
    par = parents.to(device).long().clamp(min=-1)
    real = torch.arange(k, device=device)[None] < lengths.to(device)[:, None]
    ok = (draft_tokens.to(device) == argmax.gather(1, par + 1)) & real
    alive = torch.ones(bsz, k + 1, dtype=torch.bool, device=device)  # column 0: the pending token (root)
    depth = torch.zeros(bsz, k + 1, dtype=torch.long, device=device)
    for i in range(k):  # parents come first, so one sweep settles every node (k <= a few dozen)
        p1 = par[:, i : i + 1] + 1
        alive[:, i + 1] = ok[:, i] & alive.gather(1, p1)[:, 0]
        depth[:, i + 1] = depth.gather(1, p1)[:, 0] + 1
    score = torch.where(alive[:, 1:], depth[:, 1:], 0)
    n = score.amax(-1) if k else torch.zeros(bsz, dtype=torch.long, device=device)
    best = torch.where(n > 0, score.argmax(-1) if k else n, -1)  # argmax returns the first maximum
    bonus = argmax.gather(1, (best + 1)[:, None])[:, 0]
    path = torch.zeros(bsz, k, dtype=torch.long, device=device)
    cols = torch.arange(k, device=device)[None]
    cur = best
    for _ in range(k):  # walk up from the best node, writing each node at its depth
        live = cur >= 0
        d = depth.gather(1, (cur + 1)[:, None]) - 1
        path = torch.where(live[:, None] & (cols == d), cur[:, None], path)
        cur = torch.where(live, par.gather(1, cur.clamp(min=0)[:, None])[:, 0], -1)
    return n, path, bonus


def compact_accepted(caches: Sequence[Tensor], offsets: Tensor, path: Tensor, num_accepted: Tensor) -> None:
    """Move each row's accepted draft nodes' K/V to consecutive cache slots, on device: caches [B, H, S, D] hold
    the pending token at offsets[b] and draft node i at offsets[b] + 1 + i; accepted node path[b, j] (j <
    num_accepted[b]) moves to offsets[b] + 1 + j. Nodes only move down (path[b, j] >= j) and every source is
    read before any slot is written, so nothing is overwritten before it moves."""
    if not caches or path.shape[1] == 0:
        return
    device = caches[0].device
    k = path.shape[1]
    j = torch.arange(k, device=device)[None]
    dst = offsets.to(device).long()[:, None] + 1 + j
    src = torch.where(j < num_accepted.to(device)[:, None], offsets.to(device).long()[:, None] + 1 + path.to(device),
                      dst)
    for cache in caches:
        b, h, _, d = cache.shape
        moved = cache.gather(2, src[:, None, :, None].expand(b, h, k, d))
        cache.scatter_(2, dst[:, None, :, None].expand(b, h, k, d), moved)


# ------------------------------------------------------------------------------------------ sampling


def target_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Softmax over the last dim after temperature, top-k (0 = off) and top-p (1.0 = off) filtering."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy_accept for temperature 0)")
    x = logits.float() / temperature
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if x.device.type == "cpu" and x.numel() < 32768:
        # CPU softmax always wakes the intra-op thread pool; for the tiny rows of a per-step acceptance
        # that wake-up dominates (and stalls under CPU contention), so do it by hand.
        e = (x - x.amax(-1, keepdim=True)).exp()
        probs = e / e.sum(-1, keepdim=True)
    else:
        probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sp, idx = probs.sort(dim=-1, descending=True)
        drop_sorted = (sp.cumsum(-1) - sp) >= top_p  # keep a token while the mass before it is < top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _sample_rows(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sample per row of unnormalised probs [B, V] with float32 uniforms u [B] in [0, 1).

    In float64, u * total < total strictly, and ``right=True`` skips the flat CDF steps of zero-probability
    tokens, so a zero-probability token is never returned.
    """
    cdf = probs.double().cumsum(-1)
    target = u.double().unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _uniforms(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    gdev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gdev).to(device)


def sample_accept(
    draft_tokens: Sequence[int] | Tensor,
    parents: Parents,
    target_logits: Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[list[int], int]:
    """Lossless sampled acceptance for a draft tree with deterministic (one-hot) proposals.

    From the current node, children are tried in draft order: accept child x with probability p'(x) where p'
    is the target distribution with previously rejected siblings removed and renormalised. If none is
    accepted (or the node is a leaf) the bonus token is sampled from p'. Returns (accepted path, bonus).
    """
    draft = _as_list(draft_tokens)
    k = len(draft)
    ps = _parents_list(parents, k)
    if target_logits.shape[0] != k + 1:
        raise ValueError(f"target_logits needs {k + 1} rows, got {target_logits.shape[0]}")
    if temperature <= 0:
        return greedy_accept(draft, ps, target_logits)
    probs = target_probs(target_logits, temperature, top_k, top_p)
    device = probs.device
    u = _uniforms(k + 1, generator, device)
    # Every probability the walk can need is p[parent row, child token]: gather them with the uniforms
    # in a single host transfer.
    idx = torch.tensor([[p + 1 for p in ps], draft], dtype=torch.long, device=device)
    host = torch.cat([probs[idx[0], idx[1]], u[:k]]).tolist()
    pvals, ulist = host[:k], host[k:]
    kids: list[list[int]] = [[] for _ in range(k + 1)]
    for i, p in enumerate(ps):
        kids[p + 1].append(i)

    path: list[int] = []
    cur = -1
    while True:
        removed: list[int] = []
        removed_mass = 0.0
        nxt = -1
        for c in kids[cur + 1]:
            x = draft[c]
            if x in removed:
                continue  # already zeroed: rejected with certainty, nothing changes
            remaining = 1.0 - removed_mass
            if remaining <= 0.0:
                break
            if ulist[c] * remaining < pvals[c]:
                nxt = c
                break
            removed.append(x)
            removed_mass += pvals[c]
        if nxt < 0:
            break
        path.append(nxt)
        cur = nxt
    row = probs[cur + 1 : cur + 2]
    if removed:
        residual = row.index_fill(1, torch.tensor(removed, device=device), 0.0)
        # Round-off guard: if the rejected tokens held ~all the mass, nothing would be left to sample.
        row = torch.where(residual.sum() > 0, residual, row)
    return path, int(_sample_rows(row, u[k:]).item())


def sample_accept_paths(
    draft_tokens: Tensor,
    target_logits: Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Batched sampled acceptance of path drafts without host syncs: draft [B, k], logits [B, k+1, V] ->
    (num_accepted [B], bonus [B]). Same rule as ``sample_accept`` with a single child per node. With lengths [B],
    only the first lengths[b] draft tokens of row b are real (padding is neither accepted nor removed)."""
    if temperature <= 0:
        if lengths is None:
            return greedy_accept_paths(draft_tokens, target_logits)
        n, _, bonus = greedy_accept_batched(draft_tokens, torch.arange(-1, draft_tokens.shape[1] - 1).expand_as(
            draft_tokens), lengths, target_logits)
        return n, bonus
    probs = target_probs(target_logits, temperature, top_k, top_p)
    bsz, k1, _ = probs.shape
    k = k1 - 1
    device = probs.device
    draft = draft_tokens.to(device).long()
    real = torch.full((bsz,), k, device=device) if lengths is None else lengths.to(device).long()
    u = _uniforms(bsz * k1, generator, device).view(bsz, k1)
    px = probs[:, :k].gather(-1, draft[..., None]).squeeze(-1)
    px = px.masked_fill(torch.arange(k, device=device)[None] >= real[:, None], 0.0)  # padding: never accepted
    n = (u[:, :k] < px).long().cumprod(-1).sum(-1)
    batch = torch.arange(bsz, device=device)
    row = probs[batch, n]
    if k:
        rejected = draft.gather(1, n.clamp(max=k - 1)[:, None])
        keep = (n == real)[:, None].to(row.dtype)  # only a rejection removes the draft token
        residual = row.scatter(1, rejected, row.gather(1, rejected) * keep)
        # Round-off guard: a rejected token holding ~all the mass would leave nothing to sample.
        row = torch.where(residual.sum(-1, keepdim=True) > 0, residual, row)
    return n, _sample_rows(row, u[:, k])
