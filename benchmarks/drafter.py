"""SuffixDecoding drafter cost and quality on replayed traces: old vs new braze drafter (and ArcticInference's C++
suffix tree when ``arctic_inference`` is importable), side by side in one run.

Traces are built here from seeded generators, as byte tokens (0..255): edits of a source file, edits of a JSON
document, and a chat whose answers re-quote earlier turns; each trace is a session of several requests, so the
global cache of previous responses takes part. Replay is the SuffixDecoding reference harness: draft, accept the
longest draft prefix equal to the known response plus one bonus token, append the emitted tokens, repeat; each
request starts with its prompt and ends in the global cache. Per step we time the draft and the append (observe)
on the host, best of ``--repeats`` round-robin runs, and report tokens per step (accepted + bonus).

Drafters: ``old`` is braze's previous drafter (a depth-bounded counting suffix trie with lazy tails, kept verbatim
below as the reference oracle for benchmarks and tests; braze ships only the suffix automaton); ``new`` is
braze/runtime/suffix_tree.py as shipped (matches up to 64 tokens, counts up to 128 so long matches draft in full);
``new64`` is the same with count_depth=64, ArcticInference's depth semantics (match + draft <= 64); ``arctic`` is
ArcticInference's SuffixDecodingCache (C++), present only when ``arctic_inference`` imports.

    .venv/bin/python benchmarks/drafter.py [--repeats 3] [--quick] [--note TEXT]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from braze.runtime.suffix_tree import Draft, SuffixDrafter

# ============================================================================ the old drafter (reference oracle)


class _OldNode:
    __slots__ = ("children", "count", "depth", "tail")

    def __init__(self, depth: int) -> None:
        self.children: dict[int, _OldNode] | None = None
        self.count = 0
        self.depth = depth
        # At most one occurrence may continue implicitly below this node; its next token is never a key of
        # ``children`` (otherwise that occurrence would be counted in the explicit child instead).
        self.tail: _OldOcc | None = None


class _OldOcc:
    """One suffix (start position) of a sequence. ``node`` is where its explicit path ends; if ``lazy``
    it owns ``node.tail`` and continues implicitly with ``seq.tokens[start + node.depth : start + D]``."""

    __slots__ = ("lazy", "node", "seq", "start")

    def __init__(self, seq: _OldSeq, start: int, node: _OldNode) -> None:
        self.seq = seq
        self.start = start
        self.node = node
        self.lazy = False


class _OldSeq:
    __slots__ = ("tokens", "window")

    def __init__(self, max_depth: int) -> None:
        self.tokens: list[int] = []
        # Occurrences whose path is still shorter than or equal to max_depth: the last max_depth starts.
        # window[-p] is the suffix of length p, so this is also the match chain for the sequence's own end.
        self.window: deque[_OldOcc] = deque(maxlen=max_depth)


Cursor = tuple[_OldNode, int]
"""A position in the trie: an explicit node plus how many implicit tail tokens below it were consumed."""


class OldSuffixTrie:
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
        self.root = _OldNode(0)
        self._seqs: dict[Hashable, _OldSeq] = {}
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
            seq = self._seqs[seq_id] = _OldSeq(self.max_depth)
        for t in tokens:
            self._append(seq, int(t))
        self.version += 1

    def _append(self, seq: _OldSeq, t: int) -> None:
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
        occ = _OldOcc(seq, n, self.root)
        self.root.count += 1
        self._step(occ, t)
        seq.window.append(occ)

    def _step(self, occ: _OldOcc, t: int) -> None:
        """Extend an explicitly-ending occurrence by token t."""
        self.touches += 1
        node = occ.node
        children = node.children
        child = children.get(t) if children else None
        if child is None:
            child = _OldNode(node.depth + 1)
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

    def _tail_next(self, occ: _OldOcc, offset: int) -> int | None:
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
        stack: list[tuple[_OldNode, tuple[int, ...]]] = [(self.root, ())]
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


def _old_expand(trie: OldSuffixTrie, start: Cursor, limit: int, min_prob: float, tree: bool) -> Draft:
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


class _OldRequest:
    __slots__ = ("gchain", "gversion", "prompt_len", "trie")

    def __init__(self, trie: OldSuffixTrie, prompt_len: int) -> None:
        self.trie = trie
        self.prompt_len = prompt_len
        self.gchain: list[Cursor] = []
        self.gversion = -1


class OldSuffixDrafter:
    """SuffixDecoding: a global trie over previous responses (bounded, FIFO) plus one trie per live request.

    Per request we keep its prompt + generated tokens as one sequence; the global match chain is advanced
    incrementally on ``observe`` and recomputed (O(max_depth^2)) only after the global trie changed.
    """

    def __init__(self, max_depth: int = 64, max_cached_sequences: int = 10_000) -> None:
        self.max_depth = max_depth
        self.max_cached_sequences = max_cached_sequences
        self.global_trie = OldSuffixTrie(max_depth)
        self._fifo: deque[int] = deque()
        self._next_gid = 0
        self._reqs: dict[Hashable, _OldRequest] = {}

    def start_request(self, req_id: Hashable, prompt_ids: Iterable[int]) -> None:
        if req_id in self._reqs:
            raise KeyError(f"request {req_id!r} already started")
        trie = OldSuffixTrie(self.max_depth)
        trie.extend(0, prompt_ids)
        self._reqs[req_id] = _OldRequest(trie, len(trie._seqs[0].tokens))

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
                d = _old_expand(trie, chain[p - 1], limit, min_token_prob, tree)
                if d.score > best.score:
                    d.match_len, d.source = p, source
                    best = d
        return best




# ============================================================================ ArcticInference adapter


def arctic_factory() -> tuple[Callable[[], Any] | None, str]:
    """(factory of ArcticInference-backed drafters, or None; a line saying which)."""
    try:
        from arctic_inference.suffix_decoding import SuffixDecodingCache
    except Exception as e:  # noqa: BLE001 - any import failure means: no Arctic column
        return None, (f"ArcticInference: not importable ({type(e).__name__}: {e}); no Arctic column. PyPI ships it "
                      "only as an sdist that builds CUDA/vLLM extensions; its suffix tree alone builds from "
                      "csrc/suffix_decoding with cmake + nanobind.")

    class ArcticDrafter:
        """SuffixDecodingCache behind the braze drafter interface (context kept here, as its harness does)."""

        def __init__(self, max_depth: int = 64, max_cached_sequences: int = 10_000) -> None:
            self.cache = SuffixDecodingCache(max_tree_depth=max_depth, max_cached_requests=max_cached_sequences)
            self.ctx: dict[Hashable, list[int]] = {}

        def start_request(self, req_id: Hashable, prompt: Iterable[int]) -> None:
            self.ctx[req_id] = list(prompt)
            self.cache.start_request(req_id, self.ctx[req_id])

        def draft(self, req_id: Hashable, max_spec_tokens: int = 16, max_spec_factor: float = 1.0,
                  min_token_prob: float = 0.1, tree: bool = False) -> Draft:
            d = self.cache.speculate(req_id, self.ctx[req_id], max_spec_tokens=max_spec_tokens,
                                     max_spec_factor=max_spec_factor, min_token_prob=min_token_prob,
                                     use_tree_spec=tree)
            return Draft(d.token_ids, d.parents, d.probs, d.score, d.match_len, "arctic")

        def observe(self, req_id: Hashable, tokens: Sequence[int]) -> None:
            self.cache.add_active_response(req_id, tokens)
            self.ctx[req_id].extend(tokens)

        def finish_request(self, req_id: Hashable) -> None:
            self.cache.stop_request(req_id)
            del self.ctx[req_id]

    import arctic_inference

    where = getattr(arctic_inference, "__file__", "?")
    return ArcticDrafter, f"ArcticInference: imported from {where}"


# ============================================================================ traces (byte tokens)

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "number group problem fact be have do say get make go know take see come think look want give use find "
         "tell ask seem feel try leave call good new first last long great little own other old right big high "
         "different small large next early young important few public bad same able value result table index "
         "request model token cache layer batch graph kernel buffer stream shape count score state order limit "
         "draft verify accept reject sample parse render update delete insert select filter merge split").split()


def _words(rng: random.Random, n: int) -> list[str]:
    # Zipf-ish: frequent words repeat, as in text
    return [WORDS[min(int(rng.paretovariate(1.1)) - 1, len(WORDS) - 1) if rng.random() < 0.5
                  else rng.randrange(len(WORDS))] for _ in range(n)]


def _sentence(rng: random.Random) -> str:
    w = _words(rng, rng.randint(6, 16))
    return " ".join(w).capitalize() + rng.choice([".", ".", ".", "?", "!"])


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def _ident(rng: random.Random) -> str:
    return "_".join(rng.sample(WORDS, rng.randint(1, 3)))


def _source(rng: random.Random, funcs: int) -> list[str]:
    lines = ["import math", "from collections import defaultdict", ""]
    for _ in range(funcs):
        args = [_ident(rng) for _ in range(rng.randint(1, 3))]
        lines += ["", f"def {_ident(rng)}({', '.join(args)}):", f'    """{_sentence(rng)}"""']
        names = list(args)
        for _ in range(rng.randint(3, 8)):
            kind = rng.random()
            v = _ident(rng)
            if kind < 0.4:
                lines.append(f"    {v} = {rng.choice(names)} * {rng.randint(2, 99)} + {rng.choice(names)}")
            elif kind < 0.6:
                lines.append(f"    if {rng.choice(names)} > {rng.randint(0, 9)}:")
                lines.append(f"        {v} = math.sqrt({rng.choice(names)})")
            elif kind < 0.8:
                lines.append(f"    {v} = defaultdict(list)")
                lines.append(f"    for item in {rng.choice(names)}:")
                lines.append(f"        {v}[item].append({rng.choice(names)})")
            else:
                lines.append(f"    {v} = [{rng.choice(names)} for _ in range({rng.randint(1, 9)})]")
            names.append(v)
        lines.append(f"    return {rng.choice(names[len(args):])}")
    return lines


def _edit_source(rng: random.Random, lines: list[str]) -> tuple[str, list[str]]:
    """One requested edit: rename an identifier everywhere, change constants, add or drop a function."""
    out = list(lines)
    kind = rng.randrange(4)
    if kind == 0:
        defs = [ln.split("(")[0][4:] for ln in out if ln.startswith("def ")]
        old, new = rng.choice(defs), _ident(rng)
        return f"Rename the function `{old}` to `{new}`.", [ln.replace(old, new) for ln in out]
    if kind == 1:
        picks = rng.sample(range(len(out)), k=min(6, len(out)))
        for i in picks:
            if "* " in out[i]:
                a, b = out[i].split("* ", 1)
                out[i] = a + "* " + str(rng.randint(100, 999)) + b[b.index(" "):]
        return "Use three-digit factors in a few of the products.", out
    if kind == 2:
        at = rng.choice([i for i, ln in enumerate(out) if ln.startswith("def ")])
        return "Add a helper function before one of the functions.", out[:at] + _source(rng, 1)[3:] + [""] + out[at:]
    starts = [i for i, ln in enumerate(out) if ln.startswith("def ")]
    k = rng.randrange(len(starts) - 1)
    return "Remove one function that is no longer used.", out[: starts[k]] + out[starts[k + 1]:]


Trace = list[tuple[list[int], list[int]]]  # (prompt, response) per request, in order


def _b(text: str) -> list[int]:
    return list(text.encode())


def file_edits(seed: int = 0, requests: int = 4, funcs: int = 14) -> Trace:
    """Each request shows the current file and asks for one edit; the answer is the whole edited file."""
    rng = random.Random(seed)
    src = _source(rng, funcs)
    out: Trace = []
    for _ in range(requests):
        ask, new = _edit_source(rng, src)
        fence = "```"
        prompt = f"<|user|>\nHere is utils.py:\n{fence}python\n" + "\n".join(src) + f"\n{fence}\n{ask}\n<|assistant|>\n"
        response = f"Here is the updated file:\n{fence}python\n" + "\n".join(new) + f"\n{fence}\n"
        out.append((_b(prompt), _b(response)))
        src = new
    return out


def json_edits(seed: int = 1, requests: int = 4, records: int = 18) -> Trace:
    """Each request shows a JSON document and asks to change fields or records; the answer is the whole document."""
    rng = random.Random(seed)
    doc = {"version": 3, "records": [_record(rng, i) for i in range(records)]}
    out: Trace = []
    for _ in range(requests):
        new = json.loads(json.dumps(doc))
        recs = new["records"]
        kind = rng.randrange(3)
        if kind == 0:
            for r in rng.sample(recs, 3):
                r["score"] = round(rng.random() * 100, 2)
                r["active"] = not r["active"]
            ask = "Rescore three records and flip their active flag."
        elif kind == 1:
            recs.insert(rng.randrange(len(recs)), _record(rng, 100 + rng.randrange(900)))
            ask = "Add a record."
        else:
            for r in recs:
                r["tags"] = sorted(set(r["tags"]) | {"reviewed"}) if rng.random() < 0.4 else r["tags"]
            ask = "Tag some records as reviewed."
        new["version"] += 1
        prompt = "<|user|>\n" + json.dumps(doc, indent=2) + f"\n{ask} Reply with the full JSON.\n<|assistant|>\n"
        out.append((_b(prompt), _b(json.dumps(new, indent=2) + "\n")))
        doc = new
    return out


def _record(rng: random.Random, i: int) -> dict[str, Any]:
    name = " ".join(rng.sample(WORDS, 2)).title()
    return {"id": i, "name": name, "email": name.lower().replace(" ", ".") + "@example.com",
            "tags": sorted(rng.sample(WORDS[-30:], rng.randint(1, 3))), "score": round(rng.random() * 100, 2),
            "active": rng.random() < 0.5}


def chat_requotes(seed: int = 2, turns: int = 5) -> Trace:
    """A chat whose answers quote earlier turns (block quotes and inline quotes) between fresh sentences; every
    prompt is the whole conversation so far."""
    rng = random.Random(seed)
    history = ""
    said: list[str] = []
    out: Trace = []
    for _ in range(turns):
        user = _paragraph(rng, rng.randint(4, 8))
        said.append(user)
        history += f"<|user|>\n{user}\n<|assistant|>\n"
        parts = []
        for _ in range(rng.randint(3, 5)):
            src = rng.choice(said)
            sents = src.split(". ")
            a = rng.randrange(len(sents))
            quote = ". ".join(sents[a : a + rng.randint(1, 3)])
            parts.append(rng.choice([f"> {quote}\n\n", f'You wrote "{quote}", and '
                                     f"{_sentence(rng).lower()}\n"]))
            parts.append(_paragraph(rng, rng.randint(1, 2)) + "\n")
        answer = "".join(parts)
        out.append((_b(history), _b(answer)))
        said.append(answer)
        history += answer + "\n"
    return out


TRACES: dict[str, Callable[[], Trace]] = {"file_edits": file_edits, "json_edits": json_edits,
                                          "chat_requotes": chat_requotes}


# ============================================================================ replay


def accept_known(draft: Draft, target: Sequence[int]) -> list[int]:
    """Longest root-to-node path of the draft tree that spells a prefix of the known continuation."""
    kids: dict[int, dict[int, int]] = {}
    for i, (t, p) in enumerate(zip(draft.tokens, draft.parents)):
        kids.setdefault(p, {}).setdefault(t, i)
    path: list[int] = []
    cur = -1
    while len(path) < len(target):
        nxt = kids.get(cur, {}).get(target[len(path)])
        if nxt is None:
            break
        path.append(nxt)
        cur = nxt
    return path


def replay(drafter: Any, trace: Trace, max_spec_tokens: int, max_spec_factor: float = 1.0,
           min_token_prob: float = 0.1, tree: bool = False, tag: str = "r") -> dict[str, Any]:
    """Replay every request of a trace; per-step host times in seconds and emitted tokens per step."""
    clock = time.perf_counter
    steps = tokens = 0
    t_draft = t_append = t_start = 0.0
    for i, (prompt, response) in enumerate(trace):
        rid = f"{tag}{i}"
        t0 = clock()
        drafter.start_request(rid, prompt)
        t_start += clock() - t0
        out: list[int] = []
        while len(out) < len(response):
            t0 = clock()
            d = drafter.draft(rid, max_spec_tokens=max_spec_tokens, max_spec_factor=max_spec_factor,
                              min_token_prob=min_token_prob, tree=tree)
            t1 = clock()
            target = response[len(out):]
            new = [d.tokens[j] for j in accept_known(d, target)]
            if len(new) < len(target):
                new.append(target[len(new)])
            t2 = clock()
            drafter.observe(rid, new)
            t3 = clock()
            t_draft += t1 - t0
            t_append += t3 - t2
            out += new
            steps += 1
            tokens += len(new)
        drafter.finish_request(rid)
        assert out == response
    return {"steps": steps, "tokens": tokens, "tok_per_step": tokens / steps, "draft": t_draft / steps,
            "append": t_append / steps, "step": (t_draft + t_append) / steps, "start": t_start / len(trace)}


def tokens_per_step(make_drafter: Callable[[], Any], trace: Trace, **kw: Any) -> float:
    return replay(make_drafter(), trace, **kw)["tok_per_step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="round-robin runs per drafter; the fastest is kept")
    ap.add_argument("--old-repeats", type=int, default=1, help="runs of the old drafter (seconds per replay)")
    ap.add_argument("--settings", default="16:1.0,32:1.0,16:4.0",
                    help="comma-separated max_spec_tokens:max_spec_factor pairs (factor 1.0: ArcticInference's "
                    "default; 4.0: braze's speculative runner)")
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--min-prob", type=float, default=0.1)
    ap.add_argument("--tree", action="store_true", help="tree drafts instead of path drafts")
    ap.add_argument("--quick", action="store_true", help="one setting, one repeat (a smoke run)")
    ap.add_argument("--note", default="", help="a line printed under the header (e.g. how arctic_inference was built)")
    args = ap.parse_args()
    arctic, arctic_line = arctic_factory()
    drafters: dict[str, Callable[[], Any]] = {
        "old": lambda: OldSuffixDrafter(args.depth), "new": lambda: SuffixDrafter(args.depth),
        "new64": lambda: SuffixDrafter(args.depth, count_depth=args.depth)}
    if arctic is not None:
        drafters["arctic"] = lambda: arctic(args.depth)
    settings = [(16, 1.0)] if args.quick else [(int(a), float(b)) for a, b in
                                                (x.split(":") for x in args.settings.split(","))]
    repeats = 1 if args.quick else args.repeats
    traces = {name: make() for name, make in TRACES.items()}
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start; host wall time per step = draft + append (observe), best of {repeats} "
          f"round-robin runs; depth {args.depth}, min_token_prob {args.min_prob}, "
          f"{'tree' if args.tree else 'path'} drafts; byte tokens")
    print(arctic_line)
    if args.note:
        print(args.note)
    for name, trace in traces.items():
        print(f"trace {name}: {len(trace)} requests, prompts {sum(len(p) for p, _ in trace)} tokens, responses "
              f"{sum(len(r) for _, r in trace)} tokens")
    ref = "arctic" if arctic is not None else "old"
    head = (f"{'trace':14s} {'spec':>4s} {'fac':>4s} {'drafter':7s} {'steps':>6s} {'tok/step':>8s} "
            f"{'draft us':>9s} {'append us':>9s} {'step us':>9s} {'start ms':>9s} {'step/' + ref:>12s} "
            f"{'tok/step/' + ref:>15s}")
    for spec, factor in settings:
        print()
        print(head)
        for name, trace in traces.items():
            best: dict[str, dict[str, Any]] = {}
            for rep in range(repeats):
                for label, make in drafters.items():
                    if label == "old" and rep >= args.old_repeats:
                        continue
                    r = replay(make(), trace, spec, factor, args.min_prob, args.tree)
                    if label not in best:
                        best[label] = r
                    else:
                        assert r["steps"] == best[label]["steps"]  # deterministic drafts
                        for k in ("draft", "append", "step", "start"):
                            best[label][k] = min(best[label][k], r[k])
            for label, r in best.items():
                print(f"{name:14s} {spec:4d} {factor:4.1f} {label:7s} {r['steps']:6d} {r['tok_per_step']:8.2f} "
                      f"{r['draft'] * 1e6:9.1f} {r['append'] * 1e6:9.1f} {r['step'] * 1e6:9.1f} "
                      f"{r['start'] * 1e3:9.2f} {r['step'] / best[ref]['step']:11.2f}x "
                      f"{r['tok_per_step'] / best[ref]['tok_per_step']:14.3f}x", flush=True)
    print("\nsteps: draft-verify steps over all requests; tok/step: emitted tokens (accepted drafts + bonus) per step; "
          "draft/append/step us: host microseconds per step; start ms: prompt ingestion per request")


if __name__ == "__main__":
    main()
