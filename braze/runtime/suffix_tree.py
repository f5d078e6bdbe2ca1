"""Model-free drafters for speculative decoding: SuffixDecoding (counting suffix automata) and prompt lookup.

SuffixDecoding drafts by finding the longest recent context that also occurred earlier (in this request's prompt +
output, or in previous responses) and proposing what followed it, weighted by how often.

Data structure: a generalized *suffix automaton* with occurrence counts, one per live request and one global. It
answers what ArcticInference's depth-bounded suffix tree answers -- how often each substring of length <=
``max_depth`` occurs and which tokens followed it -- with amortized O(1) structural work per appended token instead
of O(max_depth):

- A state is a class of substrings that end at the same positions, so they share their count (number of end
  positions) and their continuations; the suffixes of the text are the states of one suffix-link chain, and the
  strings of one state are a contiguous range of lengths.
- Counts. Appending a token adds one end position to every state of the new state's suffix-link chain. Only
  *short* states (holding a string of length <= max_depth) are ever read, so the walk starts at the first short
  one (jump pointers skip long states) and visits one state per distinct count among the text's suffixes of
  length <= max_depth: a handful on natural text, max_depth only on pathological runs (a trie updates max_depth
  nodes per token always).
- Each count is packed with the clock of its latest occurrence, ``key = count << 40 | clock``: the most frequent
  continuation of a context, the most recently seen one among equal counts, is one C-level ``max`` over the
  state's transitions (ArcticInference keeps children sorted by count and breaks ties toward recent updates).
- Drafting walks the context's suffix-link chain from the longest match down. All match lengths p inside one state
  share their continuations, so a path draft is expanded once per state, not once per p; an expansion stops as
  soon as it cannot beat the best draft so far, and once a single occurrence is left its continuation is a slice
  of that occurrence's sequence (found from the clock) instead of a walk.
- Removing a sequence (FIFO eviction of the global cache) decrements the counts along each of its positions'
  chains; states left at count 0 are dead and skipped, and the automaton is rebuilt from the live sequences once
  dead positions outnumber live ones (amortized O(1) per token).

Counts and drafts are exactly those of a depth-``max_depth`` counting suffix trie (a match of p tokens drafts at
most max_depth - p tokens, as in ArcticInference and braze's previous trie), except that ties between equally
frequent continuations go to the most recent one. ``SuffixDrafter`` counts deeper than it matches (``count_depth``,
twice ``max_depth`` by default), so its longest matches are not cut short by the depth bound.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Draft", "PromptLookupDrafter", "SuffixAutomaton", "SuffixDrafter"]

_SHIFT = 40
_ONE = 1 << _SHIFT  # key = count * _ONE + clock of the latest occurrence
_CLOCK = _ONE - 1


class _Seq:
    __slots__ = ("last", "live", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.last = 0  # the state whose longest string is the whole sequence
        self.live = True


Cursor = tuple[int, int]
"""A position in the automaton: (state, length) names the length-``length`` string of ``state``'s class."""


