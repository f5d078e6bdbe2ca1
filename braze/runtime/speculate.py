"""Speculative generation: SuffixDecoding drafts verified by the cached-attention graph, lossless acceptance.

A verify step feeds [pending token, d1..dk] (a path draft from the suffix trees) through the prefill/verify plan at
cache_len = tokens already cached, so row i of its logits is the target distribution after token i. Greedy keeps
the longest draft prefix equal to the target argmax plus one bonus token; sampling accepts d with probability p(d)
and resamples from p without d on rejection (runtime/speculative.py), so outputs equal plain decoding exactly
(greedy) or in distribution (sampling). K/V written for rejected drafts sit past the new cache length and are
overwritten before anything reads them. With no draft, or a draft scored below `min_score`, the step is a plain
decode step: speculation turns itself off when the trees predict poorly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from braze.runtime.speculative import greedy_accept, sample_accept
from braze.runtime.suffix_tree import SuffixDrafter


@dataclass
class SpeculationStats:
    verify_steps: int = 0
    tree_steps: int = 0  # verify steps whose draft was a tree (branching), verified with tree attention
    plain_steps: int = 0
    accepted_drafts: int = 0  # draft tokens accepted over all verify steps
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def accepted_per_verify(self) -> float:
        """Mean tokens a verify step yields: accepted draft tokens plus the bonus token."""
        return (self.accepted_drafts + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _tree_layout(parents: list[int], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [1+k, 1+k] (the pending token is node 0, draft node i is i+1; each sees itself and its ancestors) and
    depths [1+k] (position offsets)."""
    from braze.runtime.speculative import node_depths, tree_attention_mask

    k = len(parents)
    mask = torch.zeros(k + 1, k + 1, dtype=torch.bool, device=device)
    mask[:, 0] = True
    mask[1:, 1:] = tree_attention_mask(parents, device=device)
    depth = torch.tensor([0] + [d + 1 for d in node_depths(parents)], device=device)
    return mask, depth


def _compact(caches: dict[str, torch.Tensor], src: list[int], dst0: int) -> None:
    src_t = torch.tensor(src, device=next(iter(caches.values())).device)
    dst_t = torch.arange(dst0, dst0 + len(src), device=src_t.device)
    for cache in caches.values():
        cache[:, :, dst_t] = cache[:, :, src_t].clone()


class SpeculativeRunner:
    """Batch-1 speculative loop over a Generator's executors; batches run row by row."""

    def __init__(self, generator: Any, max_spec_tokens: int = 8, min_score: float = 0.5,
                 max_spec_factor: float = 4.0, min_token_prob: float = 0.1):
        self.gen = generator
        self.drafter = SuffixDrafter()
        self.max_spec_tokens = max_spec_tokens
        self.min_score = min_score
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self.stats = SpeculationStats()
        self.tree = False  # draft trees verified with tree attention (else path drafts through the prefill plan)
        self._next_request = 0

    def generate_row(self, ids: torch.Tensor, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int,
                     top_p: float, generator: torch.Generator | None, eos_ids: torch.Tensor) -> list[int]:
        """New tokens for one unpadded prompt [1, S]."""
        from braze.runtime.sampling import select_next

        g = self.gen
        req = self._next_request
        self._next_request += 1
        prompt = ids[0].tolist()
        self.drafter.start_request(req, prompt)
        caches = g.new_caches(1)
        kv_start = torch.zeros(1, dtype=torch.int32, device=g.device)
        start = time.perf_counter()
        logits = g.forward(g.prefill, ids, torch.arange(len(prompt), device=g.device)[None], 0, kv_start, caches)
        pending = int(select_next(logits[:, -1], do_sample, temperature, top_k, top_p, generator)[0])
        out = [pending]
        cached = len(prompt)  # positions in the cache; `pending` is not in it yet
        eos = set(eos_ids.tolist())
        while len(out) < max_new_tokens and pending not in eos:
            t0 = time.perf_counter()
            self.drafter.observe(req, [pending])
            room = min(self.max_spec_tokens, max_new_tokens - len(out) - 1, g.max_seq - cached - 1)
            draft = self.drafter.draft(req, max_spec_tokens=max(room, 0), max_spec_factor=self.max_spec_factor,
                                       min_token_prob=self.min_token_prob, tree=self.tree) if room > 0 else None
            self.stats.draft_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            if draft is None or len(draft) == 0 or draft.score < self.min_score:
                tok = torch.tensor([[pending]], device=g.device)
                logits = g.forward(g.decode, tok, torch.tensor([[cached]], device=g.device), cached, kv_start, caches)
                pending = int(select_next(logits[:, -1], do_sample, temperature, top_k, top_p, generator)[0])
                cached += 1
                out.append(pending)
                self.stats.plain_steps += 1
            else:
                toks = [pending] + draft.tokens
                feed = torch.tensor([toks], device=g.device)
                if draft.is_path:
                    pos = torch.arange(cached, cached + len(toks), device=g.device)[None]
                    logits = g.forward(g.prefill, feed, pos, cached, kv_start, caches)[0]
                else:
                    self.stats.tree_steps += 1
                    mask, depth = _tree_layout(draft.parents, g.device)
                    logits = g.forward(g.verify, feed, (cached + depth)[None], cached, kv_start, caches, mask)[0]
                if do_sample:
                    path, bonus = sample_accept(draft.tokens, draft.parents, logits, generator, temperature, top_k,
                                                top_p)
                else:
                    path, bonus = greedy_accept(draft.tokens, draft.parents, logits)
                accepted = [draft.tokens[i] for i in path]
                if not draft.is_path and path:  # move the accepted nodes' K/V to consecutive cache slots
                    _compact(caches, [cached + 1 + i for i in path], cached + 1)
                if eos & set(accepted):  # stop at the first accepted EOS, exactly as plain decoding would
                    accepted = accepted[: next(i for i, t in enumerate(accepted) if t in eos) + 1]
                    bonus = None
                new = accepted + ([bonus] if bonus is not None else [])
                new = new[: max_new_tokens - len(out)]
                self.drafter.observe(req, new[:-1])
                cached += 1 + len(accepted)
                out.extend(new)
                pending = new[-1]
                self.stats.verify_steps += 1
                self.stats.accepted_drafts += len(accepted)
            self.stats.verify_seconds += time.perf_counter() - t0
        self.stats.tokens += len(out)
        self.stats.seconds += time.perf_counter() - start
        self.drafter.finish_request(req)
        return out[:max_new_tokens]
