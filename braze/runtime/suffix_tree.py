"""Model-free drafters for speculative decoding: SuffixDecoding (suffix tries) and prompt lookup.

SuffixDecoding drafts by finding the longest recent context that also occurred earlier (in this request's
prompt + output, or in previous responses) and proposing what followed it, weighted by how often.

Data structure: a *bounded-depth counting suffix trie* rather than a full (Ukkonen) suffix tree. Drafting
only ever needs a match of at most ``max_depth`` context tokens followed by a draft, so storing every
substring of length <= max_depth suffices (match length plus draft length is capped by max_depth, e.g. 64).
Unlike a Ukkonen tree, the trie supports exact deletion (decrement along each suffix, prune zero-count
nodes), which FIFO eviction of whole sequences needs, and appending one token touches <= max_depth nodes.

Each node counts the number of suffixes (occurrences) passing through it. A plain depth-D trie has O(L * D)
nodes, so path segments that a single occurrence owns are kept implicit ("lazy tails": a pointer to the
occurrence hanging off its last shared node, read from the sequence's token list) and are materialised one
node at a time only when a second occurrence arrives. On natural text this keeps memory near O(L) nodes.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Draft", "PromptLookupDrafter", "SuffixDrafter", "SuffixTrie"]


class _Node:
    __slots__ = ("children", "count", "depth", "tail")

    def __init__(self, depth: int) -> None:
        self.children: dict[int, _Node] | None = None
        self.count = 0
        self.depth = depth
        # At most one occurrence may continue implicitly below this node; its next token is never a key of
        # ``children`` (otherwise that occurrence would be counted in the explicit child instead).
        self.tail: _Occ | None = None


class _Occ:
    """One suffix (start position) of a sequence. ``node`` is where its explicit path ends; if ``lazy``
    it owns ``node.tail`` and continues implicitly with ``seq.tokens[start + node.depth : start + D]``."""

    __slots__ = ("lazy", "node", "seq", "start")

    def __init__(self, seq: _Seq, start: int, node: _Node) -> None:
        self.seq = seq
        self.start = start
        self.node = node
        self.lazy = False


class _Seq:
    __slots__ = ("tokens", "window")

    def __init__(self, max_depth: int) -> None:
        self.tokens: list[int] = []
        # Occurrences whose path is still shorter than or equal to max_depth: the last max_depth starts.
        # window[-p] is the suffix of length p, so this is also the match chain for the sequence's own end.
        self.window: deque[_Occ] = deque(maxlen=max_depth)


Cursor = tuple[_Node, int]
"""A position in the trie: an explicit node plus how many implicit tail tokens below it were consumed."""


class SuffixTrie:
    """Counting trie of all substrings of length <= ``max_depth`` of a set of token sequences.

    ``extend`` is incremental: appending a token costs O(max_depth) (each of the last max_depth suffixes
    grows by one node or, when lazy, by nothing). ``remove_sequence`` costs O(len * max_depth) and prunes
    nodes whose count reaches zero. ``touches`` counts node visits/creations so tests can check costs
    without timing.
    """

    def __init__(self, max_depth: int = 64) -> None:
        if max_depth < 1:
            raise ValueError("max_depth must be >= 1")
        self.max_depth = max_depth
        self.root = _Node(0)
        self._seqs: dict[Hashable, _Seq] = {}
        self.version = 0  # bumped on every mutation; lets callers invalidate cached cursors
        self.touches = 0

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
        """Append tokens to a sequence (created if new), updating every suffix that ends at its end."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = _Seq(self.max_depth)
        for t in tokens:
            self._append(seq, int(t))
        self.version += 1

    def _append(self, seq: _Seq, t: int) -> None:
        seq.tokens.append(t)
        n = len(seq.tokens) - 1  # position of t; occurrence o had path length n - o.start before it
        for occ in seq.window:
            plen = n - occ.start
            if plen >= self.max_depth:
                continue  # complete; falls out of the window below
            node = occ.node
            if occ.lazy:
                if node.depth < plen:
                    continue  # grows implicitly (t is read from seq.tokens)
                # t is the first token below node: if another occurrence already made it explicit, join it.
                child = node.children.get(t) if node.children else None
                if child is not None:
                    self.touches += 1
                    node.tail = None
                    occ.lazy = False
                    child.count += 1
                    occ.node = child
                continue
            self._step(occ, t)
        occ = _Occ(seq, n, self.root)
        self.root.count += 1
        self._step(occ, t)
        seq.window.append(occ)

    def _step(self, occ: _Occ, t: int) -> None:
        """Extend an explicitly-ending occurrence by token t."""
        self.touches += 1
        node = occ.node
        children = node.children
        child = children.get(t) if children else None
        if child is None:
            child = _Node(node.depth + 1)
            if children is None:
                children = node.children = {}
            children[t] = child
            tail = node.tail
            if tail is not None and self._tail_next(tail, node.depth) == t:
                # Materialise one node of the other occurrence's lazy tail; both now pass through child.
                node.tail = None
                child.tail = tail
                tail.node = child
                child.count = 1
            elif child.depth < self.max_depth:
                child.tail = occ
                occ.lazy = True
        child.count += 1
        occ.node = child

    def _tail_next(self, occ: _Occ, offset: int) -> int | None:
        """Token at path depth ``offset`` along a lazy occurrence; None past its end or the depth bound."""
        if offset >= self.max_depth:
            return None
        idx = occ.start + offset
        toks = occ.seq.tokens
        return toks[idx] if idx < len(toks) else None

    def remove_sequence(self, seq_id: Hashable) -> None:
        """Decrement counts along every suffix of the sequence and prune nodes that reach zero."""
        seq = self._seqs.pop(seq_id)
        toks = seq.tokens
        size = len(toks)
        root = self.root
        for j in range(size):
            node = root
            root.count -= 1
            for pos in range(j, min(j + self.max_depth, size)):
                self.touches += 1
                tok = toks[pos]
                child = node.children.get(tok) if node.children else None
                if child is None:  # rest of this suffix is our own lazy tail
                    assert node.tail is not None and node.tail.seq is seq and node.tail.start == j
                    node.tail = None
                    break
                child.count -= 1
                if child.count == 0:  # nothing else passes through: drop the whole subtree
                    del node.children[tok]
                    if not node.children:
                        node.children = None
                    break
                node = child
            else:
                tail = node.tail
                if tail is not None and tail.seq is seq and tail.start == j:
                    node.tail = None
        self.version += 1

    # ------------------------------------------------------------------ queries
    @staticmethod
    def count(cursor: Cursor) -> int:
        node, k = cursor
        return node.count if k == 0 else 1

    def depth(self, cursor: Cursor) -> int:
        return cursor[0].depth + cursor[1]

    def children(self, cursor: Cursor) -> list[tuple[int, int, Cursor]]:
        """(token, count, cursor) for every continuation of the cursor's substring."""
        node, k = cursor
        out: list[tuple[int, int, Cursor]] = []
        if k == 0 and node.children:
            out = [(tok, ch.count, (ch, 0)) for tok, ch in node.children.items()]
        if node.tail is not None:
            nxt = self._tail_next(node.tail, node.depth + k)
            if nxt is not None:
                out.append((nxt, 1, (node, k + 1)))
        return out

    def advance(self, cursor: Cursor, t: int) -> Cursor | None:
        node, k = cursor
        if k == 0 and node.children:
            child = node.children.get(t)
            if child is not None:
                return (child, 0)
        if node.tail is not None and self._tail_next(node.tail, node.depth + k) == t:
            return (node, k + 1)
        return None

    def advance_chain(self, chain: list[Cursor], t: int) -> list[Cursor]:
        """Match chain after appending t to the context: chain[p-1] matches the last p tokens.

        A substring's suffixes are substrings too, so the chain is contiguous and the first miss ends it.
        """
        nxt = self.advance((self.root, 0), t)
        if nxt is None:
            return []
        out = [nxt]
        for cur in chain:
            if self.depth(cur) >= self.max_depth:
                break
            nxt = self.advance(cur, t)
            if nxt is None:
                break
            out.append(nxt)
        return out

    def match(self, context: Sequence[int]) -> list[Cursor]:
        """Cursors for the last p context tokens, p = 1 .. longest match (<= max_depth). O(max_depth^2)."""
        chain: list[Cursor] = []
        for t in context[-self.max_depth :]:
            chain = self.advance_chain(chain, int(t))
        return chain

    def tail_chain(self, seq_id: Hashable) -> list[Cursor]:
        """Match chain of a stored sequence's own end, read off its window in O(max_depth)."""
        seq = self._seqs[seq_id]
        n = len(seq.tokens)
        chain = []
        for occ in reversed(seq.window):
            node = occ.node
            chain.append((node, n - occ.start - node.depth if occ.lazy else 0))
        return chain

    # --------------------------------------------------------- introspection
    def counts(self) -> dict[tuple[int, ...], int]:
        """Materialised {substring: count} view including lazy tails (for tests and debugging)."""
        out: dict[tuple[int, ...], int] = {}
        stack: list[tuple[_Node, tuple[int, ...]]] = [(self.root, ())]
        while stack:
            node, path = stack.pop()
            if path:
                out[path] = out.get(path, 0) + node.count
            if node.tail is not None:
                ext = path
                off = node.depth
                while (tok := self._tail_next(node.tail, off)) is not None:
                    ext = ext + (tok,)
                    out[ext] = out.get(ext, 0) + 1
                    off += 1
            for tok, ch in (node.children or {}).items():
                stack.append((ch, path + (tok,)))
        return out

    def node_count(self) -> int:
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            total += 1
            stack.extend((node.children or {}).values())
        return total

    def check(self) -> None:
        """Assert structural invariants (counts positive and non-increasing, lazy tails not shadowed)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            below = 0
            for ch in (node.children or {}).values():
                assert ch.count >= 1 and ch.depth == node.depth + 1 <= self.max_depth
                below += ch.count
                stack.append(ch)
            if node.tail is not None:
                assert node.tail.node is node and node.tail.lazy
                nxt = self._tail_next(node.tail, node.depth)
                assert nxt is None or not node.children or nxt not in node.children
                below += nxt is not None
            assert below <= node.count


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


def _expand(trie: SuffixTrie, start: Cursor, limit: int, min_prob: float, tree: bool) -> Draft:
    d = Draft()
    if not tree:  # greedy: follow the most frequent continuation while the path stays likely enough
        cur, prob = start, 1.0
        while len(d.tokens) < limit:
            best = None
            for cand in trie.children(cur):
                if best is None or cand[1] > best[1]:
                    best = cand
            if best is None:
                break
            prob *= best[1] / trie.count(cur)
            if prob < min_prob:
                break
            d.parents.append(len(d.tokens) - 1)
            d.tokens.append(best[0])
            d.probs.append(prob)
            cur = best[2]
    else:  # best-first: always add the most probable frontier node next
        heap: list[tuple[float, int, int, Cursor, int]] = []
        tick = 0

        def push(cur: Cursor, prob: float, parent: int) -> None:
            nonlocal tick
            base = trie.count(cur)
            for tok, cnt, nxt in trie.children(cur):
                q = prob * cnt / base
                if q >= min_prob:
                    heapq.heappush(heap, (-q, tick, tok, nxt, parent))
                    tick += 1

        push(start, 1.0, -1)
        while heap and len(d.tokens) < limit:
            negq, _, tok, nxt, parent = heapq.heappop(heap)
            d.parents.append(parent)
            d.tokens.append(tok)
            d.probs.append(-negq)
            push(nxt, -negq, len(d.tokens) - 1)
    d.score = sum(d.probs)
    return d


class _Request:
    __slots__ = ("gchain", "gversion", "prompt_len", "trie")

    def __init__(self, trie: SuffixTrie, prompt_len: int) -> None:
        self.trie = trie
        self.prompt_len = prompt_len
        self.gchain: list[Cursor] = []
        self.gversion = -1


class SuffixDrafter:
    """SuffixDecoding: a global trie over previous responses (bounded, FIFO) plus one trie per live request.

    Per request we keep its prompt + generated tokens as one sequence; the global match chain is advanced
    incrementally on ``observe`` and recomputed (O(max_depth^2)) only after the global trie changed.
    """

    def __init__(self, max_depth: int = 64, max_cached_sequences: int = 10_000) -> None:
        self.max_depth = max_depth
        self.max_cached_sequences = max_cached_sequences
        self.global_trie = SuffixTrie(max_depth)
        self._fifo: deque[int] = deque()
        self._next_gid = 0
        self._reqs: dict[Hashable, _Request] = {}

    def start_request(self, req_id: Hashable, prompt_ids: Iterable[int]) -> None:
        if req_id in self._reqs:
            raise KeyError(f"request {req_id!r} already started")
        trie = SuffixTrie(self.max_depth)
        trie.extend(0, prompt_ids)
        self._reqs[req_id] = _Request(trie, len(trie._seqs[0].tokens))

    def observe(self, req_id: Hashable, new_tokens: Iterable[int]) -> None:
        """Record generated tokens (accepted drafts and bonus tokens)."""
        req = self._reqs[req_id]
        toks = [int(t) for t in new_tokens]
        req.trie.extend(0, toks)
        if req.gversion == self.global_trie.version:
            for t in toks:
                req.gchain = self.global_trie.advance_chain(req.gchain, t)

    def context(self, req_id: Hashable) -> list[int]:
        return self._reqs[req_id].trie.sequence(0)

    def finish_request(self, req_id: Hashable, cache: bool = True) -> None:
        """Drop the request; its response (not the prompt) joins the global trie, evicting the oldest."""
        req = self._reqs.pop(req_id)
        response = req.trie._seqs[0].tokens[req.prompt_len :]
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
        """Best draft over match lengths p and both tries; p draws at most min(max_spec_tokens, p*factor)."""
        req = self._reqs[req_id]
        g = self.global_trie
        if req.gversion != g.version:
            req.gchain = g.match(req.trie._seqs[0].tokens[-self.max_depth :])
            req.gversion = g.version
        best = Draft()
        for source, trie, chain in (("request", req.trie, req.trie.tail_chain(0)), ("global", g, req.gchain)):
            # Longest match first: ties go to the more specific context (and to the request trie).
            for p in range(len(chain), 0, -1):
                limit = min(max_spec_tokens, int(p * max_spec_factor + max_spec_offset))
                if limit <= 0 or best.score >= limit:
                    break  # scores are <= limit, and limit only shrinks with p
                d = _expand(trie, chain[p - 1], limit, min_token_prob, tree)
                if d.score > best.score:
                    d.match_len, d.source = p, source
                    best = d
        return best


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