class SuffixAutomaton:
    """Counting generalized suffix automaton over a set of token sequences, read up to ``max_depth`` tokens deep.

    ``extend`` appends to a sequence (amortized O(1) structure plus a walk over distinct suffix counts);
    ``remove_sequence`` undoes a sequence's counts. ``touches`` counts count updates so tests can check costs
    without timing.
    """

    def __init__(self, max_depth: int = 64, max_match: int | None = None) -> None:
        if max_depth < 1:
            raise ValueError("max_depth must be >= 1")
        self.max_depth = max_depth  # substrings up to this length are counted: a match of p drafts <= max_depth - p
        self.max_match = max_depth if max_match is None else min(max_match, max_depth)  # longest context used
        self._seqs: dict[Hashable, _Seq] = {}
        self.version = 0  # bumped on every mutation; lets callers invalidate cached match states
        self.touches = 0
        self._reset()

    def _reset(self) -> None:
        # Parallel arrays, one entry per state; state 0 is the root (the empty string).
        self._len = [0]  # length of the state's longest string
        self._link = [-1]  # suffix link: the state of the longest suffix outside this class
        self._next: list[dict[int, int] | None] = [None]  # transitions token -> state
        self._key = [0]  # count * _ONE + clock of the latest end position (maintained for short states only)
        self._tok = [-1]  # the token every string of the state ends with
        self._jump: dict[int, int] = {}  # long state -> a state up its chain with only long states in between
        self._clock = 0  # end positions appended so far (live or not)
        # Runs of consecutive appends to one sequence, to find the sequence and index of a clock (a count-1
        # state's continuation is a slice of its sequence): first clock, sequence, index of that clock.
        self._runs: list[int] = []
        self._run_at: list[tuple[_Seq, int]] = []
        self._live = 0  # positions of live sequences (the root's count)
        self._dead = 0  # positions removed since the last rebuild

    # ----------------------------------------------------------------- sequences
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def sequence(self, seq_id: Hashable) -> list[int]:
        return list(self._seqs[seq_id].tokens)

    def add_sequence(self, seq_id: Hashable, tokens: Iterable[int]) -> None:
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} already present")
        self.extend(seq_id, tokens)

    def extend(self, seq_id: Hashable, tokens: Iterable[int]) -> None:
        """Append tokens to a sequence (created if new)."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = _Seq()
        self._extend(seq, [int(t) for t in tokens])
        self.version += 1

    def _clone(self, p: int, c: int, q: int) -> int:
        """Split q: its strings of length <= len(p) + 1 move to a new state, which p's chain now points to."""
        ln, nxt, link = self._len, self._next, self._link
        clone = len(ln)
        ln.append(ln[p] + 1)
        d = nxt[q]
        nxt.append(d.copy() if d else None)
        link.append(link[q])
        self._key.append(self._key[q])
        self._tok.append(c)
        link[q] = clone
        while p >= 0:
            d = nxt[p]
            if d.get(c) != q:
                break
            d[c] = clone
            p = link[p]
        return clone

    def _extend(self, seq: _Seq, tokens: list[int]) -> None:
        """The hot loop: append tokens to seq (online suffix-automaton construction plus the count walk)."""
        if not tokens:
            return
        ln, link, nxt, key, tok = self._len, self._link, self._next, self._key, self._tok
        depth = self.max_depth
        if not self._run_at or self._run_at[-1][0] is not seq:  # a new run of appends
            self._runs.append(self._clock + 1)
            self._run_at.append((seq, len(seq.tokens)))
        clock = self._clock
        last = seq.last
        touched = 0
        for c in tokens:
            d = nxt[last]
            q = d.get(c, -1) if d is not None else -1
            if q >= 0:  # the new prefix already occurs (in another sequence): its state, split off if needed
                cur = q if ln[q] == ln[last] + 1 else self._clone(last, c, q)
            else:
                cur = len(ln)
                ln.append(ln[last] + 1)
                link.append(0)
                nxt.append(None)
                key.append(0)
                tok.append(c)
                p = last
                while p >= 0:
                    d = nxt[p]
                    if d is None:
                        nxt[p] = {c: cur}
                    else:
                        q = d.get(c, -1)
                        if q >= 0:
                            break
                        d[c] = cur
                    p = link[p]
                if p >= 0:
                    if ln[p] + 1 == ln[q]:
                        link[cur] = q
                    else:  # split q (inline _clone: this is the common case while text is being copied)
                        clone = len(ln)
                        ln.append(ln[p] + 1)
                        d = nxt[q]
                        nxt.append(d.copy() if d else None)
                        link.append(link[q])
                        key.append(key[q])
                        tok.append(c)
                        link[q] = link[cur] = clone
                        while p >= 0:
                            d = nxt[p]
                            if d.get(c) != q:
                                break
                            d[c] = clone
                            p = link[p]
            # one more end position (clock) for every short state on cur's chain
            clock += 1
            inc = _ONE + clock
            y = cur
            if ln[link[y]] >= depth:  # cur is long: start from its link (no jump is recorded for cur itself)
                y = link[y]
                if ln[link[y]] >= depth:
                    y = self._short(y)
            while y > 0:
                k = key[y]
                key[y] = k - (k & _CLOCK) + inc
                y = link[y]
                touched += 1
            last = cur
        seq.tokens += tokens
        seq.last = last
        self._live += len(tokens)
        self._clock = clock
        self.touches += touched

    def _where(self, clock: int) -> tuple[_Seq, int]:
        """(sequence, index) of the end position appended at ``clock``."""
        i = bisect_right(self._runs, clock) - 1
        seq, first = self._run_at[i]
        return seq, first + clock - self._runs[i]

    def _short(self, x: int) -> int:
        """The first state on x's suffix-link chain (x included) holding a string of length <= max_depth."""
        ln, link, depth = self._len, self._link, self.max_depth
        if x == 0 or ln[link[x]] < depth:
            return x
        jump = self._jump
        path = []
        while ln[link[x]] >= depth:  # x is long (its shortest string is longer than max_depth); never the root
            path.append(x)
            x = jump.get(x) or link[x]  # a state only ever turns long, so a jump stays valid
        for z in path:
            jump[z] = x
        return x

    def _prefix_states(self, seq: _Seq) -> list[int]:
        """states[i]: the state holding tokens[: i + 1] (found by reading the sequence from the root)."""
        nxt = self._next
        out, x = [], 0
        for t in seq.tokens:
            x = nxt[x][t]
            out.append(x)
        return out

    def remove_sequence(self, seq_id: Hashable) -> None:
        """Take the sequence's end positions off every count; rebuild once dead positions outnumber live ones."""
        seq = self._seqs.pop(seq_id)
        seq.live = False
        key, link = self._key, self._link
        for x in self._prefix_states(seq):
            y = self._short(x)
            while y > 0:
                key[y] -= _ONE
                y = link[y]
                self.touches += 1
        self._live -= len(seq.tokens)
        self._dead += len(seq.tokens)
        if self._dead > self._live:
            self._rebuild()
        self.version += 1

    def _rebuild(self) -> None:
        """Fresh automaton over the live sequences (in their insertion order): drops dead states."""
        self._reset()
        for seq in self._seqs.values():
            toks = seq.tokens
            seq.tokens, seq.last = [], 0
            self._extend(seq, toks)

    # ------------------------------------------------------------------ queries
    def count(self, cursor: Cursor) -> int:
        """Occurrences of the cursor's string (the root: all positions)."""
        return self._live if cursor[0] == 0 else self._key[cursor[0]] >> _SHIFT

    @staticmethod
    def depth(cursor: Cursor) -> int:
        return cursor[1]

    def children(self, cursor: Cursor) -> list[tuple[int, int, Cursor]]:
        """(token, count, cursor) for every continuation of the cursor's string, most frequent (then most
        recent) first."""
        x, n = cursor
        d = self._next[x]
        if n >= self.max_depth or not d:
            return []
        key, tok = self._key, self._tok
        kids = sorted((s for s in d.values() if key[s] >= _ONE), key=key.__getitem__, reverse=True)
        return [(tok[s], key[s] >> _SHIFT, (s, n + 1)) for s in kids]

    def _advance(self, x: int, n: int, t: int) -> tuple[int, int]:
        """Longest live suffix (<= max_depth tokens) of (the string (x, n)) + t, as (state, length)."""
        ln, link, nxt, key = self._len, self._link, self._next, self._key
        while True:
            d = nxt[x]
            s = d.get(t, -1) if d is not None else -1
            if s >= 0:
                if n >= self.max_depth:
                    s = self._short(s)
                else:
                    n += 1
                if key[s] >= _ONE:
                    return s, n
            if x == 0:
                return 0, 0
            x = link[x]
            n = ln[x]

    def _locate(self, context: Sequence[int]) -> tuple[int, int]:
        x = n = 0
        for t in context[-self.max_depth :]:
            x, n = self._advance(x, n, int(t))
        return x, n

    def _chain(self, x: int, n: int) -> list[Cursor]:
        """Cursors for lengths 1..n (n <= max_depth) of the chain holding (x, n)."""
        out: list[Cursor] = []
        ln, link = self._len, self._link
        x = self._short(x) if x else 0
        while n > 0:
            while ln[link[x]] >= n:
                x = link[x]
            out.append((x, n))
            n -= 1
        return out[::-1]

    def match(self, context: Sequence[int]) -> list[Cursor]:
        """Cursors for the last p context tokens, p = 1 .. the longest match (<= max_depth)."""
        return self._chain(*self._locate(context))

    def tail_chain(self, seq_id: Hashable) -> list[Cursor]:
        """Match chain of a stored sequence's own end."""
        seq = self._seqs[seq_id]
        return self._chain(seq.last, min(len(seq.tokens), self.max_depth))

    # ------------------------------------------------------------------ drafting
    def _path(self, x: int, limit: int, min_prob: float, beat: float = 0.0, unseen: int = 0
              ) -> tuple[list[int], list[float]]:
        """Greedy path from state x: follow the most frequent (then most recent) continuation while the path
        probability (product of count ratios) stays >= min_prob. Stops early, with a path scoring <= ``beat``,
        once the path cannot score above ``beat`` (probabilities never grow along a path)."""
        nxt, key, tok = self._next, self._key, self._tok
        toks: list[int] = []
        probs: list[float] = []
        base = (key[x] >> _SHIFT) + unseen
        prob = 1.0
        score = 0.0
        if min_prob > prob or limit <= beat:
            return toks, probs
        m = 0
        while m < limit:
            if base == 1:  # one occurrence left: the rest of the path is a slice of its sequence (probability kept)
                seq, i = self._where(key[x] & _CLOCK)
                if seq.live:  # (after a removal the clock may name a removed occurrence: walk instead)
                    rest = seq.tokens[i + 1 : i + 1 + limit - m]
                    toks += rest
                    probs += [prob] * len(rest)
                    break
            d = nxt[x]
            if d is None:
                break
            if len(d) == 1:
                (s,) = d.values()
            else:
                s = max(d.values(), key=key.__getitem__)
            c = key[s] >> _SHIFT
            if c == 0:
                break
            if c != base:
                prob *= c / base
                if prob < min_prob or score + prob * (limit - m) < beat - 1e-9:
                    break  # (a margin for rounding: a draft that might tie or win is expanded and compared)
            toks.append(tok[s])
            probs.append(prob)
            score += prob
            m += 1
            x, base = s, c
        return toks, probs

    def _tree(self, x: int, limit: int, min_prob: float, max_levels: int, unseen: int = 0) -> Draft:
        """Best-first draft tree from state x: the most probable frontier node next, at most max_levels deep."""
        nxt, key, tok = self._next, self._key, self._tok
        d = Draft()
        heap: list[tuple[float, int, int, int, int]] = []
        tick = 0

        def push(s0: int, prob: float, parent: int, level: int) -> None:
            nonlocal tick
            kids = nxt[s0]
            if not kids or level >= max_levels:
                return
            base = (key[s0] >> _SHIFT) + (unseen if level == 0 else 0)
            for s in sorted(kids.values(), key=key.__getitem__, reverse=True):
                c = key[s] >> _SHIFT
                q = prob * c / base
                if c == 0 or q < min_prob:
                    break  # sorted by count: the rest are rarer still
                heapq.heappush(heap, (-q, tick, s, parent, level + 1))
                tick += 1

        push(x, 1.0, -1, 0)
        while heap and len(d.tokens) < limit:
            negq, _, s, parent, level = heapq.heappop(heap)
            d.parents.append(parent)
            d.tokens.append(tok[s])
            d.probs.append(-negq)
            push(s, -negq, len(d.tokens) - 1, level)
        d.score = sum(d.probs)
        return d

    def draft_from(self, x: int, n: int, max_spec_tokens: int, max_spec_factor: float, max_spec_offset: float,
                   min_token_prob: float, tree: bool, beat: float, unseen: int = 0) -> Draft | None:
        """Best draft over the match lengths p <= min(n, max_match) of the chain holding (x, n), if its score beats
        ``beat``.

        Match length p drafts at most min(max_spec_tokens, int(p * max_spec_factor + max_spec_offset)) tokens and
        reaches at most max_depth - p tokens deep; longest match first, ties go to the longer match. ``unseen``
        occurrences of the context are added to its count: occurrences held elsewhere whose continuation is not
        known yet (the drafting request's own, for the global automaton).
        """
        depth = self.max_depth
        ln, link = self._len, self._link
        top = min(n, self.max_match)
        if top <= 0 or x == 0:
            return None
        x = self._short(x)
        while ln[link[x]] >= top:  # the state holding the length-top suffix
            x = link[x]
        best = None
        most, factor, offset = max_spec_tokens, max_spec_factor, max_spec_offset
        while x > 0 and top > 0:
            lo = ln[link[x]] + 1
            cap = min(most, int(top * factor + offset))
            if cap <= beat:
                break  # the cap only shrinks with p: nothing shorter can beat the best
            if tree:
                last = None
                for p in range(top, lo - 1, -1):
                    u = min(most, int(p * factor + offset))
                    if u <= beat:
                        return best
                    if depth - p <= 0 or (last is not None and u <= last[0] and last[0] <= depth - last[1]):
                        continue  # an empty draft, or a prefix of the last tree of this state
                    d = self._tree(x, u, min_token_prob, depth - p, unseen)
                    last = (u, p)
                    if d.score > beat:
                        d.match_len = p
                        best, beat = d, d.score
            else:
                # The longest draft any p of this state allows: p drafts L(p) = min(cap(p), depth - p) tokens.
                if depth - top >= cap:
                    lb = cap
                elif lo <= depth - most and int((depth - most) * factor + offset) >= most:
                    lb = most  # p = depth - most reaches the full max_spec_tokens
                else:  # L(p) = min(nondecreasing, decreasing): scan p down to the crossing (< max_spec_tokens steps)
                    lb = 0
                    for p in range(top, lo - 1, -1):
                        u = min(most, int(p * factor + offset))
                        lb = max(lb, min(u, depth - p))
                        if depth - p >= u:
                            break
                if lb > beat:
                    toks, probs = self._path(x, lb, min_token_prob, beat, unseen)
                    m = len(toks)
                    if m:
                        score = sum(probs)
                        if score > beat:
                            # the longest match of this state that drafts all m tokens: L(p) >= m
                            best = Draft(toks, list(range(-1, m - 1)), probs, score, min(top, depth - m))
                            beat = score
            top = lo - 1
            x = link[x]
        return best

    # --------------------------------------------------------- introspection
    def counts(self) -> dict[tuple[int, ...], int]:
        """{substring: count} for every live substring of length <= max_depth (for tests and debugging)."""
        out: dict[tuple[int, ...], int] = {}
        stack: list[tuple[Cursor, tuple[int, ...]]] = [((0, 0), ())]
        while stack:
            cur, path = stack.pop()
            for tok, cnt, nxt in self.children(cur):
                out[path + (tok,)] = cnt
                stack.append((nxt, path + (tok,)))
        return out

    def node_count(self) -> int:
        """States, dead ones included (<= 2 per position since the last rebuild)."""
        return len(self._len)

    def check(self) -> None:
        """Assert structural invariants: links shorten, transitions lengthen, short states' counts equal their
        live end positions (recounted from every sequence's prefix states)."""
        ln, link, nxt = self._len, self._link, self._next
        for x in range(1, len(ln)):
            assert 0 <= link[x] < len(ln) and ln[link[x]] < ln[x]
            for t, s in (nxt[x] or {}).items():
                assert ln[s] >= ln[x] + 1 and self._tok[s] == t
        expect = [0] * len(ln)
        for seq in self._seqs.values():
            for i, x in enumerate(self._prefix_states(seq)):
                assert ln[x] == i + 1 and self._tok[x] == seq.tokens[i]
                y = self._short(x)
                while y > 0:
                    expect[y] += 1
                    y = link[y]
        for x in range(1, len(ln)):
            if ln[link[x]] < self.max_depth:
                assert self._key[x] >> _SHIFT == expect[x], (x, self._key[x] >> _SHIFT, expect[x])
        assert self._live == sum(len(s.tokens) for s in self._seqs.values())


