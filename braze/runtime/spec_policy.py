"""When to speculate, and how far: a per-request cost model fed by the acceptance actually observed.

Verifying k draft tokens costs about ``1 + a + c*k`` decode steps (a = ``verify_step_cost``: a verify forward's
fixed extra cost over a decode step; c = ``verify_token_cost``: one more row through the verify plan) and yields
``1 + accepted`` tokens, so a step is worth speculating when the expected accepted length beats ``a + c*k``; the
draft is cut to the length k that maximises the difference.

The drafter's own score (a sum of count-ratio path probabilities) is over-confident for short matches: a token
seen once after a 1-token context scores 1.0. So draft token i is taken to be accepted with probability
``probs[i] * r**(i+1)``, r being the conditional per-token acceptance rate of drafts with a similar match length:
a prior that grows with the match length, updated by what this request observed (exponentially forgotten, so
the estimate follows the text).

While speculation is off the policy keeps learning for free: after a plain step it checks whether the draft it
declined would have predicted the token just produced (a greedy token, or a sample, matches the draft with
exactly the probability verification would have accepted it). Rejections turn speculation off; predictions
that would have succeeded turn it back on.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from braze.runtime.suffix_tree import Draft

__all__ = ["PolicyDrafter", "SpecPolicy", "default_costs"]

_BUCKETS = 6  # match lengths 1, 2-3, 4-7, 8-15, 16-31, 32+
# Per-token acceptance before any evidence, by match-length bucket: a long match is usually a copy in progress.
PRIOR_ACCEPT = (0.3, 0.45, 0.8, 0.9, 0.95, 0.95)


def _bucket(match_len: int) -> int:
    return min(max(match_len, 1).bit_length(), _BUCKETS) - 1


@dataclass
class _Rate:
    """Forgetful Bernoulli counts: accepted draft tokens (hits) and first rejections (misses)."""

    hits: float = 0.0
    misses: float = 0.0

    def add(self, hits: int, misses: int, keep: float) -> None:
        self.hits = self.hits * keep + hits
        self.misses = self.misses * keep + misses

    def rate(self, prior: float, weight: float) -> float:
        return (self.hits + prior * weight) / (self.hits + self.misses + weight)


class SpecPolicy:
    """One request's speculation decisions: ``decide`` before each step, ``observe`` with every emitted token.

    Costs are in decode steps (see ``default_costs``). ``prior_accept``/``prior_weight``: the starting per-token
    acceptance per match-length bucket and how many observations it is worth. ``keep``: per-update forgetting
    factor of the counts.
    """

    def __init__(self, verify_step_cost: float = 0.5, verify_token_cost: float = 0.06,
                 prior_accept: tuple[float, ...] = PRIOR_ACCEPT, prior_weight: float = 4.0, keep: float = 0.9) -> None:
        self.a = verify_step_cost
        self.c = verify_token_cost
        self.prior_accept = prior_accept
        self.prior_weight = prior_weight
        self.keep = keep
        self.by_len = [_Rate() for _ in range(_BUCKETS)]
        self._last: Draft | None = None  # the draft of the current step (verified or declined), until scored
        self._declined = False
        self._matched = 0

    def accept_rate(self, match_len: int) -> float:
        """Per-token conditional acceptance for drafts of this match length: the bucket's counts, shrunk
        toward its prior."""
        b = _bucket(match_len)
        return self.by_len[b].rate(self.prior_accept[b], self.prior_weight)

    def expected_gains(self, draft: Draft) -> list[float]:
        """gains[k-1] = expected accepted tokens minus the verify step's extra cost, path draft cut to k tokens."""
        r = self.accept_rate(draft.match_len)
        gains, total, reach = [], -self.a, 1.0
        for prob in draft.probs:
            reach *= r
            total += prob * reach - self.c
            gains.append(total)
        return gains

    def decide(self, draft: Draft | None) -> Draft | None:
        """The draft to verify (possibly cut shorter), or None for a plain decode step."""
        if self._last is not None and self._matched:  # still matching when this step began: credit the hits
            self._record(self._last.match_len, self._matched, 0)
        self._last, self._matched = None, 0
        if draft is None or len(draft) == 0:
            return None
        if draft.is_path:
            gains = self.expected_gains(draft)
            k = max(range(len(gains)), key=gains.__getitem__) + 1
            gain = gains[k - 1]
        else:  # trees: all or nothing on the whole tree's expected value
            r = self.accept_rate(draft.match_len)
            k, gain = len(draft), sum(p * r for p in draft.probs) - self.c * len(draft) - self.a
        self._last = draft
        self._declined = gain <= 0.0
        if self._declined:
            return None
        return draft if k == len(draft) else _truncate(draft, k)

    def observe(self, tokens: Sequence[int]) -> None:
        """Tokens emitted after the last ``decide``: score the draft (verified, or declined: its first token only)
        against them. A greedy token, or a sample, equals a draft token with exactly the probability that
        verification accepts it, so declined drafts are scored as if they had been verified."""
        draft = self._last
        for t in tokens:
            if draft is None:
                return
            if draft.is_path:
                hit = draft.tokens[self._matched] == t
            else:  # trees: a root token (first step only)
                hit = self._matched == 0 and t in _roots(draft)
            self._matched += hit
            if not hit or self._matched == len(draft) or self._declined or not draft.is_path:
                self._record(draft.match_len, self._matched, int(not hit))
                draft = self._last = None

    def _record(self, match_len: int, hits: int, misses: int) -> None:
        self.by_len[_bucket(match_len)].add(hits, misses, self.keep)


class PolicyDrafter:
    """A drafter with a per-request ``SpecPolicy`` in front: same interface as ``SuffixDrafter``, so a runner
    needs no feedback hooks (the policy learns from the tokens the runner reports through ``observe``)."""

    def __init__(self, drafter: Any, **policy: Any) -> None:
        self.inner = drafter
        self.options = policy
        self.policies: dict[Hashable, SpecPolicy] = {}
        # host time spent in the policy itself (decisions; learning from emitted tokens), for runner statistics
        self.decide_seconds = 0.0
        self.learn_seconds = 0.0

    def __getattr__(self, name: str) -> Any:  # global_trie, context, ... of the wrapped drafter
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def start_request(self, req_id: Hashable, prompt_ids: Iterable[int]) -> None:
        self.inner.start_request(req_id, prompt_ids)
        self.policies[req_id] = SpecPolicy(**self.options)

    def observe(self, req_id: Hashable, new_tokens: Iterable[int]) -> None:
        toks = [int(t) for t in new_tokens]
        self.inner.observe(req_id, toks)
        t0 = time.perf_counter()
        self.policies[req_id].observe(toks)
        self.learn_seconds += time.perf_counter() - t0

    def draft(self, req_id: Hashable, **kwargs: Any) -> Draft:
        """The inner drafter's draft as the policy cuts it; an empty draft means: take a plain step."""
        draft = self.inner.draft(req_id, **kwargs)
        t0 = time.perf_counter()
        chosen = self.policies[req_id].decide(draft) or Draft()
        self.decide_seconds += time.perf_counter() - t0
        return chosen

    def finish_request(self, req_id: Hashable, cache: bool = True) -> None:
        self.inner.finish_request(req_id, cache)
        del self.policies[req_id]


# Interpreted verify forward over a decode step, minus one: SmolLM2-135M fp32, 2-core CPU, 2026-11-30 (make demo's
# prompt): decode steps 14.9-18.1 s, verify forwards of 3 and 5 rows 25.4 and 23.4 s (the flash attention over
# the cache and the draft rows costs more than the split-KV decode kernel; the GEMMs cost the same)
INTERPRETED_VERIFY_STEP_COST = 0.4


def default_costs(device: Any, interpreted: bool = False) -> dict[str, float]:
    """Verify cost over a decode step, in decode steps. CPU reference executor, SmolLM2-135M fp32 (CPU time, one
    thread, 2026-11-24): verifying d drafts costs ~1.55 + 0.05*d decode steps (a GEMM instead of a GEMV, plus the
    tree-masked attention). A batch-1 GPU decode is bound by weight reads, so extra rows are nearly free; so is
    the Triton interpreter's, whose time goes by weight elements loaded (a 16-row tile costs what one row does)."""
    if interpreted:
        return {"verify_step_cost": INTERPRETED_VERIFY_STEP_COST, "verify_token_cost": 0.02}
    if getattr(device, "type", str(device)) == "cuda":
        return {"verify_step_cost": 0.05, "verify_token_cost": 0.01}
    return {"verify_step_cost": 0.5, "verify_token_cost": 0.06}


def _truncate(draft: Draft, k: int) -> Draft:
    probs = draft.probs[:k]
    return replace(draft, tokens=draft.tokens[:k], parents=draft.parents[:k], probs=probs, score=sum(probs))


def _roots(draft: Draft) -> set[int]:
    return {t for t, p in zip(draft.tokens, draft.parents, strict=True) if p == -1}