# ============================================================================ drafting


@dataclass
class Draft:
    """Draft tokens as a tree: ``parents[i]`` is the index of node i's parent, -1 for the last context token.

    A path draft has parents [-1, 0, 1, ...]. ``probs[i]`` is the estimated probability that node i is
    accepted (product of count ratios along its path) and ``score`` their sum, the expected accepted length.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    score: float = 0.0
    match_len: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_path(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))


class _Request:
    __slots__ = ("auto", "gstate", "gversion", "prompt_len", "seq")

    def __init__(self, auto: SuffixAutomaton, seq: _Seq) -> None:
        self.auto = auto
        self.seq = seq
        self.prompt_len = len(seq.tokens)
        self.gstate = (0, 0)  # longest suffix of the context in the global automaton, as (state, length)
        self.gversion = -1


class SuffixDrafter:
    """SuffixDecoding: a global automaton over previous responses (bounded, FIFO) plus one per live request.

    Contexts match at most ``max_depth`` tokens; substrings of up to ``count_depth`` tokens are counted (default
    ``2 * max_depth``), so a match of p tokens drafts at most ``count_depth - p`` tokens. ``count_depth=max_depth``
    is ArcticInference's depth-bounded tree (a 64-token match drafts nothing, a 48-token one at most 16); the
    default lets the longest, most specific matches draft in full, which the automaton gets for free.

    Per request we keep its prompt + generated tokens as one sequence; the context's match in the global
    automaton is advanced on ``observe`` and recomputed (O(max_depth)) only after the global automaton changed.
    """

    def __init__(self, max_depth: int = 64, max_cached_sequences: int = 10_000, count_depth: int | None = None
                 ) -> None:
        self.max_depth = max_depth
        self.count_depth = 2 * max_depth if count_depth is None else max(count_depth, max_depth)
        self.max_cached_sequences = max_cached_sequences
        self.global_trie = self._automaton()
        self._fifo: deque[int] = deque()
        self._next_gid = 0
        self._reqs: dict[Hashable, _Request] = {}

    def _automaton(self) -> SuffixAutomaton:
        return SuffixAutomaton(self.count_depth, max_match=self.max_depth)

    def start_request(self, req_id: Hashable, prompt_ids: Iterable[int]) -> None:
        if req_id in self._reqs:
            raise KeyError(f"request {req_id!r} already started")
        auto = self._automaton()
        auto.extend(0, prompt_ids)
        self._reqs[req_id] = _Request(auto, auto._seqs[0])

    def observe(self, req_id: Hashable, new_tokens: Iterable[int]) -> None:
        """Record generated tokens (accepted drafts and bonus tokens)."""
        req = self._reqs[req_id]
        auto, seq = req.auto, req.seq
        toks = [int(t) for t in new_tokens]
        auto._extend(seq, toks)
        auto.version += 1
        g = self.global_trie
        if req.gversion == g.version and g._live:
            x, n = req.gstate
            for t in toks:
                x, n = g._advance(x, n, t)
            req.gstate = (x, n)

    def context(self, req_id: Hashable) -> list[int]:
        return list(self._reqs[req_id].seq.tokens)

    def finish_request(self, req_id: Hashable, cache: bool = True) -> None:
        """Drop the request; its response (not the prompt) joins the global automaton, evicting the oldest."""
        req = self._reqs.pop(req_id)
        response = req.seq.tokens[req.prompt_len :]
        if not cache or not response or self.max_cached_sequences <= 0:
            return
        gid = self._next_gid
        self._next_gid += 1
        self.global_trie.add_sequence(gid, response)
        self._fifo.append(gid)
        while len(self._fifo) > self.max_cached_sequences:
            self.global_trie.remove_sequence(self._fifo.popleft())

    def draft(
        self,
        req_id: Hashable,
        max_spec_tokens: int = 16,
        max_spec_factor: float = 1.0,
        min_token_prob: float = 0.1,
        tree: bool = False,
        max_spec_offset: float = 0.0,
    ) -> Draft:
        """Best draft over match lengths p and both automata; p draws at most min(max_spec_tokens, p*factor)
        tokens. Ties go to the longer match, then to the request's own automaton."""
        req = self._reqs[req_id]
        seq = req.seq
        opts = (max_spec_tokens, max_spec_factor, max_spec_offset, min_token_prob, tree)
        best = req.auto.draft_from(seq.last, len(seq.tokens), *opts, 0.0)
        if best is not None:
            best.source = "request"
        g = self.global_trie
        if g._live:
            if req.gversion != g.version:
                req.gstate = g._locate(seq.tokens[-self.max_depth :])
                req.gversion = g.version
            # The global automaton does not hold this request, so its counts miss the context's own occurrence (whose
            # continuation is unseen). Where the request's own history matches a longer context than the cache does,
            # count that occurrence: a short match in one cached response is weak evidence against a long one here.
            # (ArcticInference gets the same effect by inserting live responses into its global tree.)
            own = min(req.auto._len[req.auto._link[seq.last]], self.max_depth)  # longest repeated suffix here
            other = g.draft_from(*req.gstate, *opts, best.score if best is not None else 0.0,
                                 unseen=int(req.gstate[1] < own))
            if other is not None:
                other.source = "global"
                best = other
        return best if best is not None else Draft()


# ============================================================================ baseline


class PromptLookupDrafter:
    """Prompt-lookup baseline: find the last n tokens earlier in prompt + output (n = max_ngram .. min_ngram)
    and propose what followed. Uses the earliest occurrence (longest available continuation); an n-gram
    index updated per token makes the lookup O(max_ngram) instead of a rescan of the context."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._reqs: dict[Hashable, tuple[list[int], dict[int, dict[tuple[int, ...], int]]]] = {}

    def start_request(self, req_id: Hashable, prompt_ids: Iterable[int]) -> None:
        if req_id in self._reqs:
            raise KeyError(f"request {req_id!r} already started")
        self._reqs[req_id] = ([], {n: {} for n in range(self.min_ngram, self.max_ngram + 1)})
        self.observe(req_id, prompt_ids)

    def observe(self, req_id: Hashable, new_tokens: Iterable[int]) -> None:
        toks, index = self._reqs[req_id]
        for t in new_tokens:
            toks.append(int(t))
            size = len(toks)
            for n, first in index.items():
                if size >= n:
                    first.setdefault(tuple(toks[size - n :]), size - n)

    def finish_request(self, req_id: Hashable, cache: bool = True) -> None:
        del self._reqs[req_id]

    def draft(self, req_id: Hashable, max_spec_tokens: int = 16) -> Draft:
        toks, index = self._reqs[req_id]
        size = len(toks)
        for n in range(min(self.max_ngram, size), self.min_ngram - 1, -1):
            pos = index[n].get(tuple(toks[size - n :]))
            if pos is not None and pos + n < size:  # an earlier occurrence than the trailing one
                cont = toks[pos + n : pos + n + max_spec_tokens]
                k = len(cont)
                return Draft(cont, list(range(-1, k - 1)), [1.0] * k, float(k), n, "ngram")
        return Draft()
